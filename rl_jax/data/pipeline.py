"""grain pipelines: text source -> shuffle/repeat -> shard -> tokenize -> pack -> batch.

Sources (`source` argument):
  "procedural[:KIND]"    infinite procedural documents (KIND: mixed, arithmetic, countdown)
  path, glob or list     *.jsonl files (one JSON object per line, text in `text_field`) or *.txt
                         files (ONE DOCUMENT PER FILE: keeps code and long-form text whole)
  "tfds:NAME[:SPLIT]"    tfds.data_source(NAME, split=SPLIT or "train", data_dir=data_dir); ArrayRecord,
                         no TensorFlow. NAME may carry a config and version: "name/config:1.0.0".
Sharding is over documents after the (global, seeded) shuffle, so with the same seed every process
sees a disjoint slice and shard k of n is exactly documents k, k+n, k+2n, ... of the global stream.
The iterator is a grain DatasetIterator: get_state()/set_state() are small JSON-able dicts.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import re
import sys
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import tokenizers
from etils import epath

from rl_jax.data import packing, procedural
from rl_jax.data import tokenizer as tokenizer_lib

_SUFFIXES = (".jsonl", ".json", ".txt")
_TFDS = re.compile(r"^tfds:(?P<name>[^:]+(?::\d+\.\d+\.\d+)?)(?::(?P<split>.+))?$")


# ------------------------------------------------------------------- sources


class ProceduralSource(grain.sources.RandomAccessDataSource):
  """Index -> procedural document; 'infinite' (sys.maxsize long)."""

  def __init__(self, seed: int, kind: str = "mixed"):
    if kind not in procedural.KINDS:
      raise ValueError(f"unknown procedural kind {kind!r}; expected one of {procedural.KINDS}")
    self.seed, self.kind = seed, kind

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index: int) -> str:
    return procedural.document_at(self.seed, int(index), self.kind)


class JsonlSource(grain.sources.RandomAccessDataSource):
  """Random access to the non-empty lines of JSONL files, by byte offset (thread-safe pread)."""

  def __init__(self, paths: Sequence[str], text_field: str = "text"):
    self.paths, self.text_field = list(paths), text_field
    files, starts, ends, numbers = [], [], [], []
    for i, path in enumerate(self.paths):
      data = pathlib.Path(path).read_bytes()
      pos = 0
      for n, line in enumerate(data.splitlines(keepends=True), start=1):
        if line.strip():
          files.append(i), starts.append(pos), ends.append(pos + len(line)), numbers.append(n)
        pos += len(line)
    self._file, self._start, self._end, self._line = (np.asarray(a, np.int64) for a in (files, starts, ends, numbers))

  def __len__(self) -> int:
    return len(self._file)

  def __getitem__(self, index: int) -> str:
    path = self.paths[self._file[index]]
    fd = os.open(path, os.O_RDONLY)
    try:
      line = os.pread(fd, int(self._end[index] - self._start[index]), int(self._start[index]))
    finally:
      os.close(fd)
    where = f"{path}:{self._line[index]}"
    try:
      record = json.loads(line)
    except ValueError as e:
      raise ValueError(f"{where}: malformed JSON ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get(self.text_field), str):
      raise ValueError(f"{where}: no string field {self.text_field!r} (set data.text_field)")
    return record[self.text_field]


class TextFilesSource(grain.sources.RandomAccessDataSource):
  """One document per non-empty .txt file."""

  def __init__(self, paths: Sequence[str]):
    self.paths = [p for p in paths if os.path.getsize(p) > 0]

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> str:
    return pathlib.Path(self.paths[index]).read_text(encoding="utf-8")


class _Field:
  """Record -> text (TFDS yields dicts of numpy values, Text features as bytes)."""

  def __init__(self, name: str):
    self.name = name

  def __call__(self, record: Any) -> str:
    value = record[self.name]
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


class _Encode:
  """Text -> [bos] + ids."""

  def __init__(self, tok: tokenizers.Tokenizer):
    self.tok, self.bos_id = tok, tokenizer_lib.Vocab.from_tokenizer(tok).bos_id

  def __call__(self, text: str) -> np.ndarray:
    return np.asarray([self.bos_id] + tokenizer_lib.encode(self.tok, text), np.int32)


def _expand(source: str | Sequence[str]) -> list[str]:
  patterns = [source] if isinstance(source, (str, os.PathLike)) else list(source)
  paths = []
  for pattern in map(str, patterns):
    globs = (
      [os.path.join(pattern, f"*{ext}") for ext in _SUFFIXES] if os.path.isdir(pattern) else [pattern]
    )  # a directory means its data files
    found = sorted(p for g in globs for p in glob.glob(g, recursive=True) if os.path.isfile(p))
    if not found:
      raise FileNotFoundError(f"data source {pattern!r} matches no file")
    paths += found
  return paths


def document_dataset(
  source: str | Sequence[str],
  *,
  seed: int,
  shard_index: int = 0,
  shard_count: int = 1,
  text_field: str = "text",
  data_dir: str | None = None,
  num_epochs: int | None = None,
) -> grain.MapDataset:
  """MapDataset of this shard's document texts (shuffled per epoch; num_epochs=None: forever)."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} not in [0, shard_count={shard_count})")
  if isinstance(source, str) and (source == "procedural" or source.startswith("procedural:")):
    kind = source.partition(":")[2] or "mixed"
    ds = grain.MapDataset.source(ProceduralSource(seed, kind))  # already random, no shuffle
  else:
    if isinstance(source, str) and source.startswith("tfds:"):
      m = _TFDS.match(source)
      if not m:
        raise ValueError(f"bad TFDS source {source!r}; expected tfds:NAME[:SPLIT]")
      import tensorflow_datasets as tfds  # slow import: only when used

      split = m["split"] or "train"
      ds = grain.MapDataset.source(tfds.data_source(m["name"], split=split, data_dir=data_dir))
      ds = ds.map(_Field(text_field))
    else:
      paths = _expand(source)
      suffixes = {pathlib.Path(p).suffix for p in paths}
      if suffixes <= {".jsonl", ".json"}:
        ds = grain.MapDataset.source(JsonlSource(paths, text_field))
      elif suffixes == {".txt"}:
        ds = grain.MapDataset.source(TextFilesSource(paths))
      else:
        raise ValueError(f"data files must be all .jsonl or all .txt, got {sorted(suffixes)}")
    if len(ds) == 0:
      raise ValueError(f"data source {source!r} is empty")
    ds = ds.shuffle(seed % 2**32).repeat(num_epochs)  # shuffle before repeat: new order per epoch
  return ds[shard_index::shard_count]


# ------------------------------------------------------------------- packing


class PackIterDataset(grain.IterDataset):
  """Packs token documents into rows (see packing.py); checkpointable at row boundaries."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, eos_id: int, pad_id: int = 0):
    super().__init__(parent)
    self.seq_len, self.eos_id, self.pad_id = seq_len, eos_id, pad_id

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self.seq_len, self.eos_id, self.pad_id)


class _PackIterator(grain.DatasetIterator):
  """State = parent state before the document being packed + how much of it was emitted."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, eos_id: int, pad_id: int):
    super().__init__(parent)
    self.seq_len, self.eos_id, self.pad_id = seq_len, eos_id, pad_id
    self._pending: packing.Pending | None = None
    self._pending_state: dict[str, Any] | None = None  # parent state before the pending doc

  def _pull(self):
    state = self._parent.get_state()
    doc = next(self._parent)
    self._pending_state = state  # fill_row keeps doc pending unless it was fully emitted
    return doc

  def __next__(self) -> dict[str, np.ndarray]:
    row, self._pending = packing.fill_row(self._pull, self._pending, self.seq_len, self.eos_id, self.pad_id)
    if row is None:
      raise StopIteration
    return row

  def get_state(self) -> dict[str, Any]:
    if self._pending is None:
      return {"parent": self._parent.get_state(), "offset": 0}
    return {"parent": self._pending_state, "offset": int(self._pending[1])}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._pending = None
    if state["offset"]:
      self._pending = (self._pull(), state["offset"])


# ------------------------------------------------------------------ iterator


def make_iterator(
  source: str | Sequence[str],
  *,
  tokenizer: tokenizers.Tokenizer | str | os.PathLike,
  seq_len: int,
  batch_size: int,
  seed: int,
  shard_index: int = 0,
  shard_count: int = 1,
  text_field: str = "text",
  data_dir: str | None = None,
  num_epochs: int | None = None,
  read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
  """Checkpointable iterator of dicts of int32 [batch_size, seq_len] (packing.FIELDS).

  Multi-host: shard_index, shard_count = jax.process_index(), jax.process_count(); batch_size is
  per process. Tokenization runs in read_options.num_threads threads (default 2).
  """
  tok = tokenizer if isinstance(tokenizer, tokenizers.Tokenizer) else tokenizer_lib.load(tokenizer)
  vocab = tokenizer_lib.Vocab.from_tokenizer(tok)
  docs = document_dataset(
    source,
    seed=seed,
    shard_index=shard_index,
    shard_count=shard_count,
    text_field=text_field,
    data_dir=data_dir,
    num_epochs=num_epochs,
  )
  read_options = read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)
  ds = docs.map(_Encode(tok)).to_iter_dataset(read_options)
  ds = PackIterDataset(ds, seq_len, vocab.eos_id, vocab.pad_id)
  return iter(ds.batch(batch_size, drop_remainder=True))


def save_state(it: grain.DatasetIterator, path: str | os.PathLike) -> None:
  """Writes the iterator state as JSON (atomically; local or a URL)."""
  path = epath.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(it.get_state()))
  tmp.replace(path)


def restore_state(it: grain.DatasetIterator, path: str | os.PathLike) -> grain.DatasetIterator:
  """Sets the iterator state from a save_state file (local or a URL); returns the iterator."""
  path = epath.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no data iterator state at {path}")
  it.set_state(json.loads(path.read_text()))
  return it


# ------------------------------------------------------------------ run tokenizer


def prepare_tokenizer(
  run_dir: str,
  vocab_size: int,
  *,
  given: str | None = None,
  source: str | Sequence[str] = "procedural",
  seed: int = 0,
  text_field: str = "text",
  write: bool = True,
) -> tuple[tokenizers.Tokenizer, str]:
  """A run's tokenizer and the directory holding it (<run_dir>/tokenizer): the run's own copy when
  resuming, else `given` (a directory with tokenizer.json), else a byte-level BPE of `vocab_size`
  trained now on the first 4000 documents of `source`. `write`: save the copy (process 0 only)."""
  saved = os.path.join(run_dir, "tokenizer")
  if (epath.Path(saved) / "tokenizer.json").exists():
    return tokenizer_lib.load(saved), saved
  if given:
    tok = tokenizer_lib.load(given)
  else:
    docs = document_dataset(source, seed=seed, text_field=text_field)
    tok = tokenizer_lib.train_bpe((docs[i] for i in range(min(len(docs), 4000))), vocab_size=vocab_size)
  if tok.get_vocab_size() > vocab_size:
    raise ValueError(
      f"{f'tokenizer {given} (data.tokenizer)' if given else 'the trained tokenizer'} has {tok.get_vocab_size()} "
      f"tokens but model.vocab_size is {vocab_size}"
    )
  if write:
    tokenizer_lib.save(tok, saved)
  return tok, saved
