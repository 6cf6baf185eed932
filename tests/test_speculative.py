"""MTP speculative decoding: greedy output == plain greedy decoding (random and trained weights, EOS, several
prompt lengths, draft lengths 1-3, one MTP module chained or V3's sequential modules); sampled output has the
model's exact distribution (chi-square against probabilities enumerated by teacher forcing), and the same test
rejects a broken acceptance / residual rule."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from flax import nnx

from rl_jax import models, sampling, speculative
from rl_jax.models import ModelConfig

# A dense and an MoE V3-shaped model with one MTP module (MLA, dropless routing).
BASE = dict(
  arch="deepseek_v3",
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=2,
  q_lora_rank=16,
  kv_lora_rank=16,
  qk_rope_head_dim=8,
  qk_nope_head_dim=8,
  v_head_dim=8,
  num_nextn_predict_layers=1,
)
MOE = dict(
  n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1
)
PROMPTS = [[5, 17, 3], [20, 3, 9, 41, 7, 12, 50], [9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


def _data(key, B: int, T: int, V: int):
  """Arithmetic progressions mod V (step 1..3, random start): the next two tokens follow from the last two."""
  k1, k2 = jax.random.split(key)
  start = jax.random.randint(k1, (B, 1), 0, V)
  step = jax.random.randint(k2, (B, 1), 1, 4)
  return (start + step * jnp.arange(T)[None]) % V


@functools.cache
def _trained(D: int = 1):
  """A dense tiny V3 with D MTP modules trained (main + MTP losses) until all predict the progressions well:
  high acceptance."""
  model = models.build(ModelConfig(vocab_size=64, **{**BASE, "num_nextn_predict_layers": D}), seed=0)
  opt = nnx.Optimizer(model, optax.adam(2e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x):
    def loss_fn(model):
      out = model.forward(x[:, :-1], mtp=True)
      ce = optax.softmax_cross_entropy_with_integer_labels(out.logits_BTV, x[:, 1:]).mean()
      xent = optax.softmax_cross_entropy_with_integer_labels
      return ce + sum(xent(out.mtp_logits[k][:, : -(k + 1)], x[:, k + 2 :]).mean() for k in range(D))

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  for i in range(60):
    step(model, opt, _data(jax.random.key(i), 32, 24, 64))
  return model


@functools.cache
def _random_moe():
  return models.build(ModelConfig(vocab_size=64, initializer_range=0.1, **BASE, **MOE), seed=1)


@pytest.mark.parametrize("which", ["random_moe", "trained", "trained_2_modules"])
def test_greedy_equals_plain_greedy(which):
  model = {"random_moe": _random_moe, "trained": _trained, "trained_2_modules": lambda: _trained(2)}[which]()
  trained = which != "random_moe"
  prompts = PROMPTS + ([[3, 5], [10, 11, 12]] if trained else [])
  # EOS: a token row 1 emits mid-way, so that rows end at different steps
  eos = int(sampling.generate(model, prompts, max_new_tokens=24, temperature=0.0).tokens[1, 9])
  ref = sampling.generate(model, prompts, max_new_tokens=24, temperature=0.0, eos_id=eos)
  assert (ref.lengths < 24).any() and (ref.lengths > 1).any(), ref.lengths
  # (compile time: the MoE one drafts 1; with 2 modules, K = 3 chains the second)
  for K in {"random_moe": (1,), "trained": (1, 2), "trained_2_modules": (2, 3)}[which]:
    out = speculative.generate(model, prompts, max_new_tokens=24, eos_id=eos, draft_len=K)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
    assert out.drafted > 0
    if trained:  # the accept path is exercised, and steps are saved
      assert out.acceptance_rate > 0.5, out.acceptance_rate
      if which == "trained_2_modules" and K == 2:  # module 2 fed module 1's draft (0.86; 0.61 when fed x_{p+1})
        assert out.acceptance_rate > 0.75, out.acceptance_rate
      assert out.steps < 24 * 0.75


# ------------------------------------------------------------------ the sampled distribution
V_SMALL, ROWS = 8, 8192
PROMPT = [[3, 1, 4]]


@functools.cache
def _small(D: int = 1):
  """Vocab 8, sharp distributions; the untrained MTP disagrees with the main model (rejections happen)."""
  cfg = ModelConfig(
    vocab_size=V_SMALL, initializer_range=0.6, **{**BASE, "num_hidden_layers": 1, "num_nextn_predict_layers": D}
  )
  return models.build(cfg, seed=3)


def _exact(model, n: int):
  """P(x_1 .. x_n | prompt) for every continuation, by teacher forcing: [V] * n array."""
  seqs = np.array(list(itertools.product(range(V_SMALL), repeat=n)), np.int32)
  x = np.concatenate([np.repeat(np.array(PROMPT, np.int32), len(seqs), 0), seqs], 1)
  logp = jax.nn.log_softmax(model(jnp.asarray(x[:, :-1])), -1)
  P = len(PROMPT[0])
  lp = sum(np.take_along_axis(np.asarray(logp[:, P - 1 + i]), seqs[:, i : i + 1], 1)[:, 0] for i in range(n))
  return np.exp(lp).reshape((V_SMALL,) * n)


def _chi2(tokens, probs, cols):
  """Chi-square statistic and its 1e-4 critical value for the tokens' joint distribution over `cols`."""
  p = probs.sum(axis=tuple(i for i in range(probs.ndim) if i not in cols)).ravel()
  idx = np.ravel_multi_index(tuple(tokens[:, c] for c in cols), (V_SMALL,) * len(cols))
  counts = np.bincount(idx, minlength=p.size)
  expected = p * len(tokens)
  big = expected >= 5  # small cells pooled into one
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  stat = float(((obs - exp) ** 2 / np.maximum(exp, 1e-12)).sum())
  return stat, float(scipy.stats.chi2.ppf(1 - 1e-4, len(obs) - 1))


def _sampled(K: int, n: int, D: int = 1):
  return speculative.generate(_small(D), PROMPT * ROWS, max_new_tokens=n, temperature=1.0, seed=11, draft_len=K)


# Two drafts a step: the first token comes from the prefill, the second and third out of the accept / reject
# step (the third from a chained draft or the second MTP module, or the main model's token after a rejection).
# Their joint is tested.
K, N_NEW, COLS = 2, 3, (1, 2)


@pytest.mark.parametrize("D", [1, 2])
def test_sampled_distribution_is_the_models(D):
  out = _sampled(K, N_NEW, D)
  assert 0.1 < out.acceptance_rate < 0.9, out.acceptance_rate  # both branches taken
  stat, crit = _chi2(out.tokens, _exact(_small(D), N_NEW), COLS)
  assert stat < crit, (stat, crit)


@pytest.mark.parametrize("broken", ["always_accept", "residual_is_p"])
def test_broken_rule_fails_the_distribution_test(monkeypatch, broken):
  monkeypatch.setattr(speculative, "_COMPILED", {})  # retrace with the broken rule
  if broken == "always_accept":
    monkeypatch.setattr(speculative, "accept_rule", lambda p, q, d, u: jnp.ones(d.shape, bool))
  else:
    monkeypatch.setattr(speculative, "residual", lambda p, q: p)
  stat, crit = _chi2(_sampled(K, N_NEW).tokens, _exact(_small(), N_NEW), COLS)
  assert stat > crit, (stat, crit)


def test_bad_input():
  dense = models.build(ModelConfig(vocab_size=16, **{**BASE, "num_nextn_predict_layers": 0}), seed=0)
  with pytest.raises(ValueError, match="MTP module"):
    speculative.generate(dense, [[1]], max_new_tokens=4)
  with pytest.raises(ValueError, match="draft_len"):
    speculative.generate(_small(), [[1]], max_new_tokens=4, draft_len=0)
