"""`rl-jax bench train|sample`: step time, tokens/s, model FLOPs and MFU against a matmul peak measured on
the spot on the same devices; sampler throughput and cache size. Results print as one JSON object."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def matmul_peak(dtype=None, n: int | None = None, repeats: int = 5) -> float:
  """Best FLOP/s of a large square matmul on all local devices (the denominator of MFU)."""
  platform = jax.devices()[0].platform
  dtype = dtype or (jnp.float32 if platform == "cpu" else jnp.bfloat16)
  n = n or (2048 if platform == "cpu" else 8192)
  devs = jax.local_devices()
  mesh = jax.make_mesh((len(devs),), ("d",), devices=devs, axis_types=(jax.sharding.AxisType.Auto,))
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  a = jax.device_put(jnp.ones((len(devs) * n, n), dtype), sh)
  b = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a, b: (a @ b).sum(dtype=jnp.float32))
  f(a, b).block_until_ready()
  best = 0.0
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = max(best, 2 * len(devs) * n**3 / (time.perf_counter() - t))
  return best


def bench_train(run, steps: int = 5) -> dict:
  """Times the training step the loop runs, on a fixed random batch; one JSON-able dict."""
  from rl_jax.sharding import mesh as smesh
  from rl_jax.sharding import rules as srules
  from rl_jax.train.step import runs_mtp

  mesh = smesh.mesh_from_config(run.mesh)
  with jax.set_mesh(mesh), srules.use_rules(run.mesh.rules):
    mcfg, fn, state, batch = _train_setup(run, mesh)
    peak_before = matmul_peak()
    t0 = time.perf_counter()
    state, m = fn(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, m = fn(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
  t = run.train
  step_s = float(np.median(times))
  tokens = t.batch_size * t.seq_len
  fpt = mcfg.flops_per_token(t.seq_len, mtp=runs_mtp(mcfg, t))
  peak = max(peak_before, matmul_peak())  # measured on the spot, before and after; the better one
  achieved = fpt * tokens / step_s
  return {
    "bench": "train",
    "model": run.model if isinstance(run.model, str) else "inline",
    "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    "compute_dtype": t.compute_dtype,
    "batch": t.batch_size,
    "seq_len": t.seq_len,
    "params_active": mcfg.param_counts()["active"],
    "compile_s": round(compile_s, 2),
    "step_s": round(step_s, 4),
    "tokens_per_s": round(tokens / step_s, 1),
    "model_flops_per_token": fpt,
    "achieved_tflops": round(achieved / 1e12, 4),
    "matmul_peak_tflops": round(peak / 1e12, 4),
    "mfu": round(achieved / peak, 4),
    "loss": float(m["loss"]),
  }


def _train_setup(run, mesh):
  """(model config, jitted step, state, placed random batch) as the training loop builds them."""
  from rl_jax.config import model_config
  from rl_jax.train import state as S
  from rl_jax.train import step as ST

  t = run.train
  mcfg = S.train_model_config(model_config(run), t)
  tx = S.optimizer(run.optimizer, t.steps)
  graphdef, state, shardings = S.init_state(mcfg, tx, mesh, seed=t.seed)
  fn = ST.build_step(graphdef, mcfg, t, tx, mesh, shardings)
  toks = np.random.RandomState(0).randint(0, mcfg.vocab_size, (t.batch_size, t.seq_len + 1)).astype(np.int32)
  host = dict(
    tokens=toks[:, :-1],
    targets=toks[:, 1:],
    segment_ids=np.ones((t.batch_size, t.seq_len), np.int32),
    positions=np.tile(np.arange(t.seq_len, dtype=np.int32), (t.batch_size, 1)),
    loss_mask=np.ones((t.batch_size, t.seq_len), np.int32),
  )
  return mcfg, fn, state, ST.place_batch(host, mesh, t.grad_accum)


def bench_sample(
  presets=("tiny-moe", "small-moe"), batches=(1, 16, 64), prompt_len: int = 64, new_tokens: int = 256
) -> list[dict]:
  from rl_jax import models, sampling
  from rl_jax.models.config import preset

  out = []
  for name in presets:
    cfg = preset(name)
    model = models.build(cfg, seed=0)
    per_token = (
      (cfg.kv_lora_rank + cfg.qk_rope_head_dim) if cfg.is_mla else 2 * cfg.num_key_value_heads * cfg.gqa_head_dim
    )
    for b in batches:
      rs = np.random.RandomState(b)
      prompts = [list(rs.randint(3, cfg.vocab_size, prompt_len)) for _ in range(b)]
      kw = dict(max_new_tokens=new_tokens, temperature=1.0, seed=0)
      sampling.generate(model, prompts, **kw)  # compile
      t0 = time.perf_counter()
      res = sampling.generate(model, prompts, **kw)
      dt = time.perf_counter() - t0
      out.append(
        {
          "bench": "sample",
          "model": name,
          "batch": b,
          "prompt_len": prompt_len,
          "new_tokens": new_tokens,
          "seconds": round(dt, 3),
          "tokens_per_s": round(float(res.lengths.sum()) / dt, 1),
          "cache_numbers_per_token_per_layer": per_token,
          "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        }
      )
      print(json.dumps(out[-1]), flush=True)
  return out


def rollout_workload(n_prompts: int, group: int, prompt_len: int, max_new: int, vocab: int, seed: int = 0):
  """A GRPO-like long-tailed workload: prompts (each sampled `group` times) and per-row response lengths drawn
  from a lognormal (median max_new / 8, sigma 1) clipped to [1, max_new], as reasoning RL produces."""
  rs = np.random.RandomState(seed)
  prompts = [list(rs.randint(3, vocab, rs.randint(prompt_len // 2, prompt_len + 1))) for _ in range(n_prompts)]
  lengths = np.clip(np.round(rs.lognormal(np.log(max_new / 8), 1.0, n_prompts * group)), 1, max_new).astype(int)
  return prompts, lengths


def _static_rollout(model, prompts, lengths, group: int, batch_prompts: int, max_new: int) -> float:
  """Today's sampler: `batch_prompts` prompts x G rows a call, each call decoding until its longest row ends
  (the per-row lengths stand in for EOS: the rows past their length are wasted work). Seconds."""
  from rl_jax import sampling

  t0 = time.perf_counter()
  for i in range(0, len(prompts), batch_prompts):
    rows = lengths[i * group : (i + batch_prompts) * group]
    sampling.generate(model, prompts[i : i + batch_prompts], max_new_tokens=int(rows.max()), num_samples=group)
  return time.perf_counter() - t0


def _engine_rollout(model, prompts, lengths, group: int, slots: int, max_new: int, chunk: int):
  """The engine on the same rows: all submitted, slots refilled as rows end. (seconds, stats)."""
  from rl_jax import engine

  t0 = time.perf_counter()
  eng = engine.Engine(model, slots=slots, max_prompt_len=max(map(len, prompts)), max_new_tokens=max_new, chunk=chunk)
  for p, prompt in enumerate(prompts):
    rows = range(p * group, (p + 1) * group)
    eng.submit(prompt, num_samples=group, rows=rows, max_new_tokens=[int(lengths[r]) for r in rows])
  n = sum(1 for _ in eng.run())
  assert n == len(lengths)
  return time.perf_counter() - t0, eng.stats


def bench_rollout(
  preset_name: str = "tiny-moe",
  n_prompts: int = 64,
  group: int = 8,
  batch_prompts: int = 8,
  slots: int = 64,
  prompt_len: int = 64,
  max_new: int = 256,
  chunk: int = 16,
  repeats: int = 3,
) -> dict:
  """Static sampler vs rollout engine on one long-tailed G-sample workload, each warmed up on the whole
  workload first (compiles excluded), then timed `repeats` times (best); useful tokens/s side by side."""
  from rl_jax import models
  from rl_jax.models.config import preset

  cfg = preset(preset_name)
  model = models.build(cfg, seed=0)
  prompts, lengths = rollout_workload(n_prompts, group, prompt_len, max_new, cfg.vocab_size)
  useful = int(lengths.sum())
  static = lambda: _static_rollout(model, prompts, lengths, group, batch_prompts, max_new)
  eng = lambda: _engine_rollout(model, prompts, lengths, group, slots, max_new, chunk)
  static(), eng()  # warm-up: every shape both sides use gets compiled
  times, runs = [], []
  for _ in range(repeats):  # interleaved, so a shared machine's load changes hit both sides alike
    times.append(static())
    runs.append(eng())
  static_s = min(times)
  engine_s, stats = min(runs, key=lambda r: r[0])
  static_slots = sum(
    batch_prompts * group * int(lengths[i * group : (i + batch_prompts) * group].max())
    for i in range(0, n_prompts, batch_prompts)
  )
  s = stats.summary()
  out = {
    "bench": "rollout",
    "model": preset_name,
    "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    "rows": len(lengths),
    "group": group,
    "static_batch_rows": batch_prompts * group,
    "engine_slots": slots,
    "lengths": {k: int(f(lengths)) for k, f in (("min", np.min), ("median", np.median), ("max", np.max))},
    "useful_tokens": useful,
    "static_s": round(static_s, 3),
    "engine_s": round(engine_s, 3),
    "static_useful_tokens_per_s": round(useful / static_s, 1),
    "engine_useful_tokens_per_s": round(useful / engine_s, 1),
    "speedup": round(static_s / engine_s, 2),
    "static_slot_utilization": round(useful / static_slots, 3),
    "engine_slot_utilization": round(s["slot_utilization"], 3),
    "prefill_reduction": round(s["prefill_reduction"], 2),
    "engine_prefill_share": round(s["prefill_share"], 3),
  }
  print(json.dumps(out), flush=True)
  return out


# ------------------------------------------------------------------ speculative decoding
def _spec_prompts(checkpoint: str, kind: str, n: int, prompt_tokens: int) -> list[list[int]]:
  """The first tokens of held-out documents of the corpus the checkpoint was trained on (a seed no run uses)."""
  from rl_jax import checkpoint as ckpt
  from rl_jax.data import procedural
  from rl_jax.data import tokenizer as toks

  tok_dir = ckpt.tokenizer_dir(checkpoint)
  if tok_dir is None:
    raise ValueError(f"{checkpoint}: no tokenizer saved with the checkpoint (bench spec encodes corpus prompts)")
  tok = toks.load(tok_dir)
  bos = tok.token_to_id(toks.BOS)
  out = []
  for i in range(n):
    ids = ([] if bos is None else [bos]) + toks.encode(tok, procedural.document_at(987, i, kind))
    out.append(ids[: min(prompt_tokens, len(ids) - 1)])
  return out


def bench_spec(
  checkpoint: str,
  *,
  kind: str = "r1",
  draft_lens=(1, 2, 3),
  n_prompts: int = 4,
  prompt_tokens: int = 12,
  new_tokens: int = 128,
  repeats: int = 3,
) -> list[dict]:
  """MTP speculative decoding vs plain greedy decoding at batch 1, side by side: every configuration compiled
  and run once first (warm-up excluded, the speculative tokens checked equal to plain greedy's), then plain and
  speculative runs interleaved `repeats` times, best of each. MoE layers switch to dropless dispatch."""
  from rl_jax import checkpoint as ckpt
  from rl_jax import sampling, speculative

  if repeats < 1 or n_prompts < 1 or new_tokens < 1 or not draft_lens:
    raise ValueError(
      f"bench spec: --repeats, --prompts and --new-tokens must be >= 1 and --draft-lens given, got {repeats}, "
      f"{n_prompts}, {new_tokens}, {list(draft_lens)}"
    )
  model = ckpt.load_model(checkpoint, moe_capacity_factor=None)
  prompts = _spec_prompts(checkpoint, kind, n_prompts, prompt_tokens)
  plain = lambda p: sampling.generate(model, [p], max_new_tokens=new_tokens, temperature=0.0)
  spec = {
    k: (lambda p, k=k: speculative.generate(model, [p], max_new_tokens=new_tokens, draft_len=k)) for k in draft_lens
  }
  ref = [plain(p) for p in prompts]  # warm-up and the reference tokens
  for k, fn in spec.items():
    for p, r in zip(prompts, ref):
      np.testing.assert_array_equal(fn(p).tokens, r.tokens, err_msg=f"draft_len={k}: speculative != greedy")

  def timed(fn, p):
    t0 = time.perf_counter()
    res = fn(p)
    return time.perf_counter() - t0, res

  best = {"plain": float("inf"), **{k: float("inf") for k in draft_lens}}
  stats = {}
  for _ in range(repeats):
    best["plain"] = min(best["plain"], sum(timed(plain, p)[0] for p in prompts))
    for k, fn in spec.items():
      runs = [timed(fn, p) for p in prompts]
      best[k] = min(best[k], sum(t for t, _ in runs))
      stats[k] = [sum(getattr(r, f) for _, r in runs) for f in ("drafted", "accepted", "steps")]
  tokens = int(sum(r.lengths.sum() for r in ref))
  rows = []
  for k in draft_lens:
    drafted, accepted, steps = stats[k]
    rows.append(
      {
        "bench": "spec",
        "checkpoint": checkpoint,
        "mtp_modules": len(model.mtp),
        "batch": 1,
        "prompts": n_prompts,
        "new_tokens": new_tokens,
        "draft_len": k,
        "plain_tokens_per_s": round(tokens / best["plain"], 1),
        "spec_tokens_per_s": round(tokens / best[k], 1),
        "speedup": round(best["plain"] / best[k], 2),
        "acceptance_rate": round(accepted / max(drafted, 1), 3),
        "tokens_per_verify": round(tokens / max(steps + n_prompts, 1), 2),  # the prefill makes each first token
        "load_average_1m": round(os.getloadavg()[0], 1),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      }
    )
    print(json.dumps(rows[-1]), flush=True)
  return rows
