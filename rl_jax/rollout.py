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

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from rl_jax import engine, sampling
from rl_jax import rewards as R
from rl_jax.data import procedural, tasks
from rl_jax.data import tokenizer as toks
from rl_jax.sharding.rules import shard_count


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

  def take(self, n: int, part: slice = slice(None)) -> list[dict[str, Any]]:
    """The stream's next `n` problems, or only their `part` (this process's share: every process advances by
    all `n`, so the position stays the same on every process)."""
    out = [self._at(self.index + i) for i in range(n)[part]]
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
  engine_stats: dict = dataclasses.field(default_factory=dict)  # the rollout engine's engine.COUNTERS

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
      self.engine_stats,
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
    _sum_stats(parts),
  )


def _sum_stats(parts: Sequence[Rollout]) -> dict:
  """The engine counters of the rollouts `parts` came from, each counted once (selected groups share theirs)."""
  rounds = {id(p.engine_stats): p.engine_stats for p in parts}.values()
  return {k: sum(r.get(k, 0) for r in rounds) for k in parts[0].engine_stats}


def completion_texts(tok, result: sampling.SampleResult, eos_id: int) -> list[str]:
  """Each completion decoded without its EOS (special tokens dropped, the template tags kept)."""
  return [toks.decode(tok, [t for t in row[:n] if t != eos_id]) for row, n in zip(result.tokens, result.lengths)]


def rollout(model, tok, problems, *, group_size, template, max_prompt_len, max_new_tokens, temperature, top_p, seed,
            spec: R.RewardSpec, pool=None, rows: slice | None = None, total: int = 0, sharding=None,
            slots: int = 0) -> Rollout:  # fmt: skip
  """G completions of each problem from `model` (dropless MoE), scored. With `sharding`: `problems` are this
  process's share, global rows `rows` of `total`, sampled together with the other processes' (generate_rows).
  One process samples on the rollout engine with `slots` decode slots (0: one per row; fewer bound the decode
  memory, finished rows' slots taking waiting rows); several run the static sampler."""
  vocab = toks.Vocab.from_tokenizer(tok)
  prompts = encode_prompts(tok, problems, template, max_prompt_len)
  t0 = time.perf_counter()
  kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, eos_id=vocab.eos_id, seed=seed,
            num_samples=group_size)  # fmt: skip
  if sharding is None and jax.process_count() > 1:  # (held-out eval) every process samples every row
    mesh = jax.tree.leaves(nnx.state(model))[0].sharding.mesh
    total = sampling.bucket(len(prompts) * group_size, shard_count("act_batch"))  # as sampling.generate pads
    rows, sharding = slice(0, total), NamedSharding(mesh, PartitionSpec())
  stats = {}
  if sharding is not None and jax.process_count() > 1:
    res = generate_rows(model, prompts, rows=rows, total=total, sharding=sharding, **kw)
  else:  # one process: the rollout engine (shared prompt prefill, in-flight refill), the same rows and samples
    res, st = engine.generate(model, prompts, logprob_temperature=temperature, slots=slots, **kw)
    stats = {k: getattr(st, k) for k in engine.COUNTERS}
  t1 = time.perf_counter()
  texts = completion_texts(tok, res, vocab.eos_id)
  rows = [p for p in problems for _ in range(group_size)]
  total, parts = R.score_batch(texts, rows, spec, lengths=res.lengths, pool=pool)
  prompt_rows = [p for p in prompts for _ in range(group_size)]
  return Rollout(rows, prompt_rows, res, texts, total, parts, t1 - t0, time.perf_counter() - t1, stats)


def process_rows(sharding, n: int, group_size: int) -> slice:
  """This process's rows of an `n`-row global batch split by `sharding` (one contiguous block, whole groups)."""
  starts = {idx[0].indices(n)[:2] for idx in sharding.addressable_devices_indices_map((n,)).values()}
  lo, hi = min(a for a, _ in starts), max(b for _, b in starts)
  if sum(b - a for a, b in starts) != hi - lo or lo % group_size or hi % group_size:
    raise ValueError(f"process {jax.process_index()}: its devices hold rows {sorted(starts)} of {n}, not a block of "
                     f"whole groups of {group_size}; reorder the mesh so each process holds whole groups")  # fmt: skip
  return slice(lo, hi)


def generate_rows(model, prompts, *, rows: slice, total: int, sharding, max_new_tokens: int, temperature: float,
                  top_p: float, eos_id: int, seed: int, num_samples: int) -> sampling.SampleResult:  # fmt: skip
  """`sampling.generate` for this process's `rows` of a `total`-row global batch whose rows `sharding` splits
  over every process's devices: all processes sample together (one collective program), each feeding and
  reading back its own rows. Row i draws from its global index, so how the rows split over processes does
  not change any sample. Rows past the prompts' are padding (a 1-token prompt, done from the start)."""
  local = [list(p) for p in prompts for _ in range(num_samples)]
  n = len(local)
  local += [[sampling.PAD_ID]] * (rows.stop - rows.start - n)
  lens = np.array([len(r) for r in local], np.int32)
  longest = int(multihost_utils.process_allgather(lens.max()).max())  # the prompt bucket every process uses
  P, N = sampling.bucket(longest), sampling.bucket(max_new_tokens)
  tokens = np.full((len(local), P), sampling.PAD_ID, np.int32)
  for i, r in enumerate(local):
    tokens[i, : len(r)] = r
  host = (tokens, lens, np.arange(rows.start, rows.stop, dtype=np.int32), np.arange(len(local)) < n)
  args = [jax.make_array_from_process_local_data(sharding, x, (total,) + x.shape[1:]) for x in host]
  graphdef, state = nnx.split(model)
  fn = sampling.compiled(graphdef, total, P, N, temperature, 0, top_p, logprob_temperature=temperature)
  out = fn(state, *args, np.uint32(seed), np.int32(max_new_tokens), np.int32(eos_id))
  mine = slice(rows.start, rows.start + n)
  tok, lp, length, ex, pex = (
    None if x is None else x[mine] for x in multihost_utils.process_allgather(out, tiled=True)
  )
  T = max_new_tokens
  return sampling.SampleResult(
    np.asarray(tok[:, :T], np.int32), np.asarray(lp[:, :T], np.float32), np.asarray(length, np.int32),
    None if ex is None else np.asarray(ex[:, :T], np.int32), None if pex is None else np.asarray(pex[:, :longest]),
  )  # fmt: skip


def gather_rows(x: np.ndarray, rows: slice) -> np.ndarray:
  """Every process's `rows` of a per-row host array, concatenated in global row order."""
  if jax.process_count() == 1:
    return x
  starts, parts = multihost_utils.process_allgather((np.int32(rows.start), x))
  return np.concatenate([parts[i] for i in np.argsort(starts)])


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
