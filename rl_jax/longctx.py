"""Long-context evaluation (`rl-jax eval --task passkey|perplexity`): does a model use its whole context?

passkey: a random key (procedural.random_key) stated at a chosen depth of filler text, asked for at the end, in exactly the
format of the procedural "longkey" corpus (procedural.passkey_text). A case counts as retrieved when greedy
decoding reproduces the key exactly; that is checked in one forward pass, teacher-forced: greedy decoding
emits the key iff the argmax at every key position is the key's next token given the key's own prefix.
Accuracy per (context length, depth) cell makes V3's needle-in-a-haystack figure (depth on y, length on x).

perplexity: mean next-token loss by position bucket on held-out documents (procedural, JSONL, text or
ArrayRecord sources), so a curve shows where a model stops using its context.

Lengths past the model's max_position_embeddings are allowed: that is where a base model is expected to fail.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rl_jax.data import procedural
from rl_jax.data import tokenizer as toks

TASKS = ("passkey", "perplexity")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

# (tokens [B, T] int32, targets [B, T] int32) -> (greedy next token [B, T], next-token loss [B, T]), numpy
TokenStats = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def model_stats(model) -> TokenStats:
  """TokenStats of a Transformer: one jitted full-sequence forward (no cache), float32 log-softmax."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, tokens, targets):
    logits = nnx.merge(graphdef, state).forward(tokens).logits_BTV.astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    return jnp.argmax(logits, axis=-1), nll

  return lambda tokens, targets: tuple(np.asarray(x) for x in fn(state, jnp.asarray(tokens), jnp.asarray(targets)))


def _bos(tok) -> list[int]:
  """[bos] when the tokenizer has the pipeline's BOS (training documents start with it), else []."""
  bos = tok.token_to_id(toks.BOS)
  return [] if bos is None else [bos]


def _batched(stats: TokenStats, rows: Sequence[Sequence[int]], length: int, batch_size: int, pad: int = 0):
  """(greedy [N, length], nll [N, length]) over right-padded rows (causal: padding never changes what precedes)."""
  greedy, nll = [], []
  for i in range(0, len(rows), batch_size):
    chunk = rows[i : i + batch_size]
    tokens = np.full((batch_size, length), pad, np.int32)  # a fixed batch shape: one compile per length
    for r, ids in enumerate(chunk):
      tokens[r, : len(ids)] = ids
    targets = np.concatenate([tokens[:, 1:], np.full((batch_size, 1), pad, np.int32)], axis=1)
    g, n = stats(tokens, targets)
    greedy.append(g[: len(chunk)])
    nll.append(n[: len(chunk)])
  return np.concatenate(greedy), np.concatenate(nll)


# ------------------------------------------------------------------------------------------ passkey
def passkey_case(tok, length: int, depth: float, rng: random.Random) -> tuple[list[int], int, str]:
  """(ids, n_prompt, key): [bos] + the longest passkey prompt + " KEY" of at most `length` tokens; the key's
  tokens are ids[n_prompt:]."""
  key = procedural.random_key(rng)
  filler = [rng.choice(procedural.FILLER) for _ in range(length)]  # more sentences than can ever fit

  def encode(n: int) -> tuple[list[int], int]:
    prompt = procedural.passkey_text(key, filler[:n], depth)
    ids, head = _bos(tok) + toks.encode(tok, f"{prompt} {key}"), _bos(tok) + toks.encode(tok, prompt)
    if ids[: len(head)] != head:  # the answer merged into the prompt's last token: no clean split to score
      raise ValueError(f"the tokenizer merges the pass key into the question ({prompt[-30:]!r} + ' {key}')")
    return ids, len(head)

  lo, hi = 0, length  # the most filler sentences that fit
  if len(encode(0)[0]) > length:
    raise ValueError(f"--lengths {length}: too short for even an empty passkey prompt ({len(encode(0)[0])} tokens)")
  while lo < hi:
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if len(encode(mid)[0]) <= length else (lo, mid - 1)
  ids, n_prompt = encode(lo)
  return ids, n_prompt, key


def passkey(stats: TokenStats, tok, *, lengths: Sequence[int], depths: Sequence[float] = DEFAULT_DEPTHS,
            samples: int = 20, seed: int = 0, batch_size: int = 8) -> dict[str, Any]:  # fmt: skip
  """Retrieval accuracy per (depth, length) cell over `samples` random keys each: `accuracy[d][l]`."""
  _check_grid(lengths, depths)
  acc = [[0.0] * len(lengths) for _ in depths]
  tokens = []
  for j, length in enumerate(lengths):
    cases = [passkey_case(tok, length, d, random.Random(f"rl_jax.passkey/{seed}/{length}/{d}/{s}"))
             for d in depths for s in range(samples)]  # fmt: skip
    greedy, _ = _batched(stats, [ids for ids, _, _ in cases], length, batch_size)
    for c, (ids, n_prompt, _) in enumerate(cases):
      hit = all(greedy[c, t - 1] == ids[t] for t in range(n_prompt, len(ids)))
      acc[c // samples][j] += float(hit) / samples
    tokens.append(round(float(np.mean([len(ids) for ids, _, _ in cases])), 1))
  by_length = [float(np.mean([acc[i][j] for i in range(len(depths))])) for j in range(len(lengths))]
  return {
    "lengths": list(lengths), "depths": list(depths), "samples": samples, "accuracy": acc,
    "accuracy_by_length": dict(zip(map(str, lengths), by_length)), "mean_tokens": tokens,
    "accuracy_mean": float(np.mean(acc)),
  }  # fmt: skip


def _check_grid(lengths: Sequence[int], depths: Sequence[float]) -> None:
  if not lengths or any(int(x) < 2 for x in lengths):
    raise ValueError(f"--lengths must be token counts >= 2, got {list(lengths)}")
  if not depths or any(not 0 <= d <= 1 for d in depths):
    raise ValueError(f"--depths must be fractions in [0, 1], got {list(depths)}")


# ------------------------------------------------------------------------------------------ perplexity
def documents(source: str, tok, *, length: int, num_docs: int, seed: int, text_field: str = "text") -> list[list[int]]:
  """The first `num_docs` documents of `source` (stream / shuffle `seed`) as [bos] + ids + [eos], cut to `length`."""
  from rl_jax.data import pipeline

  docs = pipeline.document_dataset(source, seed=seed, text_field=text_field, num_epochs=1)
  eos = tok.token_to_id(toks.EOS)
  out = []
  for i in range(len(docs)):
    if len(out) == num_docs:
      break
    ids = _bos(tok) + toks.encode(tok, docs[i]) + ([] if eos is None else [eos])
    if len(ids) >= 2:
      out.append(ids[:length])
  if not out:
    raise ValueError(f"data source {source!r} has no document of 2 tokens or more")
  return out


def perplexity(stats: TokenStats, rows: Sequence[Sequence[int]], *, length: int, bucket: int,
               batch_size: int = 8) -> dict[str, Any]:  # fmt: skip
  """Mean loss of predicting token t+1 at positions t in [start, start + bucket), over every row that has one."""
  if bucket < 1 or length < 2:
    raise ValueError(f"perplexity needs --bucket >= 1 and a length >= 2, got bucket={bucket}, length={length}")
  _, nll = _batched(stats, rows, length, batch_size)
  valid = np.zeros_like(nll, dtype=bool)
  for r, ids in enumerate(rows):
    valid[r, : len(ids) - 1] = True  # the last token has no next token in the row
  buckets = []
  for start in range(0, length - 1, bucket):
    v = valid[:, start : start + bucket]
    n = int(v.sum())
    loss = float(nll[:, start : start + bucket][v].mean()) if n else None
    buckets.append({"start": start, "end": min(start + bucket, length - 1), "loss": loss, "tokens": n})
  return {"length": length, "bucket": bucket, "documents": len(rows), "buckets": buckets,
          "mean_loss": float(nll[valid].mean())}  # fmt: skip


# ------------------------------------------------------------------------------------------ run + figures
def run(checkpoint: str, task: str, *, lengths: Sequence[int] | None = None, depths: Sequence[float] | None = None,
        data: str | None = None, num: int = 20, bucket: int | None = None, seed: int = 0,
        batch_size: int = 8) -> dict[str, Any]:  # fmt: skip
  """`rl-jax eval --task passkey|perplexity` on a checkpoint, with its tokenizer, on one device's worth of rows."""
  from rl_jax import checkpoint as ckpt

  cfg = ckpt.read_model_config(checkpoint)
  meta = ckpt.read_meta(checkpoint)
  rc = meta.get("run_config") or {}
  trained = (rc.get("train") or {}).get("seq_len")
  tok_dir = ckpt.tokenizer_dir(checkpoint)
  if tok_dir is None:
    raise ValueError(f"{checkpoint} has no tokenizer/ to encode the {task} texts with")
  tok = toks.load(tok_dir)
  lengths = list(lengths or ([trained, 2 * trained, 4 * trained] if trained else [128, 256, 512]))
  stats = model_stats(ckpt.load_model(checkpoint, moe_capacity_factor=None))  # dropless: rows never compete
  info = {"task": task, "checkpoint": os.path.abspath(checkpoint), "step": meta.get("step"), "seed": seed,
          "train_seq_len": trained, "max_position_embeddings": cfg.max_position_embeddings,
          "rope": cfg.rope.type, "rope_factor": cfg.rope.factor}  # fmt: skip
  if task == "passkey":
    res = passkey(stats, tok, lengths=lengths, depths=list(depths or DEFAULT_DEPTHS), samples=num, seed=seed,
                  batch_size=batch_size)  # fmt: skip
    return {**info, **res}
  source = data or (rc.get("data") or {}).get("source")
  if not source:
    raise ValueError(f"{checkpoint}: its run config names no data source; pass --data")
  length = max(lengths)
  rows = documents(source, tok, length=length, num_docs=num, seed=seed + 1_000_003,  # not a training stream's seed
                   text_field=(rc.get("data") or {}).get("text_field", "text"))  # fmt: skip
  res = perplexity(stats, rows, length=length, bucket=bucket or max(1, length // 16), batch_size=batch_size)
  return {**info, "data": source, **res}


def figure(res: dict[str, Any], path: str) -> str:
  """The passkey heatmap (depth on y, length on x) or the loss-by-position curve, as a PNG at `path`."""
  import io

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from etils import epath

  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  title = f"{res['task']}: {os.path.basename(os.path.dirname(res['checkpoint'].rstrip('/')))}"
  if res["task"] == "passkey":
    im = ax.imshow(np.asarray(res["accuracy"]), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set(xticks=range(len(res["lengths"])), xticklabels=res["lengths"], yticks=range(len(res["depths"])),
           yticklabels=[f"{d:g}" for d in res["depths"]], xlabel="context length (tokens)", ylabel="key depth")  # fmt: skip
    for (i, j), a in np.ndenumerate(np.asarray(res["accuracy"])):
      ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="retrieval accuracy")
  else:
    b = [x for x in res["buckets"] if x["loss"] is not None]
    ax.plot([(x["start"] + x["end"]) / 2 for x in b], [x["loss"] for x in b], marker="o")
    if res.get("train_seq_len"):
      ax.axvline(res["train_seq_len"], ls="--", c="gray", label=f"train seq_len {res['train_seq_len']}")
      ax.legend()
    ax.set(xlabel="position in document (tokens)", ylabel="next-token loss")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90)
  plt.close(fig)
  epath.Path(path).write_bytes(buf.getvalue())
  return path
