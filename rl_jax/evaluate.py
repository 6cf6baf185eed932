"""R1's evaluation protocol as pure functions over scored samples: pass@1 over k samples, unbiased pass@k,
cons@k (majority vote), format rate, response length and reflection-word rate.

A problem's samples are dicts with at least `correct` (bool), and optionally `answer` (the extracted answer
text, None when there is none), `lenient_correct` (answer taken from anywhere in the completion), `format`
(float, 1.0 = well formatted), `tokens` (response length) and `text` (the completion).
"""

from __future__ import annotations

import collections
import math
import os
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


# ------------------------------------------------------------------ evaluating a model
_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_LAST_EXPR = re.compile(r"[\d\s+\-*/().]*\d[\d\s+\-*/().]*")


def lenient_answer(text: str, kind: str) -> str | None:
  """The answer taken from anywhere in a completion: the last <answer> block if there is one, else the last
  number (the last arithmetic expression for countdown, the last \\boxed{} for math)."""
  from rl_jax.rewards import extract_answer

  if (tagged := extract_answer(text)) is not None:
    return tagged
  if kind == "math" and "\\boxed{" in text:
    return text[text.rfind("\\boxed{") :]
  pattern = _LAST_EXPR if kind == "countdown" else _LAST_NUMBER
  found = [m.group(0).strip() for m in pattern.finditer(text) if m.group(0).strip()]
  return found[-1] if found else None


def evaluate_model(model, tok, problems, *, k: int, template: str, max_new_tokens: int, max_prompt_len: int = 512,
                   temperature: float = 0.6, top_p: float = 0.95, seed: int = 0, think_prefix: str = "",
                   pool=None) -> dict[str, Any]:  # fmt: skip
  """R1's protocol on `problems`: k samples each at (temperature, top_p), scored strictly (answer in the last
  <answer> block) and leniently (answer anywhere), summarised by `summarize`."""
  from rl_jax import rewards as R
  from rl_jax import rollout

  spec = R.RewardSpec(weights={"accuracy": 1.0, "format": 1.0}, think_prefix=think_prefix)
  ro = rollout.rollout(
    model, tok, problems, group_size=k, template=template, max_prompt_len=max_prompt_len,
    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, spec=spec, pool=pool,
  )  # fmt: skip
  answers = [lenient_answer(t, p["kind"]) for t, p in zip(ro.texts, ro.problems)]
  wrapped = [f"<answer>{a}</answer>" if a is not None else "" for a in answers]
  _, lenient = R.score_batch(wrapped, ro.problems, R.RewardSpec(weights={"accuracy": 1.0}), pool=pool)
  strict = [R.extract_answer(t) for t in ro.texts]
  samples = [
    {
      "correct": bool(ro.components["accuracy"][i]),
      "answer": strict[i],
      "lenient_correct": bool(lenient["accuracy"][i]),
      "format": float(ro.components["format"][i]),
      "tokens": int(ro.result.lengths[i]),
      "text": ro.texts[i],
    }
    for i in range(len(ro.texts))
  ]
  out = summarize([samples[i : i + k] for i in range(0, len(samples), k)], k)
  out["examples"] = [{"prompt": p["prompt"], "completion": s["text"]} for p, s in zip(ro.problems[::k], samples[::k])][
    :5
  ]
  return out


def default_task(meta: dict[str, Any]) -> str:
  """The task a checkpoint was trained on, from its meta: the run config's grpo.task after a post-training stage
  (grpo, sft, distill), or the procedural kind of a pretraining corpus (the R1 corpora teach chain sums)."""
  rc = meta.get("run_config") or {}
  if meta.get("stage") not in (None, "pretrain", "extend") and "task" in (rc.get("grpo") or {}):
    return rc["grpo"]["task"]
  source = (rc.get("data") or {}).get("source", "")
  kind = source.split(":", 1)[1] if source.startswith("procedural:") else None
  from rl_jax.data import procedural

  if kind in ("r1zero", "r1"):
    return "chain"
  if kind in procedural.PROBLEM_KINDS:
    return kind
  raise ValueError(f"cannot tell which task the checkpoint was trained on (data.source={source!r}); pass --task")


def run_eval(checkpoint: str, *, task: str | None = None, num_problems: int = 100, k: int = 4, seed: int = 0,
             temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int | None = None,
             template: str | None = None, lengths=None, depths=None, data: str | None = None,
             bucket: int | None = None) -> dict[str, Any]:  # fmt: skip
  """`rl-jax eval`: restores the checkpoint onto the current devices and evaluates held-out problems (the
  test split: never trained on, by problem text); `seed` picks which ones. Tasks passkey / perplexity are the
  long-context ones of rl_jax/longctx.py (num_problems: keys per cell / documents)."""
  from rl_jax import longctx

  if task in longctx.TASKS:
    return longctx.run(checkpoint, task, lengths=lengths, depths=depths, data=data, num=num_problems,
                       bucket=bucket, seed=seed)  # fmt: skip
  from rl_jax import checkpoint as ckpt
  from rl_jax import rollout
  from rl_jax.data import tokenizer as toks

  ckpt.read_model_config(checkpoint)  # "not a checkpoint" before orbax's manager creates a missing directory
  meta = ckpt.read_meta(checkpoint)
  grpo = (meta.get("run_config") or {}).get("grpo") or {}
  task = task or default_task(meta)
  template = template or grpo.get("template", "r1_zero_short")
  max_new_tokens = max_new_tokens or grpo.get("max_new_tokens", 64)
  tok_dir = ckpt.tokenizer_dir(checkpoint)
  if tok_dir is None:
    raise ValueError(f"{checkpoint} has no tokenizer/ to encode prompts with")
  model = ckpt.load_model(checkpoint, moe_capacity_factor=None)  # dropless: rows never compete for experts
  problems = rollout.load_problems(task, "test", num_problems, seed)
  out = evaluate_model(
    model, toks.load(tok_dir), problems, k=k, template=template, max_new_tokens=max_new_tokens,
    temperature=temperature, top_p=top_p, seed=seed, think_prefix="<think>" if grpo.get("think_prefix") else "",
  )  # fmt: skip
  info = {"checkpoint": os.path.abspath(checkpoint), "step": meta.get("step"), "task": task, "template": template}
  info.update(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
  return {**info, **out}
