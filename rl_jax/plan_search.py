"""`rl-jax plan --search`: the mesh shapes that map onto a TPU target, with remat and grad_accum choices, pruned by
an analytic memory estimate, the most promising compiled, ranked by their step-time bound.

A 671B compile takes minutes on a CPU host, so the search compiles only `top` candidates: those whose analytic
per-chip bytes fit (the training state exactly, from the parameters' logical axes on the candidate mesh; the
activations by a coarse per-layer count, see `activation_bytes`), in order of an analytic time estimate (model
FLOPs at peak, plus the FSDP weight gathers over ICI). The result is the best compiled candidate that fits."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from rl_jax import models
from rl_jax import plan as PL
from rl_jax.config import RunConfig, model_config
from rl_jax.models.config import ModelConfig
from rl_jax.sharding import rules as srules
from rl_jax.sharding import topology as topo

TRAIN_STAGES = ("pretrain", "extend", "sft", "distill", "train-rm")


def _rows_and_len(run: RunConfig, stage: str) -> tuple[int, int]:
  """(rows per optimizer update, tokens a row) of the stage (GRPO: one of its grpo.minibatches)."""
  if stage in ("grpo", "sample"):
    g = run.grpo
    return g.prompts_per_step * g.group_size // g.minibatches, g.max_prompt_len + g.max_new_tokens
  return run.train.batch_size, run.train.seq_len


def _valid(mcfg: ModelConfig, shape: dict, rows: int, accum: int, T: int) -> bool:
  batch_shards = shape["data"] * shape["fsdp"] * shape["expert"]
  if rows % accum or (rows // accum) % batch_shards:
    return False
  if shape["expert"] > 1 and (not mcfg.n_routed_experts or mcfg.n_routed_experts % shape["expert"]):
    return False  # a dense model's "expert" axis is only more FSDP: the fsdp shapes cover it
  heads = mcfg.num_attention_heads if mcfg.is_mla else mcfg.num_key_value_heads
  seq = shape.get("sequence", 1)
  return heads % shape["tensor"] == 0 and (seq == 1 or T % (2 * seq) == 0)


def model_leaves(mcfg: ModelConfig) -> list:
  """The model's parameters as (ShapeDtypeStruct, logical axes) pairs, built abstractly (once per search)."""
  abstract = nnx.state(models.abstract(mcfg))
  leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return [(v.get_value(), v.get_metadata().get("axes")) for v in leaves]


def state_bytes(leaves: list, shape: dict, rules, *, copies: float) -> float:
  """Per-device bytes of `copies` model-sized trees (parameters, moments, reference) on a mesh of `shape`, each
  leaf (`model_leaves`) split as the rules split it (exact, from the logical axes; nothing compiled)."""
  names = tuple(shape)
  mesh = jax.sharding.AbstractMesh(tuple(shape.values()), names)
  total = 0.0
  for a, axes in leaves:
    spec = srules.logical_to_spec(axes, rules, mesh, a.shape) if axes else ()
    split = math.prod(math.prod(shape[n] for n in ((s,) if isinstance(s, str) else s)) for s in spec if s)
    total += a.size * jnp.dtype(a.dtype).itemsize / split
  return total * copies


def activation_bytes(mcfg: ModelConfig, shape: dict, rows: int, accum: int, T: int, remat: bool) -> float:
  """A coarse per-device count of what a micro-batch's backward keeps: per layer and token ~16 model-width numbers
  (attention and norms) plus the MLP's three intermediates (MoE: K routed + shared experts), 2 bytes each, split
  over the tensor axis; with remat only each layer's input, plus one layer's worth; the fp32 logits; and the routed
  experts' row buffers, ~6 live at a time, which expert parallelism makes n x the assignments when dropless (every
  source may send all its rows to one shard; models/moe.py), capacity_factor x when capped."""
  tokens = rows // accum * T / (shape["data"] * shape["fsdp"] * shape["expert"] * shape.get("sequence", 1))
  D, tp = mcfg.hidden_size, shape["tensor"]
  moe_width = (mcfg.num_experts_per_tok + mcfg.n_shared_experts) * mcfg.moe_intermediate_size
  width = max(mcfg.intermediate_size, moe_width if mcfg.n_routed_experts else 0)
  layer = tokens * (16 * D + 3 * width / tp) * 2
  L = mcfg.num_hidden_layers
  stored = (L * tokens * D * 2 + layer) if remat else L * layer
  experts = 0.0
  if mcfg.n_routed_experts:
    n, cf = shape["expert"], mcfg.moe_capacity_factor
    buffer = tokens * mcfg.num_experts_per_tok * D * 2 * (n if cf is None else max(cf, 1.0))
    experts = 6 * buffer if remat else (3 * mcfg.n_moe_layers + 3) * buffer
    if n == 1 and cf is None:  # no expert parallelism: each device gathers a layer's experts whole (and its grads)
      experts += 2 * 3 * mcfg.n_routed_experts * D * mcfg.moe_intermediate_size * 2
  return stored + 2 * tokens * mcfg.vocab_size * 4 / tp + experts


def candidates(run: RunConfig, stage: str, target: topo.Target) -> list[dict]:
  """Every (mesh, remat, grad_accum) for the stage with its analytic per-chip bytes and time estimate, best first
  among those estimated to fit."""
  mcfg = model_config(run).replace(param_dtype=run.train.param_dtype, dtype=run.train.compute_dtype)
  rows, T = _rows_and_len(run, stage)
  chip, n = target.chip, len(target.devices)
  seq_ok = stage != "sample" and T >= 4096  # long rows: GRPO's update too (the sampler never splits T)
  copies = {"grpo": 3.0 + (run.grpo.beta > 0), "sample": 1.0}.get(stage, 3.0)  # params + 2 moments (+ reference)
  flops = mcfg.flops_per_token(T, mtp=False) * rows * T
  leaves = model_leaves(mcfg)
  out = []
  accums = [a for a in (1, 2, 4, 8, 16, 32) if rows % a == 0] if stage != "sample" else [1]
  for shape in topo.mesh_shapes(target, sequence=seq_ok):
    state = None
    for accum in accums:
      if not _valid(mcfg, shape, rows, accum, T):
        continue
      state = state_bytes(leaves, shape, run.mesh.rules, copies=copies) if state is None else state
      for remat in (False, True) if stage != "sample" else (False,):
        passes = 3 if remat else 2  # forward (+ its recomputation) and backward
        # + the gradients and the update's intermediates, ~3 parameter-sized trees
        mem = state + 3 * state / copies + activation_bytes(mcfg, shape, rows, accum, T, remat)
        # FSDP (over fsdp, expert and sequence: the rules) gathers each micro-batch's weights per pass; tensor
        # parallelism all-reduces two activations a layer
        gather = state / copies * (shape["fsdp"] * shape["expert"] * shape.get("sequence", 1) - 1) * accum * passes
        tokens = rows * T / (shape["data"] * shape["fsdp"] * shape["expert"] * shape.get("sequence", 1))
        tp = 2 * mcfg.num_hidden_layers * passes * tokens * mcfg.hidden_size * 2 * (1 - 1 / shape["tensor"])
        # expert parallelism: each MoE layer and pass sends and receives its padded row buffer (n x the rows)
        a2a = 0.0
        if mcfg.n_routed_experts and shape["expert"] > 1:
          rows_ep = tokens * mcfg.num_experts_per_tok * (shape["expert"] if mcfg.moe_capacity_factor is None else 1)
          a2a = 2 * mcfg.n_moe_layers * passes * rows_ep * mcfg.hidden_size * 2
        est = flops * (4 / 3 if remat else 1) / (n * chip.peak_bf16_flops) + (gather + tp + a2a) / chip.ici_bandwidth
        out.append({"mesh": shape, "remat": remat, "grad_accum": accum, "est_bytes": mem, "est_s": est})
  # ties (tiny models) go to fewer, larger micro-batches without remat
  rank = lambda c: (c["est_s"], c["grad_accum"], c["remat"], c["est_bytes"])
  fit = sorted((c for c in out if c["est_bytes"] <= chip.hbm_bytes), key=rank)
  # each mesh's best (remat, grad_accum) first, then the rest: a few compiles see as many meshes as they can
  seen, first, rest = set(), [], []
  for c in fit:
    key = tuple(c["mesh"].items())
    (rest if key in seen else first).append(c)
    seen.add(key)
  return first + rest or sorted(out, key=lambda c: c["est_bytes"])[:1]


def with_candidate(run: RunConfig, c: dict, slices: int) -> RunConfig:
  m = dict(c["mesh"])
  mesh = dataclasses.replace(run.mesh, data=m["data"] // slices, fsdp=m["fsdp"], expert=m["expert"],
                             tensor=m["tensor"], sequence=m.get("sequence", 1))  # fmt: skip
  train = dataclasses.replace(run.train, remat=c["remat"], grad_accum=c["grad_accum"])
  return dataclasses.replace(run, mesh=mesh, train=train)


def search(run: RunConfig, stage: str, target: topo.Target | str, slices: int = 1, *, top: int = 4,
           log: Callable[[str], None] = lambda s: None) -> dict:  # fmt: skip
  """Compiles the `top` most promising candidates for `target` (a topology.Target, or a name and `slices`); the
  best plan that fits (else the smallest), with every compiled candidate under "search", fastest bound first."""
  target = topo.target(target, slices) if isinstance(target, str) else target
  ranked = candidates(run, stage, target)
  log(f"{len(ranked)} candidate(s) estimated to fit {target.topology}; compiling {min(top, len(ranked))}")
  results = []
  for i, c in enumerate(ranked[:top]):
    desc = describe(c)
    log(f"[{i + 1}/{min(top, len(ranked))}] {desc} (estimated {c['est_bytes'] / PL.GiB:.1f} GiB, {c['est_s']:.3g} s)")
    p = PL.plan(with_candidate(run, c, target.slices), stage, target=target, log=log)
    results.append({"candidate": desc, **c, "plan": p})
  key = lambda r: (not r["plan"]["fits"], r["plan"]["step_time_lower_bound_s"] or math.inf)
  results.sort(key=key)
  best = dict(results[0]["plan"]) if results else {}
  best["search"] = [
    {k: r[k] for k in ("candidate", "mesh", "remat", "grad_accum", "est_bytes", "est_s")}
    | {k: r["plan"][k] for k in ("fits", "per_device_bytes", "step_time_lower_bound_s", "mfu_upper_bound", "compile_s")}
    for r in results
  ]
  best["candidates_considered"] = len(ranked)
  return best


def describe(c: dict) -> str:
  mesh = " ".join(f"{k}={v}" for k, v in c["mesh"].items() if v > 1) or "1 device"
  return f"{mesh}, remat={'on' if c['remat'] else 'off'}, grad_accum={c['grad_accum']}"
