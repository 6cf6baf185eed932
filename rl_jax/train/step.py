"""The pretraining step: one pure function (state, batch) -> (state, metrics), jitted once by `build_step`
(the loop and the benchmark both use it), and `place_batch`, which puts host rows on the mesh for it.

loss = CE(next token) + lambda * MTP + alpha * sum_layers L_bal + z * z-loss; gradient accumulation over
micro-batches runs inside the jit (lax.scan); after the update each router that ran moves its bias by
gamma * sign(mean load - load), the load summed over the whole global batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rl_jax import losses
from rl_jax.config import TrainConfig
from rl_jax.models.config import ModelConfig
from rl_jax.sharding import rules as srules
from rl_jax.train.state import TrainState

BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")
BATCH_AXIS = "act_batch"  # the logical name that splits activation rows over the mesh (sharding/rules.py)


def runs_mtp(cfg: ModelConfig, train: TrainConfig) -> bool:
  """The MTP modules run (and their routers route) only when their loss has weight."""
  return cfg.num_nextn_predict_layers > 0 and train.mtp_lambda > 0


def bias_paths(cfg: ModelConfig, *, mtp: bool) -> list[tuple]:
  """Paths of the router biases whose routing runs, in routing order: the main stack's MoE layers (one bias
  [L_moe, E], stacked like their layers), then (with `mtp`) each MTP block's [E]."""
  main = [("moe_layers", "mlp", "bias")] if cfg.n_moe_layers else []
  n_mtp = cfg.num_nextn_predict_layers if mtp and cfg.n_routed_experts else 0
  return main + [("mtp", k, "block", "mlp", "bias") for k in range(n_mtp)]


def routing_terms(out, mask, n_experts: int):
  """(sum of the sequence-wise balance losses, expert loads [R, E]) over every routing a forward ran: the main
  stack's MoE layers (stacked [L, B, T, ...]: one vmap) then each MTP block, in `bias_paths` order."""
  bal, loads = jnp.zeros(()), []
  if out.routing is not None:
    r = out.routing
    bal = bal + jax.vmap(losses.balance_loss, in_axes=(0, 0, None))(r.scores_TE, r.experts_TK, mask).sum()
    loads.append(jax.vmap(losses.expert_load, in_axes=(0, None, None))(r.experts_TK, mask, n_experts))
  for r in out.mtp_routing:
    bal = bal + losses.balance_loss(r.scores_TE, r.experts_TK, mask)
    loads.append(losses.expert_load(r.experts_TK, mask, n_experts)[None])
  return bal, (jnp.concatenate(loads) if loads else jnp.zeros((0, 1)))


def make_loss_fn(graphdef, cfg: ModelConfig, train: TrainConfig) -> Callable:
  use_mtp = runs_mtp(cfg, train)

  def loss_fn(params, bias, batch):
    model = nnx.merge(graphdef, params, bias)
    out = model.forward(
      batch["tokens"],
      positions_BT=batch["positions"],
      segment_ids_BT=batch["segment_ids"],
      mtp=use_mtp,
      remat=train.remat,
    )
    mask = batch["loss_mask"]
    ce = losses.cross_entropy(out.logits_BTV, batch["targets"], mask)
    mtp = losses.mtp_loss(out.mtp_logits, batch["targets"], mask, batch["segment_ids"]) if use_mtp else 0.0
    bal, load = routing_terms(out, mask, cfg.n_routed_experts)
    z = losses.z_loss(out.logits_BTV, mask) if train.z_loss > 0 else 0.0
    loss = ce + train.mtp_lambda * mtp + train.balance_alpha * bal + train.z_loss * z
    metrics = {
      "loss": loss,
      "ce": ce,
      "mtp": jnp.asarray(mtp, jnp.float32),
      "balance": bal,
      "tokens": mask.sum().astype(jnp.float32),
    }
    return loss, (metrics, load)

  return loss_fn


def make_train_step(
  graphdef, cfg: ModelConfig, train: TrainConfig, tx: optax.GradientTransformation, lr_schedule=None
) -> Callable:
  loss_fn = make_loss_fn(graphdef, cfg, train)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  paths = bias_paths(cfg, mtp=runs_mtp(cfg, train))

  def step(state: TrainState, batch) -> tuple[TrainState, dict]:
    # MICRO-BATCHES: batch leaves are [A, B/A, T]; sum gradients, average at the end.
    def micro(carry, mb):
      g_acc, m_acc, load_acc = carry
      (_, (metrics, load)), grads = grad_fn(state.params, state.bias, mb)
      return (jax.tree.map(jnp.add, g_acc, grads), jax.tree.map(jnp.add, m_acc, metrics), load_acc + load), None

    A = batch["tokens"].shape[0]
    zeros_g = jax.tree.map(jnp.zeros_like, state.params)
    first = jax.tree.map(lambda x: x[0], batch)
    _, (m0, l0) = jax.eval_shape(loss_fn, state.params, state.bias, first)
    zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
    (grads, metrics, load), _ = jax.lax.scan(micro, (zeros_g, zeros_m, jnp.zeros(l0.shape, l0.dtype)), batch)
    grads = jax.tree.map(lambda g: g / A, grads)
    metrics = {k: (v if k == "tokens" else v / A) for k, v in metrics.items()}

    # UPDATE
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    # AUX-LOSS-FREE BALANCING: the bias follows the global load, outside the gradient.
    bias = _update_bias(state.bias, paths, load, train.bias_gamma)

    # A NON-FINITE STEP is skipped: the state stays as it was (the host stops after train.max_bad_steps).
    metrics["grad_norm"] = optax.global_norm(grads)
    ok = finite_update(metrics["loss"], metrics["grad_norm"], params)
    params, opt_state, bias = keep_if(ok, (params, opt_state, bias), (state.params, state.opt_state, state.bias))
    metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
    metrics["param_norm"] = optax.global_norm(params)
    if lr_schedule is not None:
      metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
    if paths:
      mean = load.mean(-1)
      metrics["load_imbalance"] = (load.max(-1) / jnp.maximum(mean, 1e-9)).mean()  # max/mean, 1 = balanced
    return TrainState(state.step + 1, params, bias, opt_state), metrics

  return step


def apply_update(state: TrainState, grads, metrics: dict, tx: optax.GradientTransformation, lr_schedule=None):
  """The optimizer step of a stage whose router biases stay frozen (SFT-like stages: distill, train-rm): a
  non-finite update is skipped (state kept); grad_norm, skipped, param_norm and lr join `metrics`."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.global_norm(grads)
  ok = finite_update(metrics["loss"], metrics["grad_norm"], params)
  params, opt_state = keep_if(ok, (params, opt_state), (state.params, state.opt_state))
  metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
  metrics["param_norm"] = optax.global_norm(params)
  if lr_schedule is not None:
    metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
  return TrainState(state.step + 1, params, state.bias, opt_state), metrics


def finite_update(loss, grad_norm, new_params):
  """Whether an update may be applied: a finite loss and gradient norm, and parameters that stay finite (an
  update that overflows them, e.g. a huge learning rate, is as harmful as a NaN gradient)."""
  return jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(new_params))


def keep_if(ok, new, old):
  """`new` where `ok`, else `old`, leaf by leaf (a select, not a branch: both are already computed)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def _update_bias(bias, paths, load, gamma):
  """Moves each listed router bias by its own rows of `load` (a stacked bias [L, E] takes the next L rows)."""
  flat = dict(nnx.to_flat_state(jax.tree.map(lambda x: x, bias)))  # a copy: the old bias is kept if skipped
  rows = [math.prod(flat[p].get_value().shape[:-1]) for p in paths]
  if load.shape[0] != sum(rows):  # a mismatch would index out of range, which jnp clamps silently
    raise ValueError(f"router loads for {load.shape[0]} routings but {sum(rows)} router biases to update")
  if not paths or gamma <= 0:
    return bias
  start = 0
  for p, n in zip(paths, rows):
    b = flat[p].get_value()
    moved = jax.vmap(lambda b_E, l_E: losses.bias_update(b_E, l_E, gamma))(b.reshape(n, -1), load[start : start + n])
    flat[p].set_value(moved.reshape(b.shape))
    start += n
  return nnx.from_flat_state(flat)


def build_step(
  graphdef, cfg: ModelConfig, train: TrainConfig, tx: optax.GradientTransformation, mesh, shardings, lr_schedule=None
) -> Callable:
  """The train step jitted once: explicit in/out shardings (the ambient rules), the state donated."""
  check_batch(train, mesh)
  batch_sh = {k: batch_sharding(mesh) for k in BATCH_KEYS}
  return jax.jit(
    make_train_step(graphdef, cfg, train, tx, lr_schedule),
    in_shardings=(shardings, batch_sh),
    out_shardings=(shardings, NamedSharding(mesh, P())),
    donate_argnums=0,
  )


def check_batch(train: TrainConfig, mesh) -> None:
  """The global batch must split evenly over processes, micro-batches and the mesh's batch shards."""
  n_proc = jax.process_count()
  if train.batch_size % (n_proc * train.grad_accum):
    raise ValueError(
      f"train.batch_size ({train.batch_size}) must divide by processes x grad_accum ({n_proc} x {train.grad_accum})"
    )
  shards = srules.shard_count(BATCH_AXIS, mesh=mesh)
  micro = train.batch_size // train.grad_accum
  if micro % shards:
    raise ValueError(
      f"train.batch_size / train.grad_accum = {micro} sequences per micro-batch must divide "
      f"by the {shards} batch shards of the mesh (mesh data x fsdp x expert)"
    )


def batch_sharding(mesh) -> NamedSharding:
  """[A, B/A, T] batches: the micro-batch axis whole, the rows split like activation rows."""
  spec = srules.logical_to_spec((BATCH_AXIS, None), mesh=mesh)
  return NamedSharding(mesh, P(None, *spec))


def place_batch(host_batch: dict, mesh, grad_accum: int) -> dict:
  """This process's [B_local, T] rows -> global [A, B/A, T] int32 arrays on `mesh`, as the step takes them."""
  sh = batch_sharding(mesh)
  micro = to_micro(host_batch, grad_accum)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v, np.int32)) for k, v in micro.items()}


def to_micro(batch: dict, grad_accum: int) -> dict:
  """[B, T] host arrays -> [A, B/A, T]."""
  return {k: batch[k].reshape(grad_accum, -1, *batch[k].shape[1:]) for k in BATCH_KEYS}
