"""One-GPU device check (run by benchmarks/device_check.sh; an H200 in mind, any one CUDA GPU works).

Parts, each in its own child process with its own time limit (a crash, an out-of-memory abort or a hang in one
part is reported as that part's error and the next part still runs), in this order:
  equality       greedy decode (temperature 0) of tiny-moe and tiny-dense (fp32, seed 0) on the GPU equals the
                 CPU's, token for token: the same weights placed on the CPU with jax.device_put and run under
                 jax.default_device (in-process), and again in a JAX_PLATFORMS=cpu process (the CPU-only code
                 paths, e.g. the bucket MoE dispatch); the GPU at full fp32 matmul precision gates the exit
                 code, the GPU at jax's default precision is reported beside it
  train_dense    train-step MFU of a 1.1B Llama-style dense model (bf16 compute, fp32 master weights, AdamW),
                 through rl_jax.bench.bench_train (the jitted step the training loop runs)
  train_moe      the same for the small-moe preset (MLA + DeepSeekMoE + MTP, dropless routing: ragged_dot)
  decode_dense   batch-1 greedy decode tokens/s of the 1.1B dense model (bf16) through rl_jax.sampling.generate,
                 against the HBM roofline (weights + KV cache read per token / 4.8 TB/s)
  decode_moe     the same for small-moe (bf16)
  train_moe_capacity  (only with --parts all) small-moe with capacity-factor-1.0 dispatch instead of ragged_dot

Results: one JSON line per part in $OUT/results.jsonl and a markdown summary in $OUT/results.md (both printed).
Exit status: 0 all parts ok; 1 a part failed, timed out or was skipped; 2 no GPU (or rl_jax not importable);
3 the GPU's greedy tokens differ from the CPU's.

  python benchmarks/device_check.py [--out DIR] [--parts equality,train_dense,...|all] [--deadline S]
  python benchmarks/device_check.py --table --out DIR      # rebuild results.md from results.jsonl (no jax)
  python benchmarks/device_check.py --allow-cpu --smoke    # the plumbing on a CPU with toy sizes (development)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # rl_jax from this tree, installed or not (rl_jax/__init__ finds models/, sharding/)

SPEC_BF16_FLOPS = 989e12  # H200 SXM dense bf16, datasheet
SPEC_HBM_BPS = 4.8e12  # H200 HBM3e, datasheet
RESULTS, TABLE = "results.jsonl", "results.md"

# The ~1B dense model: small-dense (Llama-style, GQA) scaled up. 1,107,363,840 parameters (untied embeddings).
DENSE_1B = dict(
  vocab_size=32768,
  hidden_size=2048,
  intermediate_size=8192,
  num_hidden_layers=16,
  num_attention_heads=16,
  num_key_value_heads=4,
)
# --smoke: toy sizes that run on a CPU in seconds (checks the plumbing, not the numbers)
SMOKE_DENSE = dict(
  vocab_size=512,
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
)
SMOKE_MOE = dict(num_hidden_layers=2, vocab_size=512, hidden_size=64, moe_intermediate_size=64, q_lora_rank=32)

# name: (time cap s, least time worth starting it with s)
PARTS = {
  "equality": (120, 25),
  "train_dense": (180, 60),
  "train_moe": (150, 45),
  "decode_dense": (120, 40),
  "decode_moe": (100, 30),
  "train_moe_capacity": (120, 45),
}
DEFAULT_PARTS = ("equality", "train_dense", "train_moe", "decode_dense", "decode_moe")


def _now() -> str:
  return time.strftime("%Y-%m-%dT%H:%M:%S%z")


_T0 = time.monotonic()


def _say(msg: str) -> None:
  """A progress line (the driver keeps the last ones of a part that dies or runs out of time)."""
  print(f"{time.monotonic() - _T0:6.1f}s {msg}", flush=True)


def _append(out: str, rec: dict) -> None:
  rec = {"time": _now(), **rec}
  line = json.dumps(rec, default=_jsonable)
  with open(os.path.join(out, RESULTS), "a") as f:
    f.write(line + "\n")
  print(line, flush=True)


def _jsonable(x):
  try:
    import numpy as np

    if isinstance(x, np.generic):
      return x.item()
    if isinstance(x, np.ndarray):
      return x.tolist()
  except ImportError:
    pass
  return str(x)


# ------------------------------------------------------------------------------------------ GPU check
def _fail(msg: str, code: int = 2):
  print(f"device_check: {msg}", file=sys.stderr, flush=True)
  sys.exit(code)


@contextlib.contextmanager
def _quiet_stderr():
  """fd 2 into a temp file while jax starts its backends (plugins such as libtpu print screens of warnings
  there); yields a callable returning what was written."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield lambda: (tmp.seek(0), tmp.read().decode(errors="replace"))[1]
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)


def gpu_check(allow_cpu: bool) -> str:
  """The backend jax starts with, before anything else is imported or compiled; one line and exit 2 when it
  is not a GPU (unless allow_cpu)."""
  import logging

  said = []

  class Keep(logging.Handler):
    def emit(self, record):
      said.append(record.getMessage())

  log, keep = logging.getLogger("jax._src.xla_bridge"), Keep()
  log.addHandler(keep)
  log.propagate = False
  try:
    with _quiet_stderr() as captured:
      jax = backend = None
      try:
        import jax as _jax

        jax = _jax
        backend = jax.default_backend()
      except Exception as e:  # no jax, or no backend it could start
        said.append(f"{type(e).__name__}: {e}")
      err = captured()
  finally:
    log.removeHandler(keep)
    log.propagate = True
  if backend == "gpu" or (allow_cpu and backend is not None):
    if backend == "gpu" and (said or err.strip()):  # what jax said while starting, e.g. CUDA version warnings
      print("\n".join([*said, err.strip()]).strip(), file=sys.stderr, flush=True)
    return backend
  why = [s.splitlines()[0][:200] for s in said if "cuda" in s.lower() or "gpu" in s.lower() or "Error" in s]
  if not why:
    why = [ln[:200] for ln in err.splitlines() if "cuda" in ln.lower()][:1]
  env = f"; JAX_PLATFORMS={os.environ['JAX_PLATFORMS']!r}" if os.environ.get("JAX_PLATFORMS") else ""
  found = f"jax.default_backend() is {backend!r}" if backend else "jax could not start a backend"
  found = found if jax else "jax is not importable"
  ver = f"jax {jax.__version__}, " if jax else ""
  hint = f" (jax said: {why[0]})" if why else ""
  _fail(f"no GPU: {found} ({ver}{sys.executable}{env}); run this where a CUDA-enabled jax is installed{hint}", code=2)
  return ""


def import_check() -> None:
  """rl_jax from this tree with its dependencies; one line and exit 2 naming what is missing."""
  try:
    import rl_jax
    from rl_jax import bench, models, sampling  # noqa: F401
    from rl_jax.train import state, step  # noqa: F401
  except ImportError as e:
    missing = getattr(e, "name", None) or str(e)
    _fail(
      f"rl_jax is not importable with {sys.executable} ({type(e).__name__}: {e}); missing: {missing}. "
      f"This script imports it from {ROOT} (no install needed); a missing third-party package must be "
      f"installed or carried as a wheel (pip install --no-deps)",
      code=2,
    )
  if not os.path.abspath(rl_jax.__file__).startswith(ROOT):
    print(f"device_check: note: rl_jax imported from {rl_jax.__file__}, not from {ROOT}", flush=True)


def env_record(backend: str) -> dict:
  import jax

  rec = {"part": "env", "status": "ok", "backend": backend, "python": sys.version.split()[0]}
  rec["executable"] = sys.executable
  rec["devices"] = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  for mod in ("jax", "jaxlib", "flax", "optax", "numpy"):
    try:
      rec[mod] = __import__(mod).__version__
    except Exception:
      rec[mod] = None
  import rl_jax

  rec["rl_jax"] = os.path.dirname(os.path.abspath(rl_jax.__file__))
  q = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu"
  for key, cmd in (
    ("nvidia_smi", ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"]),
    ("git", ["git", "-C", ROOT, "describe", "--always", "--dirty"]),
  ):
    try:
      rec[key] = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except Exception:
      rec[key] = None
  for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "JAX_COMPILATION_CACHE_DIR"):
    rec[k] = os.environ.get(k)
  return rec


# ------------------------------------------------------------------------------------------ helpers (children)
def _peak_mem_gb():
  import jax

  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:
    return None
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else round(peak / 2**30, 2)


def _shape(cfg) -> str:
  if cfg.is_mla:
    moe = (
      f", {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok} + {cfg.n_shared_experts} shared "
      f"(I={cfg.moe_intermediate_size}), first {cfg.first_k_dense_replace} dense"
      if cfg.n_routed_experts
      else ""
    )
    return (
      f"MLA d={cfg.hidden_size} L={cfg.num_hidden_layers} H={cfg.num_attention_heads} q_lora={cfg.q_lora_rank} "
      f"kv_lora={cfg.kv_lora_rank} rope={cfg.qk_rope_head_dim}{moe}, MTP={cfg.num_nextn_predict_layers}, "
      f"V={cfg.vocab_size}"
    )
  return (
    f"{cfg.arch} d={cfg.hidden_size} L={cfg.num_hidden_layers} H={cfg.num_attention_heads} "
    f"kv={cfg.num_key_value_heads} hd={cfg.gqa_head_dim} ffn={cfg.intermediate_size} V={cfg.vocab_size}"
    f"{' tied' if cfg.tie_word_embeddings else ''}"
  )


def _model_spec(which: str, smoke: bool) -> tuple[str, dict]:
  """(preset, overrides) of the models this check measures."""
  if which == "dense":
    return "small-dense", (SMOKE_DENSE if smoke else DENSE_1B)
  return "small-moe", (SMOKE_MOE if smoke else {})


# ------------------------------------------------------------------------------------------ part: train
def part_train(args, which: str, capacity: float | None = None) -> dict:
  from rl_jax import bench
  from rl_jax.config import load_run_config, model_config

  name, over = _model_spec(which, args.smoke)
  batch, seq = (args.dense_batch, args.dense_seq) if which == "dense" else (args.moe_batch, args.moe_seq)
  if args.smoke:
    batch, seq = 2, 64
  overrides = [f"model={name}", *(f"model.{k}={v}" for k, v in over.items())]
  if capacity is not None:
    overrides.append(f"model.moe_capacity_factor={capacity}")
  overrides += [
    f"train.batch_size={batch}",
    f"train.seq_len={seq}",
    "train.compute_dtype=bfloat16",
    "train.param_dtype=float32",
  ]
  run = load_run_config(None, overrides)
  mcfg = model_config(run)
  counts = mcfg.param_counts()
  _say(f"{_shape(mcfg)}: {counts['total']:,} params; batch {batch} x {seq}; bench_train (init, peak, compile, steps)")
  t0 = time.perf_counter()
  r = bench.bench_train(run, steps=args.steps)
  achieved = r["achieved_tflops"] * 1e12
  dispatch = "-"
  if mcfg.n_routed_experts:
    dispatch = f"capacity {mcfg.moe_capacity_factor}" if mcfg.moe_capacity_factor else "dropless (ragged_dot)"
  return {
    **r,
    "model": f"{name}{'+1B overrides' if which == 'dense' and not args.smoke else ''}",
    "shape": _shape(mcfg),
    "params_total": counts["total"],
    "params_active": counts["active"],
    "params_mtp": counts["mtp"],
    "param_dtype": "float32",
    "moe_dispatch": dispatch,
    "timed_steps": args.steps,
    "mfu_measured_peak": r["mfu"],
    "mfu_spec_peak": round(achieved / SPEC_BF16_FLOPS, 4),
    "spec_peak_tflops": SPEC_BF16_FLOPS / 1e12,
    "peak_mem_gib": _peak_mem_gb(),
    "part_wall_s": round(time.perf_counter() - t0, 1),
    "reproduce": "rl-jax bench train " + " ".join(overrides) + f" --steps {args.steps}",
  }


# ------------------------------------------------------------------------------------------ part: decode
def _copy_bandwidth() -> float | None:
  """Best bytes/s of a jitted x * 2 over a 2 GiB bf16 array (read + write counted), random data."""
  import jax
  import jax.numpy as jnp

  if jax.default_backend() == "cpu":
    return None
  n = 2**30
  x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
  f = jax.jit(lambda x: x * 2)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(10):
    t = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  del x
  return 2 * n * 2 / best


def part_decode(args, which: str) -> dict:
  import jax
  import numpy as np
  from flax import nnx

  from rl_jax import models, sampling
  from rl_jax.models.config import preset

  name, over = _model_spec(which, args.smoke)
  cfg = preset(name, **over, dtype="bfloat16", param_dtype="bfloat16")
  P = 16 if args.smoke else args.prompt_len
  n_long = 16 if args.smoke else args.new_tokens
  n_short = n_long // 2 + 1  # the same power-of-two budget bucket: the same compiled sampler, fewer steps
  _say(f"building {_shape(cfg)} in bfloat16")
  t0 = time.perf_counter()
  model = models.build(cfg, seed=0)
  jax.block_until_ready(nnx.state(model))
  build_s = time.perf_counter() - t0
  prompt = [int(t) for t in np.random.RandomState(0).randint(3, cfg.vocab_size, P)]
  gen = lambda n: sampling.generate(model, [prompt], max_new_tokens=n, temperature=0.0)

  _say(f"first generate call (compiles): prompt {P}, {n_long} new tokens")
  t0 = time.perf_counter()
  res = gen(n_long)
  first_s = time.perf_counter() - t0
  if int(res.lengths[0]) != n_long:
    raise RuntimeError(f"generate made {int(res.lengths[0])} tokens, asked for {n_long} (no EOS given)")
  gen(n_short)  # same bucket: should not compile again
  _say(f"timing {args.repeats} x ({n_long}, {n_short}) new tokens")
  longs, shorts = [], []
  for _ in range(args.repeats):  # interleaved
    for n, acc in ((n_long, longs), (n_short, shorts)):
      t = time.perf_counter()
      gen(n)
      acc.append(time.perf_counter() - t)
  t_long, t_short = float(np.median(longs)), float(np.median(shorts))
  step_s = (t_long - t_short) / (n_long - n_short)
  if step_s <= 0:  # timing noise swamped the difference (toy sizes): no decode rate from it
    raise RuntimeError(
      f"median {n_long}-token run ({t_long:.4f} s) not slower than {n_short}-token run ({t_short:.4f} s)"
    )

  # Roofline: every weight a token meets read once per step (the embedding: one row, so the untied table is not
  # counted; routed experts: only the top-k the token picks, as the few-row gather dispatch reads them; no MTP),
  # plus the KV cache: filled slots (mean context of the run) and, beside it, every allocated slot (the decode
  # attention reads the whole preallocated cache under a mask).
  pc = cfg.param_counts()
  item = np.dtype(jax.numpy.bfloat16).itemsize
  weights = pc["active"] - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
  per_slot = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) if cfg.is_mla else 2 * cfg.num_key_value_heads * cfg.gqa_head_dim
  per_slot *= cfg.num_hidden_layers * item
  bucket = lambda n: max(8, 1 << max(0, n - 1).bit_length())
  kv_filled = per_slot * (P + n_long / 2)
  kv_alloc = per_slot * (bucket(P) + bucket(n_long))
  bytes_tok = weights * item + kv_filled
  roof = SPEC_HBM_BPS / bytes_tok
  _say("copy bandwidth")
  bw = _copy_bandwidth()
  decode_tps = 1.0 / step_s
  return {
    "model": name + ("+1B overrides" if which == "dense" and not args.smoke else ""),
    "shape": _shape(cfg),
    "dtype": "bfloat16 (params, compute, cache)",
    "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    "params_built": models.count_params(model),
    "params_read_per_token": weights,
    "batch": 1,
    "prompt_len": P,
    "new_tokens": n_long,
    "short_new_tokens": n_short,
    "build_s": round(build_s, 2),
    "first_call_s": round(first_s, 2),
    "t_long_s": round(t_long, 4),
    "t_short_s": round(t_short, 4),
    "decode_ms_per_token": round(step_s * 1e3, 4),
    "decode_tokens_per_s": round(decode_tps, 1),
    "end_to_end_tokens_per_s": round(n_long / t_long, 1),
    "weight_bytes_per_token": weights * item,
    "kv_bytes_per_token_filled": round(kv_filled),
    "kv_bytes_per_token_allocated": kv_alloc,
    "roofline_tokens_per_s": round(roof, 1),
    "roofline_fraction": round(decode_tps / roof, 4),
    "roofline_fraction_allocated_kv": round(decode_tps * (weights * item + kv_alloc) / SPEC_HBM_BPS, 4),
    "copy_bandwidth_tbps": None if bw is None else round(bw / 1e12, 3),
    "measured_roofline_fraction": None if bw is None else round(decode_tps * bytes_tok / bw, 4),
    "peak_mem_gib": _peak_mem_gb(),
  }


# ------------------------------------------------------------------------------------------ part: equality
EQ_MODELS = ("tiny-moe", "tiny-dense")
EQ_PROMPT_LENS = (3, 8, 13, 21)
EQ_NEW = 48


def _eq_prompts(vocab: int) -> list[list[int]]:
  import numpy as np

  rs = np.random.RandomState(0)
  return [[int(t) for t in rs.randint(3, vocab, n)] for n in EQ_PROMPT_LENS]


def _diff(ref, other, prompts, margin_model=None) -> dict:
  """Rows whose tokens differ: first differing step, both tokens, and (with margin_model, a CPU model) the
  reference's top-2 logit gap there, teacher-forced: a tiny gap means a near tie, not a sampler bug."""
  import jax.numpy as jnp
  import numpy as np

  rows = []
  for i in range(ref.tokens.shape[0]):
    a, b = ref.tokens[i], other.tokens[i]
    if np.array_equal(a, b) and ref.lengths[i] == other.lengths[i]:
      continue
    j = int(np.argmax(a != b)) if not np.array_equal(a, b) else int(min(len(a), len(b)))
    row = {"row": i, "first_diff_step": j, "ref_token": int(a[j]) if j < len(a) else None}
    row["gpu_token"] = int(b[j]) if j < len(b) else None
    if margin_model is not None and j < len(a):
      ids = jnp.asarray([list(prompts[i]) + [int(t) for t in a[:j]]], jnp.int32)
      logits = np.asarray(margin_model(ids))[0, -1]
      top = np.sort(logits)[-2:]
      row["ref_top2_gap"] = float(top[1] - top[0])
      row["gpu_token_logit_gap"] = float(logits.max() - logits[row["gpu_token"]])
    rows.append(row)
  lp = float(np.max(np.abs(ref.logprobs - other.logprobs))) if ref.logprobs.shape == other.logprobs.shape else None
  return {"identical": not rows, "mismatched_rows": rows, "max_abs_logprob_diff": lp}


def _cpu_process_reference(models_state, tmp: str, timeout: float) -> list[dict]:
  """Greedy tokens of the same weights in a JAX_PLATFORMS=cpu child (the CPU-only code paths)."""
  import jax
  import numpy as np

  spec = []
  for i, (name, state, prompts) in enumerate(models_state):
    np.savez(os.path.join(tmp, f"params_{i}.npz"), *[np.asarray(x) for x in jax.tree.leaves(state)])
    spec.append({"name": name, "prompts": prompts, "new": EQ_NEW})
  with open(os.path.join(tmp, "spec.json"), "w") as f:
    json.dump(spec, f)
  path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
  env.pop("XLA_FLAGS", None)
  p = subprocess.run(
    [sys.executable, os.path.abspath(__file__), "--cpu-reference", tmp],
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  if p.returncode:
    raise RuntimeError(f"CPU reference process failed ({p.returncode}): {(p.stdout + p.stderr)[-1500:]}")
  data = np.load(os.path.join(tmp, "ref.npz"))
  return [{k: data[f"{k}_{i}"] for k in ("tokens", "lengths", "logprobs")} for i in range(len(spec))]


def cpu_reference(tmp: str) -> None:
  """The --cpu-reference child: loads the parent's weights into freshly built models, greedy-decodes on the CPU."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from rl_jax import models, sampling
  from rl_jax.models.config import preset

  assert jax.default_backend() == "cpu", jax.default_backend()
  with open(os.path.join(tmp, "spec.json")) as f:
    spec = json.load(f)
  out = {}
  for i, s in enumerate(spec):
    model = models.build(preset(s["name"]), seed=0)
    leaves, treedef = jax.tree.flatten(nnx.state(model))
    data = np.load(os.path.join(tmp, f"params_{i}.npz"))
    new = [data[f"arr_{k}"] for k in range(len(leaves))]
    for a, b in zip(leaves, new):
      if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"{s['name']}: parameter {a.shape} {a.dtype} != saved {b.shape} {b.dtype}")
    nnx.update(model, jax.tree.unflatten(treedef, [jnp.asarray(x) for x in new]))
    res = sampling.generate(model, s["prompts"], max_new_tokens=s["new"], temperature=0.0)
    out.update({f"tokens_{i}": res.tokens, f"lengths_{i}": res.lengths, f"logprobs_{i}": res.logprobs})
  np.savez(os.path.join(tmp, "ref.npz"), **out)


def part_equality(args) -> dict:
  import jax
  from flax import nnx

  from rl_jax import models, sampling
  from rl_jax.models.config import preset

  cpu = jax.devices("cpu")[0]
  highest = getattr(jax, "default_matmul_precision", None)
  full = (lambda: highest("highest")) if highest is not None else contextlib.nullcontext
  out, keep = [], []
  for name in EQ_MODELS:
    _say(f"{name}: GPU (full fp32, default precision) and CPU greedy decode")
    cfg = preset(name)  # float32 params and compute
    model = models.build(cfg, seed=0)
    prompts = _eq_prompts(cfg.vocab_size)
    kw = dict(max_new_tokens=EQ_NEW, temperature=0.0)
    platform = {d.platform for x in jax.tree.leaves(nnx.state(model)) for d in x.devices()}
    with full():
      gpu_full = sampling.generate(model, prompts, **kw)
    gpu_default = sampling.generate(model, prompts, **kw)
    graphdef, state = nnx.split(model)
    with jax.default_device(cpu), full():
      cpu_state = jax.device_put(state, cpu)
      cpu_model = nnx.merge(graphdef, cpu_state)
      cpu_res = sampling.generate(cpu_model, prompts, **kw)
      cpu_platform = {d.platform for x in jax.tree.leaves(cpu_state) for d in x.devices()}
      vs_cpu = _diff(cpu_res, gpu_full, prompts, cpu_model)
      vs_cpu_default = _diff(cpu_res, gpu_default, prompts, cpu_model)
    keep.append((name, jax.device_get(state), prompts, cpu_res, gpu_full))
    out.append(
      {
        "model": name,
        "model_platforms": sorted(platform),
        "cpu_platforms": sorted(cpu_platform),
        "rows": len(prompts),
        "prompt_lens": list(EQ_PROMPT_LENS),
        "new_tokens": EQ_NEW,
        "gpu_full_fp32_vs_cpu": vs_cpu,
        "gpu_default_precision_vs_cpu": vs_cpu_default,
        "gpu_full_vs_gpu_default_identical": bool((gpu_full.tokens == gpu_default.tokens).all()),
      }
    )
  # the same weights in a CPU-only process: the code paths a CPU run takes (bucket MoE dispatch, ...)
  import types

  _say("CPU-only process reference")
  err = None
  with tempfile.TemporaryDirectory() as tmp:
    try:
      refs = _cpu_process_reference([(n, s, p) for n, s, p, _, _ in keep], tmp, timeout=90)
    except Exception as e:
      refs, err = None, f"{type(e).__name__}: {e}"
  for i, (_, _, prompts, cpu_res, gpu_full) in enumerate(keep):
    if refs is None:
      out[i]["gpu_full_fp32_vs_cpu_process"] = {"identical": None, "error": err[-800:]}
      continue
    ref = types.SimpleNamespace(**refs[i])
    out[i]["gpu_full_fp32_vs_cpu_process"] = _diff(ref, gpu_full, prompts)
    out[i]["cpu_process_vs_cpu_in_process_identical"] = bool((ref.tokens == cpu_res.tokens).all())
  gates = [m["gpu_full_fp32_vs_cpu"]["identical"] for m in out]
  gates += [m["gpu_full_fp32_vs_cpu_process"]["identical"] for m in out]
  status = "ok" if all(g is True for g in gates) else ("mismatch" if any(g is False for g in gates) else "error")
  return {
    "status": status,
    "precision": "gate: GPU under jax.default_matmul_precision('highest'); default precision reported beside",
    "models": out,
  }


# ------------------------------------------------------------------------------------------ child entry
def run_part(args) -> int:
  part = args.part
  os.makedirs(args.out, exist_ok=True)
  if not args.allow_cpu:
    gpu_check(False)
  t0 = time.perf_counter()
  try:
    fn = {
      "equality": lambda: part_equality(args),
      "train_dense": lambda: part_train(args, "dense"),
      "train_moe": lambda: part_train(args, "moe"),
      "train_moe_capacity": lambda: part_train(args, "moe", capacity=1.0),
      "decode_dense": lambda: part_decode(args, "dense"),
      "decode_moe": lambda: part_decode(args, "moe"),
    }[part]
    rec = fn()
    rec = {"part": part, "status": rec.pop("status", "ok"), **rec, "part_s": round(time.perf_counter() - t0, 1)}
    _append(args.out, rec)
    return 3 if rec["status"] == "mismatch" else (0 if rec["status"] == "ok" else 1)
  except Exception as e:  # reported, the driver goes on with the next part
    tb = traceback.format_exc()
    print(tb, file=sys.stderr, flush=True)
    rec = {"part": part, "status": "error", "error": f"{type(e).__name__}: {e}"[:2000]}
    rec["traceback_tail"] = tb.strip().splitlines()[-12:]
    rec["part_s"] = round(time.perf_counter() - t0, 1)
    _append(args.out, rec)
    return 1


# ------------------------------------------------------------------------------------------ driver
class _Terminated(Exception):
  pass


def _records(out: str) -> list[dict]:
  path = os.path.join(out, RESULTS)
  if not os.path.exists(path):
    return []
  recs = []
  with open(path) as f:
    for line in f:
      with contextlib.suppress(json.JSONDecodeError):
        recs.append(json.loads(line))
  return recs


def _run_child(cmd: list[str], env: dict, timeout: float, prefix: str) -> tuple[int | None, list[str]]:
  """The part's process, its output echoed with a prefix; (exit code, None when killed at its limit; last lines)."""
  tail = collections.deque(maxlen=15)
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

  def pump():
    for line in proc.stdout:
      tail.append(line.rstrip())
      print(f"{prefix} {line}", end="", flush=True)

  th = threading.Thread(target=pump, daemon=True)
  th.start()
  try:
    rc = proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    rc = None
  except BaseException:
    proc.kill()
    proc.wait()
    raise
  th.join(timeout=5)
  return rc, list(tail)


def drive(args) -> int:
  t_start = time.monotonic()
  child_env = dict(os.environ)  # before this process changes its own
  child_env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
  child_env.setdefault("PYTHONUNBUFFERED", "1")
  # This process only checks the backend: no preallocation here, the parts get the GPU's memory.
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  backend = gpu_check(args.allow_cpu)
  import_check()
  os.makedirs(args.out, exist_ok=True)
  parts = list(PARTS) if args.parts == "all" else [p.strip() for p in args.parts.split(",") if p.strip()]
  unknown = [p for p in parts if p not in PARTS]
  if unknown:
    _fail(f"unknown part(s) {unknown}; parts: {', '.join(PARTS)} or all", code=2)
  print(f"device_check: backend {backend}, parts {', '.join(parts)}, deadline {args.deadline:.0f} s, out {args.out}")
  _append(args.out, env_record(backend))

  def on_term(signum, frame):
    raise _Terminated()

  signal.signal(signal.SIGTERM, on_term)
  codes, current = [], None
  try:
    for part in parts:
      current = part
      cap, least = PARTS[part]
      left = args.deadline - (time.monotonic() - t_start)
      if left < least:
        _append(args.out, {"part": part, "status": "skipped", "error": f"{left:.0f} s left of the deadline"})
        codes.append(1)
        continue
      limit = min(cap * args.cap_scale, left)
      before = len(_records(args.out))
      cmd = [sys.executable, os.path.abspath(__file__), "--part", part, "--out", args.out, *args.passthrough]
      print(f"device_check: [{part}] start, limit {limit:.0f} s", flush=True)
      t0 = time.monotonic()
      rc, tail = _run_child(cmd, child_env, limit, f"[{part}]")
      wrote = len(_records(args.out)) > before
      if rc is None or not wrote:
        why = f"killed at its {limit:.0f} s limit" if rc is None else f"process ended with status {rc}"
        rec = {"part": part, "status": "error", "error": f"{why} without a result", "output_tail": tail[-8:]}
        rec["part_s"] = round(time.monotonic() - t0, 1)
        _append(args.out, rec)
        rc = 1
      codes.append(rc)
  except _Terminated:
    rec = {"part": current or "driver", "status": "error", "error": "terminated (the overall timeout?) while running"}
    _append(args.out, rec)
    write_table(args.out)
    return 124
  write_table(args.out)
  print(f"device_check: done in {time.monotonic() - t_start:.0f} s; {os.path.join(args.out, RESULTS)}")
  return 3 if 3 in codes else (1 if any(codes) else 0)


# ------------------------------------------------------------------------------------------ table
def _f(x, fmt="{:.3g}"):
  return "-" if x is None else fmt.format(x)


def table(recs: list[dict]) -> str:
  last = {}
  for r in recs:
    last[r["part"]] = r  # the latest record of each part
  lines = ["# rl_jax device check", ""]
  env = last.get("env")
  if env:
    lines += [
      f"{env.get('devices')}; jax {env.get('jax')}, jaxlib {env.get('jaxlib')}, flax {env.get('flax')}, "
      f"Python {env.get('python')}; nvidia-smi: {env.get('nvidia_smi')}; tree {env.get('git')}; {env.get('time')}",
      "",
    ]
  train = [last[p] for p in ("train_dense", "train_moe", "train_moe_capacity") if p in last]
  if train:
    lines += [
      "## Train step MFU (bf16 compute, fp32 master weights, AdamW; median step after compilation)",
      "",
      "| part | model | params (active) | batch x seq | MoE dispatch | step s | tokens/s | TFLOP/s | MFU vs 989 "
      "spec | matmul peak TFLOP/s | MFU vs it | compile s | peak GiB |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in train:
      if r.get("status") != "ok":
        lines.append(f"| {r['part']} | {r.get('status')}: {str(r.get('error', ''))[:120]} |")
        continue
      lines.append(
        f"| {r['part']} | {r['shape']} | {r['params_total'] / 1e6:.1f}M ({r['params_active'] / 1e6:.1f}M) | "
        f"{r['batch']} x {r['seq_len']} | {r['moe_dispatch']} | {r['step_s']:.4f} | {r['tokens_per_s']:,.0f} | "
        f"{r['achieved_tflops']:.1f} | **{100 * r['mfu_spec_peak']:.1f}%** | {r['matmul_peak_tflops']:.1f} | "
        f"{100 * r['mfu_measured_peak']:.1f}% | {r['compile_s']:.1f} | {_f(r.get('peak_mem_gib'))} |"
      )
    lines.append("")
  dec = [last[p] for p in ("decode_dense", "decode_moe") if p in last]
  if dec:
    lines += [
      "## Batch-1 greedy decode (sampling.generate, bf16) against the HBM roofline",
      "",
      "| part | model | bytes read / token (weights + KV) | prompt + new | decode tokens/s | ms / token | "
      "end-to-end tokens/s | roofline tokens/s (4.8 TB/s) | of roofline | copy TB/s measured | of measured |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in dec:
      if r.get("status") != "ok":
        lines.append(f"| {r['part']} | {r.get('status')}: {str(r.get('error', ''))[:120]} |")
        continue
      mb = (r["weight_bytes_per_token"] + r["kv_bytes_per_token_filled"]) / 1e6
      lines.append(
        f"| {r['part']} | {r['shape']} | {mb:,.1f} MB ({r['weight_bytes_per_token'] / 1e6:,.1f} + "
        f"{r['kv_bytes_per_token_filled'] / 1e6:.2f}) | {r['prompt_len']} + {r['new_tokens']} | "
        f"{r['decode_tokens_per_s']:,.1f} | {r['decode_ms_per_token']:.3f} | {r['end_to_end_tokens_per_s']:,.1f} | "
        f"{r['roofline_tokens_per_s']:,.0f} | **{100 * r['roofline_fraction']:.1f}%** | "
        f"{_f(r.get('copy_bandwidth_tbps'))} | {_f(r.get('measured_roofline_fraction'), '{:.1%}')} |"
      )
    lines.append("")
  eq = last.get("equality")
  if eq:
    lines += ["## Greedy decode, GPU vs CPU (fp32, seed 0, same weights)", ""]
    if eq.get("status") == "error" and "models" not in eq:
      lines.append(f"error: {eq.get('error')}")
    else:
      lines += [
        "| model | rows x new tokens | GPU (fp32 'highest') = CPU, in-process | = CPU, JAX_PLATFORMS=cpu process | "
        "GPU (default precision) = CPU | max abs log-prob diff |",
        "|---|---|---|---|---|---|",
      ]

      def verdict(d):
        if d.get("identical") is None:
          return f"error: {str(d.get('error'))[:80]}"
        if d["identical"]:
          return "identical"
        rows = d["mismatched_rows"]
        first = rows[0]
        gap = f", CPU top-2 gap {first['ref_top2_gap']:.2e}" if "ref_top2_gap" in first else ""
        return f"**{len(rows)} rows differ** (row {first['row']} from step {first['first_diff_step']}{gap})"

      for m in eq["models"]:
        lines.append(
          f"| {m['model']} | {m['rows']} x {m['new_tokens']} | {verdict(m['gpu_full_fp32_vs_cpu'])} | "
          f"{verdict(m['gpu_full_fp32_vs_cpu_process'])} | {verdict(m['gpu_default_precision_vs_cpu'])} | "
          f"{_f(m['gpu_full_fp32_vs_cpu'].get('max_abs_logprob_diff'), '{:.1e}')} |"
        )
      lines.append(f"\nstatus: **{eq['status']}**")
    lines.append("")
  bad = [r for r in last.values() if r.get("status") not in ("ok", None)]
  if bad:
    lines += ["## Problems", ""]
    why = lambda r: (
      r.get("error") or ("the GPU's greedy tokens differ from the CPU's" if r["status"] == "mismatch" else "")
    )
    lines += [f"- {r['part']}: {r['status']}: {str(why(r))[:300]}" for r in bad]
    lines.append("")
  return "\n".join(lines)


def write_table(out: str) -> None:
  md = table(_records(out))
  with open(os.path.join(out, TABLE), "w") as f:
    f.write(md + "\n")
  print("\n" + md, flush=True)


# ------------------------------------------------------------------------------------------ main
def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.getcwd(), "device_check_out"))
  ap.add_argument("--parts", default=",".join(DEFAULT_PARTS), help=f"comma list of {', '.join(PARTS)}, or all")
  ap.add_argument("--deadline", type=float, default=430.0, help="seconds for the whole run (parts then skip)")
  ap.add_argument("--cap-scale", type=float, default=1.0, help="multiplies every part's own time cap")
  ap.add_argument("--table", action="store_true", help="only rebuild results.md from results.jsonl")
  ap.add_argument("--part", help=argparse.SUPPRESS)
  ap.add_argument("--cpu-reference", help=argparse.SUPPRESS)
  child = ap.add_argument_group("part settings (passed on to each part)")
  child.add_argument("--allow-cpu", action="store_true", help="run on a non-GPU backend (development)")
  child.add_argument("--smoke", action="store_true", help="toy model sizes (development, with --allow-cpu)")
  child.add_argument("--steps", type=int, default=8, help="timed train steps after the compiling one")
  child.add_argument("--dense-batch", type=int, default=16)
  child.add_argument("--dense-seq", type=int, default=1024)
  child.add_argument("--moe-batch", type=int, default=32)
  child.add_argument("--moe-seq", type=int, default=1024)
  child.add_argument("--prompt-len", type=int, default=128)
  child.add_argument("--new-tokens", type=int, default=512, help="a power of two (the short run takes half + 1)")
  child.add_argument("--repeats", type=int, default=3, help="timed decode runs of each length (median)")
  args = ap.parse_args(argv)
  args.out = os.path.abspath(args.out)
  keys = ("steps", "dense_batch", "dense_seq", "moe_batch", "moe_seq", "prompt_len", "new_tokens", "repeats")
  args.passthrough = [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
  args.passthrough += [f for f, on in (("--allow-cpu", args.allow_cpu), ("--smoke", args.smoke)) if on]
  return args


def main(argv=None) -> int:
  args = parse(argv)
  if args.table:
    write_table(args.out)
    return 0
  if args.cpu_reference:
    cpu_reference(args.cpu_reference)
    return 0
  if args.part:
    return run_part(args)
  return drive(args)


if __name__ == "__main__":
  sys.exit(main())
