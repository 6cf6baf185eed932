"""`rl-jax plan`: ahead-of-time compilation of the tiny models for a TPU target (v5e:2x2, libtpu on this CPU host),
what the TPU program holds (grouped-matmul kernels, not the CPU bucket dispatch; blockwise attention), the HLO cost
reader against XLA's own count, and the command's JSON and one-line errors."""

import json

import pytest

pytest.importorskip("libtpu")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rl_jax import cli, hlo, plan
from rl_jax.config import load_run_config
from rl_jax.sharding import topology as topo

TINY = ["train.batch_size=8", "train.seq_len=64"]


@pytest.fixture(scope="module")
def v5e():
  return topo.target("v5e:2x2")


def test_cli_writes_the_plan_json(tmp_path, capsys):
  out = tmp_path / "out.json"
  assert cli.main(["plan", "--config", "configs/pretrain_tiny.yaml", "--topology", "v5e:2x2", "--json", str(out)]) == 0
  table = capsys.readouterr().out
  assert "train_step" in table and "step-time lower bound" in table
  p = json.loads(out.read_text())
  assert p["fits"] is True and p["topology"] == "v5e:2x2" and p["mesh"]["fsdp"] == 4
  assert p["hbm_bytes"] == topo.CHIPS["v5e"].hbm_bytes
  b = p["per_device_bytes"]
  assert set(b) == {"arguments", "temporaries", "outputs", "aliased", "total"}
  assert b["total"] == b["arguments"] + b["temporaries"] + b["outputs"] - b["aliased"] > 0
  assert b["aliased"] > 0  # the donated state is updated in place
  assert p["flops_per_device"] > 0 and p["step_time_lower_bound_s"] > 0 and p["compile_s"] > 0
  assert "all-gather" in p["collectives"]  # FSDP gathers the weights
  # XLA's argument bytes hold at least the state's per-device shards (TPU tiles pad small arrays up to 8 x 128)
  run = load_run_config("configs/pretrain_tiny.yaml")
  mesh = plan.target_mesh(run, topo.target("v5e:2x2"))
  with jax.set_mesh(mesh):
    (program,) = plan.train_programs(run, "pretrain", mesh)
  assert b["arguments"] >= plan.per_device_bytes(program.args) > 0


def test_tpu_program_holds_the_tpu_kernels(v5e):
  """Dropless MoE on a TPU target is the grouped-matmul kernel (gmm forward, tgmm weight gradient), never the CPU
  bucket dispatch (a lax.switch over capacities); a 1024-token row attends blockwise (no [T, T] scores)."""
  run = load_run_config("configs/pretrain_tiny.yaml", ["model.moe_capacity_factor=null", "train.batch_size=4",
                                                       "train.seq_len=1024"])  # fmt: skip
  mesh = plan.target_mesh(run, v5e)
  with jax.set_mesh(mesh):
    (p,) = plan.train_programs(run, "pretrain", mesh)
    text = p.fn.lower(*p.args).compile().as_text()
  assert "jit(gmm)" in text and "jit(tgmm)" in text
  assert "ragged-dot" not in text
  branches = [line.split("branch_computations={", 1)[1].split("}", 1)[0] for line in text.splitlines()
              if " conditional(" in line and "branch_computations" in line]  # fmt: skip
  assert branches and max(b.count(",") + 1 for b in branches) == 2  # blockwise attention's tile skips only
  assert not [s for s in set(hlo._ARRAY.findall(text)) if s[1].endswith("1024,1024")]  # no dense scores


def test_grpo_plan_colocates_the_sampler(v5e):
  run = load_run_config("configs/grpo_r1zero_tiny.yaml", ["model=tiny-moe", "grpo.prompts_per_step=4"])
  p = plan.plan(run, "grpo", target=v5e)
  rows = {r["program"]: r for r in p["programs"]}
  assert set(rows) == {"grpo_update", "rollout_prefill", "rollout_decode"} and p["fits"]
  assert rows["rollout_decode"]["calls"] == run.grpo.max_new_tokens  # 32 rows on 32 slots: one wave
  # while the engine samples, the moments and the reference model (3 parameter-sized trees) stay on the chips
  d = rows["rollout_decode"]["bytes"]
  mesh = plan.target_mesh(run, v5e)
  with jax.set_mesh(mesh):
    params = plan.per_device_bytes(plan.grpo_programs(run, mesh)[0].args[0].params)
  assert d["resident"] >= 3 * params > 0
  assert d["total"] == d["arguments"] + d["temporaries"] + d["outputs"] - d["aliased"] + d["resident"]
  assert p["step_time_lower_bound_s"] == pytest.approx(sum(r["bound_s"] * r["calls"] for r in rows.values()))


def test_hlo_costs_count_loops_and_match_xla(v5e):
  """On a loop-free program the reader's FLOPs are XLA's; a scan of the same layers counts each iteration (XLA's
  cost_analysis counts a loop body once)."""
  mesh = topo.make_mesh(v5e, fsdp=4)
  L = 6
  w = jax.ShapeDtypeStruct((L, 512, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "fsdp")))
  x = jax.ShapeDtypeStruct((64, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))
  unrolled = lambda w, x: jax.tree.reduce(lambda h, i: jnp.tanh(h @ w[i]), list(range(L)), x).sum()
  scanned = lambda w, x: jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0].sum()
  for f in (unrolled, jax.grad(unrolled)):
    c = jax.jit(f).lower(w, x).compile()
    np.testing.assert_allclose(hlo.analyse(c.as_text()).flops, c.cost_analysis()["flops"], rtol=0.05)
  want = 2 * 16 * 512 * 512 * L  # per device: 16 rows of x
  for f, n in ((scanned, 1), (jax.grad(scanned), 3)):
    c = jax.jit(f).lower(w, x).compile()
    got = hlo.analyse(c.as_text())
    np.testing.assert_allclose(got.flops, n * want, rtol=0.02)
    assert got.unknown_loops == 0 and c.cost_analysis()["flops"] < got.flops / 2  # XLA: the body once


def test_plan_errors_are_one_line(capsys):
  cfg = ["--config", "configs/pretrain_tiny.yaml"]
  assert cli.main(["plan", *cfg, "--topology", "v9z:2x2"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: unknown TPU target 'v9z:2x2'") and "\n" not in err
  assert cli.main(["plan", *cfg, "--topology", "v5p:4x4x4", "mesh.expert=8", "mesh.fsdp=8"]) == 2
  err = capsys.readouterr().err.strip()
  assert "does not map onto v5p:4x4x4" in err and "shapes that map" in err and "\n" not in err
  assert cli.main(["plan", *cfg, "--topology", "v5e:2x2", "--stage", "rl"]) == 2
  assert "unknown stage 'rl'" in capsys.readouterr().err
