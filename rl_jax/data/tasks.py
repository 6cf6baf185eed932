"""RL tasks: problems with gold answers, train / test splits that never share a problem, prompt templates.

A problem is a dict: `kind` (which verifier scores it), `prompt` (the question text, without template), the
gold fields its verifier needs (`answer` and `target` for arithmetic / chain sums, `numbers` and `target` for
countdown, `answer` for math), and `id`. Procedural splits are decided by a hash of the problem's text, so a
held-out problem can never appear in training whatever the seeds (text-level disjointness, not only seed-level).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from rl_jax.data import procedural

SPLITS = ("train", "test")
split_of = procedural.split_of  # one problem text in procedural.TEST_SHARE is held out of corpora and RL

# DeepSeek-R1's R1-Zero template (the paper's Table 1), and a short one for tiny models whose context is small.
TEMPLATES = {
  "r1_zero": (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:"
  ),
  "r1_zero_short": procedural.R1ZERO_FRAME.replace("{q}", "{prompt}"),  # what the R1-Zero corpus frames
  "plain": "{prompt}",
}


def render(problem: dict[str, Any], template: str = "plain") -> str:
  """The prompt text the model sees: a template name from TEMPLATES or a format string with `{prompt}`."""
  fmt = TEMPLATES.get(template, template)
  if "{prompt}" not in fmt:
    raise ValueError(f"unknown template {template!r} (names: {', '.join(TEMPLATES)}; or a string with {{prompt}})")
  return fmt.format(prompt=problem["prompt"])


def bare(p: dict[str, Any]) -> dict[str, Any]:
  """A procedural problem without its worked solution: the question (strip the corpus' "A:" cue)."""
  prompt = p["prompt"].removesuffix(" A:").removeprefix("Q: ")
  out = {k: v for k, v in p.items() if k not in ("solution", "text")}
  return {**out, "prompt": prompt, "question": p["prompt"]}


def procedural_problems(kind: str, split: str, seed: int = 0) -> Iterator[dict[str, Any]]:
  """Endless problems of a procedural `kind` in `split`, deterministic in `seed`."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  i = 0
  while True:
    p = procedural.problem_at(seed, i, kind)
    i += 1
    if split_of(p["prompt"]) == split:
      yield {**bare(p), "id": f"{kind}/{seed}/{i - 1}"}


def take(kind: str, split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
  """The first `n` distinct problems (by text) of `procedural_problems(kind, split, seed)`."""
  out, seen = [], set()
  for p in procedural_problems(kind, split, seed):
    if p["prompt"] not in seen:
      seen.add(p["prompt"])
      out.append(p)
    if len(out) == n:
      return out
  return out


def load_jsonl(path: str, *, question_field: str = "question", answer_field: str = "answer") -> list[dict[str, Any]]:
  """GSM8K / MATH-style `{"question": ..., "answer": ...}` lines as math problems. GSM8K's "#### 42" final-answer
  marker is honoured; a malformed line is a one-line error naming file:line."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"task file not found: {path}")
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        q, a = row[question_field], row[answer_field]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        why = f"missing field {e}" if isinstance(e, KeyError) else type(e).__name__
        raise ValueError(f"{path}:{n}: malformed task line ({why})") from None
      a = str(a).split("####")[-1].strip()
      out.append({"kind": "math", "prompt": str(q).strip(), "answer": a, "id": f"{os.path.basename(path)}:{n}"})
  return out
