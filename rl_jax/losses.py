"""Losses: next-token CE, multi-token prediction, DeepSeek-V3's sequence-wise balance loss, z-loss.

Shapes: logits [B, T, V] float32, targets/mask [B, T]. Every mean is over real (mask=1) tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits_BTV, targets_BT):
  """log p(target) under log_softmax(logits), float32 [B, T]."""
  logz = jax.nn.logsumexp(logits_BTV.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0].astype(jnp.float32)
  return picked - logz


def cross_entropy(logits_BTV, targets_BT, mask_BT):
  """Mean next-token cross-entropy over mask=1 positions."""
  mask = mask_BT.astype(jnp.float32)
  return -(token_logprobs(logits_BTV, targets_BT) * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def mtp_targets(targets_BT, mask_BT, segment_ids_BT, k: int):
  """Depth-k targets: at position i the k-th MTP module predicts token i+k+1 = targets[i+k], valid only
  while i+k stays inside the row and inside the same document."""
  T = targets_BT.shape[1]
  shifted = jnp.roll(targets_BT, -k, axis=1)
  valid = jnp.roll(mask_BT, -k, axis=1) * (jnp.arange(T) < T - k)[None, :]
  if segment_ids_BT is not None:
    valid = valid * (jnp.roll(segment_ids_BT, -k, axis=1) == segment_ids_BT)
  return shifted, valid * mask_BT


def mtp_loss(mtp_logits, targets_BT, mask_BT, segment_ids_BT=None):
  """L_MTP without lambda: (1/D) sum_k CE_k."""
  if not mtp_logits:
    return jnp.zeros((), jnp.float32)
  losses = []
  for k, logits in enumerate(mtp_logits, start=1):
    tgt, valid = mtp_targets(targets_BT, mask_BT, segment_ids_BT, k)
    losses.append(cross_entropy(logits, tgt, valid))
  return sum(losses) / len(losses)


def balance_loss(scores_BTE, experts_BTK, mask_BT):
  """Sequence-wise balance loss (V3 eq. 17-20) without alpha: mean over sequences of sum_i f_i P_i with
  f_i = E/(K T) sum_t 1[i in TopK_t] and P_i = (1/T) sum_t s_{i,t} / sum_j s_{j,t}."""
  B, T, E = scores_BTE.shape
  K = experts_BTK.shape[-1]
  mask = mask_BT.astype(jnp.float32)
  n = jnp.maximum(mask.sum(1), 1.0)  # tokens per sequence
  chosen = jax.nn.one_hot(experts_BTK, E, dtype=jnp.float32).sum(2)  # [B, T, E]
  f = E / (K * n[:, None]) * (chosen * mask[..., None]).sum(1)
  p = ((scores_BTE / scores_BTE.sum(-1, keepdims=True)) * mask[..., None]).sum(1) / n[:, None]
  return (f * p).sum(-1).mean()


def expert_load(experts_BTK, mask_BT, n_experts: int):
  """Tokens routed to each expert over the batch [E] (float32)."""
  chosen = jax.nn.one_hot(experts_BTK, n_experts, dtype=jnp.float32).sum(2)
  return (chosen * mask_BT.astype(jnp.float32)[..., None]).sum((0, 1))


def z_loss(logits_BTV, mask_BT):
  """Mean squared log-partition (PaLM-style), keeps logits from drifting."""
  mask = mask_BT.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits_BTV.astype(jnp.float32), axis=-1)
  return (logz**2 * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def bias_update(bias_E, load_E, gamma: float):
  """Aux-loss-free balancing: b_i += gamma * sign(mean load - load_i)."""
  return bias_E + gamma * jnp.sign(load_E.mean() - load_E)
