"""Losses against hand-computed examples and the published formulas."""

import jax
import jax.numpy as jnp
import numpy as np

from rl_jax import losses


def test_mtp_targets_hand_example():
  # one row, two documents: tokens a b c | d e, targets = next tokens, EOS=9 closing each document
  targets = jnp.asarray([[2, 3, 9, 5, 9, 0]])
  mask = jnp.asarray([[1, 1, 1, 1, 1, 0]])
  seg = jnp.asarray([[1, 1, 1, 2, 2, 0]])
  t1, v1 = losses.mtp_targets(targets, mask, seg, 1)
  # depth 1 at i predicts token i+2 = targets[i+1], only inside the same document
  np.testing.assert_array_equal(np.asarray(t1)[0, :5], [3, 9, 5, 9, 0])
  np.testing.assert_array_equal(np.asarray(v1)[0], [1, 1, 0, 1, 0, 0])
  t2, v2 = losses.mtp_targets(targets, mask, seg, 2)
  np.testing.assert_array_equal(np.asarray(t2)[0, :1], [9])
  np.testing.assert_array_equal(np.asarray(v2)[0], [1, 0, 0, 0, 0, 0])


def test_mtp_loss_is_ce_on_shifted_targets():
  rs = np.random.RandomState(0)
  logits = jnp.asarray(rs.normal(size=(1, 5, 7)), jnp.float32)
  targets = jnp.asarray([[1, 2, 3, 4, 5]])
  mask = jnp.ones((1, 5), jnp.int32)
  got = losses.mtp_loss([logits], targets, mask)
  lp = jax.nn.log_softmax(logits[0])
  want = -np.mean([lp[i, int(targets[0, i + 1])] for i in range(4)])
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_cross_entropy_matches_formula():
  rs = np.random.RandomState(1)
  logits = rs.normal(size=(2, 3, 5)).astype(np.float32)
  targets = rs.randint(0, 5, (2, 3))
  mask = np.array([[1, 1, 0], [1, 0, 0]])
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  want = -(np.log(np.take_along_axis(p, targets[..., None], -1)[..., 0]) * mask).sum() / mask.sum()
  np.testing.assert_allclose(
    float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))), want, rtol=1e-5
  )


def test_balance_loss_formula():
  rs = np.random.RandomState(2)
  B, T, E, K = 2, 6, 4, 2
  s = rs.uniform(0.1, 1, (B, T, E)).astype(np.float32)
  idx = np.argsort(-s, -1)[..., :K]
  mask = np.ones((B, T))
  want = 0
  for b in range(B):
    f = np.array([E / (K * T) * sum(i in idx[b, t] for t in range(T)) for i in range(E)])
    P = (s[b] / s[b].sum(-1, keepdims=True)).mean(0)
    want += (f * P).sum() / B
  got = losses.balance_loss(jnp.asarray(s), jnp.asarray(idx), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert (
    abs(
      float(
        losses.balance_loss(
          jnp.full((1, 8, 4), 0.5),
          jnp.asarray(np.stack([np.arange(8) % 4, (np.arange(8) + 1) % 4], -1)[None]),
          jnp.ones((1, 8)),
        )
      )
      - 1.0
    )
    < 1e-6
  )  # balanced = 1


def test_bias_update_moves_load_toward_balance():
  """A skewed toy batch: routing through the biased scores gets more balanced as the bias updates."""
  from rl_jax.models.moe import route

  rs = np.random.RandomState(3)
  E, T = 8, 512
  logits = jnp.asarray(rs.normal(size=(T, E)) + np.linspace(2, -2, E)[None], jnp.float32)  # skewed to expert 0
  bias = jnp.zeros(E)
  imbalance = []
  for _ in range(300):
    r = route(logits, bias, k=2, n_group=1, topk_group=1, norm_topk_prob=True, scaling=1.0)
    load = losses.expert_load(r.experts_TK[None], jnp.ones((1, T)), E)
    imbalance.append(float(load.max() / load.mean()))
    bias = losses.bias_update(bias, load, 0.01)
  assert imbalance[0] > 2.5
  assert imbalance[-1] < 1.3
  assert float(bias[0]) < 0 < float(bias[-1])  # overloaded expert pushed down, starved one pulled up


def test_remat_gives_the_same_gradients():
  """train.remat trades memory for compute: gradients must not change."""
  from flax import nnx

  from rl_jax import models
  from rl_jax.models.config import preset

  model = models.build(preset("tiny-moe", vocab_size=64), seed=0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 12)), jnp.int32)

  def loss(p, remat):
    out = nnx.merge(graphdef, p, rest).forward(ids, mtp=True, remat=remat)
    return losses.cross_entropy(out.logits_BTV[:, :-1], ids[:, 1:], jnp.ones((2, 11)))

  g0 = jax.jit(jax.grad(lambda p: loss(p, False)))(params)
  g1 = jax.jit(jax.grad(lambda p: loss(p, True)))(params)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g0)) > 0
