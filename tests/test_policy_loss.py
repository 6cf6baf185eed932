"""GRPO-family losses against their published formulas, written here in float64 numpy: group advantages
(DeepSeekMath, Dr. GRPO), the clipped surrogate with KL k1/k2/k3, verl's four aggregations, GSPO's sequence
ratio; values AND gradients (analytic, per token), micro-batch accumulation, chunked log-probs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_jax import losses

jax.config.update("jax_enable_x64", False)


def _batch(seed=0, N=6, T=7):
  rs = np.random.RandomState(seed)
  old = rs.normal(-2.0, 0.5, (N, T))
  # ratios from e^-1.5 to e^1.5: far outside any clip range as well as inside it
  logp = old + rs.uniform(-1.5, 1.5, (N, T))
  ref = old + rs.normal(0, 0.7, (N, T))
  mask = (rs.rand(N, T) < 0.8).astype(np.float64)
  mask[0, :] = 1.0
  mask[-1, :] = 0.0  # an all-padding row: counts for no aggregation
  adv = rs.normal(0, 1, N)
  adv[1] = -abs(adv[1])  # negative advantages
  return logp, old, ref, mask, adv


# ------------------------------------------------------------------ references (float64, per token)
def ref_kl(logp, ref, kind):
  d = ref - logp
  return {"k1": -d, "k2": 0.5 * d * d, "k3": np.exp(d) - d - 1}[kind]


def ref_kl_grad(logp, ref, kind):
  d = ref - logp  # d/dlogp of the estimators above
  return {"k1": np.ones_like(d), "k2": -d, "k3": 1 - np.exp(d)}[kind]


def ref_weights(mask, agg, max_len):
  """w[i, t]: the loss is sum_it w_it * l_it for each aggregation (the published normalisations)."""
  n_i = mask.sum(1)
  rows = (n_i > 0).sum()
  if agg == "token-mean":
    return mask / mask.sum()
  if agg == "seq-mean-token-mean":
    return mask / np.maximum(n_i, 1)[:, None] / rows
  if agg == "seq-mean-token-sum":
    return mask / rows
  return mask / (rows * max_len)


def ref_token_terms(logp, old, ref, adv, mask, clip_low, clip_high, beta, kl, level):
  """(per-token loss, its derivative wrt logp[i, t] holding the rest fixed (token level only))."""
  if level == "token":
    r = np.exp(logp - old)
  else:
    seq = ((logp - old) * mask).sum(1) / np.maximum(mask.sum(1), 1)
    r = np.repeat(np.exp(seq)[:, None], logp.shape[1], 1)
  A = adv[:, None]
  unclipped, clipped = r * A, np.clip(r, 1 - clip_low, 1 + clip_high) * A
  loss = -np.minimum(unclipped, clipped) + beta * ref_kl(logp, ref, kl)
  # gradient of -min(rA, clip(r)A): -rA where the unclipped term is the min (or they tie inside the range)
  active = unclipped <= clipped
  grad = np.where(active, -r * A, 0.0) + beta * ref_kl_grad(logp, ref, kl)
  return loss, grad


def test_group_advantages_against_formula():
  rs = np.random.RandomState(1)
  r = rs.randint(0, 3, 12).astype(np.float64)
  r[4:8] = 1.0  # an all-equal group: advantage 0, not NaN
  G = 4
  g = r.reshape(-1, G)
  centred = (g - g.mean(1, keepdims=True)).ravel()
  want = {
    "group": ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)).ravel(),
    "batch": centred / (r.std(ddof=1) + 1e-4),
    "none": centred,
  }
  for scale, w in want.items():
    got = np.asarray(losses.group_advantages(r, G, scale=scale))
    np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6, err_msg=scale)
  assert np.all(np.asarray(losses.group_advantages(r, G))[4:8] == 0)
  with pytest.raises(ValueError, match="groups of 5"):
    losses.group_advantages(r, 5)
  with pytest.raises(ValueError, match="scale"):
    losses.group_advantages(r, G, scale="std")


@pytest.mark.parametrize("agg", losses.LOSS_AGGS)
@pytest.mark.parametrize("kl", losses.KL_ESTIMATORS)
def test_policy_loss_values_and_gradients(agg, kl):
  logp, old, ref, mask, adv = _batch()
  clip_low, clip_high, beta, max_len = 0.2, 0.28, 0.04, 9
  terms, dterms = ref_token_terms(logp, old, ref, adv, mask, clip_low, clip_high, beta, kl, "token")
  w = ref_weights(mask, agg, max_len)
  want = (w * terms).sum()

  def f(lp):
    return losses.policy_loss(
      lp,
      old,
      adv,
      mask,
      ref_logp=ref,
      loss_agg=agg,
      clip_low=clip_low,
      clip_high=clip_high,
      beta=beta,
      kl=kl,
      max_len=max_len,
    )

  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp, jnp.float32))
  np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), w * dterms, rtol=2e-4, atol=1e-6)
  r = np.exp(logp - old)
  A = adv[:, None]
  clipped = ((A > 0) & (r > 1 + clip_high)) | ((A < 0) & (r < 1 - clip_low))
  np.testing.assert_allclose(float(metrics["clip_frac"]), (clipped * mask).sum() / mask.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["kl"]), (ref_kl(logp, ref, kl) * mask).sum() / mask.sum(), rtol=1e-4)
  assert 0 < float(metrics["clip_frac"]) < 1  # the batch exercises both branches


def test_gspo_sequence_ratio():
  """GSPO: s_i = exp(mean_t log r_it), clipped per sequence; value and gradient by finite differences of the
  float64 formula (every token of a row moves s_i)."""
  logp, old, ref, mask, adv = _batch(seed=3)
  kw = dict(clip_low=3e-3, clip_high=4e-3, beta=0.0, kl="k3", level="sequence")
  w = ref_weights(mask, "seq-mean-token-mean", None)

  def ref_loss(lp):
    return (w * ref_token_terms(lp, old, ref, adv, mask, **kw)[0]).sum()

  f = lambda lp: losses.policy_loss(
    lp, old, adv, mask, clip_low=3e-3, clip_high=4e-3, ratio_level="sequence", loss_agg="seq-mean-token-mean"
  )[0]
  # rows near ratio 1 so some sequences sit inside the tiny clip range
  logp = old + (logp - old) * 1e-3
  logp[2] = old[2] + 0.5  # and one far outside, with a positive advantage: clipped
  adv = adv.copy()
  adv[2] = abs(adv[2]) + 0.1
  loss, grad = jax.value_and_grad(f)(jnp.asarray(logp, jnp.float32))
  np.testing.assert_allclose(float(loss), ref_loss(logp), rtol=1e-5, atol=1e-7)
  eps = 1e-6
  fd = np.zeros_like(logp)
  for i, t in itertools.product(range(logp.shape[0]), range(logp.shape[1])):
    e = np.zeros_like(logp)
    e[i, t] = eps
    fd[i, t] = (ref_loss(logp + e) - ref_loss(logp - e)) / (2 * eps)
  np.testing.assert_allclose(np.asarray(grad), fd, rtol=1e-3, atol=1e-5)
  assert np.abs(fd[2]).sum() == 0 and np.abs(fd[0]).sum() > 0  # clipped row: no gradient; inside: some


@pytest.mark.parametrize("agg", losses.LOSS_AGGS)
def test_micro_batch_accumulation_equals_full_batch(agg):
  """Summing micro-batch losses (each divided by the whole batch's denominator) gives the full-batch loss and
  gradient, for every aggregation: token-mean divides by the global token count, not per micro-batch."""
  logp, old, ref, mask, adv = _batch(seed=5, N=8)
  mask[2, 3:] = 0  # uneven row lengths across the two halves
  kw = dict(ref_logp=ref, loss_agg=agg, beta=0.01, max_len=7)
  full = lambda lp: losses.policy_loss(lp, old, adv, mask, **kw)[0]
  den = losses.loss_denominator(mask, agg, 7)

  def split(lp):
    parts = [slice(0, 3), slice(3, 8)]
    return sum(
      losses.policy_loss(lp[s], old[s], adv[s], mask[s], **{**kw, "ref_logp": ref[s]}, denominator=den)[0]
      for s in parts
    )

  x = jnp.asarray(logp, jnp.float32)
  np.testing.assert_allclose(float(split(x)), float(full(x)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.grad(split)(x)), np.asarray(jax.grad(full)(x)), rtol=1e-5, atol=1e-8)
  naive = sum(
    float(losses.policy_loss(logp[s], old[s], adv[s], mask[s], **{**kw, "ref_logp": ref[s]})[0])
    for s in [slice(0, 3), slice(3, 8)]
  )
  if agg == "token-mean":  # per-micro-batch normalisation would differ: the test can tell
    assert abs(naive - float(full(x))) > 1e-4


def test_chunked_logprobs_equal_full_and_tempered():
  rs = np.random.RandomState(0)
  B, T, D, V = 2, 13, 8, 50
  h = jnp.asarray(rs.normal(size=(B, T, D)), jnp.float32)
  W = jnp.asarray(rs.normal(size=(D, V)), jnp.float32)
  tg = jnp.asarray(rs.randint(0, V, (B, T)))
  for temp in (1.0, 0.7):

    def full(h, W, temp=temp):
      logits = (h @ W) / temp
      lp = jax.nn.log_softmax(logits)
      p = jax.nn.softmax(logits)
      return jnp.take_along_axis(lp, tg[..., None], -1)[..., 0], -(p * lp).sum(-1)

    def chunked(h, W, temp=temp):
      return losses.chunked_token_logprobs(lambda x: x @ W, h, tg, chunk=4, temperature=temp)

    for a, b in zip(full(h, W), chunked(h, W)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    g_full = jax.grad(lambda h, W: full(h, W)[0].sum() + 0.1 * full(h, W)[1].sum(), argnums=(0, 1))(h, W)
    g_chunk = jax.grad(lambda h, W: chunked(h, W)[0].sum() + 0.1 * chunked(h, W)[1].sum(), argnums=(0, 1))(h, W)
    for a, b in zip(g_full, g_chunk):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
  # the tempered log-probs are those of softmax(logits / T), not of the raw logits
  lp07 = losses.chunked_token_logprobs(lambda x: x @ W, h, tg, temperature=0.7)[0]
  lp1 = losses.chunked_token_logprobs(lambda x: x @ W, h, tg, temperature=1.0)[0]
  assert np.abs(np.asarray(lp07) - np.asarray(lp1)).max() > 1e-2
