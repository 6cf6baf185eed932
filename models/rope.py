"""Rotary position embeddings: plain RoPE, YaRN (with its attention-scale correction) and Llama 3 scaling."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from .config import ModelConfig, RopeConfig, yarn_mscale


def inv_frequencies(r: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
  """Per-pair inverse frequencies [dim/2] (float32) and the cos/sin scale (YaRN's attention factor)."""
  inv = 1.0 / (np.float32(r.theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  if r.type == "default":
    return inv.astype(np.float32), 1.0
  if r.type == "llama3":
    lo_wave = r.original_max_position_embeddings / r.low_freq_factor
    hi_wave = r.original_max_position_embeddings / r.high_freq_factor
    wave = 2 * math.pi / inv
    scaled = np.where(wave > lo_wave, inv / r.factor, inv)
    smooth = (r.original_max_position_embeddings / wave - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
    medium = (wave >= hi_wave) & (wave <= lo_wave)
    return np.where(medium, smoothed, scaled).astype(np.float32), 1.0

  # YaRN: interpolate low-frequency pairs by `factor`, keep high-frequency ones, linear ramp between.
  def corr(n_rot):
    return dim * math.log(r.original_max_position_embeddings / (n_rot * 2 * math.pi)) / (2 * math.log(r.theta))

  low, high = corr(r.beta_fast), corr(r.beta_slow)
  if r.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolate = 1 - ramp
  inv_yarn = (inv / r.factor) * (1 - extrapolate) + inv * extrapolate
  if r.attention_factor is not None:
    att = r.attention_factor
  elif r.mscale and r.mscale_all_dim:
    att = yarn_mscale(r.factor, r.mscale) / yarn_mscale(r.factor, r.mscale_all_dim)
  else:
    att = yarn_mscale(r.factor)
  return inv_yarn.astype(np.float32), float(att)


def softmax_scale(cfg: ModelConfig) -> float:
  """Attention logit scale; MLA multiplies in mscale(factor, mscale_all_dim)^2 when YaRN is on."""
  if not cfg.is_mla:
    return cfg.gqa_head_dim**-0.5
  scale = cfg.qk_head_dim**-0.5
  r = cfg.rope
  if r.type != "default" and r.mscale_all_dim:
    scale *= yarn_mscale(r.factor, r.mscale_all_dim) ** 2
  return scale


class Rope:
  """Holds the frequency table; `cos_sin(positions_BT)` -> (cos, sin) each [B, T, dim/2] float32."""

  def __init__(self, cfg: ModelConfig):
    self.key = (cfg.rope, cfg.rope_dim)  # value equality: equal configs give equal graphdefs (jit cache hits)
    inv, att = inv_frequencies(cfg.rope, cfg.rope_dim)
    self.inv_freq = inv
    self.attention_factor = att
    self.interleave = cfg.rope.interleave

  def __eq__(self, other):
    return isinstance(other, Rope) and self.key == other.key

  def __hash__(self):
    return hash(self.key)

  def cos_sin(self, positions_BT):
    ang = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(self.inv_freq)
    return jnp.cos(ang) * self.attention_factor, jnp.sin(ang) * self.attention_factor

  def apply(self, x_BTHR, cos_BTR, sin_BTR):
    """Rotates the last dim of x [B, T, H, R]; interleaved inputs come out as [rotated evens | rotated odds]."""
    dtype = x_BTHR.dtype
    x = x_BTHR.astype(jnp.float32)
    if self.interleave:
      x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
      half = x.shape[-1] // 2
      x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos_BTR[:, :, None, :], sin_BTR[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(dtype)
