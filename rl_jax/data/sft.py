"""Supervised fine-tuning data: examples -> token rows whose loss covers the response tokens only.

Examples (`data.source`): JSONL files (path, glob or directory) or `tfds:NAME[:SPLIT]` ArrayRecord datasets
(fields directly, or one JSON object per record in a `problem` field, as tasks.write_array_record writes),
each either {prompt, response} (sft.prompt_field / sft.response_field) or {messages: [{role, content}]}.

Encoding is the one GRPO's rollouts see: [bos] + encode(tasks.render({"prompt": p}, sft.template)) then
encode(response) + [eos], exactly the prompt ids of rollout.encode_prompts followed by what the sampler would
emit. Messages are rendered by sft.chat_format, each piece encoded on its own and the ids concatenated, so the
loss spans (assistant contents and their end markers, and the final eos after an assistant turn) are exact.

Rows are the pretraining rows (packing.FIELDS), packed several examples per row with segment ids (sft.pack)
or one per row; an example is never split. Too-long examples are found in one pass over the data when the
iterator is made: dropped (their count printed once) or an error naming the example.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import tokenizers

from rl_jax.config import SFTConfig
from rl_jax.data import packing, pipeline, tasks
from rl_jax.data import tokenizer as toks

ROLES = ("system", "user", "assistant")
# chat_format -> role -> (text before the content, text after it); the end marker after an assistant's
# content carries loss with it. The separator between turns opens the next turn, so the last assistant turn
# ends on its end marker and the final eos follows it directly.
CHAT_FORMATS: dict[str, dict[str, tuple[str, str]]] = {
  "chatml": {r: (f"<|im_start|>{r}\n", "<|im_end|>") for r in ROLES},
  "deepseek_r1": {
    "system": ("", ""),
    "user": ("<｜User｜>", ""),
    "assistant": ("<｜Assistant｜>", "<｜end▁of▁sentence｜>"),
  },
  "plain": {r: ("", "") for r in ROLES},
}
_TURN_SEP = {"chatml": "\n", "deepseek_r1": "", "plain": ""}


# ------------------------------------------------------------------------------------------ encoding
def encode_example(tok: tokenizers.Tokenizer, row: dict[str, Any], sft_cfg: SFTConfig) -> tuple[list[int], list[int]]:
  """(ids, mask): ids = [bos] + prompt + response + [eos]; mask[j] = 1 where ids[j] carries loss (a
  response / assistant token or the final eos), so the loss mask of target j is mask[j + 1]."""
  vocab = toks.Vocab.from_tokenizer(tok)
  pieces = _pieces(row, sft_cfg)
  ids, mask = [vocab.bos_id], [0]
  for text, loss in pieces:
    piece = toks.encode(tok, text)
    ids += piece
    mask += [int(loss)] * len(piece)
  if ids[-1] != vocab.eos_id:  # a format whose end marker is the eos token itself ends there
    ids.append(vocab.eos_id)
    mask.append(int(pieces[-1][1]))
  return ids, mask


def _pieces(row: dict[str, Any], cfg: SFTConfig) -> list[tuple[str, bool]]:
  """The example's text pieces in order, each with whether its tokens carry loss."""
  if not isinstance(row, dict):
    raise ValueError(f"an SFT example must be a JSON object, got {type(row).__name__}")
  if cfg.messages_field in row:
    return _message_pieces(row[cfg.messages_field], cfg)
  prompt, response = row.get(cfg.prompt_field), row.get(cfg.response_field)
  if not isinstance(prompt, str) or not isinstance(response, str):
    raise ValueError(
      f"needs string fields {cfg.prompt_field!r} and {cfg.response_field!r} (sft.prompt_field / "
      f"sft.response_field) or a {cfg.messages_field!r} list"
    )
  return [(tasks.render({"prompt": prompt}, cfg.template), False), (response, True)]


def _message_pieces(messages: Any, cfg: SFTConfig) -> list[tuple[str, bool]]:
  if not isinstance(messages, list) or not messages:
    raise ValueError(f"{cfg.messages_field!r} must be a non-empty list of {{role, content}}")
  fmt, out = CHAT_FORMATS[cfg.chat_format], []
  for i, m in enumerate(messages):
    role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
    if role not in ROLES or not isinstance(content, str):
      raise ValueError(f"message {i} must be {{role: system|user|assistant, content: string}}, got {m!r}")
    before, after = fmt[role]
    sep = _TURN_SEP[cfg.chat_format] if i else ""
    loss = role == "assistant"
    out += [(sep + before, False), (content + after, loss)]
  if not any(loss for _, loss in out):
    raise ValueError(f"{cfg.messages_field!r} has no assistant turn to train on")
  return [(text, loss) for text, loss in out if text]


# ------------------------------------------------------------------------------------------ sources
class JsonlRecords(pipeline.JsonlSource):
  """The JSONL lines as (where, object): `where` = file:line, for errors."""

  def __getitem__(self, index: int) -> tuple[str, Any]:
    path = self.paths[self._file[index]]
    with open(path, "rb") as f:
      f.seek(int(self._start[index]))
      line = f.read(int(self._end[index] - self._start[index]))
    where = f"{path}:{self._line[index]}"
    try:
      return where, json.loads(line)
    except ValueError as e:
      raise ValueError(f"{where}: malformed JSON ({e})") from None


class TfdsRecords:
  """A TFDS ArrayRecord split as (where, object): fields directly, or a JSON object in `problem`."""

  def __init__(self, source: str, data_dir: str | None = None):
    import tensorflow_datasets as tfds  # slow import: only when used

    name, split = tasks.parse_tfds_task(source)
    self.name, self.split = name, split or "train"
    self.source = tfds.data_source(name, split=self.split, data_dir=data_dir)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> tuple[str, Any]:
    record = {k: _text(v) for k, v in dict(self.source[int(index)]).items()}
    where = f"tfds:{self.name}:{self.split}[{index}]"
    if set(record) == {"problem"}:  # tasks.write_array_record's layout: the example as JSON text
      return where, record["problem"]
    return where, record


def _text(v: Any) -> Any:
  """A TFDS value as JSON-like data: Text features are bytes; nested fields (messages) JSON text."""
  if isinstance(v, (bytes, np.bytes_)):
    v = v.decode("utf-8")
  if isinstance(v, str) and v[:1] in ("[", "{"):
    try:
      return json.loads(v)
    except ValueError:
      return v
  return v


def open_source(source: str | Sequence[str], data_dir: str | None = None):
  """Random access to the examples of `source` as (where, object)."""
  if isinstance(source, str) and source.startswith("tfds:"):
    records = TfdsRecords(source, data_dir)
  else:
    paths = pipeline._expand(source)
    if any(os.path.splitext(p)[1] not in (".jsonl", ".json") for p in paths):
      raise ValueError(f"SFT data must be .jsonl files or tfds:NAME[:SPLIT], got {source!r}")
    records = JsonlRecords(paths)
  if len(records) == 0:
    raise ValueError(f"data source {source!r} is empty")
  return records


class _Encode:
  """(where, object) -> packing.Doc over the rows' tokens (ids without the final eos, which is a target)."""

  def __init__(self, tok: tokenizers.Tokenizer, cfg: SFTConfig):
    self.tok, self.cfg = tok, cfg

  def __call__(self, item: tuple[str, Any]) -> packing.Doc:
    where, row = item
    try:
      ids, mask = encode_example(self.tok, row, self.cfg)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    return packing.Doc(np.asarray(ids[:-1], np.int32), np.asarray(mask[1:], np.int32))


class _Kept(grain.sources.RandomAccessDataSource):
  """The examples that fit a row (indices into `records`)."""

  def __init__(self, records, kept: np.ndarray):
    self.records, self.kept = records, kept

  def __len__(self) -> int:
    return len(self.kept)

  def __getitem__(self, index: int):
    return self.records[int(self.kept[index])]


def fitting(records, encode: _Encode, seq_len: int, too_long: str, *, report: bool = True) -> np.ndarray:
  """Indices of the examples whose row tokens fit seq_len (one pass; malformed examples fail here);
  `report`: print how many were dropped (one process does)."""
  kept = []
  for i in range(len(records)):
    where, _ = item = records[i]
    n = len(encode(item).tokens)
    if n <= seq_len:
      kept.append(i)
    elif too_long == "error":
      raise ValueError(
        f"{where}: example has {n} tokens (before its eos) > train.seq_len={seq_len} (sft.too_long=error)"
      )
  if report and len(kept) < len(records):
    print(
      f"sft: dropped {len(records) - len(kept)} of {len(records)} examples longer than train.seq_len", file=sys.stderr
    )
  if not kept:
    raise ValueError(f"no SFT example fits train.seq_len={seq_len}")
  return np.asarray(kept, np.int64)


# ------------------------------------------------------------------------------------------ iterator
def make_iterator(
  source: str | Sequence[str],
  *,
  tokenizer: tokenizers.Tokenizer | str | os.PathLike,
  sft_cfg: SFTConfig,
  seq_len: int,
  batch_size: int,
  seed: int,
  shard_index: int = 0,
  shard_count: int = 1,
  data_dir: str | None = None,
  num_epochs: int | None = None,
) -> grain.DatasetIterator:
  """Checkpointable iterator of dicts of int32 [batch_size, seq_len] (packing.FIELDS), epochs repeating
  with a new shuffle each; shard k of n takes examples k, k + n, ... of the global shuffled stream."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} not in [0, shard_count={shard_count})")
  tok = tokenizer if isinstance(tokenizer, tokenizers.Tokenizer) else toks.load(tokenizer)
  vocab, encode = toks.Vocab.from_tokenizer(tok), _Encode(tok, sft_cfg)
  records = open_source(source, data_dir)
  kept = fitting(records, encode, seq_len, sft_cfg.too_long, report=shard_index == 0)
  ds = grain.MapDataset.source(_Kept(records, kept)).shuffle(seed % 2**32).repeat(num_epochs)
  ds = ds[shard_index::shard_count].map(encode)
  if not sft_cfg.pack:  # one example per row: a plain map, checkpointable by position
    ds = ds.map(_OneRow(seq_len, vocab.eos_id, vocab.pad_id)).to_iter_dataset()
  else:
    ds = pipeline.PackIterDataset(ds.to_iter_dataset(), seq_len, vocab.eos_id, vocab.pad_id)
  return iter(ds.batch(batch_size, drop_remainder=True))


class _OneRow:
  def __init__(self, seq_len: int, eos_id: int, pad_id: int):
    self.seq_len, self.eos_id, self.pad_id = seq_len, eos_id, pad_id

  def __call__(self, doc: packing.Doc) -> dict[str, np.ndarray]:
    return next(packing.pack([doc], self.seq_len, self.eos_id, self.pad_id, pack=False))
