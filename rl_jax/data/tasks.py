"""RL tasks: problems with gold answers, train / test splits that never share a problem, prompt templates.

A problem is a dict: `kind` (which verifier scores it), `prompt` (the question text, without template), the
gold fields its verifier needs (`answer` and `target` for arithmetic / chain sums, `numbers` and `target` for
countdown, `answer` for math; `dataset`, `config` and `entry` for reasoning-gym), and `id`. Splits are decided
by a hash of the question's text, so a held-out problem can never appear in training whatever the seeds
(text-level disjointness, not only seed-level). Sources: procedural kinds, GSM8K/MATH-style JSONL files,
reasoning-gym datasets (`rg:NAME[:CONFIG]`, the optional `reasoning` extra) and prepared TFDS ArrayRecord
datasets (`write_array_record` / `read_array_record`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
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
  # Chat formats of released models (one user turn, the assistant's turn opened): Qwen2.5's ChatML, and
  # DeepSeek-R1's, whose template pre-fills "<think>\n" (score its completions with think_prefix).
  "chatml": "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
  "deepseek_r1": "<｜begin▁of▁sentence｜><｜User｜>{prompt}<｜Assistant｜><think>\n",
}


def fewshot_template(kind: str = "chain", n: int = 2, seed: int = 7) -> str:
  """R1's cold-start prompt: `n` worked, tagged training-split `kind` problems, then the question in the same
  Q/A form, so a base model continues with a tagged long-CoT answer."""
  shots, i = [], 0
  while len(shots) < n:
    p = procedural.problem_at(seed, i, kind)
    i += 1
    if split_of(procedural.question(p)) == "train":
      shots.append(p["text"])
  return " ".join([*shots, "Q: {prompt} A:"])


TEMPLATES["r1_fewshot"] = fewshot_template()  # few-shot long-CoT cold start for the chain-sum task


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
    q = bare(p)
    if split_of(q["prompt"]) == split:  # the question the model sees, as PromptSource and the corpora split it
      yield {**q, "id": f"{kind}/{seed}/{i - 1}"}


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


# ------------------------------------------------------------- reasoning-gym

RG_SIZE = 10_000  # indices per split stream (some datasets build `size` items eagerly; `size=` in the task sets it)


def _reasoning_gym():
  try:
    import reasoning_gym  # optional: ~1 s import and a few pinned dependencies
  except ImportError:
    raise ImportError("rg: tasks need reasoning-gym: pip install 'rl-jax[reasoning]'") from None
  return reasoning_gym


def _value(text: str) -> Any:
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text  # a bare word: a string


def parse_rg_task(task: str) -> tuple[str, dict[str, Any]]:
  """`rg:NAME[:CONFIG]` -> (NAME, config): CONFIG is a JSON object or `k=v,...` (values read as JSON if they parse)."""
  name, _, spec = task.removeprefix("rg:").partition(":")
  if not task.startswith("rg:") or not re.fullmatch(r"\w+", name):
    raise ValueError(f"bad reasoning-gym task {task!r}; expected rg:NAME[:CONFIG], e.g. rg:chain_sum:max_terms=4")
  if spec.startswith("{"):
    try:
      config = json.loads(spec)
    except json.JSONDecodeError as e:
      raise ValueError(f"{task}: config is not valid JSON ({e})") from None
  else:
    pairs = [kv.partition("=") for kv in spec.split(",") if kv]
    if bad := [k for k, eq, _ in pairs if not eq or not k.strip()]:
      raise ValueError(f"{task}: config item {bad[0]!r} is not k=v")
    config = {k.strip(): _value(v) for k, _, v in pairs}
  if not isinstance(config, dict) or "seed" in config:
    raise ValueError(f"{task}: config must be an object without 'seed' (each split has its own seed)")
  return name, {"size": RG_SIZE, **config}


@functools.lru_cache(maxsize=64)
def _rg_dataset(name: str, config_json: str, seed: int):
  """reasoning-gym's dataset object (cached: the scorer of a worker is built once per dataset and config)."""
  rg = _reasoning_gym()
  try:
    return rg.create_dataset(name, seed=seed, **json.loads(config_json))
  except (ValueError, TypeError, AssertionError) as e:  # unknown name or field, a failed validate()
    raise ValueError(f"reasoning-gym dataset {name!r} with {config_json}: {e}") from None


def _split_seed(seed: int, split: str) -> int:
  """A seed per (seed, split): reasoning-gym draws item i from seed + i, so nearby seeds would share items."""
  return int.from_bytes(hashlib.sha256(f"rl_jax.rg/{seed}/{split}".encode()).digest()[:4], "little")


class ReasoningGymTask:
  """A reasoning-gym dataset as a task: each split reads its own seed's items, keeping those whose question
  hashes into the split (so train and test never share a question by text)."""

  def __init__(self, task: str, seed: int = 0):
    self.task, self.seed = task, seed
    self.name, self.config = parse_rg_task(task)
    self._config_json = json.dumps(self.config, sort_keys=True)
    self.size = int(self.config["size"])
    for split in SPLITS:  # fail now on a bad name or config, not at the first problem
      self._dataset(split)

  def _dataset(self, split: str):
    return _rg_dataset(self.name, self._config_json, _split_seed(self.seed, split))

  def problem(self, split: str, index: int) -> dict[str, Any]:
    """Item `index % size` of `split`'s stream as a problem (whichever split its text hashes to)."""
    entry = self._dataset(split)[index % self.size]
    return dict(
      kind="reasoning_gym", prompt=str(entry["question"]).strip(), answer=str(entry["answer"]), dataset=self.name,
      config=self.config, entry=entry, id=f"rg:{self.name}/{self.seed}/{split}/{index % self.size}",
    )  # fmt: skip

  def at(self, split: str, index: int) -> dict[str, Any]:
    """The problem at stream position `index`; a held-out item is replaced by the next one of `split`."""
    for j in range(index, index + self.size):
      p = self.problem(split, j)
      if split_of(p["prompt"]) == split:
        return p
    raise ValueError(f"{self.task}: no {split} problems in {self.size} items")

  def take(self, split: str, n: int) -> list[dict[str, Any]]:
    """The first `n` distinct problems (by text) of `split` (fewer if its `size` items hold fewer)."""
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out, seen = [], set()
    for j in range(self.size):
      if len(out) >= n:
        break
      p = self.problem(split, j)
      if split_of(p["prompt"]) == split and p["prompt"] not in seen:
        seen.add(p["prompt"])
        out.append(p)
    return out


def reasoning_gym_score(answer: str | None, problem: dict[str, Any]) -> float:
  """reasoning-gym's own `score_answer` for the problem's dataset and config (in [0, 1]; partial credit kept)."""
  scorer = _rg_dataset(problem["dataset"], json.dumps(problem["config"], sort_keys=True), 0)
  return float(scorer.score_answer(answer, problem["entry"]))


# ------------------------------------------------------- TFDS ArrayRecord

_TFDS_NAME = re.compile(r"[a-z][a-z0-9_]*")
_TFDS_SPLIT = re.compile(r"\w+")
TFDS_VERSION = "1.0.0"


def _features():
  import tensorflow_datasets as tfds  # slow import: only when used

  return tfds.features.FeaturesDict({"problem": tfds.features.Text()})  # one JSON-encoded problem dict


def write_array_record(problems: Sequence[dict[str, Any]], out_dir: str, name: str, split: str) -> str:
  """Writes `problems` as split `split` of the TFDS dataset `name` under `out_dir` (ArrayRecord, one JSON
  problem per record; splits written before are kept, this one replaced); returns the version directory."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import file_adapters

  if not _TFDS_NAME.fullmatch(name) or not _TFDS_SPLIT.fullmatch(split):
    raise ValueError(f"TFDS name {name!r} must be snake_case and split {split!r} a word")
  if not problems:
    raise ValueError(f"no problems to write to {name}:{split}")
  records, features = [], _features()
  for p in problems:
    try:
      records.append(features.serialize_example({"problem": json.dumps(p, sort_keys=True)}))
    except (TypeError, ValueError) as e:
      raise ValueError(f"problem {p.get('id', '?')!r} is not JSON-serializable ({e})") from None
  version_dir = os.path.join(out_dir, name, TFDS_VERSION)
  os.makedirs(version_dir, exist_ok=True)
  adapter = file_adapters.ArrayRecordFileAdapter
  adapter.write_examples(os.path.join(version_dir, f"{name}-{split}.array_record-00000-of-00001"), enumerate(records))
  infos = []
  for f in sorted(os.listdir(version_dir)):  # every split of the dataset, this one included
    if m := re.fullmatch(rf"{name}-(\w+)\.array_record-00000-of-00001", f):
      n = adapter.num_examples(os.path.join(version_dir, f))
      infos.append(tfds.core.SplitInfo(name=m[1], shard_lengths=[n], num_bytes=0))
  tfds.folder_dataset.write_metadata(data_dir=version_dir, features=features, split_infos=infos, check_data=False)
  return version_dir


class _Problem:
  """TFDS record -> problem dict."""

  def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
    return json.loads(record["problem"])


def read_array_record(name: str, split: str, data_dir: str | None = None) -> list[dict[str, Any]]:
  """The problems of split `split` of a dataset `write_array_record` wrote, in order (tfds.data_source + grain)."""
  import grain
  import tensorflow_datasets as tfds

  source = tfds.data_source(name, split=split, data_dir=data_dir)
  return list(grain.MapDataset.source(source).map(_Problem()))


def parse_tfds_task(task: str) -> tuple[str, str | None]:
  """`tfds:NAME[:SPLIT]` -> (NAME, SPLIT or None); NAME may carry a version: `name:1.0.0`."""
  m = re.fullmatch(r"tfds:(?P<name>[^:]+(?::\d+\.\d+\.\d+)?)(?::(?P<split>\w+))?", task)
  if not m:
    raise ValueError(f"bad TFDS task {task!r}; expected tfds:NAME[:SPLIT]")
  return m["name"], m["split"]
