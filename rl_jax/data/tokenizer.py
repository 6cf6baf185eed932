"""Byte-level BPE tokenizer (HF `tokenizers`): train, save, load, encode, decode."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Sequence

import tokenizers
from etils import epath
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
# R1 template tags: single tokens, but NOT "special", so decode(skip_special_tokens=True) keeps them
# (the reward parser needs them; DeepSeek-R1's own tokenizer marks <think> special=false too).
TEMPLATE_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
DEFAULT_SPECIALS = (PAD, BOS, EOS, *TEMPLATE_TAGS)

_TOKENIZER_FILE = "tokenizer.json"
_CONFIG_FILE = "tokenizer_config.json"


@dataclasses.dataclass(frozen=True)
class Vocab:
  """The ids the rest of the stack needs, resolved from a tokenizer."""

  pad_id: int
  bos_id: int
  eos_id: int
  size: int

  @classmethod
  def from_tokenizer(cls, tok: tokenizers.Tokenizer) -> Vocab:
    ids = {}
    for name in (PAD, BOS, EOS):
      ids[name] = tok.token_to_id(name)
      if ids[name] is None:
        raise ValueError(f"tokenizer has no {name} token (needed for pad/bos/eos)")
    return cls(ids[PAD], ids[BOS], ids[EOS], tok.get_vocab_size())


def _pre_tokenizer(split_digits: bool) -> pre_tokenizers.PreTokenizer:
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if not split_digits:
    return byte_level
  # One token per digit (as Llama): column arithmetic stays learnable for tiny models.
  return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])


def train_bpe(
  texts: Iterable[str],
  vocab_size: int,
  special_tokens: Sequence[str] = DEFAULT_SPECIALS,
  *,
  split_digits: bool = True,
) -> tokenizers.Tokenizer:
  """Byte-level BPE of exactly vocab_size tokens; special_tokens get ids 0, 1, ... in order."""
  special_tokens = list(special_tokens)
  if len(set(special_tokens)) != len(special_tokens):
    raise ValueError(f"duplicate special tokens: {special_tokens}")
  min_size = 256 + len(special_tokens)
  if vocab_size < min_size:
    raise ValueError(f"vocab_size={vocab_size} < {min_size} (256 bytes + {len(special_tokens)} specials)")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = _pre_tokenizer(split_digits)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[AddedToken(s, special=True, normalized=False) for s in special_tokens],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(texts, trainer)
  # The trainer marks every added token special; unmark the template tags (see TEMPLATE_TAGS).
  spec = json.loads(tok.to_str())
  for added in spec["added_tokens"]:
    if added["content"] in TEMPLATE_TAGS:
      added["special"] = False
  tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
  missing = vocab_size - tok.get_vocab_size()
  if missing > 0:
    # Small corpora (the procedural one saturates near 370 tokens with split digits) run out of
    # merges; reserved tokens (as Llama 3's) keep the vocab exactly the size the model expects.
    logging.info("BPE ran out of merges: adding %d reserved tokens", missing)
    tok.add_special_tokens([AddedToken(f"<reserved_{i}>", special=True, normalized=False) for i in range(missing)])
  return tok


def save(tok: tokenizers.Tokenizer, directory: str | os.PathLike) -> epath.Path:
  """Writes tokenizer.json + tokenizer_config.json (readable by HF AutoTokenizer) to a local or URL (gs://)
  directory; returns the dir."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / _TOKENIZER_FILE).write_text(tok.to_str(pretty=True))  # what tok.save writes, through epath
  config = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": BOS,
    "eos_token": EOS,
    "pad_token": PAD,
    "add_bos_token": False,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 1_000_000_000,
  }
  (directory / _CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
  return directory


def load(path: str | os.PathLike) -> tokenizers.Tokenizer:
  """Loads a directory holding tokenizer.json, or a tokenizer.json file (local or a URL)."""
  path = epath.Path(path)
  file = path / _TOKENIZER_FILE if path.is_dir() else path
  if not file.is_file():
    raise FileNotFoundError(f"no tokenizer at {file}")
  try:
    return tokenizers.Tokenizer.from_str(file.read_text(encoding="utf-8"))
  except Exception as e:  # tokenizers raises a bare Exception on bad JSON
    raise ValueError(f"corrupt tokenizer file {file}: {e}") from None


def encode(tok: tokenizers.Tokenizer, text: str) -> list[int]:
  """Text -> ids, without bos/eos (the data pipeline adds those)."""
  return tok.encode(text, add_special_tokens=False).ids


def decode(tok: tokenizers.Tokenizer, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
  """Ids -> text; skip_special_tokens drops pad/bos/eos but keeps the template tags."""
  return tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
