"""The pretraining step: one pure function (state, batch) -> (state, metrics), jitted once.

loss = CE(next token) + lambda * MTP + alpha * sum_layers L_bal + z * z-loss; gradient accumulation over
micro-batches runs inside the jit (lax.scan); after the update each MoE layer's router bias moves by
gamma * sign(mean load - load), the load summed over the whole global batch.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rl_jax import losses
from rl_jax.config import TrainConfig
from rl_jax.models.config import ModelConfig
from rl_jax.train.state import TrainState

BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def bias_paths(cfg: ModelConfig) -> list[tuple]:
  """Router-bias paths in routing order: main MoE layers, then the MTP blocks."""
  main = [("layers", i, "mlp", "bias") for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
  mtp = (
    [("mtp", k, "block", "mlp", "bias") for k in range(cfg.num_nextn_predict_layers)] if cfg.n_routed_experts else []
  )
  return main + mtp


def make_loss_fn(graphdef, cfg: ModelConfig, train: TrainConfig) -> Callable:
  use_mtp = cfg.num_nextn_predict_layers > 0 and train.mtp_lambda > 0

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
    routing = out.routing + out.mtp_routing
    bal = sum((losses.balance_loss(r.scores_TE, r.experts_TK, mask) for r in routing), jnp.zeros(()))
    z = losses.z_loss(out.logits_BTV, mask) if train.z_loss > 0 else 0.0
    loss = ce + train.mtp_lambda * mtp + train.balance_alpha * bal + train.z_loss * z
    load = (
      jnp.stack([losses.expert_load(r.experts_TK, mask, cfg.n_routed_experts) for r in routing])
      if routing
      else jnp.zeros((0, 1))
    )
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
  paths = bias_paths(cfg)

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
    bias = state.bias
    if paths and train.bias_gamma > 0:
      flat = dict(nnx.to_flat_state(bias))
      for i, p in enumerate(paths):
        var = flat[p]
        var.set_value(losses.bias_update(var.get_value(), load[i], train.bias_gamma))
      bias = nnx.from_flat_state(flat)

    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["param_norm"] = optax.global_norm(params)
    if lr_schedule is not None:
      metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
    if paths:
      mean = load.mean(-1)
      metrics["load_imbalance"] = (load.max(-1) / jnp.maximum(mean, 1e-9)).mean()  # max/mean, 1 = balanced
    return TrainState(state.step + 1, params, bias, opt_state, state.rng), metrics

  return step


def to_micro(batch: dict, grad_accum: int) -> dict:
  """[B, T] host arrays -> [A, B/A, T]."""
  return {k: batch[k].reshape(grad_accum, -1, *batch[k].shape[1:]) for k in BATCH_KEYS}
