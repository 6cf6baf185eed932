"""Small building blocks: parameters with logical axis names, RMSNorm, the SwiGLU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..sharding.rules import constrain
from .config import ModelConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Logical axes of activations (sharding.rules maps them to mesh axes; constraints are no-ops without a mesh).
ACT_BTD = ("act_batch", "act_seq", "act_embed")  # the residual stream [B, T, D]
ACT_BTH = ("act_batch", "act_seq", "act_heads", None)  # per-head queries / outputs [B, T, H, head_dim]


class RouterBias(nnx.Variable):
  """Aux-loss-free routing bias: state, moved by the trainer's balance rule, never by gradients."""


def param(
  rngs: nnx.Rngs, shape, axes: tuple[str | None, ...], cfg: ModelConfig, *, init="normal", dtype=None
) -> nnx.Param:
  """A parameter carrying logical axis names in its `axes` metadata (mapped to a mesh by sharding.rules)."""
  assert len(shape) == len(axes), (shape, axes)
  dtype = dtype or DTYPES[cfg.param_dtype]
  if init == "normal":
    value = cfg.initializer_range * jax.random.normal(rngs.params(), shape, jnp.float32)
  elif init == "ones":
    value = jnp.ones(shape, jnp.float32)
  else:
    value = jnp.zeros(shape, jnp.float32)
  return nnx.Param(value.astype(dtype), axes=axes)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs, axis_name: str | None = "norm"):
    self.scale = param(rngs, (dim,), (axis_name,), cfg, init="ones")
    self.eps = cfg.rms_norm_eps

  def __call__(self, x):
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...].astype(jnp.float32) * x32.astype(dtype).astype(jnp.float32)).astype(dtype)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)); weights stored [in, out]."""

  def __init__(self, cfg: ModelConfig, width: int, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.gate = param(rngs, (d, width), ("embed", "mlp"), cfg)
    self.up = param(rngs, (d, width), ("embed", "mlp"), cfg)
    self.down = param(rngs, (width, d), ("mlp", "embed"), cfg)
    self.dtype = DTYPES[cfg.dtype]

  def __call__(self, x_BTD):
    dt = self.dtype
    h_BTI = jax.nn.silu(x_BTD @ self.gate[...].astype(dt)) * (x_BTD @ self.up[...].astype(dt))
    h_BTI = constrain(h_BTI, ("act_batch", "act_seq", "act_mlp"))
    return h_BTI @ self.down[...].astype(dt)
