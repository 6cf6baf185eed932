"""sharding/: mesh shapes, the rules table, and a tiny DeepSeek-V3 born sharded on 8 fake CPU devices."""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):  # effective only if jax is not imported yet: see the subprocess
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from rl_jax import sharding
from rl_jax.sharding import (
  AXES,
  constrain,
  current_rules,
  logical_to_spec,
  make_mesh,
  mesh_axes,
  mesh_shape,
  param_shardings,
  shard_count,
  use_rules,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# MESH
def test_mesh_shape_rest_and_errors():
  assert mesh_shape(n_devices=8) == (1, 8, 1, 1)
  assert mesh_shape(data=2, tensor=2, n_devices=8) == (2, 2, 1, 2)
  assert mesh_shape(data=2, fsdp=1, expert=-1, n_devices=8) == (2, 1, 4, 1)
  assert mesh_shape(2, 2, 1, 2, n_devices=8) == (2, 2, 1, 2)
  with pytest.raises(ValueError, match="'tensor'=3"):
    mesh_shape(data=2, tensor=3, n_devices=8)
  with pytest.raises(ValueError, match="'expert'=4"):
    mesh_shape(data=4, expert=4, n_devices=8)
  with pytest.raises(ValueError, match="uses 4 of the 8 devices"):
    mesh_shape(data=2, fsdp=2, n_devices=8)
  with pytest.raises(ValueError, match="at most one"):
    mesh_shape(data=-1, fsdp=-1, n_devices=8)
  with pytest.raises(ValueError, match="'data'"):
    mesh_shape(data=0, n_devices=8)


def test_make_mesh_on_available_devices():
  n = jax.device_count()
  mesh = make_mesh()
  assert mesh.axis_names == AXES and dict(mesh.shape) == {"data": 1, "fsdp": n, "expert": 1, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match="mesh axis 'tensor'"):
    make_mesh(tensor=n + 1)

  class Cfg:
    data, fsdp, expert, tensor = 1, 1, -1, 1

  assert dict(sharding.mesh_from_config(Cfg()).shape)["expert"] == n


def test_maybe_initialize_distributed(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  for var in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(var, raising=False)

  class Cfg:
    distributed, coordinator_address, num_processes, process_id = None, None, None, None

  assert sharding.maybe_initialize_distributed(Cfg()) is False and calls == []  # single host
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host0")
  assert sharding.maybe_initialize_distributed(Cfg()) is False and calls == []  # one-host TPU VM
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host0,host1")
  assert sharding.maybe_initialize_distributed(Cfg()) is True and calls == [{}]  # multi-host: autodetect
  Cfg.distributed = False
  assert sharding.maybe_initialize_distributed(Cfg()) is False and calls == [{}]
  Cfg.distributed, Cfg.coordinator_address, Cfg.num_processes, Cfg.process_id = None, "h:1234", 2, 1
  assert sharding.maybe_initialize_distributed(Cfg()) is True
  assert calls[-1] == {"coordinator_address": "h:1234", "num_processes": 2, "process_id": 1}
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  assert sharding.maybe_initialize_distributed(Cfg()) is True and len(calls) == 2  # idempotent


# RULES
MESH_DFT = AbstractMesh((2, 2, 1, 2), AXES)  # data=2, fsdp=2, expert=1, tensor=2


def test_logical_to_spec_rules():
  assert logical_to_spec(("embed", "mlp"), None, MESH_DFT, (64, 128)) == P("fsdp", "tensor")
  assert logical_to_spec(("heads", "head_dim", "embed"), None, MESH_DFT, (4, 16, 64)) == P("tensor", None, "fsdp")
  assert logical_to_spec(("kv_lora", "heads", "head_dim"), None, MESH_DFT, (16, 4, 8)) == P("fsdp", "tensor", None)
  assert logical_to_spec(("embed", "kv_lora"), None, MESH_DFT, (64, 24)) == P("fsdp", None)
  assert logical_to_spec(("norm", None), None, MESH_DFT, (16, 8)) == P(None, None)
  # "expert" has size 1 here: dropped.
  assert logical_to_spec(("expert", "embed", "moe_mlp"), None, MESH_DFT, (8, 64, 32)) == P(None, "fsdp", "tensor")
  # Overrides, e.g. from YAML (lists), merged over the defaults; without a mesh nothing is dropped.
  assert logical_to_spec(("embed", "mlp"), {"embed": None, "mlp": ["fsdp", "tensor"]}) == P(None, ("fsdp", "tensor"))
  with pytest.raises(ValueError, match="did you mean 'heads'"):
    logical_to_spec(("heds",), None, MESH_DFT)
  with pytest.raises(ValueError, match="no axis 'model'"):
    logical_to_spec(("mlp",), {"mlp": "model"}, MESH_DFT)


def test_logical_to_spec_duplicates_and_divisibility():
  # An activation's batch takes (data, fsdp); its embed dim would reuse fsdp: dropped (first use wins).
  assert logical_to_spec(("act_batch", "act_seq", "embed"), None, MESH_DFT, (8, 16, 64)) == P(
    ("data", "fsdp"), None, None
  )
  assert logical_to_spec(("embed", "mlp"), {"mlp": "fsdp"}, MESH_DFT, (64, 128)) == P("fsdp", None)
  # With expert parallelism, dense weights shard "embed" over "expert" too; expert weights cannot reuse it.
  mesh_ep = AbstractMesh((2, 1, 4, 1), AXES)
  assert logical_to_spec(("expert", "embed", "moe_mlp"), None, mesh_ep, (8, 64, 32)) == P("expert", None, None)
  assert logical_to_spec(("embed", "mlp"), None, mesh_ep, (64, 128)) == P("expert", None)
  assert logical_to_spec(("act_batch", "act_seq", "act_embed"), None, mesh_ep, (8, 16, 64)) == P(
    ("data", "expert"), None, None
  )
  # Not divisible: replicated (dims of tiny models), or the longest dividing prefix of the mesh axes.
  assert logical_to_spec(("vocab", "embed"), None, MESH_DFT, (255, 64)) == P(None, "fsdp")
  assert logical_to_spec(("embed", "mlp"), None, MESH_DFT, (63, 1)) == P(None, None)
  assert logical_to_spec(("act_batch", "act_seq"), None, MESH_DFT, (2, 16)) == P("data", None)
  # A replicated dim frees its axis for later dims.
  assert logical_to_spec(("embed", "mlp"), {"mlp": "fsdp"}, MESH_DFT, (3, 128)) == P(None, "fsdp")


def test_param_shardings_reads_axes_metadata():
  class M(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros((4, 6)), axes=("embed", "mlp"))
      self.b = nnx.Param(jnp.zeros((6,)))  # no axes: replicated

  mesh = make_mesh()
  shardings = param_shardings(nnx.state(nnx.eval_shape(M)), mesh)
  assert shardings["b"].spec == P() and shardings["w"].mesh is mesh
  n = jax.device_count()
  assert shardings["w"].spec == (P("fsdp", None) if n in (2, 4) else P(None, None))

  class Bad(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros((4, 6)), axes=("embed",))

  with pytest.raises(ValueError, match=r"\['w'\].*do not match shape \(4, 6\)"):
    param_shardings(nnx.state(nnx.eval_shape(Bad)), mesh)


def test_ambient_rules_reach_every_helper():
  """Inside `use_rules`, every helper called without `rules=` uses them; an explicit `rules=` is DEFAULT_RULES
  updated by it (not the ambient ones); outside, the defaults come back."""

  class M(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros((64, 128)), axes=("embed", "mlp"))

  abstract = nnx.state(nnx.eval_shape(M))
  x = jnp.ones((8, 16, 64))
  spec_of_constraint = lambda: next(
    e.params["sharding"].spec
    for e in jax.make_jaxpr(lambda h: constrain(h, ("act_batch", "act_seq", "act_embed")))(x).eqns
    if e.primitive.name == "sharding_constraint"
  )
  with jax.sharding.use_abstract_mesh(MESH_DFT):
    assert spec_of_constraint() == P(("data", "fsdp"), None, None)
    with use_rules({"mlp": "fsdp", "embed": None, "act_batch": "data", "act_seq": "fsdp", "act_embed": "tensor"}):
      assert current_rules()["mlp"] == ("fsdp",)
      assert logical_to_spec(("embed", "mlp"), mesh=MESH_DFT, shape=(64, 128)) == P(None, "fsdp")
      assert logical_to_spec(("embed", "mlp"), {"mlp": "tensor"}, MESH_DFT, (64, 128)) == P("fsdp", "tensor")
      assert param_shardings(abstract, MESH_DFT)["w"].spec == P(None, "fsdp")
      assert shard_count("act_batch") == 2 and mesh_axes(("act_batch", "act_seq")) == ("data", "fsdp")
      assert spec_of_constraint() == P("data", "fsdp", "tensor")
    assert shard_count("act_batch") == 4 and param_shardings(abstract, MESH_DFT)["w"].spec == P("fsdp", "tensor")
  assert shard_count("act_batch") == 1 and mesh_axes("act_batch") == ()  # no mesh
  # several names for one dim (flattened batch x seq): their axes in order, the longest dividing prefix
  merged = logical_to_spec((("act_batch", "act_seq"), None), {"act_seq": "tensor"}, MESH_DFT, (16, 4))
  assert merged == P(("data", "fsdp", "tensor"), None)
  assert mesh_axes(("act_batch", "act_seq"), {"act_seq": "tensor"}, MESH_DFT, size=6) == ("data",)
  with pytest.raises(ValueError, match="did you mean 'act_batch'"):
    shard_count("batch", mesh=MESH_DFT)  # activation names are act_*: a stale name fails loudly
  with pytest.raises(ValueError, match="unknown logical axis 'batch' .did you mean 'act_batch'"):
    with use_rules({"batch": ["data", "fsdp"]}):  # ... in a run's mesh.rules too
      pass


def test_constrain_is_noop_without_mesh():
  x = jnp.ones((4, 8))
  assert constrain(x, ("act_batch", "act_embed")) is x
  assert jax.jit(lambda x: constrain(x, ("act_batch", "act_embed")))(x).shape == (4, 8)


# 8 DEVICES: run in a fresh process so the device-count flag holds whatever imported jax first.
SCRIPT = r"""
import os, jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from rl_jax.models import ModelConfig, RopeConfig, Transformer, build
from rl_jax.sharding import constrain, create_sharded, make_mesh, shard_state

assert jax.device_count() == 8, jax.devices()
cfg = ModelConfig(arch="deepseek_v3", vocab_size=256, hidden_size=64, intermediate_size=128,
                  moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1,
                  n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                  routed_scaling_factor=2.5, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                  qk_nope_head_dim=16, v_head_dim=16,
                  rope=RopeConfig(type="yarn", factor=4.0, original_max_position_embeddings=128, mscale=1.0,
                                  mscale_all_dim=1.0, interleave=True))
forward = lambda gd: jax.jit(lambda s, t: nnx.merge(gd, s)(t))
tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)
ref = build(cfg, seed=3)
ref_gd, ref_state = nnx.split(ref)
ref_logits = np.asarray(forward(ref_gd)(ref_state, tokens))

# the MoE layers' gate [L_moe=2, E=8, D=64, I=32]: the stacked layers axis is never split
for sizes, gate_spec, gate_shard in [
    (dict(data=2, fsdp=2, tensor=2), P(None, None, "fsdp", "tensor"), (2, 8, 32, 16)),
    (dict(data=2, fsdp=1, expert=4), P(None, "expert", None, None), (2, 2, 64, 32))]:
  mesh = make_mesh(**sizes)
  model = create_sharded(lambda: Transformer(cfg, nnx.Rngs(params=3)), mesh)
  gd, state = nnx.split(model)
  # BORN SHARDED, same values as the single-device build
  gate = model.moe_layers.mlp.gate[...]
  assert gate.sharding.spec == gate_spec, (sizes, gate.sharding.spec)
  assert gate.addressable_shards[0].data.shape == gate_shard, gate.addressable_shards[0].data.shape
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(ref_state)):
    diff = float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
    assert diff < 1e-6, (sizes, jax.tree_util.keystr(path), diff)   # jit fuses init ops: a few ulps
  # CHECKPOINT-STYLE PLACEMENT gives the same shardings
  placed = shard_state(ref_state, mesh)
  assert jax.tree.map(lambda x: x.sharding, jax.tree.leaves(placed)) == \
         jax.tree.map(lambda x: x.sharding, jax.tree.leaves(state))
  # FORWARD on a batch split over (data, fsdp)
  x = jax.device_put(tokens, NamedSharding(mesh, P(("data", "fsdp"))))
  with jax.set_mesh(mesh):
    logits = forward(gd)(state, x)
    act = jax.jit(lambda h: constrain(h * 2, ("act_batch", "act_seq", "act_embed")))(jnp.ones((8, 16, 64)))
  err = float(np.abs(np.asarray(logits) - ref_logits).max())
  assert err < 1e-5, (sizes, err)
  batch_axes = tuple(a for a in ("data", "fsdp", "expert") if mesh.shape[a] > 1)
  assert act.sharding.is_equivalent_to(NamedSharding(mesh, P(batch_axes)), 3), act.sharding
  print(sizes, "max |logits - single device| =", err)
"""


def test_tiny_deepseek_v3_born_sharded_on_8_devices():
  env = {
    **os.environ,
    "XLA_FLAGS": _FLAG,
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
  }
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  assert proc.stdout.count("max |logits - single device|") == 2, proc.stdout
