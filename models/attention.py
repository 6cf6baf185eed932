"""Attention: MLA (naive path for training / prefill, absorbed latent-cache path for decode) and GQA, with a cache.

Cache layout (one dict per layer; slot s holds the token at position s of its row):
  MLA: {"c": [B, S, kv_lora] normed latent, "k_pe": [B, S, rope] rotated shared rope key}
  GQA: {"k": [B, S, Hkv, hd], "v": [B, S, Hkv, hd]}
A call with a cache and a dense [B, T, S] mask (decode) writes its T new tokens at slots positions[:, 0] ...
positions[:, 0] + T - 1 of each row, then attends to every slot <= the query's position, so right-padded prompts
of different lengths need no left padding: a row's pad slots are overwritten before any later query can see them.
A call with a cache and a `Causal` mask is a PREFILL: the T tokens are the row's positions 0..T-1 (in the order of
`Causal.idx_BT`), so they attend only among themselves, exactly as the training path below (blockwise for long
rows, sequence-parallel on a splitting mesh: no [T, S] scores), and are written at slots 0..T-1 (MLA: c, k_pe;
GQA: K, V), a zig-zag row put back in order. Right-padded prompts are fine: padding only follows real tokens.

Training calls (no cache) and prefills get a `Causal` mask (segment ids + global token indices), never a [T, T] array:
  * T < BLOCKWISE_MIN_T on one shard: the dense path (scores [B, H, T, T]) as before;
  * longer rows: `blockwise_attention`, an online softmax over BLOCK x BLOCK tiles (flash-attention style, pure
    jnp): a scan over query blocks, each a scan over key blocks, both rematerialised, so neither the scores nor
    the backward's residuals ever hold more than one tile; key blocks entirely after the query block are
    skipped by `lax.cond` (half the work of a causal row);
  * a mesh whose "act_seq" rule splits T (the `sequence` axis): `_seq_parallel`, a shard_map in which each
    device keeps its queries and all-gathers over the sequence axis only what keys/values are made from:
    MLA's normed latent + rope key (kv_lora + rope numbers a token, 576 at V3 size, expanded per key block
    inside the scan), GQA's K/V. The causal mask uses the tokens' global indices, so the split may be any
    permutation: the transformer feeds a zig-zag one (models/transformer.py) that balances the causal work.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from ..sharding.rules import constrain, mesh_axes
from .config import ModelConfig
from .layers import ACT_BTH, DTYPES, RMSNorm, param
from .rope import Rope, softmax_scale

NEG_INF = -1e30
BLOCKWISE_MIN_T = 1024  # training / prefill rows at least this long attend blockwise (read at trace time)
BLOCK = 512  # query / key tile of the blockwise path


class Causal(NamedTuple):
  """The training mask, kept implicit: query t sees key s iff idx[s] <= idx[t] and their segments match.
  `idx_BT` are the tokens' indices in the original row (None: 0..T-1); they differ from the array order when
  the transformer permutes the row for a zig-zag sequence split. `segment_ids_BT` None: one document a row."""

  segment_ids_BT: jax.Array | None = None
  idx_BT: jax.Array | None = None

  def parts(self, B: int, T: int):
    """(idx, segment ids), each [B, T] int32, with the defaults filled in."""
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) if self.idx_BT is None else self.idx_BT
    seg = jnp.zeros((B, T), jnp.int32) if self.segment_ids_BT is None else self.segment_ids_BT
    return idx.astype(jnp.int32), seg.astype(jnp.int32)

  def dense(self, B: int, T: int):
    """The boolean [B, T, T] mask (the short-row path)."""
    idx, seg = self.parts(B, T)
    return (idx[:, None, :] <= idx[:, :, None]) & (seg[:, :, None] == seg[:, None, :])


def causal_mask(positions_BT, segment_ids_BT=None, cache_len: int | None = None):
  """Boolean mask [B, T, S]: training (no cache) is causal by index within a segment; with a cache of
  `cache_len` slots a query at position p sees slots <= p."""
  B, T = positions_BT.shape
  if cache_len is not None:
    return jnp.arange(cache_len)[None, None, :] <= positions_BT[:, :, None]
  mask = jnp.tril(jnp.ones((T, T), bool))[None]
  if segment_ids_BT is not None:
    mask = mask & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
  return jnp.broadcast_to(mask, (B, T, T))


def write_cache(cache_BS, new_BT, start_B):
  """Writes new_BT[b] into cache_BS[b] at slot start_B[b] (the cache has the same trailing dims)."""
  return jax.vmap(lambda c, u, s: jax.lax.dynamic_update_slice_in_dim(c, u.astype(c.dtype), s, axis=0))(
    cache_BS, new_BT, start_B
  )


def write_prefill(cache_BS, new_BT, causal: Causal):
  """Writes a prefill's T tokens at slots 0..T-1 of every row: token t goes to slot idx[t] (a permuted row,
  e.g. zig-zag, is put back in order)."""
  if causal.segment_ids_BT is not None:
    raise ValueError("a prefill (cache + Causal mask) holds one document a row: segment_ids_BT must be None")
  if causal.idx_BT is not None:
    new_BT = jax.vmap(lambda u, i: u[i])(new_BT, jnp.argsort(causal.idx_BT, axis=1))
  return jax.lax.dynamic_update_slice_in_dim(cache_BS, new_BT.astype(cache_BS.dtype), 0, axis=1)


def _as_cached(x, cache_BS, dtype):
  """x as the cache will hold it (its dtype), so a prefill attends to what later decode steps read back."""
  return x.astype(cache_BS.dtype).astype(dtype)


def _softmax(scores, mask_B1TS):
  scores = jnp.where(mask_B1TS, scores.astype(jnp.float32), NEG_INF)
  return jax.nn.softmax(scores, axis=-1)


# ------------------------------------------------------------------ blockwise attention (online softmax)
def _scores(q_parts, k_parts):
  """Scores [B, K, G, T, S] float32 summed over parts: q [B, T, K, G, d] with k [B, S, K, d] or, shared by
  every head, [B, S, d] (MLA's rope key)."""
  s = 0.0
  for q, k in zip(q_parts, k_parts):
    spec = "btkgd,bskd->bkgts" if k.ndim == 4 else "btkgd,bsd->bkgts"
    s = s + jnp.einsum(spec, q, k).astype(jnp.float32)
  return s


def _tile(carry, qb, kb, weights, expand, scale):
  """One (query block, key block) tile of the online softmax: rescale by the new running max, accumulate."""
  m, l, acc = carry
  q_parts, q_idx, q_seg = qb
  src, k_idx, k_seg = kb
  k_parts, v = expand(weights, src)
  mask = ((k_idx[:, None, :] <= q_idx[:, :, None]) & (k_seg[:, None, :] == q_seg[:, :, None]))[:, None, None]
  s = jnp.where(mask, _scores(q_parts, k_parts) * scale, NEG_INF)
  # The result does not depend on the running max (it cancels), so no gradient flows through it.
  m_new = jax.lax.stop_gradient(jnp.maximum(m, s.max(-1)))
  p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
  corr = jnp.exp(m - m_new)
  acc = acc * corr[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), v).astype(jnp.float32)
  return m_new, l * corr + p.sum(-1), acc


def _pad(a, n: int, value):
  """Pads dim 1 of `a` up to a multiple of n with `value`."""
  extra = -a.shape[1] % n
  if not extra:
    return a
  return jnp.pad(a, [(0, 0), (0, extra)] + [(0, 0)] * (a.ndim - 2), constant_values=value)


def _blocks(a, n: int):
  """[B, N*n, ...] -> [N, B, n, ...]: the scan axis first."""
  return a.reshape(a.shape[0], a.shape[1] // n, n, *a.shape[2:]).swapaxes(0, 1)


def blockwise_attention(q_parts, src, weights, expand, q_idx, q_seg, k_idx, k_seg, scale, block: int | None = None):
  """Exact attention [B, T, K, G, Dv] without a [T, S] score matrix: queries `q_parts` (each [B, T, K, G, d]),
  keys/values `expand(weights, src_block) -> (k_parts, v [B, s, K, Dv])` made per key block from `src` (each
  leaf [B, S, ...]), mask by global indices and segment ids ([B, T] / [B, S] int32). Key blocks wholly after
  the query block are skipped; every query must see at least one key (true of causal training rows)."""
  block = block or BLOCK
  B, T, K, G = q_parts[0].shape[:4]
  bq, bk = min(block, T), min(block, k_idx.shape[1])
  qs = (tuple(_blocks(_pad(q, bq, 0), bq) for q in q_parts), _blocks(_pad(q_idx, bq, -1), bq))
  qs += (_blocks(_pad(q_seg, bq, 0), bq),)
  big = jnp.iinfo(jnp.int32).max  # padded keys come after every query: never seen
  ks = (jax.tree.map(lambda a: _blocks(_pad(a, bk, 0), bk), src), _blocks(_pad(k_idx, bk, big), bk))
  ks += (_blocks(_pad(k_seg, bk, 0), bk),)
  Dv = jax.eval_shape(expand, weights, jax.tree.map(lambda a: a[0], ks[0]))[1].shape[-1]

  def kv_step(qb, carry, kb):
    tile = lambda c: _tile(c, qb, kb, weights, expand, scale)
    return jax.lax.cond(kb[1].min() <= qb[1].max(), tile, lambda c: c, carry), None

  def q_step(_, qb):
    # Zeros derived from the queries: inside shard_map they then vary over the same mesh axes as the tiles.
    zero = (qb[0][0][..., 0] * 0).astype(jnp.float32).transpose(0, 2, 3, 1)  # [B, K, G, bq]
    init = (zero + NEG_INF, zero, jnp.broadcast_to(zero[..., None], (B, K, G, bq, Dv)))
    (_, l, acc), _ = jax.lax.scan(jax.checkpoint(lambda c, kb: kv_step(qb, c, kb)), init, ks)
    return None, (acc / jnp.where(l == 0, 1.0, l)[..., None]).transpose(0, 3, 1, 2, 4)

  _, o = jax.lax.scan(jax.checkpoint(q_step), None, qs)  # [N, B, bq, K, G, Dv]
  dtype = jax.eval_shape(expand, weights, jax.tree.map(lambda a: a[0], ks[0]))[1].dtype
  return o.swapaxes(0, 1).reshape(B, -1, K, G, Dv)[:, :T].astype(dtype)


def zigzag_order(T: int, n: int):
  """Original index of each slot of a row cut into n contiguous shards so that shard i holds chunks i and
  2n-1-i of 2n equal chunks: each shard then has the same causal work (2n+1 chunk pairs). None when n <= 1
  or 2n does not divide T (the plain contiguous split)."""
  if n <= 1 or T % (2 * n):
    return None
  c = T // (2 * n)
  return np.concatenate([np.arange(k * c, (k + 1) * c) for j in range(n) for k in (j, 2 * n - 1 - j)])


def sequence_shards(T: int) -> int:
  """How many ways the active mesh splits a training row of T tokens (the "act_seq" rule; 1 without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in mesh_axes("act_seq", size=T)) if not mesh.empty else 1


def use_blockwise(T: int) -> bool:
  return T >= BLOCKWISE_MIN_T or sequence_shards(T) > 1


def train_attention(q_parts, src, weights, expand, causal: Causal, scale, *, heads: str, src_heads: bool):
  """Attention of a training row [B, T, K, G, Dv]: blockwise on one shard, else a shard_map over the
  sequence axis that all-gathers `src` (what keys/values are made from; `src_heads`: its dim 2 is the K
  heads) and keeps the queries local. `weights` (dim 1 = heads) are what `expand` needs besides `src`."""
  B, T, K = q_parts[0].shape[:3]
  idx, seg = causal.parts(B, T)
  seq = mesh_axes("act_seq", size=T)
  if not seq:
    return blockwise_attention(q_parts, src, weights, expand, idx, seg, idx, seg, scale)
  batch, hd = mesh_axes("act_batch", size=B) or None, mesh_axes(heads, size=K) or None
  n = sequence_shards(T)
  chunk, block = (T // (2 * n) if T % (2 * n) == 0 else T // n), BLOCK
  while chunk % block:
    block //= 2  # tiles inside one zig-zag chunk, so the causal skip works

  def body(q_parts, src, weights, idx, seg):
    gather = lambda a: jax.lax.all_gather(a, seq, axis=1, tiled=True)
    kv = jax.tree.map(gather, src)
    # The weights are the same on every batch / sequence shard; marked varying here, so that the psum of
    # their gradient (the transpose of that mark) happens out here, not inside a skipped tile's lax.cond,
    # where devices that skip it would never join the collective.
    weights = jax.tree.map(lambda w: _pvary(w, (*(batch or ()), *seq)), weights)
    return blockwise_attention(q_parts, kv, weights, expand, idx, seg, gather(idx), gather(seg), scale, block)

  q_spec, tok = P(batch, seq, hd, None, None), P(batch, seq)
  src_spec = jax.tree.map(lambda a: P(batch, seq, hd if src_heads else None, *([None] * (a.ndim - 3))), src)
  w_spec = jax.tree.map(lambda a: P(None, hd, *([None] * (a.ndim - 2))), weights)
  fn = jax.shard_map(
    body,
    mesh=jax.sharding.get_abstract_mesh(),
    in_specs=(tuple(q_spec for _ in q_parts), src_spec, w_spec, tok, tok),
    out_specs=q_spec,
  )
  return fn(tuple(q_parts), src, weights, idx, seg)


def _pvary(x, axes):
  """x marked as varying over manual mesh `axes` (jax.lax.pcast in new jax, pvary before it)."""
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, axes, to="varying")
  return jax.lax.pvary(x, axes)


def _mla_expand(w, src):
  """Per-head keys (nope part; the rope key is shared) and values from MLA's latent."""
  (w_uk, w_uv), (c, k_pe) = w, src
  return (jnp.einsum("bsc,chn->bshn", c, w_uk), k_pe), jnp.einsum("bsc,chv->bshv", c, w_uv)


def _gqa_expand(_, src):
  k, v = src
  return (k,), v


def _dense_mask(mask, B: int, T: int):
  return mask.dense(B, T) if isinstance(mask, Causal) else mask


class MLA(nnx.Module):
  """Multi-head latent attention (DeepSeek-V2/V3). Weights stored [in, ..., out] with head axes split out."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, H = cfg.hidden_size, cfg.num_attention_heads
    self.cfg = cfg
    if cfg.q_lora_rank:
      self.q_a = param(rngs, (d, cfg.q_lora_rank), ("embed", "q_lora"), cfg)
      self.q_norm = RMSNorm(cfg.q_lora_rank, cfg, rngs, "q_lora")
      self.q_b = param(rngs, (cfg.q_lora_rank, H, cfg.qk_head_dim), ("q_lora", "heads", "head_dim"), cfg)
    else:
      self.q = param(rngs, (d, H, cfg.qk_head_dim), ("embed", "heads", "head_dim"), cfg)
    self.kv_a = param(rngs, (d, cfg.kv_lora_rank + cfg.qk_rope_head_dim), ("embed", "kv_lora"), cfg)
    self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg, rngs, "kv_lora")
    self.kv_b = param(
      rngs, (cfg.kv_lora_rank, H, cfg.qk_nope_head_dim + cfg.v_head_dim), ("kv_lora", "heads", "head_dim"), cfg
    )
    self.o = param(rngs, (H, cfg.v_head_dim, d), ("heads", "head_dim", "embed"), cfg)
    self.rope = Rope(cfg)
    self.scale = softmax_scale(cfg)
    self.dtype = DTYPES[cfg.dtype]

  def _project(self, x_BTD, positions_BT):
    cfg, dt = self.cfg, self.dtype
    if cfg.q_lora_rank:
      q_BTHK = jnp.einsum("btq,qhk->bthk", self.q_norm(x_BTD @ self.q_a[...].astype(dt)), self.q_b[...].astype(dt))
    else:
      q_BTHK = jnp.einsum("btd,dhk->bthk", x_BTD, self.q[...].astype(dt))
    q_BTHK = constrain(q_BTHK, ACT_BTH)
    q_nope, q_pe = q_BTHK[..., : cfg.qk_nope_head_dim], q_BTHK[..., cfg.qk_nope_head_dim :]
    ckv = x_BTD @ self.kv_a[...].astype(dt)
    c_BTC, k_pe_BTR = self.kv_norm(ckv[..., : cfg.kv_lora_rank]), ckv[..., cfg.kv_lora_rank :]
    cos, sin = self.rope.cos_sin(positions_BT)
    q_pe = self.rope.apply(q_pe, cos, sin)
    k_pe_BTR = self.rope.apply(k_pe_BTR[:, :, None, :], cos, sin)[:, :, 0, :]
    return q_nope, q_pe, c_BTC, k_pe_BTR

  def __call__(self, x_BTD, positions_BT, mask_BTS, cache=None):
    cfg, dt = self.cfg, self.dtype
    q_nope, q_pe, c_BTC, k_pe_BTR = self._project(x_BTD, positions_BT)
    w_kv = self.kv_b[...].astype(dt)
    w_uk, w_uv = w_kv[..., : cfg.qk_nope_head_dim], w_kv[..., cfg.qk_nope_head_dim :]
    B, T = positions_BT.shape
    new_cache, causal = None, isinstance(mask_BTS, Causal)
    if cache is not None and causal:
      # PREFILL: write the latent at slots 0..T-1, then attend among the T tokens as training does.
      new_cache = {
        "c": write_prefill(cache["c"], c_BTC, mask_BTS),
        "k_pe": write_prefill(cache["k_pe"], k_pe_BTR, mask_BTS),
      }
      c_BTC, k_pe_BTR = _as_cached(c_BTC, cache["c"], dt), _as_cached(k_pe_BTR, cache["k_pe"], dt)
    if causal and use_blockwise(T):
      # BLOCKWISE (long rows, sequence-parallel): keys/values expanded from the latent per key block.
      q_parts = (q_nope[:, :, :, None], q_pe[:, :, :, None])
      o = train_attention(
        q_parts, (c_BTC, k_pe_BTR), (w_uk, w_uv), _mla_expand, mask_BTS, self.scale, heads="act_heads", src_heads=False
      )
      o_BTHV = constrain(o[:, :, :, 0], ACT_BTH)
      return jnp.einsum("bthv,hvd->btd", o_BTHV, self.o[...].astype(dt)), new_cache
    mask = _dense_mask(mask_BTS, B, T)[:, None]
    if causal or cache is None:
      # NAIVE (training, short prefills): expand the latent into per-head keys and values.
      k_nope = jnp.einsum("bsc,chn->bshn", c_BTC, w_uk)
      v_BSHV = jnp.einsum("bsc,chv->bshv", c_BTC, w_uv)
      s = jnp.einsum("bthn,bshn->bhts", q_nope, k_nope) + jnp.einsum("bthr,bsr->bhts", q_pe, k_pe_BTR)
      p = _softmax(s * self.scale, mask).astype(dt)
      o_BTHV = jnp.einsum("bhts,bshv->bthv", p, v_BSHV)
    else:
      # ABSORBED: W_UK folds into the query and W_UV into the output; attend over the latent cache directly.
      start = positions_BT[:, 0]
      new_cache = {"c": write_cache(cache["c"], c_BTC, start), "k_pe": write_cache(cache["k_pe"], k_pe_BTR, start)}
      c_S, kpe_S = new_cache["c"].astype(dt), new_cache["k_pe"].astype(dt)
      q_lat = jnp.einsum("bthn,chn->bthc", q_nope, w_uk)
      s = jnp.einsum("bthc,bsc->bhts", q_lat, c_S) + jnp.einsum("bthr,bsr->bhts", q_pe, kpe_S)
      p = _softmax(s * self.scale, mask).astype(dt)
      o_BTHV = jnp.einsum("bthc,chv->bthv", jnp.einsum("bhts,bsc->bthc", p, c_S), w_uv)
    o_BTHV = constrain(o_BTHV, ACT_BTH)
    return jnp.einsum("bthv,hvd->btd", o_BTHV, self.o[...].astype(dt)), new_cache

  def init_cache(self, batch: int, length: int, dtype):
    cfg = self.cfg
    return {
      "c": jnp.zeros((batch, length, cfg.kv_lora_rank), dtype),
      "k_pe": jnp.zeros((batch, length, cfg.qk_rope_head_dim), dtype),
    }


class GQA(nnx.Module):
  """Grouped-query attention (Llama 3, Qwen2 with q/k/v bias)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, H, K, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.gqa_head_dim
    self.cfg = cfg
    self.q = param(rngs, (d, H, hd), ("embed", "heads", "head_dim"), cfg)
    self.k = param(rngs, (d, K, hd), ("embed", "kv_heads", "head_dim"), cfg)
    self.v = param(rngs, (d, K, hd), ("embed", "kv_heads", "head_dim"), cfg)
    if cfg.attention_bias:
      self.q_bias = param(rngs, (H, hd), ("heads", "head_dim"), cfg, init="zeros")
      self.k_bias = param(rngs, (K, hd), ("kv_heads", "head_dim"), cfg, init="zeros")
      self.v_bias = param(rngs, (K, hd), ("kv_heads", "head_dim"), cfg, init="zeros")
    self.o = param(rngs, (H, hd, d), ("heads", "head_dim", "embed"), cfg)
    self.rope = Rope(cfg)
    self.scale = softmax_scale(cfg)
    self.dtype = DTYPES[cfg.dtype]

  def __call__(self, x_BTD, positions_BT, mask_BTS, cache=None):
    cfg, dt = self.cfg, self.dtype
    q = jnp.einsum("btd,dhk->bthk", x_BTD, self.q[...].astype(dt))
    k = jnp.einsum("btd,dhk->bthk", x_BTD, self.k[...].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", x_BTD, self.v[...].astype(dt))
    if cfg.attention_bias:
      q, k, v = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
    cos, sin = self.rope.cos_sin(positions_BT)
    q, k = self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin)
    q = constrain(q, ACT_BTH)
    k, v = (constrain(a, ("act_batch", "act_seq", "act_kv_heads", None)) for a in (k, v))
    new_cache, causal = None, isinstance(mask_BTS, Causal)
    if cache is not None and causal:  # PREFILL: K/V at slots 0..T-1; attention among the T tokens below
      new_cache = {"k": write_prefill(cache["k"], k, mask_BTS), "v": write_prefill(cache["v"], v, mask_BTS)}
      k, v = _as_cached(k, cache["k"], dt), _as_cached(v, cache["v"], dt)
    elif cache is not None:
      start = positions_BT[:, 0]
      new_cache = {"k": write_cache(cache["k"], k, start), "v": write_cache(cache["v"], v, start)}
      k, v = new_cache["k"].astype(dt), new_cache["v"].astype(dt)
    B, T, H, hd = q.shape
    G = H // cfg.num_key_value_heads
    q = q.reshape(B, T, cfg.num_key_value_heads, G, hd)
    if causal and use_blockwise(T):
      o = train_attention((q,), (k, v), (), _gqa_expand, mask_BTS, self.scale, heads="act_kv_heads", src_heads=True)
      o = constrain(o.reshape(B, T, H, hd), ACT_BTH)
      return jnp.einsum("bthk,hkd->btd", o, self.o[...].astype(dt)), new_cache
    s = jnp.einsum("btkgd,bskd->bkgts", q, k)
    p = _softmax(s * self.scale, _dense_mask(mask_BTS, B, T)[:, None, None]).astype(dt)
    o = constrain(jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(B, T, H, hd), ACT_BTH)
    return jnp.einsum("bthk,hkd->btd", o, self.o[...].astype(dt)), new_cache

  def init_cache(self, batch: int, length: int, dtype):
    cfg = self.cfg
    shape = (batch, length, cfg.num_key_value_heads, cfg.gqa_head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
