"""Sampler: cache-decode greedy == full recomputation, log-probs == teacher forcing, sampling distributions,
EOS handling, row independence, sample grouping and MoE routing replay."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rl_jax import models, sampling
from rl_jax.models import ModelConfig, RopeConfig
from rl_jax.sampling import generate, sample_logits

MLA_CFG = ModelConfig(
  arch="deepseek_v3",
  vocab_size=256,
  hidden_size=64,
  intermediate_size=128,
  moe_intermediate_size=32,
  num_hidden_layers=3,
  num_attention_heads=4,
  n_shared_experts=1,
  n_routed_experts=8,
  num_experts_per_tok=2,
  n_group=2,
  topk_group=1,
  first_k_dense_replace=1,
  routed_scaling_factor=2.5,
  q_lora_rank=32,
  kv_lora_rank=16,
  qk_rope_head_dim=8,
  qk_nope_head_dim=16,
  v_head_dim=16,
  rope=RopeConfig(
    type="yarn", factor=4.0, original_max_position_embeddings=128, mscale=1.0, mscale_all_dim=1.0, interleave=True
  ),
)
GQA_CFG = ModelConfig(
  arch="llama",
  vocab_size=256,
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
)
CFGS = {"mla_moe": MLA_CFG, "gqa": GQA_CFG}
PROMPTS = [[5, 17, 33], [200, 3, 9, 41, 77, 12, 150], [99, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
REF_LEN, REF_ROWS = 32, 32  # reference forwards pad to this shape (one compile per model)


@functools.cache
def _model_and_states(name):
  """One model per config (so compiled samplers and references are shared: they key on the graphdef)
  and two parameter sets: random init, and embed/lm_head x20 so greedy argmaxes are far from ties."""
  model = models.build(CFGS[name], seed=1)
  copy = lambda: jax.tree.map(lambda x: x, nnx.state(model))  # new Variables: unaffected by later edits
  flat_state = copy()
  model.embed[...] = model.embed[...] * 20.0
  model.lm_head[...] = model.lm_head[...] * 20.0
  return model, flat_state, copy()


def sharp(name):
  model, _, state = _model_and_states(name)
  nnx.update(model, state)
  return model


def flat(name):
  model, state, _ = _model_and_states(name)
  nnx.update(model, state)
  return model


@functools.partial(jax.jit, static_argnums=0)
def _ref_forward(graphdef, state, tokens_BL):
  out = nnx.merge(graphdef, state).forward(tokens_BL)
  experts = None if out.routing is None else jnp.moveaxis(out.routing.experts_TK, 0, 2)  # [B, T, L, K]
  return jax.nn.log_softmax(out.logits_BTV, -1), experts


def ref_forward(model, seqs):
  """Plain training forward (no cache), each sequence in its own row right-padded to REF_LEN: causal, so
  position i sees exactly seq[:i+1]. Returns log-probs [n, REF_LEN, V] and experts [n, REF_LEN, L, K]."""
  assert len(seqs) <= REF_ROWS
  tokens = np.zeros((REF_ROWS, REF_LEN), np.int32)
  for i, s in enumerate(seqs):
    assert len(s) <= REF_LEN
    tokens[i, : len(s)] = s
  graphdef, state = nnx.split(model)
  lp, ex = _ref_forward(graphdef, state, jnp.asarray(tokens))
  return np.asarray(lp[: len(seqs)]), (None if ex is None else np.asarray(ex[: len(seqs)]))


def completions(res, i):
  return [int(t) for t in res.tokens[i, : res.lengths[i]]]


# ------------------------------------------------------------------ 1. greedy == recomputation
@pytest.mark.parametrize("name", ["mla_moe", "gqa"])
def test_greedy_matches_full_recomputation(name):
  model, T = sharp(name), 10
  res = generate(model, PROMPTS, max_new_tokens=T, temperature=0.0)
  assert res.tokens.shape == (3, T) and res.tokens.dtype == np.int32
  np.testing.assert_array_equal(res.lengths, [T] * 3)
  # Every step recomputed from scratch: one row per (prompt, prefix of the generation so far).
  prefixes = [p + completions(res, i)[:j] for i, p in enumerate(PROMPTS) for j in range(T)]
  lp, _ = ref_forward(model, prefixes)
  want = np.array([lp[r, len(s) - 1].argmax() for r, s in enumerate(prefixes)]).reshape(3, T)
  np.testing.assert_array_equal(res.tokens, want)
  margins = [np.diff(np.sort(lp[r, len(s) - 1])[-2:])[0] for r, s in enumerate(prefixes)]
  assert min(margins) > 1e-3, "near-tie in the reference: the comparison would be meaningless"
  assert len({tuple(r) for r in res.tokens}) == 3  # the rows really differ


# ------------------------------------------------------------------ 2. log-probs == teacher forcing
@pytest.mark.parametrize("name", ["mla_moe", "gqa"])
@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=20)])
def test_logprobs_match_teacher_forcing(name, settings):
  model, T = flat(name), 12
  res = generate(model, PROMPTS, max_new_tokens=T, seed=3, **settings)
  seqs = [p + completions(res, i) for i, p in enumerate(PROMPTS)]
  lp, _ = ref_forward(model, seqs)
  for i, p in enumerate(PROMPTS):
    n = res.lengths[i]
    want = lp[i, np.arange(len(p) - 1, len(p) - 1 + n), res.tokens[i, :n]]
    np.testing.assert_allclose(res.logprobs[i, :n], want, atol=1e-4, rtol=0)
  assert res.logprobs.dtype == np.float32
  # Near-flat model: these really are samples (not one greedy path) with probabilities well below 1.
  assert res.logprobs.max() < -1.0
  if "top_k" in settings:  # every drawn token is among the model's top_k at its position
    for i, p in enumerate(PROMPTS):
      for j in range(res.lengths[i]):
        row = lp[i, len(p) - 1 + j]
        assert row[res.tokens[i, j]] >= np.sort(row)[-settings["top_k"]]


# ------------------------------------------------------------------ 3. the sampling distributions
def target_distribution(logits, temperature, top_k, top_p):
  z = np.asarray(logits, np.float64) / temperature
  if top_k:
    z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
  p = np.exp(z - z.max())
  p /= p.sum()
  if top_p < 1:
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    keep = np.zeros_like(p, bool)
    keep[order[before < top_p]] = True
    p = np.where(keep, p, 0.0)
    p /= p.sum()
  return p


@pytest.mark.parametrize(
  "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 3, 1.0), (1.0, 0, 0.8), (1.5, 4, 0.75)]
)
def test_sample_logits_distribution(temperature, top_k, top_p):
  logits = np.array([1.2, 2.0, -0.5, 0.7, 0.0, 1.6], np.float32)
  n = 20000
  keys = jax.random.split(jax.random.key(7), n)
  draws = np.asarray(
    jax.jit(sample_logits, static_argnums=(2, 3, 4))(
      jnp.broadcast_to(jnp.asarray(logits), (n, 6)), keys, temperature, top_k, top_p
    )
  )
  freq = np.bincount(draws, minlength=6) / n
  want = target_distribution(logits, temperature, top_k, top_p)
  # Binomial standard error of each frequency; 5 sigma (+1e-3 floor) keeps false alarms ~1e-6 per class.
  tol = 5 * np.sqrt(want * (1 - want) / n) + 1e-3
  assert np.all(np.abs(freq - want) <= tol), (freq, want, tol)
  excluded = want == 0
  assert np.all(freq[excluded] == 0)
  assert (
    excluded.sum()
    == {(1.0, 0, 1.0): 0, (0.5, 0, 1.0): 0, (2.0, 3, 1.0): 3, (1.0, 0, 0.8): 3, (1.5, 4, 0.75): 3}[
      (temperature, top_k, top_p)
    ]
  )  # the cases really cut


def test_sample_logits_greedy():
  logits = jnp.array([[0.1, 3.0, -1.0], [5.0, 4.9, 0.0]])
  keys = jax.random.split(jax.random.key(0), 2)
  np.testing.assert_array_equal(sample_logits(logits, keys, 0.0, 0, 1.0), [1, 0])
  np.testing.assert_array_equal(sample_logits(logits, keys, 1.0, 1, 1.0), [1, 0])  # top-1 == argmax
  np.testing.assert_array_equal(sample_logits(logits, keys, 1.0, 0, 1e-6), [1, 0])  # tiny nucleus


# ------------------------------------------------------------------ 4. EOS
def test_eos_stops_and_pads():
  model, T = sharp("mla_moe"), 10
  free = generate(model, PROMPTS, max_new_tokens=T, temperature=0.0)
  row0 = list(free.tokens[0])
  j = next(j for j in range(2, T) if row0[j] not in row0[:j])  # a token row 0 first emits at step j >= 2
  eos = row0[j]
  res = generate(model, PROMPTS, max_new_tokens=T, temperature=0.0, eos_id=eos)
  for i in range(3):
    row = list(free.tokens[i])
    n = row.index(eos) + 1 if eos in row else T
    assert res.lengths[i] == n
    np.testing.assert_array_equal(res.tokens[i, :n], free.tokens[i, :n])
    np.testing.assert_allclose(res.logprobs[i, :n], free.logprobs[i, :n], atol=1e-5)
    assert np.all(res.tokens[i, n:] == sampling.PAD_ID) and np.all(res.logprobs[i, n:] == 0)
    assert np.all(res.logprobs[i, :n] < 0) and np.all(res.experts[i, n:] == 0)
  assert res.lengths[0] == j + 1 < T and res.tokens[0, j] == eos


# ------------------------------------------------------------------ 5. rows are independent
def test_rows_independent_and_buckets_reused():
  model = sharp("gqa")
  a, b, c = PROMPTS
  alone = generate(model, [a], max_new_tokens=9, temperature=0.0)
  batch = generate(model, [b, a, c], max_new_tokens=9, temperature=0.0)  # other prompt and batch buckets
  np.testing.assert_array_equal(alone.tokens[0], batch.tokens[1])
  np.testing.assert_allclose(alone.logprobs[0], batch.logprobs[1], atol=1e-5)

  model = flat("gqa")
  small = generate(model, [a, b], max_new_tokens=9, seed=11)
  big = generate(model, [a, b, c] + [[7] * 20] * 7, max_new_tokens=9, seed=11)  # 10 rows, longer prompts
  np.testing.assert_array_equal(small.tokens, big.tokens[:2])
  np.testing.assert_allclose(small.logprobs, big.logprobs[:2], atol=1e-5)
  other = generate(model, [a, b], max_new_tokens=9, seed=12)
  assert not np.array_equal(small.tokens, other.tokens)  # the seed matters

  # Same buckets (batch 2 / 8, prompt <= 8, budget <= 16): the compiled sampler is reused, not retraced.
  n_fns = len(sampling._COMPILED)
  generate(model, [[1, 2], [3, 4, 5, 6, 7, 8]], max_new_tokens=13, seed=11)
  generate(model, [[9]] * 5, max_new_tokens=10, seed=11)
  generate(model, [[9]] * 7, max_new_tokens=10, seed=11)
  assert len(sampling._COMPILED) == n_fns + 1  # the 5- and 7-row calls share batch 8
  graphdef = nnx.graphdef(model)
  assert sampling.compiled(graphdef, 8, 8, 16, 1.0, 0, 1.0)._cache_size() == 1


def test_tempered_logprobs_are_those_of_the_sampled_distribution():
  """GRPO at temperature T: with logprob_temperature=T the returned log-probs are log softmax(logits / T)
  (teacher-forced), which differ from the model's own distribution."""
  model, T, temp = flat("mla_moe"), 12, 0.7
  res = generate(model, PROMPTS, max_new_tokens=T, seed=4, temperature=temp, logprob_temperature=temp)
  seqs = [p + completions(res, i) for i, p in enumerate(PROMPTS)]
  lp, _ = ref_forward(model, seqs)
  tempered = np.asarray(jax.nn.log_softmax(jnp.asarray(lp) / temp, -1))  # log_softmax is shift-invariant
  for i, p in enumerate(PROMPTS):
    n, pos = res.lengths[i], np.arange(len(p) - 1, len(p) - 1 + res.lengths[i])
    np.testing.assert_allclose(res.logprobs[i, :n], tempered[i, pos, res.tokens[i, :n]], atol=1e-4, rtol=0)
    assert np.abs(res.logprobs[i, :n] - lp[i, pos, res.tokens[i, :n]]).max() > 1e-2


# ------------------------------------------------------------------ 6. groups and routing replay
def test_groups_and_expert_replay():
  model, G, T = flat("mla_moe"), 3, 12
  prompts = PROMPTS[1:]  # same buckets as test_logprobs_match_teacher_forcing: no recompile
  res = generate(model, prompts, max_new_tokens=T, num_samples=G, seed=5)
  N = len(prompts) * G
  assert res.tokens.shape == (N, T) and res.lengths.shape == (N,)
  n_moe = sum(MLA_CFG.is_moe_layer(i) for i in range(MLA_CFG.num_hidden_layers))
  assert res.experts.shape == (N, T, n_moe, MLA_CFG.num_experts_per_tok) and res.experts.dtype == np.int32
  # Row p*G+g is prompt p's g-th sample: the same as listing each prompt G times; samples differ.
  flat_res = generate(model, [p for p in prompts for _ in range(G)], max_new_tokens=T, seed=5)
  np.testing.assert_array_equal(res.tokens, flat_res.tokens)
  for p in range(len(prompts)):
    assert len({tuple(r) for r in res.tokens[p * G : (p + 1) * G]}) == G
  # Replay: the experts recorded for each generated (and prompt) token are those a training forward picks.
  seqs = [prompts[i // G] + completions(res, i) for i in range(N)]
  lp, ex = ref_forward(model, seqs)
  for i in range(N):
    P, n = len(prompts[i // G]), res.lengths[i]
    np.testing.assert_array_equal(res.experts[i, :n], ex[i, P : P + n])
    np.testing.assert_array_equal(res.prompt_experts[i, :P], ex[i, :P])
    np.testing.assert_allclose(res.logprobs[i, :n], lp[i, np.arange(P - 1, P - 1 + n), res.tokens[i, :n]], atol=1e-4)
  assert len(np.unique(res.experts)) > 4  # routing is not degenerate
  assert generate(flat("gqa"), prompts, max_new_tokens=T).experts is None
