"""GRPO rewards: small pure verifiers over decoded completions, combined with weights, run in a worker pool.

Every verifier takes the completion text (without the prompt) and returns a float; none raises on model output
(anything malformed scores 0.0). `score_batch` runs them in worker processes with a per-call timeout, so a
pathological answer (a power tower handed to sympy, a 100 kB expression) costs one zero, never a stalled step.
Components: format (R1's tags), accuracy (math-verify, Countdown, exact match, programs run on test cases in
`rl_jax.sandbox`, by problem kind), language (R1 stage 2), overlong (DAPO's soft length penalty, in tokens) and
repetition (repeated n-grams). "rm" (a reward model's score, rl_jax/reward_model.py) runs on the device, not
here: `score_batch` leaves it out of its parts and its total, and the caller adds weight * score.
"""

from __future__ import annotations

import dataclasses
import fractions
import os
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rl_jax import sandbox
from rl_jax.data import procedural, tasks
from rl_jax.verifier_pool import VerifierPool, default_pool

COMPONENTS = ("format", "accuracy", "language", "overlong", "repetition", "rm")
DEVICE_COMPONENTS = ("rm",)  # scored by the caller on the device (a model), not by score_batch's verifiers
_MV_TIMEOUT_S = 5  # math-verify's own (signal-based) guard: main thread only
_MAX_ANSWER_CHARS = 1000  # sympy parse cost grows fast with length; no real answer is this long

# ------------------------------------------------------------------- format


def extract_answer(completion: str) -> str | None:
  """Text of the last <answer>...</answer> block, or None."""
  start = completion.rfind("<answer>")
  end = completion.find("</answer>", start)
  return completion[start + len("<answer>") : end] if start >= 0 and end >= 0 else None


_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def format_reward(completion: str, *, prefix: str = "") -> float:
  """1.0 for exactly one non-empty <think> block followed by exactly one non-empty <answer> block, else 0.0."""
  if not isinstance(completion, str):
    return 0.0
  text = prefix + completion  # a template that pre-fills "<think>" leaves it out of the completion
  if any(text.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
    return 0.0  # several think blocks, nested or stray tags
  m = _FORMAT.fullmatch(text)
  return float(bool(m and m.group(1).strip() and m.group(2).strip()))


# ----------------------------------------------------------------- accuracy


_MIXED = re.compile(r"(\d+)\s+(\d+)\s*/\s*(\d+)")


def _math_text(s: str) -> str:
  """Bare answers go in $...$ (math-verify misreads plain text: '1+x' -> 1); '1 1/2' becomes a mixed number."""
  s = s.strip()
  if m := _MIXED.fullmatch(s):
    s = rf"{m[1]}\frac{{{m[2]}}}{{{m[3]}}}"  # math-verify reads 1\frac{1}{2} as 3/2 but "1 1/2" as 1
  return s if any(d in s for d in ("$", r"\(", r"\[", r"\boxed")) else f"${s}$"


def math_reward(completion: str, gold: str) -> float:
  """1.0 if the last <answer> block (a \\boxed{} inside it wins) equals `gold` symbolically (math-verify)."""
  try:
    answer = extract_answer(completion)
    if answer is None or not answer.strip() or len(answer) > _MAX_ANSWER_CHARS:
      return 0.0
    t = _MV_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    import math_verify  # sympy behind it: imported on first use (and preloaded in the pool's workers)

    gold_p = math_verify.parse(_math_text(gold), parsing_timeout=t)
    pred_p = math_verify.parse(_math_text(answer), parsing_timeout=t)
    return float(bool(gold_p and pred_p and math_verify.verify(gold_p, pred_p, timeout_seconds=t)))
  except Exception:
    return 0.0


def countdown_reward(completion: str, numbers: Sequence[int], target: int) -> float:
  """1.0 if the <answer> uses each number exactly once with + - * / ( ) and equals target exactly (ast, no eval)."""
  try:
    answer = extract_answer(completion)
    problem = {"kind": "countdown", "numbers": list(numbers), "target": target}
    return float(answer is not None and procedural.verify(problem, answer))
  except Exception:  # MemoryError from a huge expression, anything else odd
    return 0.0


_NUMBER = re.compile(r"[+-]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?")  # bounded: no exponents, so no 1e999999999


def _number(s: str) -> fractions.Fraction | None:
  s = s.strip()
  return fractions.Fraction(s.replace(",", "")) if _NUMBER.fullmatch(s) else None


def exact_match(completion: str, gold: str) -> float:
  """1.0 if the last <answer> equals `gold` as text or as a number ('1,000' == '1000.0'), else 0.0."""
  try:
    answer = extract_answer(completion)
    if answer is None or not answer.strip():
      return 0.0
    if answer.strip() == str(gold).strip():
      return 1.0
    a, g = _number(answer), _number(str(gold))
    return float(a is not None and a == g)
  except Exception:
    return 0.0


def reasoning_gym_reward(completion: str, problem: Mapping[str, Any]) -> float:
  """reasoning-gym's own scorer of the problem's dataset on the last <answer> block (0.0 without one)."""
  try:
    answer = extract_answer(completion)
    return 0.0 if answer is None else tasks.reasoning_gym_score(answer.strip(), dict(problem))
  except Exception:  # a scorer choking on odd model output
    return 0.0


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL)


def extract_program(completion: str) -> str | None:
  """The last ```python fenced block, else the last <answer> block; None if neither holds any code."""
  blocks = _FENCE.findall(completion)
  program = blocks[-1] if blocks else extract_answer(completion)
  return program if program and program.strip() else None


def code_reward(
  completion: str, tests: Sequence[Mapping[str, str]], *, timeout_s: float = 2.0, memory_mb: int = 512
) -> float:
  """Share of `tests` ({"input", "output"}) the program (`extract_program`) passes in the sandbox, as R1 scored
  code: run once per test on its input, stdout (stripped) must equal the output (stripped) and the run must
  exit 0 within timeout_s."""
  try:
    program = extract_program(completion)
    if program is None or not tests:
      return 0.0
    runs = [(program, str(t["input"])) for t in tests]
    workers = min(len(tests), os.cpu_count() or 1)
    results = sandbox.run_many(runs, workers=workers, timeout_s=timeout_s, memory_mb=memory_mb)
    passed = [
      r.returncode == 0 and not r.timed_out and r.stdout.strip() == str(t["output"]).strip()
      for r, t in zip(results, tests)
    ]
    return sum(passed) / len(tests)
  except Exception:  # malformed tests, a machine with no sandbox: no reward, no crash
    return 0.0


def accuracy_reward(completion: str, problem: Mapping[str, Any]) -> float:
  """The accuracy verifier of the problem's kind: countdown, math (math-verify), reasoning-gym's scorers, code
  (test cases in the sandbox), else exact / numeric match."""
  kind = problem["kind"]
  if kind == "countdown":
    return countdown_reward(completion, problem["numbers"], problem["target"])
  if kind == "reasoning_gym":
    return reasoning_gym_reward(completion, problem)
  if kind == "code":  # problem["tests"]: [{"input", "output"}]; an optional per-problem time limit
    return code_reward(completion, problem["tests"], timeout_s=problem.get("timeout_s", 2.0))
  return (math_reward if kind == "math" else exact_match)(completion, problem["answer"])


ACCURACY_KINDS = ("arithmetic", "addsub", "chain", "code", "countdown", "math", "reasoning_gym")

# ----------------------------------------------------------- shaping terms

# Code-point ranges of each script's letters; a word counts for the target if all its letters lie in them.
SCRIPTS = {
  "latin": ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x24F), (0x1E00, 0x1EFF)),
  "cjk": ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF)),
  "cyrillic": ((0x400, 0x4FF),),
  "greek": ((0x370, 0x3FF),),
}
# An ideograph/kana/hangul is a word by itself (no spaces between them); elsewhere a word is a run of letters.
_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\W\d_]+")


def _in_script(word: str, ranges: tuple[tuple[int, int], ...]) -> bool:
  return all(any(lo <= ord(c) <= hi for lo, hi in ranges) for c in word if c.isalpha())


def language_reward(completion: str, language: str = "latin", *, prefix: str = "") -> float:
  """Share of the words inside <think> written in `language`'s script (R1's language-consistency reward); 0.0
  without a CoT or with an empty one; a CoT of digits and symbols only ("7+8=15") has nothing in another language
  and scores 1.0."""
  try:
    text = prefix + completion
    start, end = text.find("<think>"), text.find("</think>")
    cot = text[start + len("<think>") : end] if 0 <= start < end else ""
    words = _WORD.findall(cot)
    if not words:
      return 1.0 if cot.strip() else 0.0
    return sum(_in_script(w, SCRIPTS[language]) for w in words) / len(words)
  except Exception:
    return 0.0


def overlong_penalty(n_tokens: int, max_tokens: int, buffer_tokens: int) -> float:
  """DAPO's soft overlong penalty: 0 up to max-buffer tokens, then linear down to -1 at max, -1 beyond."""
  if n_tokens <= max_tokens - buffer_tokens:
    return 0.0
  return ((max_tokens - buffer_tokens) - n_tokens) / buffer_tokens if n_tokens <= max_tokens else -1.0


def repetition_penalty(completion: str | Sequence[int], n: int = 3) -> float:
  """Minus the fraction of repeated n-grams (of words, or of tokens if given ids), in [-1, 0]."""
  try:
    units = completion.split() if isinstance(completion, str) else list(completion)
    grams = [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]
    return len(set(grams)) / len(grams) - 1.0 if grams else 0.0
  except Exception:
    return 0.0


# ------------------------------------------------------------- combination


@dataclasses.dataclass(frozen=True)
class RewardSpec:
  """Which components make the reward and their weights, plus each component's options."""

  weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: {"accuracy": 1.0, "format": 1.0})
  think_prefix: str = ""  # what the chat template pre-fills before the completion, e.g. "<think>"
  language: str = "latin"  # target script of the CoT for "language"
  ngram: int = 3  # n of the repetition penalty
  max_tokens: int = 0  # DAPO's Lmax (needed for "overlong")
  overlong_buffer: int = 0  # DAPO's Lc: the penalty ramps over the last Lc tokens before Lmax

  def __post_init__(self):
    if unknown := set(self.weights) - set(COMPONENTS):
      raise ValueError(f"unknown reward components {sorted(unknown)}; expected some of {COMPONENTS}")
    if self.language not in SCRIPTS:
      raise ValueError(f"unknown language script {self.language!r}; expected one of {tuple(SCRIPTS)}")
    if self.ngram < 1:
      raise ValueError(f"ngram must be >= 1, got {self.ngram}")
    if "overlong" in self.weights and not 0 < self.overlong_buffer <= self.max_tokens:
      raise ValueError(
        f"overlong needs 0 < overlong_buffer <= max_tokens, got {self.overlong_buffer}, {self.max_tokens}"
      )


def combine(components: Mapping[str, Any], weights: Mapping[str, float]) -> Any:
  """Weighted sum of the components named in `weights` (floats, or arrays of a batch)."""
  if missing := set(weights) - set(components):
    raise ValueError(f"no value for reward components {sorted(missing)}")
  return sum((w * components[k] for k, w in weights.items()), 0.0)


def _component(name: str, completion: Any, problem: Mapping[str, Any], spec: RewardSpec) -> float:
  """One component of one completion (runs in a worker)."""
  if not isinstance(completion, str):
    return 0.0
  if name == "format":
    return format_reward(completion, prefix=spec.think_prefix)
  if name == "accuracy":
    return accuracy_reward(completion, problem)
  if name == "language":
    return language_reward(completion, spec.language, prefix=spec.think_prefix)
  return repetition_penalty(completion, spec.ngram)


def score_batch(
  completions: Sequence[str],
  problems: Sequence[Mapping[str, Any]],
  spec: RewardSpec,
  *,
  lengths: Sequence[int] | None = None,
  pool: VerifierPool | None = None,
  timeout_s: float = 5.0,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Total (weighted) reward [N] float32 and each component's raw value [N] float32; `lengths` are completion
  tokens. DEVICE_COMPONENTS ("rm") are neither scored nor in the total: the caller adds them."""
  n = len(completions)
  if len(problems) != n:
    raise ValueError(f"{len(problems)} problems for {n} completions")
  if "overlong" in spec.weights and (lengths is None or len(lengths) != n):
    raise ValueError(f"overlong needs lengths (completion tokens) for all {n} completions")
  if "accuracy" in spec.weights and (kinds := {p.get("kind") for p in problems} - set(ACCURACY_KINDS)):
    raise ValueError(f"no accuracy verifier for problem kinds {sorted(map(str, kinds))}; expected {ACCURACY_KINDS}")
  names = [k for k in spec.weights if k != "overlong" and k not in DEVICE_COMPONENTS]
  calls = [(_component, (k, c, p, spec)) for k in names for c, p in zip(completions, problems)]
  values = (pool or default_pool()).run(calls, timeout_s)
  parts = {k: np.asarray(values[i * n : (i + 1) * n], np.float32) for i, k in enumerate(names)}
  if "overlong" in spec.weights:
    penalty = [overlong_penalty(int(t), spec.max_tokens, spec.overlong_buffer) for t in lengths]
    parts["overlong"] = np.asarray(penalty, np.float32)
  weights = {k: w for k, w in spec.weights.items() if k not in DEVICE_COMPONENTS}
  return (np.zeros(n) + combine(parts, weights)).astype(np.float32), parts
