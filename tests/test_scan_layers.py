"""Scanned layer groups (one lax.scan body per group) against the same stacked parameters run unrolled (one body
per layer): forward, gradients, remat, the sampler's tokens and log-probs, and the compiled programs' sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rl_jax import engine, models, sampling
from rl_jax.models.config import preset

CONFIGS = {
  "mla_moe": preset("tiny-moe", num_hidden_layers=4, moe_capacity_factor=None),  # 1 dense + 3 MoE layers, MTP
  "gqa": preset("tiny-dense", num_hidden_layers=3),
}


def _pair(name):
  """The same parameters as a scanned and an unrolled model."""
  cfg = CONFIGS[name]
  scanned = models.build(cfg, seed=2)
  graphdef, state = nnx.split(models.build(cfg.replace(scan_layers=False), seed=0))
  return scanned, nnx.merge(graphdef, nnx.state(scanned))


def _tokens(cfg, B=2, T=24, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, cfg.vocab_size, (B, T)), jnp.int32)


def _loss(model, tokens, remat=False):
  out = model.forward(tokens, mtp=bool(model.cfg.num_nextn_predict_layers), remat=remat)
  w = jnp.sin(jnp.arange(out.logits_BTV.shape[-1]))  # a loss whose gradient differs per vocab entry
  return (jax.nn.log_softmax(out.logits_BTV) * w).mean() + sum((m * w).mean() for m in out.mtp_logits)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_and_routing_match(name):
  scanned, unrolled = _pair(name)
  tokens = _tokens(scanned.cfg)
  fwd = lambda m: jax.jit(lambda s, t: nnx.merge(nnx.graphdef(m), s).forward(t, mtp=True))(nnx.state(m), tokens)
  a, b = fwd(scanned), fwd(unrolled)
  np.testing.assert_allclose(np.asarray(a.logits_BTV), np.asarray(b.logits_BTV), rtol=0, atol=1e-6)
  for x, y in zip(a.mtp_logits, b.mtp_logits):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)
  if scanned.cfg.n_routed_experts:
    assert a.routing.experts_TK.shape == (3, 2, 24, scanned.cfg.num_experts_per_tok)
    np.testing.assert_array_equal(np.asarray(a.routing.experts_TK), np.asarray(b.routing.experts_TK))
  # one body per group, not per layer: the scanned program is the smaller one
  text = lambda m: jax.jit(lambda s, t: nnx.merge(nnx.graphdef(m), s)(t)).lower(nnx.state(m), tokens).as_text()
  assert text(scanned).count("stablehlo.while") >= len(scanned.cfg.layer_groups())
  assert len(text(scanned)) < len(text(unrolled))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("remat", [False, True])
def test_gradients_match(name, remat):
  scanned, unrolled = _pair(name)
  tokens = _tokens(scanned.cfg, seed=1)
  grad = lambda m: jax.jit(jax.grad(lambda s: _loss(nnx.merge(nnx.graphdef(m), s), tokens, remat)))(nnx.state(m))
  ga, gb = jax.tree.leaves(grad(scanned)), jax.tree.leaves(grad(unrolled))
  assert len(ga) == len(gb) and sum(float(jnp.abs(g).max()) > 0 for g in ga) > len(ga) // 2
  for x, y in zip(ga, gb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sampled_tokens_match(name):
  """The decode loop carries the stacked cache through the scan: same tokens, log-probs and experts, in the static
  sampler and in the engine (whose slots write into the stacked cache at their own rows)."""
  scanned, unrolled = _pair(name)
  rs = np.random.RandomState(3)
  prompts = [rs.randint(3, scanned.cfg.vocab_size, n).tolist() for n in (5, 9, 3)]
  kw = dict(max_new_tokens=12, temperature=1.0, seed=7, num_samples=2)
  a, b = sampling.generate(scanned, prompts, **kw), sampling.generate(unrolled, prompts, **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-6)
  if a.experts is not None:
    np.testing.assert_array_equal(a.experts, b.experts)
  c, _ = engine.generate(scanned, prompts, slots=4, **kw)
  np.testing.assert_array_equal(c.tokens, a.tokens)
  np.testing.assert_allclose(c.logprobs, a.logprobs, rtol=0, atol=1e-5)
