"""One GRPO step, rl_jax vs Tunix (google-tunix), same dense model shapes, prompts, G and lengths, side by side.

    python benchmarks/grpo_vs_tunix.py    # defaults (19.7M): ~1.5 min on one core; the first run installs Tunix
    python benchmarks/grpo_vs_tunix.py --hidden 768 --layers 12 --heads 12 --kv-heads 4 --intermediate 2048 --steps 3

Tunix runs in its own virtual environment, created on the first run under --venv (default
~/.cache/rl_jax_bench/tunix-venv: `python -m venv` + `pip install google-tunix==--tunix-version`; the
install is timed and reported, never part of a step), through benchmarks/_tunix_grpo_side.py; rl_jax runs in
this process afterwards, in the project's environment. Both: a Llama-style dense model (GQA, RoPE theta
5e5, RMSNorm, SwiGLU, untied embeddings) of the same shapes from random weights, fp32, on CPU, pinned to the
same --threads core(s) (os.sched_setaffinity before jax starts a thread; with one thread XLA without its
multi-threaded Eigen pool); per-step process CPU time / wall time is reported (1.00 = one busy core).

A step: --prompts prompts of --prompt-len random tokens, --group completions each of exactly --new-tokens
tokens (EOS never sampled on either side), temperature 1, top-p 1; a trivial reward (the fraction of
completion tokens divisible by 7: microseconds, so reward compute is not what is measured); group
advantages; the reference model's log-probs (beta > 0, k3 / "low_var_kl" estimator); one epoch of one
minibatch: policy forward + backward, global-norm clip 1.0, AdamW. Tunix is driven through its public API
(`RLCluster` + `GRPOLearner.train`), rl_jax through the functions `rl-jax grpo` runs (`sampling.generate`,
`rollout.assemble`, `train.grpo.build_grpo_step`). The first --warmup steps (compilation) are excluded on
both sides; each figure is the median over --steps steps. Prints a markdown table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
  ap.add_argument("--group", type=int, default=4, help="G: completions per prompt")
  ap.add_argument("--prompt-len", type=int, default=32)
  ap.add_argument("--new-tokens", type=int, default=32)
  ap.add_argument("--vocab", type=int, default=8192)
  ap.add_argument("--hidden", type=int, default=512)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=8, help="query heads (head dim = hidden / heads)")
  ap.add_argument("--kv-heads", type=int, default=2)
  ap.add_argument("--intermediate", type=int, default=1408, help="SwiGLU hidden size")
  ap.add_argument("--beta", type=float, default=0.04, help="KL weight (> 0: a reference model on both sides)")
  ap.add_argument("--lr", type=float, default=1e-6)
  ap.add_argument("--warmup", type=int, default=2, help="steps excluded from timing (compilation)")
  ap.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
  ap.add_argument("--threads", type=int, default=1, help="cores to pin both sides to; 1: XLA single-threaded")
  ap.add_argument("--cores", default="", help="comma list of cores to pin to (default: the last --threads allowed)")
  ap.add_argument("--venv", default=os.path.expanduser("~/.cache/rl_jax_bench/tunix-venv"))
  ap.add_argument("--tunix-version", default="0.1.7")
  ap.add_argument("--sides", default="tunix,rl_jax", help="comma list: which sides to run")
  a = ap.parse_args(argv)
  if a.beta <= 0:
    raise SystemExit(f"--beta {a.beta}: must be > 0 (the comparison includes the reference model)")
  if a.hidden % a.heads or a.heads % a.kv_heads:
    raise SystemExit(f"--hidden {a.hidden} / --heads {a.heads} / --kv-heads {a.kv_heads}: must divide evenly")
  return a


def pin_cores(a) -> list[int]:
  """Pins this process to --threads cores; the Tunix subprocess pins itself to the same ones."""
  allowed = sorted(os.sched_getaffinity(0))
  cores = [int(c) for c in a.cores.split(",")] if a.cores else allowed[-a.threads :]
  if len(cores) != a.threads or not set(cores) <= set(allowed):
    raise SystemExit(f"--cores {cores}: need {a.threads} of the allowed cores {allowed}")
  os.sched_setaffinity(0, cores)
  return cores


ARGS = parse_args()
CORES = pin_cores(ARGS)
if ARGS.threads == 1:  # before jax is imported (lazily, in run_ours): XLA reads its flags once
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
sys.path.insert(0, os.path.dirname(HERE))


# ------------------------------------------------------------------ Tunix, in its own environment
def ensure_tunix_venv(a) -> float:
  """Creates --venv with google-tunix on first use; returns the seconds spent installing (0 if present)."""
  py = os.path.join(a.venv, "bin", "python")
  probe = [py, "-c", "import tunix, sys; sys.exit(tunix.__version__ != sys.argv[1])", a.tunix_version]
  if os.path.exists(py) and subprocess.run(probe, capture_output=True).returncode == 0:
    return 0.0
  t0 = time.perf_counter()
  print(f"installing google-tunix=={a.tunix_version} into {a.venv} (first run only) ...", file=sys.stderr, flush=True)
  base = getattr(sys, "_base_executable", sys.executable)  # a venv's python makes a venv of its base interpreter
  subprocess.run([base, "-m", "venv", a.venv], check=True)
  subprocess.run([py, "-m", "pip", "install", "-q", f"google-tunix=={a.tunix_version}"], check=True)
  subprocess.run(probe, check=True)
  return time.perf_counter() - t0


def side_settings(a) -> dict:
  keys = ("prompts", "group", "prompt_len", "new_tokens", "vocab", "hidden", "layers", "heads", "kv_heads")
  s = {k: getattr(a, k) for k in keys + ("intermediate", "beta", "lr", "warmup", "steps", "threads")}
  return {**s, "cores": CORES, "temperature": 1.0, "data_seed": 0}


def run_tunix(a) -> dict:
  """Tunix's per-step phase times, from benchmarks/_tunix_grpo_side.py run in Tunix's environment."""
  py = os.path.join(a.venv, "bin", "python")
  env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
  cmd = [py, os.path.join(HERE, "_tunix_grpo_side.py"), json.dumps(side_settings(a))]
  out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
  line = [x for x in out.splitlines() if x.startswith("TUNIX_RESULT ")]
  if not line:
    raise SystemExit(f"the Tunix side printed no result; its stdout ends:\n{out[-2000:]}")
  return json.loads(line[-1].removeprefix("TUNIX_RESULT "))


# ------------------------------------------------------------------ rl_jax
def ours_setup(a):
  """(graphdef, state, jitted GRPO update, mesh) as `rl-jax grpo` builds them, at the benchmark's shapes."""
  from rl_jax.config import GRPOConfig, MeshConfig, OptimizerConfig, TrainConfig
  from rl_jax.models.config import preset
  from rl_jax.sharding import mesh as smesh
  from rl_jax.train import grpo as G
  from rl_jax.train import state as S

  cfg = preset(
    "small-dense", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
    num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
  )  # fmt: skip
  g = GRPOConfig(
    prompts_per_step=a.prompts, group_size=a.group, max_prompt_len=a.prompt_len, max_new_tokens=a.new_tokens,
    temperature=1.0, top_p=1.0, beta=a.beta, kl="k3", loss_agg="seq-mean-token-mean", clip_low=0.2,
    clip_high=0.2, epochs=1, minibatches=1,
  )  # fmt: skip
  t = TrainConfig(compute_dtype="float32", param_dtype="float32")
  total = a.warmup + a.steps
  tx = S.optimizer(OptimizerConfig(lr=a.lr, schedule="constant", warmup_steps=0, grad_clip=1.0), total)
  mesh = smesh.mesh_from_config(MeshConfig())
  graphdef, state, shardings = S.init_state(S.train_model_config(cfg, t), tx, mesh, seed=0, ref=True)
  return graphdef, state, G.build_grpo_step(graphdef, g, t, tx, mesh, shardings), mesh


def ours_step(a, graphdef, state, jstep, mesh, prompts, seed):
  """One GRPO step; returns (state, {phase: wall seconds, "cpu": process CPU seconds})."""
  import jax
  import numpy as np
  from flax import nnx

  from rl_jax import rollout, sampling
  from rl_jax.train import grpo as G

  w0, c0 = time.perf_counter(), time.process_time()
  policy = nnx.merge(graphdef, state.params, state.bias)  # the live parameters: no copy
  res = sampling.generate(
    policy, prompts, max_new_tokens=a.new_tokens, temperature=1.0, top_p=1.0, eos_id=None, seed=seed,
    num_samples=a.group, logprob_temperature=1.0,
  )  # fmt: skip
  w1 = time.perf_counter()
  N = len(prompts) * a.group
  rewards = (res.tokens % 7 == 0).mean(1).astype(np.float32)  # the same trivial reward as Tunix's side
  rows = [p for p in prompts for _ in range(a.group)]
  ro = rollout.Rollout([{}] * N, rows, res, [""] * N, rewards, {})
  arrays = rollout.assemble(ro, seq_len=a.prompt_len + a.new_tokens)
  w2 = time.perf_counter()
  state, metrics = jstep(state, G.place_rollout(arrays, mesh))
  jax.block_until_ready(metrics)
  w3 = time.perf_counter()
  times = {"rollout": w1 - w0, "host": w2 - w1, "update": w3 - w2, "step": w3 - w0, "cpu": time.process_time() - c0}
  if not (res.lengths == a.new_tokens).all():
    raise SystemExit("rl_jax: a completion stopped early (EOS is disabled: this is a bug)")
  return state, times


def ours_forward_s(graphdef, state, a, repeats: int = 3) -> float:
  """Best-of-`repeats` seconds of one jitted teacher-forced log-prob forward over a rollout-shaped batch: the
  unit the update's reference and old-policy passes each cost."""
  import jax
  import numpy as np

  from rl_jax.train import grpo as G

  N, T = a.prompts * a.group, a.prompt_len + a.new_tokens
  toks = np.random.RandomState(1).randint(3, a.vocab, (N, T + 1)).astype(np.int32)
  batch = {"tokens": toks[:, :-1], "targets": toks[:, 1:], "positions": np.tile(np.arange(T, dtype=np.int32), (N, 1))}
  fwd = jax.jit(lambda p, b: G.token_logp(graphdef, p, state.bias, b, temperature=1.0, replay=False)[0])
  jax.block_until_ready(fwd(state.params, batch))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(state.params, batch))
    best = min(best, time.perf_counter() - t0)
  return best


def run_ours(a) -> dict:
  import jax
  import numpy as np

  from rl_jax.sharding import rules as srules

  rs = np.random.RandomState(0)  # the same prompts as Tunix's side (same seed, same draws)
  batches = [rs.randint(3, a.vocab, (a.prompts, a.prompt_len)) for _ in range(a.warmup + a.steps)]
  with srules.use_rules(None):
    t0 = time.perf_counter()
    graphdef, state, jstep, mesh = ours_setup(a)
    build_s = time.perf_counter() - t0
    with jax.set_mesh(mesh):
      steps = []
      for i, batch in enumerate(batches):
        state, times = ours_step(a, graphdef, state, jstep, mesh, [list(map(int, p)) for p in batch], seed=i)
        steps.append(times)
      forward_s = ours_forward_s(graphdef, state, a)
  n_params = sum(int(x.size) for x in jax.tree.leaves(state.params))
  return {"jax_version": jax.__version__, "device": jax.devices()[0].device_kind, "params": n_params,
          "build_s": build_s, "steps": steps, "forward_s": forward_s}  # fmt: skip


# ------------------------------------------------------------------ report
def summary(side: dict, a) -> dict:
  """Median seconds per phase over the timed steps ("other": the step less its timed phases, per step),
  steps/s, CPU seconds and cpu/wall per step; the warm-up steps reported apart."""
  import statistics

  timed, warm = side["steps"][a.warmup :], side["steps"][: a.warmup]
  for s in timed:
    s["other"] = s["step"] - sum(v for k, v in s.items() if k in ("rollout", "reference", "host", "update"))
  med = {k: statistics.median(s.get(k, 0.0) for s in timed) for k in sorted({k for s in timed for k in s})}
  cpu_per_wall = statistics.median(s["cpu"] / s["step"] for s in timed)
  if cpu_per_wall > 1.2 * a.threads:
    print(f"WARNING: cpu/wall {cpu_per_wall:.2f} > the {a.threads} core(s) given", file=sys.stderr, flush=True)
  if cpu_per_wall < 0.9 * a.threads:
    print(
      f"WARNING: cpu/wall {cpu_per_wall:.2f}: other work took part of the core(s); compare CPU seconds per step",
      file=sys.stderr,
      flush=True,
    )
  out = {
    "params_m": round(side["params"] / 1e6, 2),
    "steps_per_s": round(1.0 / med["step"], 4),
    "median_s": {k: round(v, 4) for k, v in med.items()},
    "all_step_s": [round(s["step"], 3) for s in side["steps"]],
    "warmup_s": round(sum(s["step"] for s in warm), 1),
    "cpu_per_wall": round(cpu_per_wall, 2),
  }
  if "forward_s" in side:
    out["forward_s"] = round(side["forward_s"], 4)
  return out


def print_report(res: dict, raw: dict, a, install_s: float) -> None:
  t, o = res.get("tunix"), res.get("rl_jax")
  rows = a.prompts * a.group
  versions = "; ".join(
    f"{k}: " + (f"google-tunix {v['tunix_version']}, " if "tunix_version" in v else "") + f"jax {v['jax_version']}"
    for k, v in raw.items()
  )
  print(
    f"\nOne GRPO step: {a.prompts} prompts x G={a.group} = {rows} rows, prompt {a.prompt_len} + {a.new_tokens} new "
    f"tokens, Llama-style dense hidden {a.hidden}, {a.layers} layers, {a.heads}/{a.kv_heads} heads, vocab {a.vocab}, "
    f"fp32, {a.threads} thread(s) pinned to core(s) {CORES}; median of {a.steps} steps after {a.warmup} warm-up; "
    f"{versions}; Tunix install {install_s:.0f} s (not timed)\n"
  )
  print(
    "| side | params | steps/s | step s | sampling s | reference fwd s | update s | other s | CPU s / step | cpu/wall |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for name, s in (("Tunix", t), ("rl_jax", o)):
    if s is None:
      continue
    m = s["median_s"]
    ref = f"{m['reference']:.3f}" if "reference" in m else "in update"
    print(
      f"| {name} | {s['params_m']}M | {s['steps_per_s']:.3f} | {m['step']:.3f} | {m['rollout']:.3f} | {ref} | "
      f"{m['update']:.3f} | {m['other']:.3f} | {m['cpu']:.3f} | {s['cpu_per_wall']:.2f} |"
    )
  if o and "forward_s" in o:
    print(f"\nrl_jax: one teacher-forced forward of the rollout batch (jitted alone) {o['forward_s']:.3f} s")
  if t and o and t["params_m"] != o["params_m"]:
    print(f"WARNING: parameter counts differ: Tunix {t['params_m']}M, rl_jax {o['params_m']}M", file=sys.stderr)
  if t and o:
    print(f"\nrl_jax / Tunix steps per second: **{o['steps_per_s'] / t['steps_per_s']:.2f}x**")
    print(f"Tunix / rl_jax CPU seconds per step: {t['median_s']['cpu'] / o['median_s']['cpu']:.2f}x")


def main(a) -> dict:
  sides = a.sides.split(",")
  install_s = ensure_tunix_venv(a) if "tunix" in sides else 0.0
  load = os.getloadavg()[0]
  raw = {}
  if "tunix" in sides:
    raw["tunix"] = run_tunix(a)
  if "rl_jax" in sides:
    raw["rl_jax"] = run_ours(a)
  res = {k: summary(v, a) for k, v in raw.items()}
  print_report(res, raw, a, install_s)
  out = {"bench": "grpo_vs_tunix", "args": vars(a), "cores": CORES, "install_s": round(install_s, 1),
         "load_avg_1min": [round(load, 2), round(os.getloadavg()[0], 2)], "results": res,
         "versions": {k: {x: v.get(x) for x in ("tunix_version", "jax_version")} for k, v in raw.items()}}  # fmt: skip
  if "tunix" in res and "rl_jax" in res:
    out["speedup"] = round(res["rl_jax"]["steps_per_s"] / res["tunix"]["steps_per_s"], 2)
    out["cpu_s_ratio"] = round(res["tunix"]["median_s"]["cpu"] / res["rl_jax"]["median_s"]["cpu"], 2)
  print("\n" + json.dumps(out))
  return out


if __name__ == "__main__":
  main(ARGS)
