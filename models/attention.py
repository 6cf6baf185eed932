"""Attention: MLA (naive training path + absorbed latent-cache path) and GQA, with a preallocated cache.

Cache layout (one dict per layer; slot s holds the token at position s of its row):
  MLA: {"c": [B, S, kv_lora] normed latent, "k_pe": [B, S, rope] rotated shared rope key}
  GQA: {"k": [B, S, Hkv, hd], "v": [B, S, Hkv, hd]}
A call with a cache writes its T new tokens at slots positions[:, 0] ... positions[:, 0] + T - 1 of each
row, then attends to every slot <= the query's position, so right-padded prompts of different lengths
need no left padding: a row's pad slots are overwritten before any later query can see them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..sharding.rules import constrain
from .config import ModelConfig
from .layers import ACT_BTH, DTYPES, RMSNorm, param
from .rope import Rope, softmax_scale

NEG_INF = -1e30


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


def _softmax(scores, mask_B1TS):
  scores = jnp.where(mask_B1TS, scores.astype(jnp.float32), NEG_INF)
  return jax.nn.softmax(scores, axis=-1)


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
    mask = mask_BTS[:, None]
    if cache is None:
      # NAIVE: expand the latent into per-head keys and values (cheapest for long prompts / training).
      k_nope = jnp.einsum("bsc,chn->bshn", c_BTC, w_uk)
      v_BSHV = jnp.einsum("bsc,chv->bshv", c_BTC, w_uv)
      s = jnp.einsum("bthn,bshn->bhts", q_nope, k_nope) + jnp.einsum("bthr,bsr->bhts", q_pe, k_pe_BTR)
      p = _softmax(s * self.scale, mask).astype(dt)
      o_BTHV = jnp.einsum("bhts,bshv->bthv", p, v_BSHV)
      new_cache = None
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
    new_cache = None
    if cache is not None:
      start = positions_BT[:, 0]
      new_cache = {"k": write_cache(cache["k"], k, start), "v": write_cache(cache["v"], v, start)}
      k, v = new_cache["k"].astype(dt), new_cache["v"].astype(dt)
    B, T, H, hd = q.shape
    G = H // cfg.num_key_value_heads
    q = q.reshape(B, T, cfg.num_key_value_heads, G, hd)
    s = jnp.einsum("btkgd,bskd->bkgts", q, k)
    p = _softmax(s * self.scale, mask_BTS[:, None, None]).astype(dt)
    o = constrain(jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(B, T, H, hd), ACT_BTH)
    return jnp.einsum("bthk,hkd->btd", o, self.o[...].astype(dt)), new_cache

  def init_cache(self, batch: int, length: int, dtype):
    cfg = self.cfg
    shape = (batch, length, cfg.num_key_value_heads, cfg.gqa_head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
