"""Training state (one pytree), the optimizer, and building both born sharded on a mesh."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rl_jax import models
from rl_jax.config import OptimizerConfig, RunConfig, TrainConfig
from rl_jax.models.config import ModelConfig
from rl_jax.models.layers import RouterBias
from rl_jax.sharding import rules as srules


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar
  params: Any  # nnx.State of nnx.Param (trainable)
  bias: Any  # nnx.State of RouterBias (aux-loss-free balancing state; not trained by gradients)
  opt_state: Any  # optax state
  rng: jax.Array  # uint32 key data


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


def state_shardings(abstract_state: TrainState, mesh, rules) -> TrainState:
  """NamedShardings for every leaf: params/bias by their logical axes, optimizer moments like their param."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  p_sh = srules.param_shardings(abstract_state.params, mesh, rules)
  b_sh = srules.param_shardings(abstract_state.bias, mesh, rules)
  return TrainState(
    step=replicated, params=p_sh, bias=b_sh, opt_state=_opt_shardings(abstract_state, p_sh, replicated), rng=replicated
  )


def _opt_shardings(abstract_state, p_sh, replicated):
  flat_p = {tuple(map(str, k)): v for k, v in nnx.to_flat_state(p_sh)}

  def pick(path, leaf):
    # optax keeps moment trees mirroring params: match a leaf by the param path at the end of its own path
    keys = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    for n in range(len(keys), 0, -1):
      sh = flat_p.get(keys[-n:])
      if sh is not None and len(sh.spec) <= len(leaf.shape):
        return sh
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_state.opt_state)


def init_state(model_cfg: ModelConfig, run: RunConfig, mesh, rules=None, init_params=None):
  """(graphdef, state, shardings, tx): parameters born sharded; `init_params` (an nnx.State) replaces the
  random init (e.g. from `--init CHECKPOINT`)."""
  tx = optimizer(run.optimizer, run.train.steps)
  seed = run.train.seed

  def build():
    model = models.Transformer(model_cfg, nnx.Rngs(params=seed))
    graphdef, params, bias = split_model(model)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      bias=bias,
      opt_state=tx.init(params),
      rng=jax.random.key_data(jax.random.key(seed)),
    )

  graphdef = nnx.split(
    nnx.eval_shape(lambda: models.Transformer(model_cfg, nnx.Rngs(params=seed))), nnx.Param, RouterBias, ...
  )[0]
  abstract = jax.eval_shape(build)
  shardings = state_shardings(abstract, mesh, rules)
  state = jax.jit(build, out_shardings=shardings)()
  if init_params is not None:
    params, bias = init_params
    params = jax.device_put(params, shardings.params)
    bias = jax.device_put(bias, shardings.bias)
    state = state._replace(
      params=params, bias=bias, opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    )
  return graphdef, state, shardings, tx
