"""Evaluation metrics against their definitions: unbiased pass@k by brute force over all k-subsets, cons@k by
majority vote, rates as fractions."""

import itertools
import math

import pytest

from rl_jax import evaluate as E


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 5, 3), (6, 2, 1), (6, 2, 3), (8, 3, 4), (4, 1, 4), (10, 7, 2)])
def test_pass_at_k_is_the_share_of_k_subsets_with_a_correct_sample(n, c, k):
  samples = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
  assert math.isclose(E.pass_at_k(n, c, k), brute, rel_tol=1e-12, abs_tol=1e-12)
  assert math.isclose(E.pass_at_k(n, c, 1), c / n)


def test_pass_at_k_rejects_impossible_counts():
  with pytest.raises(ValueError):
    E.pass_at_k(4, 5, 1)
  with pytest.raises(ValueError):
    E.pass_at_k(4, 1, 5)


def test_majority_vote_and_summary():
  p1 = [  # majority "12" is wrong although one sample is right: cons fails, pass@1 = 1/4
    {"answer": "12", "correct": False, "format": 1.0, "tokens": 10, "text": "<think>so</think>"},
    {"answer": " 12", "correct": False, "format": 1.0, "tokens": 12, "text": "wait, check"},
    {"answer": "13", "correct": True, "format": 0.0, "tokens": 8, "text": "", "lenient_correct": True},
    {"answer": None, "correct": False, "format": 0.0, "tokens": 30, "text": "hmm", "lenient_correct": True},
  ]
  p2 = [  # no answers at all: cons@k counts it wrong
    {"answer": None, "correct": False, "tokens": 4},
    {"answer": "", "correct": False, "tokens": 4},
    {"answer": None, "correct": False, "tokens": 4},
    {"answer": None, "correct": False, "tokens": 4},
  ]
  p3 = [{"answer": "7", "correct": True, "format": 1.0, "tokens": 2, "text": "However"} for _ in range(4)]
  s = E.summarize([p1, p2, p3])
  assert s["k"] == 4 and s["problems"] == 3
  assert s["pass@1"] == pytest.approx((1 + 0 + 4) / 12)
  assert s["cons@k"] == pytest.approx(1 / 3)
  assert s["pass@4"] == pytest.approx((1 + 0 + 1) / 3)
  assert s["pass@1_lenient"] == pytest.approx((2 + 0 + 4) / 12)
  assert s["format_rate"] == pytest.approx((2 + 0 + 4) / 12)
  assert s["mean_response_tokens"] == pytest.approx((60 + 16 + 8) / 12)
  assert s["reflection_rate"] == pytest.approx(5 / 12)
  assert all(0 <= s[key] <= 1 for key in ("pass@1", "cons@k", "format_rate", "pass@1_lenient", "reflection_rate"))
  assert E.majority_answer(["a", "b", "b", "a"]) == 0  # ties: first seen
  with pytest.raises(ValueError, match="same number"):
    E.summarize([p1, p1[:2]])
