"""The decoder stack (dense / MoE layers), multi-token-prediction modules, and forward with a cache.

The stack is stored and run by layer groups (`ModelConfig.layer_groups`: DeepSeek-V3's dense-first layers, then
its MoE layers; a dense model has one group). A group is one `DecoderLayer` whose every parameter carries a
leading "layers" axis (never split by the sharding rules), and it runs as one `lax.scan` over that axis, so the
compiled program holds one layer body per group whatever the depth (MaxText's `scan_layers`); with
`cfg.scan_layers=False` the same stacked parameters run through an unrolled Python loop (one body per layer:
compile time grows with depth; same numbers). The cache follows the groups: `{group: {name: [L, B, S, ...]}}`.
The MTP modules stay separate modules (one each)."""

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
  routing: Routing | None  # the main stack's MoE layers, stacked: [L_moe, B, T, ...] (None for dense models)
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
    # Layers are initialised one by one (the random streams of an unstacked stack), then stacked per group.
    layers = [DecoderLayer(cfg, cfg.is_moe_layer(i), rngs) for i in range(cfg.num_hidden_layers)]
    for name, idx in cfg.layer_groups():
      setattr(self, name, stack_modules([layers[i] for i in idx]))
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

    `segment_ids_BT` keeps packed documents apart; `replay_experts` [B, T, L_moe, K] (the sampler's layout)
    forces the routing chosen at sampling time in the main stack's MoE layers; `mtp` also runs the
    multi-token-prediction modules; `last_only` computes logits for the last position only (prefill); `remat`
    recomputes each block's activations in the backward pass instead of storing them (training memory for
    compute). Without a cache (or in a prefill) on a mesh that splits T over "sequence" (n shards, 2n dividing T),
    the main stack runs on the row in zig-zag order (models/attention.py); outputs come back in the original
    order. MoE capacity dispatch (moe_capacity_factor set) ranks tokens in the order it sees them, so what
    overflows can differ from sequence=1; dropless (the default) is exact."""
    B, T = tokens_BT.shape
    cache_len = None if cache is None else cache_length(cache)
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
      replay_experts = None if replay_experts is None else replay_experts[:, perm]
    x = self.embed_tokens(tokens_BT)
    new_cache, routing = {}, None
    for name, _ in self.cfg.layer_groups():
      stack = getattr(self, name)
      replay = None
      if stack.is_moe and replay_experts is not None:
        replay = jnp.moveaxis(replay_experts, 2, 0).astype(jnp.int32)  # [L, B, T, K]: the scan's axis first
      layer_cache = None if cache is None else cache[name]
      x, (new_cache[name], r) = run_layers(
        stack, x, positions_BT, mask, layer_cache, replay, remat=remat, scan=self.cfg.scan_layers
      )
      routing = r if r is not None else routing
    if perm is not None:  # back to the original order
      inv = np.argsort(perm)
      x, tokens_BT, positions_BT = x[:, inv], tokens_BT[:, inv], positions_BT[:, inv]
      routing = None if routing is None else Routing(*(a[:, :, inv] for a in routing))
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
    return Output(logits, h, None if cache is None else new_cache, routing, tuple(mtp_logits), tuple(mtp_routing))

  def layer(self, i: int) -> DecoderLayer:
    """Decoder layer i as a module of its own: a read-only view over its slice of the stacked parameters."""
    for name, idx in self.cfg.layer_groups():
      if i in idx:
        graphdef, state = nnx.split(getattr(self, name))
        return nnx.merge(graphdef, jax.tree.map(lambda a, j=i - idx.start: a[j], state))
    raise IndexError(f"layer {i} of a {self.cfg.num_hidden_layers}-layer model")

  def init_cache(self, batch: int, length: int, dtype=None):
    """A zeroed cache for `batch` rows of `length` slots, per layer group: {group: {name: [L, B, S, ...]}} (MLA:
    kv_lora + rope numbers a token a layer)."""
    dtype = dtype or self.dtype
    out = {}
    for name, idx in self.cfg.layer_groups():
      one = getattr(self, name).attn.init_cache(batch, length, dtype)
      out[name] = {k: jnp.zeros((len(idx),) + a.shape, a.dtype) for k, a in one.items()}
    return out


def cache_length(cache) -> int:
  """Slots S of a stacked cache (every leaf [L, B, S, ...])."""
  return jax.tree.leaves(cache)[0].shape[2]


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
  """One module of the modules' common structure whose every Variable holds their values stacked on a new
  leading axis, named "layers" in its logical axes (the sharding rules never split it)."""
  graphdef = nnx.split(modules[0])[0]
  flats = [dict(nnx.to_flat_state(nnx.state(m))) for m in modules]
  out = {}
  for path, v in flats[0].items():
    axes = v.get_metadata().get("axes")
    value = jnp.stack([f[path].get_value() for f in flats])
    out[path] = v.replace(value, axes=None if axes is None else ("layers", *axes))
  return nnx.merge(graphdef, nnx.from_flat_state(out))


def run_layers(stack: DecoderLayer, x, positions, mask, cache, replay, *, remat: bool, scan: bool):
  """x through a group's layers (parameters, `cache` and `replay` all stacked on axis 0) -> (x, (cache, routing)),
  cache and routing stacked the same way (None where absent): one `lax.scan` body, or unrolled (`scan=False`).
  `remat`: each layer's activations are recomputed in the backward pass instead of stored."""
  graphdef, state = nnx.split(stack)

  def body(x, xs):
    st, c, rep = xs
    y, c, r = nnx.merge(graphdef, st)(x, positions, mask, c, rep)
    return y, (c, None if r is None else Routing(*r))

  if remat:
    body = jax.checkpoint(body, prevent_cse=not scan)  # a scan's iterations never CSE the recomputation away
  if scan:
    return jax.lax.scan(body, x, (state, cache, replay))
  ys = []
  for i in range(jax.tree.leaves(state)[0].shape[0]):
    x, y = body(x, jax.tree.map(lambda a, i=i: a[i], (state, cache, replay)))
    ys.append(y)
  return x, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
  return Transformer(cfg, nnx.Rngs(params=seed))


def abstract(cfg: ModelConfig) -> Transformer:
  """The model's shapes only (`jax.eval_shape`): nothing is allocated (used for the 671B preset)."""
  return nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0)))


def count_params(model: nnx.Module) -> int:
  state = nnx.state(model, nnx.Param)
  return sum(int(x.size) for x in jax.tree.leaves(state))
