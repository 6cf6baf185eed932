"""The GRPO update: one jitted function per RL step, `(state, rollout) -> (state, metrics)`.

Inside it, in order: the reference model resets to the policy every `ref_reset_every` steps (R1 resets every
400); the reference's and the current (pre-update) policy's log-probs of the rollout come from teacher-forced
forwards (with one update per rollout the loss's own forward gives the latter, as its stop_gradient: one
forward fewer, see `on_policy`); with `kl_in_reward` the sequence KL is taken off the rewards; group advantages; truncated importance
weights min(pi_trainer / pi_sampler, tis_cap) correct the sampler/trainer numerics gap (then the trainer's own
log-probs are the old ones, so ratios compare like with like); then `epochs` passes of `minibatches` optimizer
steps, each accumulating gradients over `train.grad_accum` micro-batches with the loss normalised over the
whole minibatch (rl_jax.losses.loss_denominator), so the chosen aggregation is exact under accumulation.
Log-probs are those of logits / temperature (the distribution the sampler drew from), computed chunked over
the sequence (never a whole [N, T, V] float32). With `routing_replay` the forwards use the experts the sampler
chose (router scores still recomputed, so the router keeps its gradient). Router biases stay frozen in RL.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rl_jax import losses
from rl_jax.config import GRPOConfig, TrainConfig
from rl_jax.sharding import rules as srules
from rl_jax.train.state import TrainState
from rl_jax.train.step import BATCH_AXIS, finite_update, keep_if

ROLLOUT_KEYS = ("tokens", "targets", "positions", "mask", "old_logp", "rewards")


def uses_ref(g: GRPOConfig) -> bool:
  """A reference model is kept only when some KL term reads it."""
  return g.beta > 0


def token_logp(graphdef, params, bias, batch, *, temperature: float, replay: bool, remat: bool = False):
  """(log p(target), entropy) [N, T] under logits / temperature, and the forward's routing."""
  model = nnx.merge(graphdef, params, bias)
  experts = batch["experts"] if replay and "experts" in batch else None  # [N, T, L_moe, K]
  out = model.forward(batch["tokens"], positions_BT=batch["positions"], replay_experts=experts, remat=remat)
  logp, entropy = losses.chunked_token_logprobs(model.head, out.hidden_BTD, batch["targets"], temperature=temperature)
  return logp, entropy, out.routing


def _masked_mean(x, mask):
  return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def on_policy(g: GRPOConfig) -> bool:
  """One update per rollout (and no KL in the reward): the loss forward runs on the rollout's own policy, so
  the old log-probs are its own values (stop_gradient) and no separate old-policy forward is needed."""
  return g.epochs * g.minibatches == 1 and not g.kl_in_reward


def make_loss_fn(graphdef, g: GRPOConfig, train: TrainConfig, n_experts: int = 0) -> Callable:
  """loss(params, bias, micro-batch, denominator) -> (loss, metrics) for one micro-batch."""

  def loss_fn(params, bias, mb, denominator):
    logp, entropy, routing = token_logp(
      graphdef, params, bias, mb, temperature=g.temperature, replay=g.routing_replay, remat=train.remat
    )
    mb, extra = (
      _old_from_this_forward(mb, jax.lax.stop_gradient(logp), routing, g, n_experts) if "old" not in mb else (mb, {})
    )
    loss, m = losses.policy_loss(
      logp, mb["old"], mb["advantages"], mb["mask"], ref_logp=mb.get("ref_logp"), loss_agg=g.loss_agg,
      clip_low=g.clip_low, clip_high=g.clip_high, beta=0.0 if g.kl_in_reward else g.beta, kl=g.kl,
      ratio_level=g.ratio_level, max_len=g.max_new_tokens, token_weights=mb.get("is_weight"),
      denominator=denominator,
    )  # fmt: skip
    m["entropy"] = _masked_mean(jax.lax.stop_gradient(entropy), mb["mask"])
    return loss, {**m, **extra}

  return loss_fn


def _old_from_this_forward(mb, current, routing, g: GRPOConfig, n_experts: int):
  """On-policy: the old log-probs (and the importance weights against the sampler) from this very forward."""
  mask, sampler = mb["mask"], mb["sampler_logp"]
  extra = {"logp_gap": _masked_mean(jnp.abs(current - sampler), mask)}
  mb = {**mb, "old": sampler}
  if g.tis_cap is not None:
    w = jnp.minimum(jnp.exp(current - sampler), g.tis_cap) * mask
    mb = {**mb, "old": current, "is_weight": w}
    extra["is_weight_mean"] = _masked_mean(w, mask)
  if routing is not None and n_experts:
    extra["load_imbalance"] = _imbalance(routing, mask, n_experts)
  return mb, extra


def _imbalance(routing, mask, n_experts: int):
  """Expert load max / mean per MoE layer (1 = balanced), averaged over layers (routing stacked [L, N, T, K])."""
  experts = jax.lax.stop_gradient(routing.experts_TK)
  load = jax.vmap(losses.expert_load, in_axes=(0, None, None))(experts, mask, n_experts)
  return (load.max(-1) / jnp.maximum(load.mean(-1), 1e-9)).mean()


def _minibatch_update(loss_fn, tx, g: GRPOConfig):
  """One optimizer step on a minibatch whose leaves are [A, n, T] micro-batches."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def update(carry, mb):
    params, opt_state, bias = carry
    den = losses.loss_denominator(mb["mask"].reshape(-1, mb["mask"].shape[-1]), g.loss_agg, g.max_new_tokens)

    def micro(acc, x):  # each micro-batch loss is already over the minibatch's denominator: grads add up
      (loss, m), grads = grad_fn(params, bias, x, den)
      return jax.tree.map(jnp.add, acc, (grads, {**m, "loss": loss})), None

    first = jax.tree.map(lambda x: x[0], mb)
    shapes = jax.eval_shape(lambda x: grad_fn(params, bias, x, den), first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[1], {**shapes[0][1], "loss": shapes[0][0]}))
    (grads, m), _ = jax.lax.scan(micro, zeros, mb)
    A = mb["mask"].shape[0]
    m = {k: v if k == "loss" else v / A for k, v in m.items()}  # loss: a sum over micro-batches by construction
    updates, new_opt_state = tx.update(grads, opt_state, params)
    m["grad_norm"] = optax.global_norm(grads)
    new = (optax.apply_updates(params, updates), new_opt_state, bias)
    ok = finite_update(m["loss"], m["grad_norm"], new[0])  # a non-finite update is skipped (see step.py)
    m["skipped"] = 1.0 - ok.astype(jnp.float32)
    return keep_if(ok, new, carry), m

  return update


def _reference(state: TrainState, g: GRPOConfig):
  """The reference parameters for this step: reset to the policy when the schedule says so."""
  if state.ref is None or not g.ref_reset_every:
    return state.ref
  reset = state.step % g.ref_reset_every == 0
  return jax.tree.map(lambda r, p: jnp.where(reset, p, r), state.ref, state.params)


def _prepare(graphdef, state: TrainState, batch, g: GRPOConfig, ref):
  """Advantages, old log-probs, importance weights and reference log-probs for the rollout (no gradients)."""
  mask = batch["mask"]
  logp_of = lambda params: token_logp(graphdef, params, state.bias, batch, temperature=g.temperature,
                                      replay=g.routing_replay)  # fmt: skip
  prepared = {
    k: batch[k] for k in ("tokens", "targets", "positions", "mask") + (("experts",) if "experts" in batch else ())
  }
  if on_policy(g):  # the loss forward provides the old log-probs (see on_policy)
    if ref is not None:
      prepared["ref_logp"] = jax.lax.stop_gradient(logp_of(ref)[0])
    prepared["advantages"] = losses.group_advantages(batch["rewards"], g.group_size, scale=g.advantage)
    prepared["sampler_logp"] = batch["old_logp"]
    return prepared, {}, None
  old_trainer, entropy, routing = jax.tree.map(jax.lax.stop_gradient, logp_of(state.params))
  rewards = batch["rewards"]
  stats = {"logp_gap": _masked_mean(jnp.abs(old_trainer - batch["old_logp"]), mask)}
  if ref is not None:
    ref_logp = jax.lax.stop_gradient(logp_of(ref)[0])
    seq_kl = (losses.kl_penalty(old_trainer, ref_logp, g.kl) * mask).sum(1)
    stats["kl_ref"] = seq_kl.sum() / jnp.maximum(mask.sum(), 1.0)
    if g.kl_in_reward:
      rewards = rewards - g.beta * seq_kl
    else:
      prepared["ref_logp"] = ref_logp
  prepared["advantages"] = losses.group_advantages(rewards, g.group_size, scale=g.advantage)
  if g.tis_cap is not None:
    w = jnp.minimum(jnp.exp(old_trainer - batch["old_logp"]), g.tis_cap) * mask
    prepared["old"], prepared["is_weight"] = old_trainer, w
    stats["is_weight_mean"] = _masked_mean(w, mask)
  else:
    prepared["old"] = batch["old_logp"]
  return prepared, stats, routing


def make_grpo_step(graphdef, g: GRPOConfig, train: TrainConfig, tx, lr_schedule=None, n_experts: int = 0) -> Callable:
  """The pure RL step (state, rollout arrays [N, T]) -> (state, metrics); see the module docstring."""
  update = _minibatch_update(make_loss_fn(graphdef, g, train, n_experts), tx, g)
  M, A = g.minibatches, train.grad_accum

  def step(state: TrainState, batch):
    ref = _reference(state, g)
    prepared, stats, routing = _prepare(graphdef, state, batch, g, ref)
    N = prepared["mask"].shape[0]
    carry = (state.params, state.opt_state, state.bias)
    metrics = []
    for epoch in range(g.epochs):  # EPOCHS x MINIBATCHES (static, small)
      order = jnp.arange(N)
      if M > 1:
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(train.seed), state.step), epoch)
        order = jax.random.permutation(key, N)
      shaped = jax.tree.map(lambda x, order=order: x[order].reshape((M, A, N // (M * A)) + x.shape[1:]), prepared)
      carry, m = jax.lax.scan(update, carry, shaped)
      metrics.append(m)
    params, opt_state, _ = carry
    # means over the updates; `skipped` is 1 when any update of the step was skipped (the host counts steps)
    m = {k: (jnp.max if k == "skipped" else jnp.mean)(jnp.concatenate([x[k] for x in metrics])) for k in metrics[0]}
    m.update(stats, param_norm=optax.global_norm(params))
    if lr_schedule is not None:
      m["lr"] = jnp.asarray(lr_schedule(state.step * g.epochs * M), jnp.float32)
    if routing is not None and n_experts:
      m["load_imbalance"] = _imbalance(routing, batch["mask"], n_experts)
    if ref is not None and "kl_ref" not in m:  # on-policy: the loss's own KL is the policy's KL to its reference
      m["kl_ref"] = m["kl"]
    return TrainState(state.step + 1, params, state.bias, opt_state, ref), m

  return step


def check_rollout_batch(g: GRPOConfig, train: TrainConfig, mesh) -> None:
  """Rows split into minibatches, micro-batches and the mesh's batch shards evenly."""
  N = g.prompts_per_step * g.group_size
  if N % (g.minibatches * train.grad_accum):
    raise ValueError(
      f"grpo.prompts_per_step x grpo.group_size = {N} rows must divide by grpo.minibatches x train.grad_accum "
      f"({g.minibatches} x {train.grad_accum})"
    )
  shards = srules.shard_count(BATCH_AXIS, mesh=mesh)
  if N % shards:
    raise ValueError(f"{N} rollout rows per step do not split over the mesh's {shards} batch shards")


def row_sharding(mesh) -> NamedSharding:
  """Rollout arrays split by their rows, like activation rows."""
  return NamedSharding(mesh, srules.logical_to_spec((BATCH_AXIS,), mesh=mesh))


def build_grpo_step(graphdef, g, train, tx, mesh, shardings, lr_schedule=None, n_experts: int = 0) -> Callable:
  """`make_grpo_step` jitted once: rows split like activation rows, the state donated."""
  check_rollout_batch(g, train, mesh)
  rows = row_sharding(mesh)
  fn = jax.jit(
    make_grpo_step(graphdef, g, train, tx, lr_schedule, n_experts),
    in_shardings=(shardings, rows),  # a prefix: every rollout array splits its rows
    out_shardings=(shardings, NamedSharding(mesh, P())),
    donate_argnums=0,
  )
  return fn


def place_rollout(arrays: dict[str, np.ndarray], mesh) -> dict:
  """Host rollout arrays (this process's rows) -> global arrays split by rows."""
  rows = row_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(rows, v) for k, v in arrays.items()}
