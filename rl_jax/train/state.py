"""Training state (one pytree), the optimizer, and building both born sharded on a mesh."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rl_jax import models
from rl_jax.config import OptimizerConfig, TrainConfig
from rl_jax.models.config import ModelConfig
from rl_jax.models.layers import RouterBias
from rl_jax.sharding import rules as srules


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar
  params: Any  # nnx.State of nnx.Param (trainable)
  bias: Any  # nnx.State of RouterBias (aux-loss-free balancing state; not trained by gradients)
  opt_state: Any  # optax state
  ref: Any = None  # nnx.State of nnx.Param: a frozen reference policy (GRPO's KL), else None


def schedule(opt: OptimizerConfig, steps: int):
  """Learning rate by step: linear warmup then cosine / WSD (warmup-stable-decay) / constant."""
  warm = min(opt.warmup_steps, max(steps - 1, 0))
  floor = opt.lr * opt.min_lr_ratio
  if opt.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, opt.lr, max(warm, 0), max(steps, warm + 1), end_value=floor)
  warmup = optax.linear_schedule(0.0, opt.lr, max(warm, 1))
  if opt.schedule == "constant":
    return optax.join_schedules([warmup, optax.constant_schedule(opt.lr)], [warm])
  decay_steps = max(int(steps * opt.decay_fraction), 1)
  stable = max(steps - warm - decay_steps, 0)
  return optax.join_schedules(
    [warmup, optax.constant_schedule(opt.lr), optax.linear_schedule(opt.lr, floor, decay_steps)], [warm, warm + stable]
  )


def optimizer(opt: OptimizerConfig, steps: int) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; no weight decay on vectors (norm scales, biases)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  parts = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip > 0 else []
  parts.append(
    optax.adamw(schedule(opt, steps), b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=decay_mask)
  )
  return optax.chain(*parts)


def train_model_config(mcfg: ModelConfig, train: TrainConfig) -> ModelConfig:
  return mcfg.replace(param_dtype=train.param_dtype, dtype=train.compute_dtype)


def split_model(model: nnx.Module):
  graphdef, params, bias, rest = nnx.split(model, nnx.Param, RouterBias, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"model holds state that is neither a Param nor a RouterBias: {rest}")
  return graphdef, params, bias


def state_shardings(abstract_state: TrainState, mesh) -> TrainState:
  """NamedShardings for every leaf under the ambient rules: params/bias by their logical axes, and the optimizer
  state's moments like their parameters. optax builds the moments by mapping over the parameter state, so each
  moment is an nnx.Variable carrying its parameter's `axes` metadata; the rest (counts) is replicated."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  p_sh = srules.param_shardings(abstract_state.params, mesh)
  b_sh = srules.param_shardings(abstract_state.bias, mesh)
  # Full structure (each moment Variable holding its sharding), as jit shardings and restore targets expect.
  as_leaf = lambda sh, leaf: leaf.replace(sh) if isinstance(leaf, nnx.Variable) else sh
  opt_sh = jax.tree.map(as_leaf, srules.param_shardings(abstract_state.opt_state, mesh), abstract_state.opt_state)
  return TrainState(replicated, p_sh, b_sh, opt_sh, None if abstract_state.ref is None else p_sh)


def _builder(model_cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, ref: bool = False):
  def build():
    _, params, bias = split_model(models.Transformer(model_cfg, nnx.Rngs(params=seed)))
    ref_params = jax.tree.map(jnp.copy, params) if ref else None
    return TrainState(jnp.zeros((), jnp.int32), params, bias, tx.init(params), ref_params)

  return build


def state_spec(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh, seed: int = 0, *, ref: bool = False):
  """(graphdef, abstract state, shardings) without allocating: what a restore targets. `ref`: the state
  also holds a reference copy of the parameters (GRPO)."""
  graphdef = split_model(nnx.eval_shape(lambda: models.Transformer(model_cfg, nnx.Rngs(params=seed))))[0]
  abstract = jax.eval_shape(_builder(model_cfg, tx, seed, ref))
  return graphdef, abstract, state_shardings(abstract, mesh)


def init_state(
  model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh, *, seed: int = 0, init_params=None, ref=False
):
  """(graphdef, state, shardings), parameters born sharded on `mesh` under the ambient rules;
  `init_params` (params, bias) replaces the random init (e.g. from `--init CHECKPOINT`); with `ref` the
  state's reference model starts as a copy of the initial parameters."""
  graphdef, _, shardings = state_spec(model_cfg, tx, mesh, seed, ref=ref)
  if init_params is None:
    return graphdef, jax.jit(_builder(model_cfg, tx, seed, ref), out_shardings=shardings)(), shardings
  params = jax.device_put(init_params[0], shardings.params)
  bias = jax.device_put(init_params[1], shardings.bias)
  step = jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=shardings.step)()
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  ref_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings.ref)(params) if ref else None
  return graphdef, TrainState(step, params, bias, opt_state, ref_params), shardings
