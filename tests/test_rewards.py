"""Rewards: one table of verifier cases (with the known reward hacks), agreement with the procedural tasks'
own checker, and the worker pool (per-call timeout, garbage input)."""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np
import pytest

from rl_jax import rewards as R
from rl_jax.data import procedural

F, M, C, E = R.format_reward, R.math_reward, R.countdown_reward, R.exact_match
L, O, P = R.language_reward, R.overlong_penalty, R.repetition_penalty
OK = "<think>add them</think><answer>{}</answer>"
TOWER = r"<answer>$2^{2^{2^{2^{2^{2}}}}}$</answer>"  # sympy tries to evaluate it: hangs until killed

# (function, args, kwargs, expected); expected values worked out by hand.
CASES = [
  # ---- format
  ("fmt-ok", F, ("<think>a</think><answer>b</answer>",), {}, 1.0),
  ("fmt-whitespace", F, ("  <think> a </think>\n\n<answer> 42 </answer>\n",), {}, 1.0),
  ("fmt-two-thinks", F, ("<think>a</think><think>b</think><answer>1</answer>",), {}, 0.0),
  ("fmt-two-answers", F, ("<think>a</think><answer>1</answer><answer>2</answer>",), {}, 0.0),
  ("fmt-empty-answer", F, ("<think>a</think><answer>  </answer>",), {}, 0.0),
  ("fmt-empty-think", F, ("<think> </think><answer>1</answer>",), {}, 0.0),
  ("fmt-answer-outside-tags", F, ("<think>a</think> 42",), {}, 0.0),
  ("fmt-text-after", F, ("<think>a</think><answer>1</answer> so 1",), {}, 0.0),
  ("fmt-text-before", F, ("hi <think>a</think><answer>1</answer>",), {}, 0.0),
  ("fmt-nested-answer", F, ("<think>a</think><answer><answer>1</answer></answer>",), {}, 0.0),
  ("fmt-answer-in-think", F, ("<think>a <answer>1</answer></think>",), {}, 0.0),
  ("fmt-reversed", F, ("<answer>1</answer><think>a</think>",), {}, 0.0),
  ("fmt-prefilled", F, ("a</think><answer>1</answer>",), {"prefix": "<think>"}, 1.0),
  ("fmt-prefilled-repeated", F, ("<think>a</think><answer>1</answer>",), {"prefix": "<think>"}, 0.0),
  ("fmt-prefilled-no-prefix", F, ("a</think><answer>1</answer>",), {}, 0.0),
  ("fmt-none", F, (None,), {}, 0.0),
  # ---- math (math-verify, gold first)
  ("math-frac-vs-decimal", M, ("<answer>\\frac{1}{2}</answer>", "0.5"), {}, 1.0),
  ("math-decimal-vs-frac", M, ("<answer>0.5</answer>", "\\frac{1}{2}"), {}, 1.0),
  ("math-boxed", M, ("<answer>The answer is \\boxed{42}</answer>", "42"), {}, 1.0),
  ("math-boxed-wins", M, ("<answer>41+1 = \\boxed{42}</answer>", "42"), {}, 1.0),
  ("math-dollars", M, ("<answer>$\\frac{3}{4}$</answer>", "0.75"), {}, 1.0),
  ("math-paren-delims", M, ("<answer>\\(85\\)</answer>", "85"), {}, 1.0),
  ("math-thousands", M, ("<answer>1,000</answer>", "1000"), {}, 1.0),
  ("math-mixed-plain", M, ("<answer>1 1/2</answer>", "3/2"), {}, 1.0),  # math-verify alone reads 1
  ("math-mixed-latex", M, ("<answer>1\\frac{1}{2}</answer>", "\\frac{3}{2}"), {}, 1.0),  # alone: 1/2
  ("math-symbolic", M, ("<answer>1+x</answer>", "x+1"), {}, 1.0),
  ("math-sqrt", M, ("<answer>\\sqrt{2}/2</answer>", "\\frac{\\sqrt{2}}{2}"), {}, 1.0),
  ("math-equation", M, ("<answer>x = 5</answer>", "5"), {}, 1.0),
  ("math-wrong", M, ("<answer>41</answer>", "42"), {}, 0.0),
  ("math-boxed-outside-tags", M, ("<think>so</think> \\boxed{42}", "42"), {}, 0.0),
  ("math-empty-answer", M, ("<think>42</think><answer></answer>", "42"), {}, 0.0),
  ("math-last-block-wrong", M, ("<answer>42</answer><answer>41</answer>", "42"), {}, 0.0),
  ("math-last-block-right", M, ("<answer>41</answer><answer>42</answer>", "42"), {}, 1.0),
  ("math-none", M, (None, "42"), {}, 0.0),
  # ---- countdown: numbers, target; exact rationals via ast
  ("cd-ok", C, ("<answer>3*5+7</answer>", [3, 5, 7], 22), {}, 1.0),
  ("cd-ok-parens", C, ("<answer> (7 + 5) * 3 - 14 </answer>", [3, 5, 7, 14], 22), {}, 1.0),
  ("cd-exact-rational", C, ("<answer>8/(3-8/3)</answer>", [3, 3, 8, 8], 24), {}, 1.0),  # floats give 23.99...
  ("cd-number-twice", C, ("<answer>5*5-3</answer>", [3, 5, 7], 22), {}, 0.0),
  ("cd-number-unused", C, ("<answer>3*5+7</answer>", [1, 3, 5, 7], 22), {}, 0.0),
  ("cd-foreign-number", C, ("<answer>3*5+7+0</answer>", [3, 5, 7], 22), {}, 0.0),
  ("cd-wrong-target", C, ("<answer>3+5+7</answer>", [3, 5, 7], 22), {}, 0.0),
  ("cd-power", C, ("<answer>3**2*1</answer>", [1, 2, 3], 9), {}, 0.0),
  ("cd-import", C, ("<answer>__import__('os').system('true')</answer>", [3, 5, 7], 22), {}, 0.0),
  ("cd-name", C, ("<answer>x*5+7</answer>", [3, 5, 7], 22), {}, 0.0),
  ("cd-attribute", C, ("<answer>(3).real*5+7</answer>", [3, 5, 7], 22), {}, 0.0),
  ("cd-call", C, ("<answer>print(3*5+7)</answer>", [3, 5, 7], 22), {}, 0.0),
  ("cd-lambda", C, ("<answer>(lambda: 3*5+7)()</answer>", [3, 5, 7], 22), {}, 0.0),
  ("cd-div-zero", C, ("<answer>7/(5-5)+3</answer>", [3, 5, 5, 7], 22), {}, 0.0),
  ("cd-float-literal", C, ("<answer>3.0*5+7</answer>", [3, 5, 7], 22), {}, 0.0),
  ("cd-outside-tags", C, ("<think>x</think>3*5+7", [3, 5, 7], 22), {}, 0.0),
  ("cd-deep", C, ("<answer>" + "1+" * 50_000 + "1</answer>", [1], 1), {}, 0.0),
  # ---- exact / numeric match (procedural arithmetic)
  ("em-ok", E, (OK.format("85"), "85"), {}, 1.0),
  ("em-spaces", E, (OK.format(" 85 "), "85"), {}, 1.0),
  ("em-thousands", E, (OK.format("1,000"), "1000"), {}, 1.0),
  ("em-decimal", E, (OK.format("85.0"), "85"), {}, 1.0),
  ("em-wrong", E, (OK.format("86"), "85"), {}, 0.0),
  ("em-words", E, (OK.format("85 apples"), "85"), {}, 0.0),
  ("em-exponent", E, (OK.format("1e3"), "1000"), {}, 0.0),
  ("em-empty", E, (OK.format(""), "85"), {}, 0.0),
  ("em-outside-tags", E, ("<think>x</think>85", "85"), {}, 0.0),
  # ---- language consistency of the CoT
  ("lang-latin", L, ("<think>We add the numbers</think><answer>1</answer>",), {}, 1.0),
  ("lang-accents", L, ("<think>café résumé naïve</think>",), {}, 1.0),
  ("lang-mixed", L, ("<think>We 加 numbers 数</think>",), {}, 0.5),
  ("lang-cyrillic", L, ("<think>Мы add</think>",), {}, 0.5),
  ("lang-cjk", L, ("<think>我们把数字相加 then</think>",), {"language": "cjk"}, 7 / 8),
  ("lang-numbers-ignored", L, ("<think>7+8=15, write 5 carry 1</think>",), {}, 1.0),
  ("lang-no-think", L, ("<answer>We add</answer>",), {}, 0.0),
  ("lang-wordless-think", L, ("<think> 7+8=15; 15+2=17 </think>",), {}, 1.0),  # nothing in another language
  ("lang-ideograph-in-sums", L, ("<think>7加8=15</think>",), {}, 0.0),
  ("lang-empty-think", L, ("<think>  </think>",), {}, 0.0),
  ("lang-prefilled", L, ("We add</think><answer>1</answer>",), {"prefix": "<think>"}, 1.0),
  # ---- DAPO overlong shaping: Lmax=100, Lc=20
  ("len-short", O, (80, 100, 20), {}, 0.0),
  ("len-ramp-start", O, (81, 100, 20), {}, -0.05),
  ("len-ramp-mid", O, (90, 100, 20), {}, -0.5),
  ("len-at-max", O, (100, 100, 20), {}, -1.0),
  ("len-beyond", O, (101, 100, 20), {}, -1.0),
  # ---- n-gram repetition (n=3)
  ("rep-none", P, ("a b c d e",), {}, 0.0),
  ("rep-some", P, ("a b c a b c",), {}, -0.25),  # abc bca cab abc: 3 unique of 4
  ("rep-all", P, ("x x x x x",), {}, -2 / 3),
  ("rep-short", P, ("a b",), {}, 0.0),
  ("rep-tokens", P, ([1, 2, 3, 1, 2, 3],), {}, -0.25),
  ("rep-bigrams", P, ("a b a b",), {"n": 2}, -1 / 3),
  # ---- combination
  (
    "combine",
    R.combine,
    ({"accuracy": 1.0, "format": 0.0, "language": 0.5}, {"accuracy": 1.0, "format": 0.5}),
    {},
    1.0,
  ),
]


@pytest.mark.parametrize("fn, args, kwargs, expected", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_reward_table(fn, args, kwargs, expected):
  assert fn(*args, **kwargs) == pytest.approx(expected, abs=1e-12)


def test_table_size():
  assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


def test_accuracy_agrees_with_procedural_verify():
  """On the procedural tasks, accuracy is the tasks' own checker, and their worked solutions score full marks."""
  for p in procedural.problems(3, 40):
    assert R.format_reward(p["solution"]) == 1.0 and R.accuracy_reward(p["solution"], p) == 1.0, p["text"]
    wrong = [str(p["target"] + 1), "", "1/0", p["answer"] + "+0", f"({p['answer']})*1"]
    for answer in [p["answer"], f" {p['answer']} ", *wrong]:
      got = R.accuracy_reward(OK.format(answer), p)
      assert got == float(procedural.verify(p, answer)), (p["text"], answer)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(weights={"acuracy": 1.0}), "acuracy"),
    (dict(language="klingon"), "klingon"),
    (dict(weights={"overlong": 1.0}, max_tokens=10, overlong_buffer=20), "overlong_buffer"),
  ],
)
def test_spec_rejects_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    R.RewardSpec(**kwargs)


def test_score_batch_rejects_bad_batches():
  spec = R.RewardSpec(weights={"accuracy": 1.0, "overlong": 0.5}, max_tokens=10, overlong_buffer=5)
  with pytest.raises(ValueError, match="problems"):
    R.score_batch(["a"], [], spec, lengths=[1])
  with pytest.raises(ValueError, match="lengths"):
    R.score_batch(["a"], [{"kind": "math", "answer": "1"}], spec)
  with pytest.raises(ValueError, match="poetry"):
    R.score_batch(["a"], [{"kind": "poetry"}], spec, lengths=[1])


# ------------------------------------------------------------------- the pool


@pytest.fixture(scope="module")
def pool():
  with R.VerifierPool(workers=2) as p:
    yield p


def test_pool_kills_a_hung_call_and_keeps_going(pool):
  before = pool.timeouts
  calls = [(time.sleep, (60,)), (R.format_reward, ("<think>a</think><answer>b</answer>",)), (abs, (-2,))] * 2
  assert pool.run(calls, timeout_s=0.5) == [0.0, 1.0, 2.0] * 2
  assert pool.timeouts - before == 2
  assert pool.run([(abs, (-3,))] * 3, timeout_s=5.0) == [3.0] * 3  # the replaced workers serve


def test_score_batch_matches_the_pure_functions(pool):
  """Each component equals the direct call; the power tower times out (0) without holding up the rest."""
  probs = procedural.problems(5, 4) + [{"kind": "math", "answer": "5"}, {"kind": "math", "answer": "0.5"}]
  comps = [p["solution"] for p in probs[:3]] + [OK.format("1"), TOWER, OK.format("\\frac{1}{2}")]
  spec = R.RewardSpec(
    weights={"accuracy": 2.0, "format": 0.5, "language": 0.25, "repetition": 1.0, "overlong": 1.0},
    max_tokens=50,
    overlong_buffer=10,
  )
  lengths = [10, 45, 60, 5, 12, 30]
  before = pool.timeouts
  total, parts = R.score_batch(comps, probs, spec, lengths=lengths, pool=pool, timeout_s=1.0)
  assert pool.timeouts - before == 1  # the tower, killed by the pool (math-verify's own guard waits 5 s)
  expect = {
    "accuracy": [R.accuracy_reward(c, p) for c, p in zip(comps[:4], probs)] + [0.0, 1.0],
    "format": [R.format_reward(c) for c in comps],
    "language": [R.language_reward(c) for c in comps],
    "repetition": [R.repetition_penalty(c) for c in comps],
    "overlong": [0.0, -0.5, -1.0, 0.0, 0.0, 0.0],
  }
  assert expect["accuracy"] == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
  for k, v in expect.items():
    np.testing.assert_array_equal(parts[k], np.float32(v), err_msg=k)
  weighted = sum(w * np.float64(expect[k]) for k, w in spec.weights.items())
  assert total.dtype == np.float32 and total.shape == (6,)
  np.testing.assert_allclose(total, weighted, rtol=1e-6)


def test_score_batch_never_raises_on_garbage(pool):
  comps = [None, b"<think>a</think><answer>1</answer>", "x " * 50_000, "\udcff\x00<answer>", 12345, lambda: 1]
  comps.append("<think>" + "a b " * 25_000 + "</think><answer>" + "9" * 60_000 + "</answer>")
  probs = [{"kind": "math", "answer": "1"}] * len(comps)
  spec = R.RewardSpec(weights={c: 1.0 for c in R.COMPONENTS if c != "overlong"})
  total, parts = R.score_batch(comps, probs, spec, pool=pool, timeout_s=3.0)
  assert np.isfinite(total).all()
  assert (parts["accuracy"] == 0).all() and (parts["format"][:-1] == 0).all() and parts["format"][-1] == 1.0
  assert parts["language"][-1] == 1.0 and parts["repetition"][2] == pytest.approx(1 / 49_998 - 1)


def test_math_reward_off_the_main_thread():
  """math-verify's signal-based timeout only works in the main thread: elsewhere it must be off, not a silent 0."""
  with concurrent.futures.ThreadPoolExecutor(1) as ex:
    assert ex.submit(R.math_reward, "<answer>\\frac{1}{2}</answer>", "0.5").result() == 1.0
