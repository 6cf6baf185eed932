"""`rl-jax plan`: what a run needs on a TPU slice you have not rented, from ahead-of-time compilation on this host.

    rl-jax plan --config configs/pretrain_tiny.yaml --topology v5e:2x2 [--stage grpo] [--slices 2] [--json out.json]

The stage's jitted programs are built from the run config alone (the state abstractly: nothing is allocated, no
data, tokenizer or checkpoint is read; batch shapes come from the config) and compiled by libtpu for the target's
devices, on the run's mesh (`mesh.*`, laid onto the torus by sharding/topology.py) under its sharding rules:

  pretrain / extend / sft  the train step (micro-batches, update, router-bias rule)
  distill                  the distillation step with its teacher (`distill.teacher`: a checkpoint's
                           model_config.json or a preset name; none: SFT on traces, as R1 distilled)
  train-rm                 the reward model's Bradley-Terry step
  grpo                     the update step (policy, optimizer, reference) and the rollout engine's prefill and
                           decode at the rollout shape (prompts x G rows), colocated: the sampler runs while the
                           training state stays resident on the same chips
  sample                   the engine's prefill and decode alone (an inference deployment)

Per program and chip: bytes from XLA's memory analysis (arguments, temporaries, outputs, aliased: donated
buffers reused), the matmul FLOPs, HBM bytes and collectives of its HLO with loops counted as often as they run
(rl_jax/hlo.py), and compile time. A failed compile that runs out of HBM is a "does not fit" row with XLA's numbers.
The step-time lower bound adds, per program call, the largest of three times a chip cannot beat: its FLOPs at the
peak bf16 rate, the bytes it must touch (its arguments and outputs: every parameter, moment and cache entry read or
written once) at the HBM bandwidth, and its collectives' bytes at the chip's whole ICI bandwidth (every byte a
collective delivers crosses a link at least once; links both ways counted as one pipe, so also optimistic). A
GRPO step calls the update once, the prefill once per wave of rows and the decode once a token. A bound, not a
prediction: host time, DCN between slices and imperfect overlap only add to it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rl_jax import engine, hlo, models, sampling
from rl_jax.config import RunConfig, model_config
from rl_jax.models.config import ModelConfig, preset_dict
from rl_jax.models.config import from_dict as model_from_dict
from rl_jax.sharding import rules as srules
from rl_jax.sharding import topology as topo

STAGES = ("pretrain", "extend", "sft", "distill", "grpo", "train-rm", "sample")
GiB = 2**30


@dataclasses.dataclass
class Program:
  name: str
  fn: Callable  # jitted
  args: tuple  # abstract arguments (ShapeDtypeStructs with shardings)
  calls: float = 1.0  # calls per stage step
  resident: float = 0.0  # bytes a chip holds besides the program's own (the training state while sampling)
  model_flops: float = 0.0  # analytic model FLOPs of one call, all chips (for the MFU bound)
  grouped_fill: float = 1.0  # buffer rows per real row of its grouped-matmul kernels (they skip empty tiles)


def grouped_fill(mcfg: ModelConfig, mesh) -> float:
  """How much larger the routed experts' row buffers are than the rows they hold: the expert-parallel dispatch
  (models/moe.py) sends n x the tokens' assignments when dropless (every source may send all to one shard), and
  capacity_factor x when capped; the grouped kernels compute only the filled tiles, so their FLOPs shrink by it."""
  n = math.prod(mesh.shape[a] for a in srules.mesh_axes("expert", mesh=mesh))
  if not mcfg.n_routed_experts or n == 1:
    return 1.0
  return float(n) if mcfg.moe_capacity_factor is None else max(1.0, mcfg.moe_capacity_factor)


def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _abstract(tree, shardings):
  """ShapeDtypeStructs of `tree` placed by `shardings` (a prefix: a Variable's sharding may stand for it)."""

  def one(s, a):
    if isinstance(a, nnx.Variable):
      return a.replace(_sds(a.get_value().shape, a.get_value().dtype, s))
    return _sds(a.shape, a.dtype, s)

  return jax.tree.map(one, shardings, tree)


def per_device_bytes(tree) -> int:
  """Bytes one device holds of an abstract tree (the first device's shard of each leaf)."""
  total = 0
  for a in jax.tree.leaves(tree):
    shard = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
    total += math.prod(shard) * jnp.dtype(a.dtype).itemsize
  return total


# ------------------------------------------------------------------------------------------ stage programs
def _train_state(mcfg: ModelConfig, run: RunConfig, mesh, steps: int, ref: bool = False):
  from rl_jax.train import state as S

  tx = S.optimizer(run.optimizer, steps)
  graphdef, abstract, shardings = S.state_spec(mcfg, tx, mesh, run.train.seed, ref=ref)
  return graphdef, tx, _abstract(abstract, shardings), shardings, S.schedule(run.optimizer, steps)


def _rows(run: RunConfig, mesh, keys) -> dict:
  """Batches [A, B/A, T] int32 as the pretraining-style steps take them."""
  from rl_jax.train import step as ST

  t = run.train
  A = t.grad_accum
  return {k: _sds((A, t.batch_size // A, t.seq_len), jnp.int32, ST.batch_sharding(mesh)) for k in keys}


def _teacher_config(name: str, dtype: str) -> ModelConfig:
  """A teacher's model: a checkpoint's model_config.json (nothing else of it is read) or a model preset."""
  from etils import epath

  path = epath.Path(name) / "model_config.json"
  if path.exists():
    from rl_jax import checkpoint as ckpt

    cfg = ckpt.read_model_config(name)
  else:
    cfg = model_from_dict(preset_dict(name), path="distill.teacher")
  return cfg.replace(param_dtype=dtype, dtype=dtype, moe_capacity_factor=None)


def train_programs(run: RunConfig, stage: str, mesh) -> list[Program]:
  """The training stages' one program: pretrain / extend / sft / distill / train-rm."""
  from rl_jax.train import distill as D
  from rl_jax.train import rm as RM
  from rl_jax.train import state as S
  from rl_jax.train import step as ST

  t = run.train
  mcfg = S.train_model_config(model_config(run), t)
  tokens = t.batch_size * t.seq_len
  if stage == "train-rm":
    mcfg = mcfg.replace(score_head=True, moe_capacity_factor=None)
    graphdef, tx, state, sh, lr = _train_state(mcfg, run, mesh, t.steps)
    pairs = RM.pair_shardings(mesh)
    batch = {
      k: _sds((t.grad_accum, t.batch_size // t.grad_accum) + (() if k.endswith("_len") else (t.seq_len,)),
              jnp.int32, pairs[k])
      for k in RM.PAIR_KEYS
    }  # fmt: skip
    fn = RM.build_rm_step(graphdef, t, tx, mesh, sh, lr)
    flops = 2 * mcfg.flops_per_token(t.seq_len, mtp=False) * tokens  # chosen and rejected rows
    return [Program("rm_step", fn, (state, batch), model_flops=flops, grouped_fill=grouped_fill(mcfg, mesh))]
  graphdef, tx, state, sh, lr = _train_state(mcfg, run, mesh, t.steps)
  batch = _rows(run, mesh, ST.BATCH_KEYS)
  if stage == "distill" and run.distill.teacher:
    d = run.distill
    teacher_cfg = _teacher_config(d.teacher, t.compute_dtype)
    t_graph, t_params, t_bias = S.split_model(models.abstract(teacher_cfg))
    frozen = tuple(_abstract(x, srules.param_shardings(x, mesh)) for x in (t_params, t_bias))
    fn = D.build_distill_step(graphdef, (t_graph, *frozen), d, t, tx, mesh, sh, lr)
    flops = mcfg.flops_per_token(t.seq_len, mtp=False) + teacher_cfg.flops_per_token(t.seq_len, mtp=False) / 3
    fill = grouped_fill(mcfg, mesh)
    return [Program("distill_step", fn, (state, frozen, batch), model_flops=flops * tokens, grouped_fill=fill)]
  fn = ST.build_step(graphdef, mcfg, t, tx, mesh, sh, lr)
  flops = mcfg.flops_per_token(t.seq_len, mtp=ST.runs_mtp(mcfg, t)) * tokens
  return [Program("train_step", fn, (state, batch), model_flops=flops, grouped_fill=grouped_fill(mcfg, mesh))]


def sampler_programs(run: RunConfig, mesh, params, mcfg: ModelConfig, resident: int = 0) -> list[Program]:
  """The rollout engine's prefill and decode for grpo.prompts_per_step x group_size rows on grpo.rollout_slots
  slots (0: one a row), prompts of grpo.max_prompt_len, budgets of grpo.max_new_tokens; `params` the model state
  (abstract, sharded), `resident` what else stays on each chip meanwhile."""
  g = run.grpo
  rows = g.prompts_per_step * g.group_size
  shards = max(1, srules.shard_count("act_batch", mesh=mesh))
  slots = g.rollout_slots or sampling.bucket(rows, shards)
  Pb, Nb = sampling.bucket(g.max_prompt_len), sampling.bucket(g.max_new_tokens)
  graphdef = nnx.graphdef(models.abstract(mcfg))
  cfg = (float(g.temperature), 0, float(g.top_p), float(g.temperature))
  empty, prefill, decode = engine.programs(graphdef, slots, Pb, Nb, cfg)
  out_sh = empty.lower(params).compile().output_shardings
  shape = jax.eval_shape(empty, params)
  state = jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), shape, out_sh)
  repl = NamedSharding(mesh, P())
  U = min(slots, sampling.bucket(-(-slots // g.group_size), shards))  # a wave's distinct prompts
  ints = lambda *s: _sds(s, jnp.int32, repl)
  waves = -(-rows // slots)
  per_token = 2 * (mcfg.param_counts()["active"] - mcfg.vocab_size * mcfg.hidden_size)
  prefill_args = (params, state, ints(U, Pb), ints(U), ints(slots), ints(slots), ints(slots), ints(slots))
  prefill_args += (_sds((), jnp.uint32, repl), ints())
  fill = grouped_fill(mcfg, mesh)
  return [
    Program("rollout_prefill", prefill, prefill_args, waves, resident, per_token * U * Pb, fill),
    Program("rollout_decode", decode, (params, state, ints(), ints(), ints()), waves * g.max_new_tokens, resident,
            per_token * slots, fill),
  ]  # fmt: skip


def grpo_programs(run: RunConfig, mesh) -> list[Program]:
  from rl_jax.train import grpo as G
  from rl_jax.train import state as S

  g, t = run.grpo, run.train
  mcfg = S.train_model_config(model_config(run), t).replace(moe_capacity_factor=None)  # as rl-jax grpo
  steps = t.steps * g.epochs * g.minibatches
  graphdef, tx, state, sh, lr = _train_state(mcfg, run, mesh, steps, ref=G.uses_ref(g))
  N, T = g.prompts_per_step * g.group_size, g.max_prompt_len + g.max_new_tokens
  rows = G.row_sharding(mesh)
  batch = {k: _sds((N, T), jnp.int32 if k in ("tokens", "targets", "positions") else jnp.float32, rows)
           for k in G.ROLLOUT_KEYS if k != "rewards"}  # fmt: skip
  batch["rewards"] = _sds((N,), jnp.float32, rows)
  if g.routing_replay and mcfg.n_moe_layers:
    batch["experts"] = _sds((N, T, mcfg.n_moe_layers, mcfg.num_experts_per_tok), jnp.int32, rows)
  fn = G.build_grpo_step(graphdef, g, t, tx, mesh, sh, lr, mcfg.n_routed_experts)
  forwards = (0 if G.on_policy(g) else 1) + (1 if G.uses_ref(g) else 0)  # old policy and reference: forward only
  flops = mcfg.flops_per_token(T, mtp=False) * N * T * (g.epochs + forwards / 3)
  update = Program("grpo_update", fn, (state, batch), model_flops=flops, grouped_fill=grouped_fill(mcfg, mesh))
  params = nnx.merge_state(state.params, state.bias)
  resident = per_device_bytes(state) - per_device_bytes(params)  # moments, reference, step: stay put
  return [update, *sampler_programs(run, mesh, params, mcfg, resident)]


def sample_programs(run: RunConfig, mesh) -> list[Program]:
  from rl_jax.train import state as S

  mcfg = S.train_model_config(model_config(run), run.train).replace(moe_capacity_factor=None)
  abstract = nnx.state(models.abstract(mcfg))
  return sampler_programs(run, mesh, _abstract(abstract, srules.param_shardings(abstract, mesh)), mcfg)


def stage_programs(run: RunConfig, stage: str, mesh) -> list[Program]:
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")
  if stage == "grpo":
    return grpo_programs(run, mesh)
  if stage == "sample":
    return sample_programs(run, mesh)
  return train_programs(run, stage, mesh)


def state_breakdown(p: Program) -> dict | None:
  """Logical per-device bytes of a training program's state (its first argument): parameters (+ router bias),
  optimizer moments, reference model, distillation teacher. XLA's argument bytes add TPU tile padding."""
  from rl_jax.train.state import TrainState

  st = p.args[0] if p.args else None
  if not isinstance(st, TrainState):
    return None
  out = {"parameters": per_device_bytes((st.params, st.bias)), "optimizer": per_device_bytes(st.opt_state)}
  if st.ref is not None:
    out["reference"] = per_device_bytes(st.ref)
  if p.name == "distill_step" and p.args[1]:
    out["teacher"] = per_device_bytes(p.args[1])
  return out


# ------------------------------------------------------------------------------------------ compile and measure
_OOM = [
  re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)"),
  re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm"),
]


def _gib(value: str, unit: str) -> float:
  return float(value) * 1024.0 ** ("KMGT".index(unit) + 1)


def compile_program(p: Program, chip: topo.Chip) -> dict:
  """One program's row: per-device bytes, FLOPs, HBM bytes, collectives, its bound, compile time; a compile that
  runs out of HBM gives a row that does not fit, with XLA's numbers."""
  t0 = time.perf_counter()
  row: dict[str, Any] = {"program": p.name, "calls": p.calls}
  if (state := state_breakdown(p)) is not None:
    row["state"] = state
  try:
    compiled = p.fn.lower(*p.args).compile()
  except Exception as e:  # XLA raises JaxRuntimeError / XlaRuntimeError by version
    msg = " ".join(str(e).split())
    m = next((m for r in _OOM if (m := r.search(msg))), None)
    if m is None:
      raise
    row.update(compile_s=time.perf_counter() - t0, fits=False, error=msg[:300])
    row["bytes"] = {"arguments": per_device_bytes(p.args), "temporaries": int(_gib(m[1], m[2])), "outputs": 0,
                    "aliased": 0, "resident": int(p.resident)}  # fmt: skip
    row["bytes"]["total"] = row["bytes"]["arguments"] + row["bytes"]["temporaries"] + int(p.resident)
    row["hbm_reported"] = int(_gib(m[3], m[4]))
    return row
  row["compile_s"] = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  b = {
    "arguments": int(mem.argument_size_in_bytes),
    "temporaries": int(mem.temp_size_in_bytes),
    "outputs": int(mem.output_size_in_bytes),
    "aliased": int(mem.alias_size_in_bytes),
    "resident": int(p.resident),
  }
  b["total"] = b["arguments"] + b["temporaries"] + b["outputs"] - b["aliased"] + b["resident"]
  costs = hlo.analyse(compiled.as_text())
  flops = costs.flops - costs.grouped_flops * (1 - 1 / p.grouped_fill)
  touched = b["arguments"] + b["outputs"] - b["aliased"]
  limits = {
    "compute": flops / chip.peak_bf16_flops,
    "hbm": touched / chip.hbm_bandwidth,
    "ici": sum(c["bytes"] for c in costs.collectives.values()) / chip.ici_bandwidth,
  }
  bound = max(limits.values())
  row.update(bytes=b, fits=b["total"] <= chip.hbm_bytes, flops=flops, hbm_bytes_accessed=costs.bytes,
             collectives=costs.collectives, unknown_loops=costs.unknown_loops, bound_s=bound, limits_s=limits,
             limited_by=max(limits, key=limits.get),
             model_flops=p.model_flops)  # fmt: skip
  return row


# ------------------------------------------------------------------------------------------ the plan
def target_mesh(run: RunConfig, target: topo.Target):
  """The run's mesh laid onto the target: `mesh.data` per slice (the slices multiply it, over DCN)."""
  m = run.mesh
  return topo.make_mesh(target, m.data * target.slices, m.fsdp, m.expert, m.tensor, m.sequence)


def plan(run: RunConfig, stage: str = "pretrain", topology: str = "v5e:2x2", slices: int = 1, *, target=None,
         log: Callable[[str], None] = lambda s: None) -> dict:  # fmt: skip
  """Compiles the stage's programs for the target on the run's mesh; the JSON-ready result (see module doc).
  `log` hears a line before and after each compile (they can take minutes)."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")
  target = target or topo.target(topology, slices)
  mesh = target_mesh(run, target)
  rows = []
  with jax.set_mesh(mesh), srules.use_rules(run.mesh.rules):
    programs = stage_programs(run, stage, mesh)
    for i, p in enumerate(programs):
      log(f"  compiling {p.name} ({i + 1}/{len(programs)}) for {target.topology}")
      rows.append(compile_program(p, target.chip))
      log(f"  {p.name}: {rows[-1]['compile_s']:.1f} s, {'fits' if rows[-1]['fits'] else 'does not fit'}")
  return summarize(rows, target, mesh, stage)


def summarize(rows: list[dict], target: topo.Target, mesh, stage: str) -> dict:
  """The stage as a whole: the peak program's bytes (what must fit), summed FLOPs, collectives and bound."""
  chip, n = target.chip, len(target.devices)
  peak = max(rows, key=lambda r: r["bytes"]["total"])
  b = peak["bytes"]
  compiled = all("bound_s" in r for r in rows)
  collectives: dict[str, dict] = {}
  for r in rows:
    for kind, c in (r.get("collectives") or {}).items():
      acc = collectives.setdefault(kind, {"count": 0, "bytes": 0.0})
      acc["count"] += int(c["count"] * r["calls"])
      acc["bytes"] += c["bytes"] * r["calls"]
  bound = sum(r["bound_s"] * r["calls"] for r in rows) if compiled else None
  model_flops = sum(r.get("model_flops", 0.0) * r["calls"] for r in rows)
  return {
    "stage": stage,
    "topology": target.topology,
    "slices": target.slices,
    "devices": n,
    "chip": dataclasses.asdict(chip),
    "mesh": {k: int(v) for k, v in mesh.shape.items()},
    "fits": all(r["fits"] for r in rows),
    "hbm_bytes": chip.hbm_bytes,
    "per_device_bytes": {
      "arguments": b["arguments"] + b["resident"],
      "temporaries": b["temporaries"],
      "outputs": b["outputs"],
      "aliased": b["aliased"],
      "total": b["total"],
    },
    "peak_program": peak["program"],
    "state_per_device": next((r["state"] for r in rows if "state" in r), None),
    "flops_per_device": sum(r.get("flops", 0.0) * r["calls"] for r in rows) if compiled else None,
    "hbm_bytes_accessed_per_device": sum(r.get("hbm_bytes_accessed", 0.0) * r["calls"] for r in rows)
    if compiled
    else None,
    "step_time_lower_bound_s": bound,
    "mfu_upper_bound": model_flops / (n * chip.peak_bf16_flops * bound) if bound else None,
    "collectives": collectives,
    "compile_s": sum(r["compile_s"] for r in rows),
    "programs": rows,
  }
