"""Greedy packing of token documents into fixed-length rows with segment ids.

Row layout (all int32 [seq_len]):
  tokens       document tokens, pad_id after the last document
  targets      next token of the same document; a document's last token targets eos_id
  segment_ids  1, 2, ... per document (chunk) within the row; 0 = padding
  positions    0, 1, ... restarting at each segment
  loss_mask    1 where the target is real and carries loss (a `Doc`'s own mask, else 1)
A document that fits in an empty row is never split: if it does not fit in the space left, the row
is closed (padded) and the document starts the next one. Longer documents fill the space left and
continue over as many rows as needed, each chunk its own segment whose last target is the
document's next token (in the next row), so no target ever crosses into another document.

A document is a sequence of token ids (pretraining: every target carries loss) or a `Doc` whose
`loss_mask[i]` says whether target i (token i + 1, or eos after the last) carries loss (SFT: responses only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

FIELDS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


class Doc(NamedTuple):
  """A document with its own loss mask: `loss_mask[i]` = 1 where target i (the token after `tokens[i]`,
  eos after the last) carries loss."""

  tokens: Sequence[int]
  loss_mask: Sequence[int]


Pending = tuple[Sequence[int] | Doc, int]  # (document, tokens of it already emitted)


def _split(doc: Sequence[int] | Doc) -> tuple[Sequence[int], Sequence[int] | None]:
  """(tokens, per-target loss mask or None = all ones)."""
  if isinstance(doc, Doc):
    if len(doc.loss_mask) != len(doc.tokens):
      raise ValueError(f"Doc has {len(doc.tokens)} tokens but a loss_mask of {len(doc.loss_mask)}")
    return doc.tokens, doc.loss_mask
  return doc, None


def fill_row(
  pull: Callable[[], Sequence[int]],
  pending: Pending | None,
  seq_len: int,
  eos_id: int,
  pad_id: int = 0,
  *,
  pack: bool = True,
) -> tuple[dict[str, np.ndarray] | None, Pending | None]:
  """Builds one row from `pending` then documents from `pull()` (raises StopIteration at the end);
  `pack=False`: at most one document (chunk) per row, the rest padding.

  Returns (row or None when there is no data left, the new pending document or None).
  """
  row = {k: np.zeros([seq_len], np.int32) for k in FIELDS}
  row["tokens"][:] = pad_id
  row["targets"][:] = pad_id
  used, segment = 0, 0
  while used < seq_len:
    if pending is None:
      try:
        doc = pull()
      except StopIteration:
        break
      if len(_split(doc)[0]) == 0:
        continue
      pending = (doc, 0)
    (doc, mask), offset = _split(pending[0]), pending[1]
    rest = len(doc) - offset
    if used and (not pack or seq_len - used < rest <= seq_len):
      break  # fits an empty row but not this one (or one per row): start the next row with it
    n = min(rest, seq_len - used)
    segment += 1
    span = slice(used, used + n)
    row["tokens"][span] = doc[offset : offset + n]
    row["targets"][span] = list(doc[offset + 1 : offset + n + 1]) + ([eos_id] if n == rest else [])
    row["segment_ids"][span] = segment
    row["positions"][span] = np.arange(n)
    row["loss_mask"][span] = 1 if mask is None else mask[offset : offset + n]
    used += n
    pending = None if n == rest else (pending[0], offset + n)
  return (row if used else None), pending


def pack(
  token_seqs: Iterable[Sequence[int] | Doc], seq_len: int, eos_id: int, pad_id: int = 0, *, pack: bool = True
) -> Iterator[dict[str, np.ndarray]]:
  """Packs documents into rows of length seq_len (see the module docstring; `pack=False`: one per row)."""
  if seq_len < 1:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  docs = iter(token_seqs)
  pending = None
  while True:
    row, pending = fill_row(lambda: next(docs), pending, seq_len, eos_id, pad_id, pack=pack)
    if row is None:
      return
    yield row
