"""A Bradley-Terry reward model (a checkpoint with a scalar `score` head, trained by `rl-jax train-rm`), host side.

The reward of a sequence is the head's score at its last real token. A sequence is encoded like a GRPO
training row: [bos] + encode(render(prompt)) + encode(completion) + [eos], right-padded; attention is causal,
so the padding never changes the score. `RewardModel.score` returns sigmoid(score) in (0, 1), on the scale of
the rule rewards (a 0.5 weight of "rm" in grpo.rewards then weighs like half an accuracy point); `raw=True`
gives the raw score (the Bradley-Terry logit: P(a preferred to b) = sigmoid(r_a - r_b)).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rl_jax import checkpoint as ckpt
from rl_jax.data import tasks
from rl_jax.data import tokenizer as toks


def sequence_scores(model, tokens_BT, lengths_B, *, remat: bool = False):
  """The score head at each row's last real token (index length - 1): [B] float32."""
  h_BTD = model.forward(tokens_BT, last_only=True, remat=remat).hidden_BTD
  s_BT = model.scores(h_BTD)
  return jnp.take_along_axis(s_BT, (lengths_B - 1)[:, None].astype(jnp.int32), axis=1)[:, 0]


def encode_pair_text(tok, prompt: str | Sequence[int], completion: str | Sequence[int], template: str) -> list[int]:
  """[bos] + encode(render(prompt)) + encode(completion) + [eos]; an id list is taken as already encoded."""
  v = toks.Vocab.from_tokenizer(tok)
  p = (
    list(prompt)
    if not isinstance(prompt, str)
    else [v.bos_id] + toks.encode(tok, tasks.render({"prompt": prompt}, template))
  )
  c = list(completion) if not isinstance(completion, str) else toks.encode(tok, completion)
  return p + c + [v.eos_id]


def pad_rows(rows: Sequence[Sequence[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded int32 [N, width] tokens (pad 0: never attended by a real token) and lengths [N]."""
  out = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    out[i, : len(r)] = r
  return out, np.asarray([len(r) for r in rows], np.int32)


class RewardModel:
  """`RewardModel.load(ckpt)`, then `score(prompts, completions)` -> np.ndarray [N] float32."""

  def __init__(self, model, tok, *, template: str = "r1_zero_short", batch_size: int = 32):
    if not model.cfg.score_head:
      raise ValueError("RewardModel needs a checkpoint with a score head (trained by rl-jax train-rm)")
    self.model, self.tok, self.template, self.batch_size = model, tok, template, batch_size
    graphdef, state = nnx.split(model)
    self._fn = jax.jit(lambda st, t, n: sequence_scores(nnx.merge(graphdef, st), t, n))
    self._state = state

  @classmethod
  def load(cls, path: str, *, template: str | None = None, batch_size: int = 32) -> RewardModel:
    """The checkpoint's model (dropless routing, so rows never compete for expert capacity) and tokenizer;
    the prompt template defaults to the one it was trained with (its sft.template)."""
    tok_dir = ckpt.tokenizer_dir(path)
    if tok_dir is None:
      raise ValueError(f"{path}: reward model checkpoint has no tokenizer/")
    if template is None:
      template = ckpt.read_meta(path).get("run_config", {}).get("sft", {}).get("template", "r1_zero_short")
    model = ckpt.load_model(path, moe_capacity_factor=None)
    return cls(model, toks.load(tok_dir), template=template, batch_size=batch_size)

  def score(self, prompts: Sequence, completions: Sequence, *, raw: bool = False) -> np.ndarray:
    """Scores of each (prompt, completion) (text, or token ids taken as encoded): sigmoid(r), or r if `raw`."""
    if len(prompts) != len(completions):
      raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    rows = [encode_pair_text(self.tok, p, c, self.template) for p, c in zip(prompts, completions)]
    if not rows:
      return np.zeros((0,), np.float32)
    width = _bucket(max(len(r) for r in rows))  # few distinct shapes: few compiles
    out = []
    for i in range(0, len(rows), self.batch_size):
      chunk = rows[i : i + self.batch_size]
      chunk = chunk + [chunk[-1]] * (self.batch_size - len(chunk))  # a fixed batch shape
      t, n = pad_rows(chunk, width)
      out.append(np.asarray(self._fn(self._state, t, n))[: len(rows) - i])
    r = np.concatenate(out).astype(np.float32)
    return r if raw else (1.0 / (1.0 + np.exp(-r))).astype(np.float32)


def _bucket(n: int) -> int:
  """The padded width: the next power of two >= n (at least 16)."""
  return max(16, 1 << (n - 1).bit_length())
