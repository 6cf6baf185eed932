"""MTP speculative decoding vs plain greedy decoding at batch 1, side by side in one run.

  XLA_FLAGS=--xla_cpu_multi_thread_eigen=false \
    python benchmarks/spec_decode.py --checkpoint runs/r1_tiny_dev/base/checkpoints [--draft-lens 1 2]

(single-threaded matmuls: on a loaded machine Eigen's thread pool makes every small matmul wait for a core.)

The checkpoint must be a V3-shaped model whose MTP module was trained (`train.mtp_lambda > 0`, e.g.
configs/pretrain_r1_tiny.yaml or pretrain_r1zero_tiny.yaml). MoE layers are switched to dropless dispatch (exact
routing whatever the number of tokens a forward sees). Prompts: the first tokens of held-out procedural
documents of the corpus the checkpoint was trained on. Every configuration is compiled and run once first
(warm-up excluded), then the plain and speculative runs are interleaved `--repeats` times and the best time of
each is kept (the machine may be shared: interleaving exposes both sides to the same load). The speculative
tokens are checked equal to the plain greedy ones.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np


def _prompts(tokenizer_dir: str, kind: str, n: int, prompt_tokens: int) -> list[list[int]]:
  from transformers import AutoTokenizer

  from rl_jax.data import procedural

  tok = AutoTokenizer.from_pretrained(tokenizer_dir)
  doc = procedural.r1_document if kind == "r1" else procedural.r1zero_document
  out = []
  for i in range(n):
    ids = tok(doc(987, i))["input_ids"]  # a seed no training run uses
    out.append(ids[: min(prompt_tokens, len(ids) - 1)])
  return out


def _timed(fn) -> tuple[float, object]:
  t0 = time.perf_counter()
  res = fn()
  return time.perf_counter() - t0, res


def run(checkpoint: str, *, kind: str, draft_lens, n_prompts: int, prompt_tokens: int, new_tokens: int, repeats: int):
  from rl_jax import checkpoint as ckpt
  from rl_jax import sampling, speculative

  model = ckpt.load_model(checkpoint, moe_capacity_factor=None)
  prompts = _prompts(ckpt.tokenizer_dir(checkpoint) or checkpoint, kind, n_prompts, prompt_tokens)
  plain = lambda p: sampling.generate(model, [p], max_new_tokens=new_tokens, temperature=0.0)
  spec = {
    k: (lambda p, k=k: speculative.generate(model, [p], max_new_tokens=new_tokens, draft_len=k)) for k in draft_lens
  }
  ref = [plain(p) for p in prompts]  # warm-up (compiles) and the reference tokens
  for k, fn in spec.items():
    for p, r in zip(prompts, ref):
      np.testing.assert_array_equal(fn(p).tokens, r.tokens, err_msg=f"draft_len={k}: speculative != greedy")
  best = {"plain": float("inf"), **{k: float("inf") for k in draft_lens}}
  stats = {k: [0, 0, 0] for k in draft_lens}  # drafted, accepted, verify steps
  for _ in range(repeats):
    best["plain"] = min(best["plain"], sum(_timed(lambda p=p: plain(p))[0] for p in prompts))
    for k, fn in spec.items():
      runs = [_timed(lambda p=p, fn=fn: fn(p)) for p in prompts]
      best[k] = min(best[k], sum(t for t, _ in runs))
      stats[k] = [sum(getattr(r, f) for _, r in runs) for f in ("drafted", "accepted", "steps")]
  tokens = int(sum(r.lengths.sum() for r in ref))
  rows = []
  for k in draft_lens:
    drafted, accepted, steps = stats[k]
    rows.append(
      {
        "bench": "spec_decode",
        "checkpoint": checkpoint,
        "batch": 1,
        "prompts": n_prompts,
        "new_tokens": new_tokens,
        "draft_len": k,
        "plain_tokens_per_s": round(tokens / best["plain"], 1),
        "spec_tokens_per_s": round(tokens / best[k], 1),
        "speedup": round(best["plain"] / best[k], 2),
        "acceptance_rate": round(accepted / max(drafted, 1), 3),
        "tokens_per_verify": round(tokens / max(steps + n_prompts, 1), 2),  # the prefill makes each first token
        "cpu_threads": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 1),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      }
    )
    print(json.dumps(rows[-1]), flush=True)
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--checkpoint", default="runs/r1_tiny_dev/base/checkpoints")
  ap.add_argument("--corpus", choices=["r1", "r1zero"], default="r1", help="the corpus the checkpoint was trained on")
  ap.add_argument("--draft-lens", type=int, nargs="+", default=[1, 2])
  ap.add_argument("--prompts", type=int, default=4)
  ap.add_argument("--prompt-tokens", type=int, default=12)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=3)
  a = ap.parse_args(argv)
  if not os.path.isdir(a.checkpoint):
    raise SystemExit(
      f"error: {a.checkpoint}: no checkpoint (train one, e.g. rl-jax pretrain --config pretrain_r1_tiny)"
    )
  run(
    a.checkpoint,
    kind=a.corpus,
    draft_lens=a.draft_lens,
    n_prompts=a.prompts,
    prompt_tokens=a.prompt_tokens,
    new_tokens=a.new_tokens,
    repeats=a.repeats,
  )


if __name__ == "__main__":
  main()
