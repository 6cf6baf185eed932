"""The decoder stack (dense / MoE layers), multi-token-prediction modules, and forward with a cache."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..sharding.rules import constrain
from .attention import GQA, MLA, Causal, causal_mask, sequence_shards, zigzag_order
from .config import ModelConfig
from .layers import ACT_BTD, DTYPES, MLP, RMSNorm, param
from .moe import MoE, Routing


class Output(NamedTuple):
  logits_BTV: jax.Array  # float32
  hidden_BTD: jax.Array  # last hidden state after the final norm
  cache: Any  # updated cache (None without one)
  routing: tuple[Routing, ...]  # one per MoE layer (main stack), in layer order
  mtp_logits: tuple[jax.Array, ...]  # depth k predicts token t+k+1 at position t (last k+1 invalid)
  mtp_routing: tuple[Routing, ...]


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, moe: bool, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg, rngs)
    self.attn = MLA(cfg, rngs) if cfg.is_mla else GQA(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.hidden_size, cfg, rngs)
    self.is_moe = moe
    self.mlp = MoE(cfg, rngs) if moe else MLP(cfg, cfg.intermediate_size, rngs)

  def __call__(self, x_BTD, positions_BT, mask_BTS, cache=None, experts_BTK=None):
    h, cache = self.attn(self.attn_norm(x_BTD), positions_BT, mask_BTS, cache)
    x_BTD = x_BTD + h
    if self.is_moe:
      h, routing = self.mlp(self.mlp_norm(x_BTD), experts_BTK)
    else:
      h, routing = self.mlp(self.mlp_norm(x_BTD)), None
    return constrain(x_BTD + h, ACT_BTD), cache, routing


class MTPModule(nnx.Module):
  """h' = Block(eh_proj([enorm(emb(t_{i+k})) ; hnorm(h)])), embedding first as in real checkpoints."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.enorm = RMSNorm(d, cfg, rngs)
    self.hnorm = RMSNorm(d, cfg, rngs)
    self.eh_proj = param(rngs, (2 * d, d), (None, "embed"), cfg)
    self.block = DecoderLayer(cfg, cfg.n_routed_experts > 0, rngs)
    self.head_norm = RMSNorm(d, cfg, rngs)
    self.dtype = DTYPES[cfg.dtype]

  def __call__(self, h_BTD, emb_BTD, positions_BT, mask_BTS):
    x = jnp.concatenate([self.enorm(emb_BTD), self.hnorm(h_BTD)], axis=-1) @ self.eh_proj[...].astype(self.dtype)
    x, _, routing = self.block(x, positions_BT, mask_BTS)
    return x, routing


class Transformer(nnx.Module):
  """`model(tokens_BT)` -> logits [B, T, V] float32; `model.forward(...)` returns everything (`Output`)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg)
    self.layers = nnx.List([DecoderLayer(cfg, cfg.is_moe_layer(i), rngs) for i in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg, rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg)
    self.mtp = nnx.List([MTPModule(cfg, rngs) for _ in range(cfg.num_nextn_predict_layers)])
    if cfg.score_head:  # zero-initialised: a fresh reward model scores every sequence alike
      self.score = param(rngs, (cfg.hidden_size, 1), ("embed", None), cfg, init="zeros")
    self.dtype = DTYPES[cfg.dtype]

  def __call__(self, tokens_BT):
    return self.forward(tokens_BT).logits_BTV

  def head(self, h_BTD):
    w = self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
    logits_BTV = (h_BTD @ w.astype(self.dtype)).astype(jnp.float32)
    return constrain(logits_BTV, ("act_batch", "act_seq", "act_vocab"))

  def scores(self, h_BTD):
    """Per-position scalar scores [B, T] float32 of the score head (`score_head` models) on final hidden states."""
    if not self.cfg.score_head:
      raise ValueError("the model has no score head (model.score_head=false)")
    return (h_BTD.astype(jnp.float32) @ self.score[...].astype(jnp.float32))[..., 0]

  def embed_tokens(self, tokens_BT):
    return constrain(self.embed[...].astype(self.dtype)[tokens_BT], ACT_BTD)

  def forward(
    self,
    tokens_BT,
    *,
    positions_BT=None,
    segment_ids_BT=None,
    cache=None,
    mtp: bool = False,
    replay_experts=None,
    last_only: bool = False,
    remat: bool = False,
    prefill: bool = False,
  ) -> Output:
    """tokens [B, T] int32. With `cache` (from `init_cache`) tokens are written at slots `positions`.

    `prefill` (with a cache; no positions / segment ids): the tokens are each row's positions 0..T-1 (a prompt,
    right padding allowed), written at slots 0..T-1. They attend only among themselves, through the training
    path: a `Causal` mask instead of a dense [B, T, S] one, blockwise for long prompts and sequence-parallel
    (zig-zag, below) on a mesh that splits T; the cache comes back in slot order. Without it a cached call
    (decode: T new tokens at any positions) attends over the whole cache with a dense mask.

    `segment_ids_BT` keeps packed documents apart; `replay_experts` (one [B, T, K] per MoE layer) forces
    the routing chosen at sampling time; `mtp` also runs the multi-token-prediction modules;
    `last_only` computes logits for the last position only (prefill); `remat` recomputes each block's
    activations in the backward pass instead of storing them (training memory for compute).
    Without a cache (or in a prefill) on a mesh that splits T over "sequence" (n shards, 2n dividing T), the main
    stack runs on the row in zig-zag order (models/attention.py); outputs come back in the original order. MoE capacity
    dispatch (moe_capacity_factor set) ranks tokens in the order it sees them, so what overflows can differ
    from sequence=1; dropless (the default) is exact."""
    B, T = tokens_BT.shape
    cache_len = None if cache is None else cache[0][next(iter(cache[0]))].shape[1]
    if prefill:
      if cache is None:
        raise ValueError("forward(prefill=True) needs a cache (model.init_cache) to write the prompt into")
      if positions_BT is not None or segment_ids_BT is not None:
        raise ValueError(
          "forward(prefill=True) writes positions 0..T-1 of one document a row: pass no positions_BT / segment_ids_BT"
        )
      if T > cache_len:
        raise ValueError(f"forward(prefill=True): {T} tokens do not fit the cache's {cache_len} slots")
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    decode = cache is not None and not prefill  # a dense [B, T, S] mask over the whole cache
    perm = None if decode else zigzag_order(T, sequence_shards(T))
    if decode:
      mask = causal_mask(positions_BT, segment_ids_BT, cache_len)
    elif perm is None:
      mask = Causal(segment_ids_BT)  # implicit: attention picks dense or blockwise by T
    else:
      # ZIG-ZAG: the stack runs on the row permuted so that each sequence shard holds chunks i and 2n-1-i
      # (balanced causal work); attention masks by the original indices, the outputs are put back below.
      seg_p = None if segment_ids_BT is None else segment_ids_BT[:, perm]
      mask = Causal(seg_p, jnp.broadcast_to(jnp.asarray(perm, jnp.int32), (B, T)))
      tokens_BT, positions_BT = tokens_BT[:, perm], positions_BT[:, perm]
      replay_experts = None if replay_experts is None else [r[:, perm] for r in replay_experts]
    x = self.embed_tokens(tokens_BT)
    new_cache, routing = [], []
    moe_i = 0
    call = _remat_layer if remat else _call_layer
    for i, layer in enumerate(self.layers):
      replay = None
      if layer.is_moe and replay_experts is not None:
        replay, moe_i = replay_experts[moe_i], moe_i + 1
      x, c, r = call(layer, x, positions_BT, mask, None if cache is None else cache[i], replay)
      new_cache.append(c)
      if r is not None:
        routing.append(r)
    if perm is not None:  # back to the original order
      inv = np.argsort(perm)
      x, tokens_BT, positions_BT = x[:, inv], tokens_BT[:, inv], positions_BT[:, inv]
      routing = [Routing(*(a[:, inv] for a in r)) for r in routing]
    h = constrain(self.norm(x), ACT_BTD)
    logits = self.head(h[:, -1:] if last_only else h)
    mtp_logits, mtp_routing = [], []
    if mtp:
      mtp_mask = Causal(segment_ids_BT)  # MTP attends in the original order (contiguous sequence split)
      hk = h
      for k, module in enumerate(self.mtp, start=1):
        next_tokens = jnp.roll(tokens_BT, -k, axis=1)  # t_{i+k}; the last k positions wrap (invalid)
        hk, r = module(hk, self.embed_tokens(next_tokens), positions_BT, mtp_mask)
        mtp_logits.append(self.head(module.head_norm(hk)))
        if r is not None:
          mtp_routing.append(r)
    return Output(
      logits, h, None if cache is None else new_cache, tuple(routing), tuple(mtp_logits), tuple(mtp_routing)
    )

  def init_cache(self, batch: int, length: int, dtype=None):
    """A zeroed cache for `batch` rows of `length` slots (MLA: kv_lora + rope numbers a token a layer)."""
    dtype = dtype or self.dtype
    return [layer.attn.init_cache(batch, length, dtype) for layer in self.layers]


def _call_layer(layer, x, positions, mask, cache, replay):
  return layer(x, positions, mask, cache, replay)


def _remat_layer(layer, *args):
  """jax.checkpoint over a functional view of the layer (forward never writes module state)."""
  graphdef, state = nnx.split(layer)
  return jax.checkpoint(lambda st, *a: nnx.merge(graphdef, st)(*a))(state, *args)


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
  return Transformer(cfg, nnx.Rngs(params=seed))


def abstract(cfg: ModelConfig) -> Transformer:
  """The model's shapes only (`jax.eval_shape`): nothing is allocated (used for the 671B preset)."""
  return nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0)))


def count_params(model: nnx.Module) -> int:
  state = nnx.state(model, nnx.Param)
  return sum(int(x.size) for x in jax.tree.leaves(state))
