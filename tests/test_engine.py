"""Rollout engine and shared prompt prefill: the same tokens, log-probs and routing as the static per-row sampler
whatever the slot count, arrival order or per-row budget; rows come back as they finish; an 8-device mesh."""

import random

import numpy as np
import pytest
from flax import nnx

from rl_jax import engine, sampling
from tests._subproc import run_python
from tests.test_sampling import PROMPTS, flat

G, T, SEED = 3, 12, 5  # the buckets of tests/test_sampling.py's group test: its compiled sampler is reused


def assert_same(got, want, rows=slice(None)):
  np.testing.assert_array_equal(got.lengths, want.lengths[rows])
  np.testing.assert_array_equal(got.tokens, want.tokens[rows])
  np.testing.assert_allclose(got.logprobs, want.logprobs[rows], atol=1e-5, rtol=0)
  if want.experts is not None:
    np.testing.assert_array_equal(got.experts, want.experts[rows])
    np.testing.assert_array_equal(got.prompt_experts, want.prompt_experts[rows])


@pytest.fixture(scope="module")
def moe_ref():
  """The static sampler's rows for PROMPTS x G, every row prefilled on its own (the pre-engine reference)."""
  model = flat("mla_moe")
  old, sampling.SHARED_PREFILL = sampling.SHARED_PREFILL, False
  try:
    return model, sampling.generate(model, PROMPTS, max_new_tokens=T, num_samples=G, seed=SEED)
  finally:
    sampling.SHARED_PREFILL = old


def test_shared_prefill_same_samples_and_prefills_once(moe_ref):
  model, want = moe_ref
  got = sampling.generate(model, PROMPTS, max_new_tokens=T, num_samples=G, seed=SEED)
  assert_same(got, want)
  assert len({tuple(r) for r in got.tokens}) == len(PROMPTS) * G  # samples of one prompt still differ
  # The program really prefills one row per group of 3 (3 real prompts, 3 groups of bucket padding rows), not
  # the 16 rows: the MLA latent cache the prefill builds is [6, P + N, kv_lora_rank], then gathered to 16 rows.
  (B, P, N), args = sampling.device_inputs(PROMPTS, max_new_tokens=T, seed=SEED, num_samples=G)
  graphdef, state = nnx.split(model)
  text = lambda group: sampling.compiled(graphdef, B, P, N, 1.0, 0, 1.0, group=group).lower(state, *args).as_text()
  latent = lambda rows: f"tensor<{rows}x{P + N}x16xf32>"
  assert B == 16 and latent(6) in text(G) and latent(6) not in text(1)


def test_engine_matches_static_sampler(moe_ref):
  model, want = moe_ref
  got, stats = engine.generate(model, PROMPTS, num_samples=G, max_new_tokens=T, seed=SEED, slots=4, chunk=3)
  assert_same(got, want)
  assert stats.useful_tokens == want.lengths.sum() and stats.prefill_rows == len(PROMPTS) * G
  assert stats.prefill_tokens * G == stats.prefill_tokens_per_row  # 3-row groups into 4 slots: each prefilled once
  assert stats.slot_steps == stats.decode_steps * 4

  # ARRIVAL ORDER: rows submitted one at a time, shuffled, with per-row budgets: each row is a prefix of its
  # static sample, and rows come back as they finish (the iterator and the callback see the same order).
  order = list(range(len(PROMPTS) * G))
  random.Random(0).shuffle(order)
  budgets = {r: 1 + (7 * r) % T for r in order}
  eng = engine.Engine(model, slots=2, max_prompt_len=12, max_new_tokens=T, seed=SEED, chunk=3)
  for r in order:
    eng.submit(PROMPTS[r // G], rows=[r], max_new_tokens=[budgets[r]])
  seen = []
  results = list(eng.run(callback=lambda res: seen.append(res.row)))
  assert seen == [res.row for res in results] and sorted(seen) == sorted(order)
  assert seen != order  # short rows overtook long ones
  for res in results:
    n = budgets[res.row]
    np.testing.assert_array_equal(res.tokens, want.tokens[res.row, :n])
    np.testing.assert_allclose(res.logprobs, want.logprobs[res.row, :n], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(res.experts, want.experts[res.row, :n])
    np.testing.assert_array_equal(res.prompt_experts, want.prompt_experts[res.row, : len(res.prompt)])


def test_engine_eos_and_dense_model():
  """A GQA model with an EOS: rows end at it (and refill), matching the static sampler's rows."""
  model = flat("gqa")
  free = sampling.generate(model, PROMPTS, max_new_tokens=T, num_samples=G, seed=SEED)
  eos = int(free.tokens[0, 3])  # ends row 0 at step 3 (and others wherever they draw it)
  want = sampling.generate(model, PROMPTS, max_new_tokens=T, num_samples=G, seed=SEED, eos_id=eos)
  assert want.lengths.min() < T and want.experts is None
  got, _ = engine.generate(model, PROMPTS, num_samples=G, max_new_tokens=T, seed=SEED, eos_id=eos, slots=4, chunk=2)
  assert_same(got, want)


def test_engine_rejects_bad_requests():
  model = flat("gqa")
  eng = engine.Engine(model, slots=2, max_prompt_len=4, max_new_tokens=8)
  with pytest.raises(ValueError, match="prompt length 5"):
    eng.submit([1] * 5)
  with pytest.raises(ValueError, match="row 0: max_new_tokens 9"):
    eng.submit([1], max_new_tokens=[9])
  with pytest.raises(ValueError, match="slots must be"):
    engine.Engine(model, slots=0, max_prompt_len=4, max_new_tokens=8)


# Runs in a fresh process: the device-count flag only holds if it is set before jax is imported.
MESH_SCRIPT = r"""
import jax, numpy as np
from flax import nnx
from rl_jax import engine, sampling, sharding
from rl_jax.models import Transformer, build
from tests.test_sampling import MLA_CFG, PROMPTS

assert jax.device_count() == 8
mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
want = sampling.generate(build(MLA_CFG, seed=1), PROMPTS, max_new_tokens=10, num_samples=3, seed=4)
model = sharding.create_sharded(lambda: Transformer(MLA_CFG, nnx.Rngs(params=1)), mesh)
with jax.set_mesh(mesh):
  eng = engine.Engine(model, slots=4, max_prompt_len=12, max_new_tokens=10, seed=4, chunk=4)
  for p, prompt in enumerate(PROMPTS):
    eng.submit(prompt, num_samples=3, rows=range(3 * p, 3 * p + 3))
  got = engine.collect(eng.run(), 9, 10, 12)
  spec = eng._dev.tokens.sharding.spec[0]
assert spec == ("data", "fsdp"), spec
np.testing.assert_array_equal(got.tokens, want.tokens)
np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5, rtol=0)
np.testing.assert_array_equal(got.experts, want.experts)
np.testing.assert_array_equal(got.prompt_experts, want.prompt_experts)
print("engine on the mesh == static single device")
"""


def test_engine_on_8_device_mesh():
  proc = run_python(["-c", MESH_SCRIPT], n_devices=8)
  assert "engine on the mesh == static single device" in proc.stdout


def test_grpo_step_counts_each_rollouts_engine_work_once():
  """A step's rollout is split into groups (select) and rejoined (concat): its engine counters count once."""
  from rl_jax import rollout

  res = sampling.SampleResult(*(np.zeros((4, 2), np.int32) for _ in range(3)), None, None)
  counters = {k: 1.0 for k in engine.COUNTERS}
  ro = rollout.Rollout([{}] * 4, [[1]] * 4, res, [""] * 4, np.zeros(4, np.float32), {}, engine_stats=counters)
  other = rollout.Rollout([{}] * 4, [[1]] * 4, res, [""] * 4, np.zeros(4, np.float32), {}, engine_stats=counters | {})
  parts = [ro.select(np.arange(i, i + 2)) for i in (0, 2)] + [other.select(np.arange(2))]
  assert rollout.concat(parts).engine_stats == {k: 2.0 for k in engine.COUNTERS}  # two rollouts, not three groups


def test_grpo_rollout_on_fewer_slots_than_rows(monkeypatch):
  """`grpo.rollout_slots` below a step's rows: the engine runs on that many slots (rows wait for finished rows'
  slots) and the step's samples are the same as on one slot per row."""
  import itertools

  from rl_jax import models, rewards, rollout
  from rl_jax.data import procedural
  from rl_jax.data import tokenizer as toks
  from rl_jax.models.config import preset

  seen = []
  real_init = engine.Engine.__init__
  monkeypatch.setattr(
    engine.Engine, "__init__", lambda self, *a, **k: seen.append(k["slots"]) or real_init(self, *a, **k)
  )
  tok = toks.train_bpe(itertools.islice(procedural.documents(0), 200), vocab_size=512)
  model = models.build(preset("tiny-moe"), seed=0)
  kw = dict(group_size=4, template="r1_zero_short", max_prompt_len=64, max_new_tokens=8, temperature=1.0, top_p=1.0,
            seed=3, spec=rewards.RewardSpec(weights={"format": 1.0}))  # fmt: skip
  problems = procedural.problems(0, 4, "chain")
  full, few = rollout.rollout(model, tok, problems, **kw), rollout.rollout(model, tok, problems, slots=8, **kw)
  assert seen == [16, 8]
  np.testing.assert_array_equal(few.result.tokens, full.result.tokens)
  np.testing.assert_allclose(few.result.logprobs, full.result.logprobs, atol=1e-5, rtol=0)
  assert few.texts == full.texts
