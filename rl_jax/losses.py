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


# ------------------------------------------------------------------ policy-gradient (GRPO family)
# Sequences are rows: logp / old_logp / ref_logp / mask are [N, T] over the completion tokens, advantages [N].
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


def group_advantages(rewards, group_size: int, *, scale: str = "group"):
  """Outcome advantages for rewards [N] grouped contiguously (rows p*G .. p*G+G-1, as the sampler returns them).

  "group": (r - group mean) / (group sample std + 1e-4)  (GRPO);  "batch": the group mean removed, divided by the
  sample std of all N rewards + 1e-4;  "none": the group mean removed only (Dr. GRPO)."""
  r = jnp.asarray(rewards, jnp.float32)
  N = r.shape[0]
  if scale not in ("group", "batch", "none"):
    raise ValueError(f"advantage scale must be 'group', 'batch' or 'none', got {scale!r}")
  if group_size < 1 or N % group_size:
    raise ValueError(f"{N} rewards do not split into groups of {group_size}")
  if scale == "group" and group_size < 2:
    raise ValueError("advantage scale 'group' needs group_size >= 2 (a sample std of one reward is undefined)")
  g = r.reshape(N // group_size, group_size)
  centred = g - g.mean(1, keepdims=True)
  if scale == "group":
    return (centred / (g.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(N)
  if scale == "batch":
    return centred.reshape(N) / (r.std(ddof=1) + 1e-4)
  return centred.reshape(N)


def kl_penalty(logp, ref_logp, kind: str = "k3"):
  """Per-token estimators of KL(pi || pi_ref) from tokens sampled by pi (Schulman's k1, k2, k3; k3 >= 0)."""
  d = ref_logp - logp  # log(pi_ref / pi)
  if kind == "k1":
    return -d
  if kind == "k2":
    return 0.5 * d * d
  if kind == "k3":
    return jnp.exp(d) - d - 1.0
  raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {kind!r}")


def loss_denominator(mask, loss_agg: str = "seq-mean-token-mean", max_len: int | None = None):
  """What `policy_loss` divides by: computed once on the whole batch and passed to every micro-batch, the
  chosen aggregation holds for the batch (token-mean divides by the global token count)."""
  mask = jnp.asarray(mask, jnp.float32)
  if loss_agg == "token-mean":
    return mask.sum()
  n_seq = (mask.sum(1) > 0).sum().astype(jnp.float32)  # rows with no completion token (padding) do not count
  if loss_agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
    return n_seq
  if loss_agg == "seq-mean-token-sum-norm":
    return n_seq * float(max_len or mask.shape[1])
  raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")


def policy_loss(
  logp,
  old_logp,
  advantages,
  mask,
  *,
  ref_logp=None,
  loss_agg: str = "seq-mean-token-mean",
  clip_low: float = 0.2,
  clip_high: float = 0.2,
  beta: float = 0.0,
  kl: str = "k3",
  ratio_level: str = "token",
  max_len: int | None = None,
  token_weights=None,
  denominator=None,
):
  """Clipped policy-gradient loss with an optional KL to a reference; returns (loss, metrics).

  Per token: -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) [* token_weights] + beta * KL_kl(pi || pi_ref), with
  r = exp(logp - old_logp) ("token") or GSPO's length-normalised sequence ratio exp(mean_t (logp - old_logp))
  broadcast over the row's tokens ("sequence"). `token_weights` (e.g. truncated importance weights for the
  sampler/trainer mismatch) scale the surrogate only. Aggregation (verl's names): "token-mean" sums over all
  tokens / token count; "seq-mean-token-mean" averages each row over its tokens, then rows; "seq-mean-token-sum"
  sums each row, averages rows; "seq-mean-token-sum-norm" sums everything / (rows * max_len) (Dr. GRPO).
  `denominator`: the whole batch's `loss_denominator`, for exact gradient accumulation over micro-batches."""
  if ratio_level not in ("token", "sequence"):
    raise ValueError(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}")
  mask = jnp.asarray(mask, jnp.float32)
  logp = jnp.asarray(logp, jnp.float32)
  A = jnp.asarray(advantages, jnp.float32)[:, None]
  log_ratio = (logp - old_logp) * mask
  if ratio_level == "sequence":
    seq = log_ratio.sum(1, keepdims=True) / jnp.maximum(mask.sum(1, keepdims=True), 1.0)
    log_ratio = jnp.broadcast_to(seq, logp.shape)
  ratio = jnp.exp(log_ratio)
  clipped_ratio = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  surrogate = -jnp.minimum(ratio * A, clipped_ratio * A)
  if token_weights is not None:
    surrogate = surrogate * token_weights
  per_token = surrogate
  kl_tok = jnp.zeros_like(logp)
  if ref_logp is not None:
    kl_tok = kl_penalty(logp, ref_logp, kl)
    per_token = per_token + beta * kl_tok
  if loss_agg == "seq-mean-token-mean":
    row_tokens = jnp.maximum(mask.sum(1, keepdims=True), 1.0)
    numerator = (per_token * mask / row_tokens).sum()
  else:
    numerator = (per_token * mask).sum()
  den = loss_denominator(mask, loss_agg, max_len) if denominator is None else denominator
  loss = numerator / jnp.maximum(den, 1e-9)
  n_tok = jnp.maximum(mask.sum(), 1.0)
  is_clipped = ((A > 0) & (ratio > 1.0 + clip_high)) | ((A < 0) & (ratio < 1.0 - clip_low))
  metrics = {
    "pg_loss": loss,
    "clip_frac": (is_clipped * mask).sum() / n_tok,
    "ratio_mean": (ratio * mask).sum() / n_tok,
    "kl": (kl_tok * mask).sum() / n_tok,
  }
  return loss, metrics


def chunked_token_logprobs(head_fn, hidden_BTD, targets_BT, *, chunk: int = 256, temperature: float = 1.0):
  """(log p(target), entropy) per token, float32 [B, T], from final hidden states: `head_fn(h [B, c, D]) -> logits`
  runs on `chunk` positions at a time and is recomputed in the backward pass, so no [B, T, V] float32 tensor ever
  exists whole. Logits are divided by `temperature` first (the distribution the sampler drew from)."""
  B, T, D = hidden_BTD.shape
  c = min(chunk, T)
  n = -(-T // c)
  pad = n * c - T
  h = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0))).reshape(B, n, c, D).swapaxes(0, 1)
  tg = jnp.pad(targets_BT, ((0, 0), (0, pad))).reshape(B, n, c).swapaxes(0, 1)

  @jax.checkpoint
  def one(h_BcD, t_Bc):
    logits = head_fn(h_BcD).astype(jnp.float32) / temperature
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, t_Bc[..., None], axis=-1)[..., 0]
    entropy = logz - (jax.nn.softmax(logits, axis=-1) * logits).sum(-1)
    return picked - logz, entropy

  lp, ent = jax.lax.map(lambda a: one(*a), (h, tg))
  unchunk = lambda x: x.swapaxes(0, 1).reshape(B, n * c)[:, :T]
  return unchunk(lp), unchunk(ent)


# ------------------------------------------------------------------ distillation (teacher -> student logits)
# P is the teacher's distribution, Q the student's, both of logits / temperature. Per token [B, T]; averaged
# over mask=1 tokens; no T^2 factor (scale the loss weight instead).
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _check_divergence(divergence: str, temperature: float, jsd_beta: float) -> None:
  if divergence not in DIVERGENCES:
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
  if not temperature > 0:
    raise ValueError(f"distillation temperature must be > 0, got {temperature}")
  if not 0.0 <= jsd_beta <= 1.0:
    raise ValueError(f"jsd_beta must be in [0, 1], got {jsd_beta}")


def _kl(logp_a, logp_b):
  """KL(A || B) over the last axis from log-probs (terms with a = 0 contribute 0)."""
  return (jnp.exp(logp_a) * (logp_a - logp_b)).sum(-1)


def _jsd(logp, logq, beta: float, q_rest=None):
  """beta KL(P||M) + (1 - beta) KL(Q||M), M = beta P + (1 - beta) Q, log M by logsumexp. `q_rest` [...]: Q's
  mass outside the given support, where P = 0, so M = (1 - beta) Q there and KL(Q||M) gains q_rest log 1/(1-beta)."""
  if beta <= 0.0 or beta >= 1.0:  # M is Q (or P): both terms vanish
    return jnp.zeros(logp.shape[:-1], jnp.float32)
  logm = jnp.logaddexp(logp + jnp.log(beta), logq + jnp.log1p(-beta))
  out = beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)
  if q_rest is not None:
    out = out - (1.0 - beta) * q_rest * jnp.log1p(-beta)
  return out


def _token_divergence(logq_V, teacher, divergence: str, temperature: float, jsd_beta: float):
  """(divergence, teacher entropy, top-1 agreement) per token from the student's log-probs [..., V] and the
  teacher: its logits [..., V], or a (values, indices) pair [..., k] of its top-k logits (see distill_loss_topk)."""
  if isinstance(teacher, (tuple, list)):
    values, indices = teacher
    logp = jax.nn.log_softmax(values.astype(jnp.float32) / temperature, axis=-1)  # P renormalised over its top k
    logq_k = jnp.take_along_axis(logq_V, indices, axis=-1)  # the student's full-vocab log-probs there
    if divergence == "forward_kl":
      div = _kl(logp, logq_k)
    elif divergence == "reverse_kl":  # Q renormalised over the same k tokens: KL(Q || P_k) is infinite otherwise
      div = _kl(jax.nn.log_softmax(logq_k, axis=-1), logp)
    else:
      div = _jsd(logp, logq_k, jsd_beta, q_rest=jnp.maximum(1.0 - jnp.exp(logq_k).sum(-1), 0.0))
    teacher_top1 = jnp.take_along_axis(indices, jnp.argmax(values, axis=-1)[..., None], axis=-1)[..., 0]
  else:
    logp = jax.nn.log_softmax(teacher.astype(jnp.float32) / temperature, axis=-1)
    div = {"forward_kl": lambda: _kl(logp, logq_V), "reverse_kl": lambda: _kl(logq_V, logp)}.get(
      divergence, lambda: _jsd(logp, logq_V, jsd_beta)
    )()
    teacher_top1 = jnp.argmax(logp, axis=-1)
  entropy = -(jnp.exp(logp) * logp).sum(-1)
  agree = (jnp.argmax(logq_V, axis=-1) == teacher_top1).astype(jnp.float32)
  return div, jax.lax.stop_gradient(entropy), jax.lax.stop_gradient(agree)


def _masked_metrics(div, entropy, agree, mask_BT):
  mask = mask_BT.astype(jnp.float32)
  n = jnp.maximum(mask.sum(), 1.0)
  loss = (div * mask).sum() / n
  return loss, {"kd": loss, "teacher_entropy": (entropy * mask).sum() / n, "agreement": (agree * mask).sum() / n}


def distill_loss(
  student_logits, teacher_logits, mask, *, divergence: str = "forward_kl", temperature: float = 1.0, jsd_beta=0.5
):
  """Logit distillation, the reference definition; returns (loss, metrics {kd, teacher_entropy, agreement}).

  P = softmax(teacher / T), Q = softmax(student / T) over the full vocabulary [B, T, V]; per token
  forward_kl = KL(P||Q), reverse_kl = KL(Q||P), jsd = b KL(P||M) + (1 - b) KL(Q||M) with M = b P + (1 - b) Q
  (b = jsd_beta; 0 at b in {0, 1}); averaged over mask=1 tokens, no T^2 factor. `agreement`: the fraction of
  tokens where the student's argmax is the teacher's; `teacher_entropy`: H(P). The teacher gets no gradient."""
  _check_divergence(divergence, temperature, jsd_beta)
  logq = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  teacher = jax.lax.stop_gradient(teacher_logits)
  return _masked_metrics(*_token_divergence(logq, teacher, divergence, temperature, jsd_beta), mask)


def distill_loss_topk(
  student_logits,
  teacher_values,
  teacher_indices,
  mask,
  *,
  divergence: str = "forward_kl",
  temperature: float = 1.0,
  jsd_beta=0.5,
):
  """distill_loss when the teacher gives only its top-k logits `teacher_values` [B, T, k] at vocabulary ids
  `teacher_indices` [B, T, k]. Computed, per token, with P_k = softmax(values / T) (the teacher renormalised
  over its k tokens, zero elsewhere) and q_i = softmax(student / T)_i the student's FULL-vocabulary probs:
    forward_kl = sum_{i in K} p_i (log p_i - log q_i) = KL(P_k || Q) exactly;
    jsd        = KL with M = b P_k + (1 - b) Q over the whole vocabulary, exactly: the k terms plus, outside K
                 (where M = (1 - b) Q), (1 - b) (1 - sum_{i in K} q_i) log 1/(1 - b);
    reverse_kl = KL(Q_k || P_k), Q_k = Q renormalised over K (KL(Q || P_k) is infinite when Q has mass outside K).
  With k = V (any order) all three equal distill_loss."""
  _check_divergence(divergence, temperature, jsd_beta)
  logq = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  teacher = (jax.lax.stop_gradient(teacher_values), teacher_indices)
  return _masked_metrics(*_token_divergence(logq, teacher, divergence, temperature, jsd_beta), mask)


def chunked_distill_loss(
  head_fn,
  hidden_BTD,
  teacher,
  mask_BT,
  *,
  targets_BT=None,
  chunk: int = 256,
  divergence: str = "forward_kl",
  temperature: float = 1.0,
  jsd_beta=0.5,
):
  """distill_loss (teacher logits [B, T, V]) or distill_loss_topk (teacher a (values, indices) pair [B, T, k])
  from the student's final hidden states: `head_fn(h [B, c, D]) -> logits` runs on `chunk` positions at a time
  and is recomputed in the backward pass, so no [B, T, V] student logits exist whole. With `targets_BT` the
  metrics also hold `ce`, the next-token cross-entropy (at temperature 1) on the same mask=1 tokens, which is
  differentiable like the loss. Returns (loss, metrics)."""
  _check_divergence(divergence, temperature, jsd_beta)
  B, T, D = hidden_BTD.shape
  c = min(chunk, T)
  n = -(-T // c)
  split = lambda x: jnp.pad(x, [(0, 0), (0, n * c - T)] + [(0, 0)] * (x.ndim - 2)).reshape(B, n, c, *x.shape[2:]).swapaxes(0, 1)  # fmt: skip
  teacher = jax.tree.map(jax.lax.stop_gradient, teacher)
  targets = jnp.zeros((B, T), jnp.int32) if targets_BT is None else targets_BT

  @jax.checkpoint
  def one(h_BcD, t_Bc, teacher_c):
    logits = head_fn(h_BcD).astype(jnp.float32)
    logq = jax.nn.log_softmax(logits / temperature, axis=-1)
    div, ent, agree = _token_divergence(logq, teacher_c, divergence, temperature, jsd_beta)
    logp_target = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), t_Bc[..., None], axis=-1)[..., 0]
    return div, ent, agree, logp_target

  per = jax.lax.map(lambda a: one(*a), (split(hidden_BTD), split(targets), jax.tree.map(split, teacher)))
  div, ent, agree, logp = (x.swapaxes(0, 1).reshape(B, n * c)[:, :T] for x in per)
  loss, metrics = _masked_metrics(div, ent, agree, mask_BT)
  if targets_BT is not None:
    mask = mask_BT.astype(jnp.float32)
    metrics["ce"] = -(logp * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  return loss, metrics
