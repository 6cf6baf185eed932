"""Data: byte-level BPE tokenizer, procedural tasks, packing, checkpointable grain pipelines."""

from rl_jax.data.packing import FIELDS, fill_row, pack
from rl_jax.data.pipeline import (
  JsonlSource,
  PackIterDataset,
  ProceduralSource,
  TextFilesSource,
  document_dataset,
  make_iterator,
  restore_state,
  save_state,
)
from rl_jax.data.procedural import KINDS, document_at, documents, problem_at, problems, verify
from rl_jax.data.tokenizer import (
  DEFAULT_SPECIALS,
  TEMPLATE_TAGS,
  Vocab,
  decode,
  encode,
  load,
  save,
  train_bpe,
)

__all__ = [
  "FIELDS",
  "fill_row",
  "pack",
  "JsonlSource",
  "PackIterDataset",
  "ProceduralSource",
  "TextFilesSource",
  "document_dataset",
  "make_iterator",
  "restore_state",
  "save_state",
  "KINDS",
  "document_at",
  "documents",
  "problem_at",
  "problems",
  "verify",
  "DEFAULT_SPECIALS",
  "TEMPLATE_TAGS",
  "Vocab",
  "decode",
  "encode",
  "load",
  "save",
  "train_bpe",
]
