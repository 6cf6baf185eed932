"""Rejection sampling (R1's stage 3): N completions per training prompt from a checkpoint, kept only if they pass
the filters (correct, well formatted, language-consistent, not repetitive, approved by a generative judge),
deduplicated and capped per prompt, written as an SFT dataset plus preference pairs for a reward model.

`select` is the whole keep/reject decision as a pure function of scored samples, so it is table-tested; `run`
only samples, scores and writes. Out directory:
  kept.jsonl    {"prompt": question, "response": completion, "task", "id"}: what `rl-jax sft` reads (it renders
                the prompt with its own template, so cold-start data sampled few-shot teaches the plain one)
  tfds/         the same rows as a TFDS ArrayRecord dataset (`rejection_sampled`, split train)
  pairs.jsonl   {"prompt", "chosen", "rejected"}: a kept vs an incorrect completion of the same prompt
  stats.json    generated / kept per task, rejections per filter, kept lengths, pairs, judge agreement, seconds
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

FILTERS = ("correct", "format", "language", "repetition", "judge")  # a sample's reason is the first that fails
TFDS_NAME = "rejection_sampled"


@dataclasses.dataclass(frozen=True)
class RejectionSpec:
  """What to sample and what to keep."""

  task: str = "chain"  # rollout.load_problems: a procedural kind, .jsonl, rg:NAME, tfds:NAME
  split: str = "train"
  num_problems: int = 64
  num_samples: int = 8  # N per prompt
  template: str = "r1_zero_short"  # tasks.TEMPLATES name or a {prompt} string (r1_fewshot: cold start)
  max_prompt_len: int = 128
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_p: float = 1.0
  seed: int = 0
  batch_rows: int = 256  # completions per sampler call
  keep_per_prompt: int = 4  # cap after dedupe; 0 = no cap
  filters: tuple[str, ...] = ("correct", "format", "language", "repetition")
  language: str = "latin"  # script of a language-consistent CoT
  language_min: float = 1.0  # least share of CoT words in that script
  repetition_max: float = 0.2  # most share of repeated n-grams (rewards.repetition_penalty >= -it)
  ngram: int = 3
  dedupe: bool = True  # identical (whitespace-normalised) responses of one prompt count once
  think_prefix: str = ""  # what the template pre-fills before the completion, e.g. "<think>"
  # Cut each completion after the first occurrence of this text; None: "</answer>" for the few-shot template (whose
  # examples go on with the next "Q:"), else no cut.
  stop: str | None = None
  max_len: int = 0  # most response tokens kept; 0 = no limit

  def __post_init__(self):
    if unknown := set(self.filters) - set(FILTERS):
      raise ValueError(f"unknown rejection filters {sorted(unknown)}; expected some of {FILTERS}")
    for name in ("num_problems", "num_samples", "max_new_tokens", "batch_rows"):
      if getattr(self, name) < 1:
        raise ValueError(f"rejection {name} must be >= 1, got {getattr(self, name)}")
    if self.keep_per_prompt < 0 or self.max_len < 0:
      raise ValueError(f"keep_per_prompt and max_len must be >= 0, got {self.keep_per_prompt}, {self.max_len}")


# ------------------------------------------------------------------------------------- selection
def _fails(s: dict[str, Any], spec: RejectionSpec) -> str | None:
  """The first filter of FILTERS (in spec.filters) that sample `s` fails, "length" past max_len, else None."""
  checks = {
    "correct": lambda: bool(s["correct"]),
    "format": lambda: s["format"] >= 1.0,
    "language": lambda: s["language"] >= spec.language_min,
    "repetition": lambda: s["repetition"] >= -spec.repetition_max,
    "judge": lambda: s.get("judge") is True,
  }
  for name in FILTERS:
    if name in spec.filters and not checks[name]():
      return name
  return "length" if spec.max_len and s["tokens"] > spec.max_len else None


_TAG_SPACE = re.compile(r"\s*(</?(?:think|answer)>)\s*")


def normalise(text: str) -> str:
  """The text dedupe compares: whitespace runs as one space, none around the template tags."""
  return _TAG_SPACE.sub(r"\1", " ".join(text.split()))


def select(samples: Sequence[dict[str, Any]], spec: RejectionSpec) -> tuple[list[dict[str, Any]], list[str | None]]:
  """(kept samples in order, a reason per sample: None if kept, else the failed filter, "duplicate" or "cap").

  A sample is a dict with `prompt_id`, `text`, `correct`, `format`, `language`, `repetition`, `tokens` and, for
  the judge filter, `judge` (True / False / None = unparseable)."""
  kept, reasons = [], []
  seen, count = set(), collections.Counter()
  for s in samples:
    reason = _fails(s, spec)
    key = (s["prompt_id"], normalise(s["text"]))
    if reason is None and spec.dedupe and key in seen:
      reason = "duplicate"
    if reason is None and spec.keep_per_prompt and count[s["prompt_id"]] >= spec.keep_per_prompt:
      reason = "cap"
    if reason is None:
      seen.add(key)
      count[s["prompt_id"]] += 1
      kept.append(s)
    reasons.append(reason)
  return kept, reasons


def preference_pairs(samples: Sequence[dict[str, Any]], kept: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
  """Per prompt, the i-th kept correct completion against the i-th distinct incorrect one (Bradley-Terry pairs)."""
  wrong = collections.defaultdict(dict)
  for s in samples:
    if not s["correct"]:
      wrong[s["prompt_id"]].setdefault(normalise(s["text"]), s)
  used = collections.Counter()
  pairs = []
  for s in (s for s in kept if s["correct"]):  # without the correct filter, kept may hold wrong ones
    pool = list(wrong[s["prompt_id"]].values())
    if used[s["prompt_id"]] < len(pool):
      bad = pool[used[s["prompt_id"]]]
      used[s["prompt_id"]] += 1
      pairs.append({"prompt": s["question"], "chosen": s["text"], "rejected": bad["text"]})
  return pairs


# -------------------------------------------------------------------------------------- sampling
def stop_text(spec: RejectionSpec) -> str:
  """The text completions are cut after (see RejectionSpec.stop)."""
  return spec.stop if spec.stop is not None else "</answer>" if spec.template == "r1_fewshot" else ""


def _cut(text: str, stop: str) -> str:
  i = text.find(stop) if stop else -1
  return text if i < 0 else text[: i + len(stop)]


def sample_batch(model, tok, problems, spec: RejectionSpec, seed: int, pool=None) -> list[dict[str, Any]]:
  """N scored completions of each problem (rows p*N .. p*N+N-1 belong to problem p)."""
  from rl_jax import rewards as R
  from rl_jax import rollout, sampling
  from rl_jax.data import tokenizer as toks

  vocab = toks.Vocab.from_tokenizer(tok)
  prompts = rollout.encode_prompts(tok, problems, spec.template, spec.max_prompt_len)
  res = sampling.generate(
    model, prompts, max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, top_p=spec.top_p,
    eos_id=vocab.eos_id, seed=seed, num_samples=spec.num_samples,
  )  # fmt: skip
  texts = [_cut(t, stop_text(spec)) for t in rollout.completion_texts(tok, res, vocab.eos_id)]
  rows = [p for p in problems for _ in range(spec.num_samples)]
  weights = {"accuracy": 1.0, "format": 1.0, "language": 1.0, "repetition": 1.0}
  rs = R.RewardSpec(weights=weights, think_prefix=spec.think_prefix, language=spec.language, ngram=spec.ngram)
  _, parts = R.score_batch(texts, rows, rs, pool=pool)
  lengths = [len(toks.encode(tok, t)) for t in texts]  # response tokens (after any cut, without EOS)
  return [
    dict(
      prompt_id=p["id"],
      question=p["prompt"],
      kind=p["kind"],
      text=t,
      answer=R.extract_answer(t),
      tokens=n,
      correct=bool(parts["accuracy"][i]),
      format=float(parts["format"][i]),
      language=float(parts["language"][i]),
      repetition=float(parts["repetition"][i]),
      id=f"{p['id']}/{i % spec.num_samples}",
    )  # fmt: skip
    for i, (p, t, n) in enumerate(zip(rows, texts, lengths, strict=True))
  ]


def add_verdicts(samples: list[dict[str, Any]], judge_checkpoint: str, *, max_prompt_len: int = 256) -> dict:
  """Sets each sample's `judge` (None without an answer to judge); returns the agreement with the verifier."""
  from rl_jax import judge as J

  model, tok = _load(judge_checkpoint)
  items = sorted({(s["question"], s["answer"].strip()) for s in samples if s["answer"] is not None})
  verdicts = dict(zip(items, J.judge(model, tok, items, max_prompt_len=max_prompt_len)))
  judged = [s for s in samples if s["answer"] is not None]
  for s in samples:
    s["judge"] = None if s["answer"] is None else verdicts[(s["question"], s["answer"].strip())]
  return J.agreement([s["judge"] for s in judged], [s["correct"] for s in judged])


def _load(checkpoint: str):
  from rl_jax import checkpoint as ckpt
  from rl_jax.data import tokenizer as toks

  tok_dir = ckpt.tokenizer_dir(checkpoint)
  if tok_dir is None:
    raise ValueError(f"{checkpoint} has no tokenizer/ to encode prompts with")
  return ckpt.load_model(checkpoint, moe_capacity_factor=None), toks.load(tok_dir)  # dropless: rows independent


# --------------------------------------------------------------------------------------- writing
def _write_jsonl(path: str, rows: Sequence[dict[str, Any]]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")


def sft_rows(kept: Sequence[dict[str, Any]], task: str) -> list[dict[str, Any]]:
  return [{"prompt": s["question"], "response": s["text"], "task": task, "id": s["id"]} for s in kept]


def stats(samples, kept, reasons, pairs, spec: RejectionSpec) -> dict[str, Any]:
  """Counts per task and per rejection reason, kept response lengths (tokens)."""
  per_task = collections.defaultdict(lambda: {"generated": 0, "kept": 0})
  for s, r in zip(samples, reasons):
    per_task[s["kind"]]["generated"] += 1
    per_task[s["kind"]]["kept"] += r is None
  lengths = [s["tokens"] for s in kept]
  return {
    "generated": len(samples),
    "kept": len(kept),
    "prompts": len({s["prompt_id"] for s in samples}),
    "prompts_kept": len({s["prompt_id"] for s in kept}),
    "per_task": dict(per_task),
    "rejected": dict(collections.Counter(r for r in reasons if r is not None)),
    "kept_tokens_mean": sum(lengths) / len(lengths) if lengths else 0.0,
    "kept_tokens_max": max(lengths, default=0),
    "pairs": len(pairs),
    "spec": dataclasses.asdict(spec),
  }


def write(out_dir: str, rows, pairs, info: dict[str, Any]) -> None:
  """kept.jsonl, the ArrayRecord dataset (if anything was kept), pairs.jsonl, stats.json."""
  from rl_jax.data import tasks

  os.makedirs(out_dir, exist_ok=True)
  _write_jsonl(os.path.join(out_dir, "kept.jsonl"), rows)
  _write_jsonl(os.path.join(out_dir, "pairs.jsonl"), pairs)
  if rows:
    tasks.write_array_record(rows, os.path.join(out_dir, "tfds"), TFDS_NAME, "train")
  with open(os.path.join(out_dir, "stats.json"), "w") as f:
    json.dump(info, f, indent=2)


# ------------------------------------------------------------------------------------------- run
def run(checkpoint: str, spec: RejectionSpec, out_dir: str, *, judge_checkpoint: str | None = None,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:  # fmt: skip
  """`rl-jax rejection-sample`: samples, scores, filters and writes `out_dir` (see the module docstring)."""
  from rl_jax import rollout

  if "judge" in spec.filters and judge_checkpoint is None:
    raise ValueError("the judge filter needs a judge checkpoint (--judge CKPT)")
  t0, log = time.perf_counter(), log or print  # progress lines
  model, tok = _load(checkpoint)
  problems = rollout.load_problems(spec.task, spec.split, spec.num_problems, spec.seed)
  problems = [{**p, "id": p.get("id", f"{spec.task}/{i}")} for i, p in enumerate(problems)]
  per_call = max(1, spec.batch_rows // spec.num_samples)
  samples = []
  for b in range(0, len(problems), per_call):
    samples += sample_batch(model, tok, problems[b : b + per_call], spec, seed=spec.seed * 1_000_003 + b)
    n = min(b + per_call, len(problems))
    log(f"rejection-sample: {n}/{len(problems)} prompts, {len(samples)} samples ({time.perf_counter() - t0:.0f}s)")
  del model
  agreement = add_verdicts(samples, judge_checkpoint) if judge_checkpoint else None
  kept, reasons = select(samples, spec)
  pairs = preference_pairs(samples, kept)
  info = stats(samples, kept, reasons, pairs, spec)
  info.update(judge=agreement, checkpoint=os.path.abspath(checkpoint), seconds=time.perf_counter() - t0)
  write(out_dir, sft_rows(kept, spec.task), pairs, info)
  return info


def summary_line(info: dict[str, Any]) -> str:
  """One line: kept / generated and the count of each rejection reason."""
  reasons = ", ".join(f"{k} {v}" for k, v in sorted(info["rejected"].items())) or "none"
  judge = f"; judge agreement {info['judge']['agreement']}" if info.get("judge") else ""
  return f"kept {info['kept']}/{info['generated']} ({info['pairs']} pairs); rejected: {reasons}{judge}"
