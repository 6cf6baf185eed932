"""GRPO rollouts, host side: training problems from a task, G completions each from the jitted sampler on the
live parameters, rewards from the verifier pool, and the fixed-shape arrays the update step trains on.

Row i of a rollout is completion i % G of problem i // G (the sampler's order). Its training sequence is
prompt + completion, fed as inputs seq[:-1] with targets seq[1:], right-padded to T = max_prompt_len +
max_new_tokens; `mask` marks the completion's targets (EOS included), `old_logp` holds the sampler's
log-probs there and `experts` the routing the sampler chose for every input position (MoE replay).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from rl_jax import rewards as R
from rl_jax import sampling
from rl_jax.data import procedural, tasks
from rl_jax.data import tokenizer as toks


def load_problems(task: str, split: str, n: int, seed: int = 0, *, data_dir: str | None = None) -> list[dict[str, Any]]:
  """`n` problems of `split`: a procedural kind (rl_jax/data/procedural.py), a GSM8K/MATH-style .jsonl file, a
  reasoning-gym dataset `rg:NAME[:CONFIG]` or a prepared TFDS dataset `tfds:NAME[:SPLIT]` (in `data_dir`, else
  TFDS's default); all split by a hash of each problem's text like the procedural tasks."""
  if task.startswith("rg:"):
    return tasks.ReasoningGymTask(task, seed).take(split, n)
  if task.endswith(".jsonl") or task.startswith("tfds:"):
    rows = _fixed_problems(task, split, data_dir)
    random.Random(f"{seed}/{split}").shuffle(rows)
    return rows[:n]
  if task not in procedural.PROBLEM_KINDS:
    raise ValueError(
      f"unknown task {task!r}: a procedural kind {procedural.PROBLEM_KINDS}, a .jsonl file, rg:NAME or tfds:NAME"
    )
  return tasks.take(task, split, n, seed)


def _fixed_problems(task: str, split: str, data_dir: str | None) -> list[dict[str, Any]]:
  """A file's or a TFDS dataset's problems of `split`. `tfds:NAME` reads NAME's split `split` as prepared;
  `tfds:NAME:SPLIT` reads SPLIT as one pool and keeps what hashes into `split`, as for a .jsonl file."""
  if task.startswith("tfds:"):
    name, pool = tasks.parse_tfds_task(task)
    rows = tasks.read_array_record(name, pool or split, data_dir)
    if pool is None:
      return rows
  else:
    rows = tasks.load_jsonl(task)
  return [p for p in rows if tasks.split_of(p["prompt"]) == split]


class PromptSource:
  """An endless, checkpointable stream of a task's training problems (`get_state` / `set_state` as the run
  skeleton expects of a data iterator)."""

  def __init__(self, task: str, seed: int = 0, *, data_dir: str | None = None):
    self.task, self.seed, self.index = task, seed, 0
    fixed = task.endswith(".jsonl") or task.startswith("tfds:")
    self._fixed = load_problems(task, "train", 10**9, seed, data_dir=data_dir) if fixed else None
    if self._fixed == []:
      raise ValueError(f"{task}: no training problems (every line hashed into the held-out split?)")
    self._rg = tasks.ReasoningGymTask(task, seed) if task.startswith("rg:") else None

  def take(self, n: int) -> list[dict[str, Any]]:
    out = [self._at(self.index + i) for i in range(n)]
    self.index += n
    return out

  def _at(self, i: int) -> dict[str, Any]:
    if self._fixed is not None:
      return self._fixed[i % len(self._fixed)]
    if self._rg is not None:
      return self._rg.at("train", i)  # random access too
    p = procedural.problem_at(self.seed, i, self.task)  # random access: resumes exactly
    while tasks.split_of(p["prompt"].removeprefix("Q: ").removesuffix(" A:")) != "train":
      i += 1_000_003  # a held-out problem: take a deterministic stand-in from far along the stream
      p = procedural.problem_at(self.seed, i, self.task)
    return tasks.bare(p)

  def get_state(self) -> dict:
    return {"task": self.task, "index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])


def encode_prompts(tok, problems: Sequence[dict], template: str, max_prompt_len: int) -> list[list[int]]:
  """BOS + the rendered template, as the pretraining pipeline encodes documents; too long is an error."""
  bos = toks.Vocab.from_tokenizer(tok).bos_id
  out = [[bos] + toks.encode(tok, tasks.render(p, template)) for p in problems]
  longest = max(len(p) for p in out)
  if longest > max_prompt_len:
    raise ValueError(f"a prompt has {longest} tokens > grpo.max_prompt_len={max_prompt_len} (raise it)")
  return out


@dataclasses.dataclass
class Rollout:
  problems: list[dict]  # one per row (each problem repeated G times)
  prompts: list[list[int]]  # one per row
  result: sampling.SampleResult
  texts: list[str]
  rewards: np.ndarray  # float32 [N], weighted total
  components: dict[str, np.ndarray]  # raw value per component [N]
  sample_s: float = 0.0  # wall time of the sampler
  score_s: float = 0.0  # wall time of the verifiers

  def select(self, rows: np.ndarray) -> Rollout:
    r = self.result
    pick = lambda x: None if x is None else x[rows]
    return Rollout(
      [self.problems[i] for i in rows],
      [self.prompts[i] for i in rows],
      sampling.SampleResult(*(pick(x) for x in r)),
      [self.texts[i] for i in rows],
      self.rewards[rows],
      {k: v[rows] for k, v in self.components.items()},
      self.sample_s,
      self.score_s,
    )


def concat(parts: Sequence[Rollout]) -> Rollout:
  if len(parts) == 1:
    return parts[0]

  def cat(xs):  # rounds may differ in their longest prompt: prompt_experts are zero-padded to the longest
    if xs[0] is None:
      return None
    if xs[0].ndim > 1:
      width = max(x.shape[1] for x in xs)
      xs = [np.pad(x, [(0, 0), (0, width - x.shape[1])] + [(0, 0)] * (x.ndim - 2)) for x in xs]
    return np.concatenate(xs)

  fields = zip(*(p.result for p in parts))
  return Rollout(
    [x for p in parts for x in p.problems],
    [x for p in parts for x in p.prompts],
    sampling.SampleResult(*(cat(list(f)) for f in fields)),
    [x for p in parts for x in p.texts],
    np.concatenate([p.rewards for p in parts]),
    {k: np.concatenate([p.components[k] for p in parts]) for k in parts[0].components},
    sum(p.sample_s for p in parts),
    sum(p.score_s for p in parts),
  )


def completion_texts(tok, result: sampling.SampleResult, eos_id: int) -> list[str]:
  """Each completion decoded without its EOS (special tokens dropped, the template tags kept)."""
  return [toks.decode(tok, [t for t in row[:n] if t != eos_id]) for row, n in zip(result.tokens, result.lengths)]


def rollout(model, tok, problems, *, group_size, template, max_prompt_len, max_new_tokens, temperature, top_p, seed,
            spec: R.RewardSpec, pool=None) -> Rollout:  # fmt: skip
  """G completions of each problem from `model` (dropless MoE), scored."""
  vocab = toks.Vocab.from_tokenizer(tok)
  prompts = encode_prompts(tok, problems, template, max_prompt_len)
  t0 = time.perf_counter()
  res = sampling.generate(
    model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, eos_id=vocab.eos_id,
    seed=seed, num_samples=group_size, logprob_temperature=temperature,
  )  # fmt: skip
  t1 = time.perf_counter()
  texts = completion_texts(tok, res, vocab.eos_id)
  rows = [p for p in problems for _ in range(group_size)]
  total, parts = R.score_batch(texts, rows, spec, lengths=res.lengths, pool=pool)
  prompt_rows = [p for p in prompts for _ in range(group_size)]
  return Rollout(rows, prompt_rows, res, texts, total, parts, t1 - t0, time.perf_counter() - t1)


def informative_groups(rewards: np.ndarray, group_size: int) -> np.ndarray:
  """bool [groups]: the group's rewards are not all equal (so its advantages carry a signal)."""
  g = rewards.reshape(-1, group_size)
  return g.max(1) > g.min(1)


def assemble(ro: Rollout, seq_len: int) -> dict[str, np.ndarray]:
  """The update step's arrays (see the module docstring), every one [N, seq_len, ...]."""
  res, N = ro.result, len(ro.prompts)
  out = {
    "tokens": np.zeros((N, seq_len), np.int32),
    "targets": np.zeros((N, seq_len), np.int32),
    "positions": np.tile(np.arange(seq_len, dtype=np.int32), (N, 1)),
    "mask": np.zeros((N, seq_len), np.float32),
    "old_logp": np.zeros((N, seq_len), np.float32),
    "rewards": ro.rewards.astype(np.float32),
  }
  if res.experts is not None:
    out["experts"] = np.zeros((N, seq_len) + res.experts.shape[2:], np.int32)
  for i, prompt in enumerate(ro.prompts):
    P, L = len(prompt), int(res.lengths[i])
    seq = np.concatenate([np.asarray(prompt, np.int32), res.tokens[i, :L]])
    n = len(seq) - 1
    if n > seq_len:
      raise ValueError(f"row {i}: prompt {P} + completion {L} tokens exceed the training length {seq_len}")
    out["tokens"][i, :n], out["targets"][i, :n] = seq[:-1], seq[1:]
    out["mask"][i, P - 1 : P - 1 + L] = 1.0
    out["old_logp"][i, P - 1 : P - 1 + L] = res.logprobs[i, :L]
    if res.experts is not None:  # input position p < P: the prompt's routing; P + j: completion token j's
      out["experts"][i, :P] = res.prompt_experts[i, :P]
      out["experts"][i, P:n] = res.experts[i, : n - P]
  return out
