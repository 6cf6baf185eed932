"""`rl-jax bench train|sample`: step time, tokens/s, model FLOPs and MFU against a matmul peak measured on
the spot on the same devices; sampler throughput and cache size. Results print as one JSON object."""

from __future__ import annotations

import json
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


def train_flops_per_token(cfg, seq_len: int) -> float:
  """6 x (active matmul params, excluding the embedding lookup) + causal attention (fwd + bwd)."""
  counts = cfg.param_counts()
  n = counts["active"] - cfg.vocab_size * cfg.hidden_size
  if cfg.num_nextn_predict_layers:
    per_layer = counts["mtp"] / cfg.num_nextn_predict_layers
    if cfg.n_routed_experts:  # an MTP block activates K routed + shared experts only
      per_layer -= (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    n += cfg.num_nextn_predict_layers * (per_layer + cfg.hidden_size * cfg.vocab_size)
  H = cfg.num_attention_heads
  dqk, dv = (cfg.qk_head_dim, cfg.v_head_dim) if cfg.is_mla else (cfg.gqa_head_dim, cfg.gqa_head_dim)
  layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
  return 6.0 * n + 3.0 * layers * H * (dqk + dv) * seq_len


def bench_train(run, steps: int = 5) -> dict:
  from rl_jax.config import model_config
  from rl_jax.sharding import mesh as smesh
  from rl_jax.train import loop
  from rl_jax.train import state as S
  from rl_jax.train import step as ST

  mesh = smesh.mesh_from_config(run.mesh)
  mcfg = S.train_model_config(model_config(run), run.train)
  t = run.train
  with jax.set_mesh(mesh):
    graphdef, state, shardings, tx = S.init_state(mcfg, run, mesh, run.mesh.rules)
    bsh = loop.batch_sharding(mesh, run.mesh.rules)
    fn = jax.jit(
      ST.make_train_step(graphdef, mcfg, t, tx),
      in_shardings=(shardings, {k: bsh for k in ST.BATCH_KEYS}),
      donate_argnums=0,
    )
  rs = np.random.RandomState(0)
  toks = rs.randint(0, mcfg.vocab_size, (t.batch_size, t.seq_len + 1)).astype(np.int32)
  host = dict(
    tokens=toks[:, :-1],
    targets=toks[:, 1:],
    segment_ids=np.ones((t.batch_size, t.seq_len), np.int32),
    positions=np.tile(np.arange(t.seq_len, dtype=np.int32), (t.batch_size, 1)),
    loss_mask=np.ones((t.batch_size, t.seq_len), np.int32),
  )
  batch = loop.global_batch(host, bsh, t.grad_accum)
  peak_before = matmul_peak()
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    state, m = fn(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, m = fn(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  tokens = t.batch_size * t.seq_len
  fpt = train_flops_per_token(mcfg, t.seq_len)
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
