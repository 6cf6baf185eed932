"""R1's evaluation protocol as pure functions over scored samples: pass@1 over k samples, unbiased pass@k,
cons@k (majority vote), format rate, response length and reflection-word rate.

A problem's samples are dicts with at least `correct` (bool), and optionally `answer` (the extracted answer
text, None when there is none), `lenient_correct` (answer taken from anywhere in the completion), `format`
(float, 1.0 = well formatted), `tokens` (response length) and `text` (the completion).
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Sequence
from typing import Any

# Words R1's paper tracks as signs of reflection during RL (its figure on "aha" behaviour).
REFLECTION_WORDS = ("wait", "mistake", "however", "but", "retry", "error", "verify", "check", "again", "recheck")
_WORD = re.compile(r"[a-z]+")


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
  if n - c < k:
    return 1.0
  return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_answer(answers: Sequence[str | None]) -> int | None:
  """Index of a sample holding the most frequent non-empty answer (first seen wins ties); None if none."""
  norm = [None if a is None else " ".join(str(a).split()) for a in answers]
  counts = collections.Counter(a for a in norm if a)
  if not counts:
    return None
  best = max(counts.values())
  return next(i for i, a in enumerate(norm) if a and counts[a] == best)


def reflection_rate(texts: Sequence[str]) -> float:
  """Share of completions using at least one reflection word."""
  if not texts:
    return 0.0
  words = set(REFLECTION_WORDS)
  return sum(bool(words & set(_WORD.findall(t.lower()))) for t in texts) / len(texts)


def summarize(samples_per_problem: Sequence[Sequence[dict[str, Any]]], k: int | None = None) -> dict[str, Any]:
  """The evaluation metrics over problems, each with the same number n of samples; k defaults to n."""
  if not samples_per_problem:
    raise ValueError("no problems to evaluate")
  n = len(samples_per_problem[0])
  if any(len(s) != n for s in samples_per_problem):
    raise ValueError("every problem needs the same number of samples")
  k = n if k is None else k
  flat = [x for s in samples_per_problem for x in s]
  cons = []
  for s in samples_per_problem:
    i = majority_answer([x.get("answer") for x in s])
    cons.append(i is not None and bool(s[i]["correct"]))
  mean = lambda xs: float(sum(xs) / len(xs)) if xs else 0.0
  return {
    "problems": len(samples_per_problem),
    "k": k,
    "pass@1": mean([float(x["correct"]) for x in flat]),
    f"pass@{k}": mean([pass_at_k(n, sum(bool(x["correct"]) for x in s), k) for s in samples_per_problem]),
    "cons@k": mean(cons),
    "pass@1_lenient": mean([float(x.get("lenient_correct", x["correct"])) for x in flat]),
    "format_rate": mean([float(x.get("format", 0.0)) for x in flat]),
    "mean_response_tokens": mean([float(x.get("tokens", 0)) for x in flat]),
    "reflection_rate": reflection_rate([x.get("text", "") for x in flat]),
  }
