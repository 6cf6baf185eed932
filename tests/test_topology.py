"""sharding/topology.py: TPU target names -> libtpu's compile-only devices, chip figures, torus-mapped meshes, and
an ahead-of-time compile for a TPU target on this CPU-only host (conftest sets JAX_PLATFORMS=cpu)."""

import os
import re

import pytest

pytest.importorskip("libtpu")

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from rl_jax.sharding import topology
from rl_jax.sharding.topology import CHIPS, make_mesh, mesh_shapes, parse, target


@pytest.mark.parametrize(
  "name, expected",
  [
    ("v5p:4x4x4", ("v5p", (4, 4, 4))),
    ("v6e:2x4", ("v6e", (2, 4))),
    ("tpu7x:2x2x1", ("tpu7x", (2, 2, 1))),
    ("v5p-128", ("v5p", (4, 4, 4))),  # TensorCores: 64 chips
    ("v4-8", ("v4", (2, 2, 1))),
    ("v5e-4", ("v5e", (2, 2))),  # chips
    ("v5litepod-16", ("v5e", (4, 4))),
    ("v6e-256", ("v6e", (16, 16))),
    ("tpu7x-8", ("tpu7x", (2, 2, 1))),
    ("V5P-8192", ("v5p", (16, 16, 16))),
  ],
)
def test_parse(name, expected):
  assert parse(name) == expected


@pytest.mark.parametrize("name", ["v9:2x2", "v5p-100", "v5p-7", "v6e-3", "v5p", "v5p:4x4x", "v5p:0x4x4", "gpu-8"])
def test_parse_rejects_with_one_line(name):
  with pytest.raises(ValueError) as e:
    parse(name)
  msg = str(e.value)
  examples = [n for n in re.findall(r"[a-z][a-z0-9]*[-:][0-9x]+", msg) if n != name]
  assert "\n" not in msg and examples and all(parse(n) for n in examples)  # names valid examples


def test_target_v5e():
  t = target("v5e:2x2")
  assert len(t.devices) == 4 and t.chip == CHIPS["v5e"] and t.topology == "v5e:2x2" and t.slices == 1
  assert {d.device_kind for d in t.devices} == {"TPU v5 lite"}
  assert t.chip.hbm_bytes == int(15.75 * 2**30) and t.chip.peak_bf16_flops == 197e12


def test_target_slice_name():
  t = target("v5p-128")
  assert t.name == "v5p-128" and t.topology == "v5p:4x4x4" and t.family == "v5p" and len(t.devices) == 64


def test_two_device_chips_split_the_chip():
  assert CHIPS["tpu7x"].devices_per_chip == 2 and CHIPS["tpu7x"].hbm_bytes == int(94.75 * 2**30)
  assert CHIPS["tpu7x"].peak_bf16_flops == 2307e12 / 2


def test_unknown_target_is_one_line():
  with pytest.raises(ValueError) as e:
    target("v9-8")
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=r"cannot build v5p:3x3x3"):  # libtpu refuses; its reason, on one line
    target("v5p:3x3x3")


def test_mesh_shapes_map_onto_the_torus():
  shapes = mesh_shapes(target("v5p:4x4x4"))
  assert {"data": 1, "fsdp": 16, "expert": 4, "tensor": 1, "sequence": 1} in shapes
  assert not any(s["expert"] == 8 for s in shapes)
  assert len(shapes) == len({tuple(s.values()) for s in shapes}) == 35  # 5 axes over 3 torus axes of 4
  assert list(mesh_shapes(target("v5e:2x2"), sequence=False)[0]) == ["data", "fsdp", "expert", "tensor"]


def test_make_mesh_refuses_what_does_not_map():
  t = target("v5p:4x4x4")
  with pytest.raises(ValueError) as e:
    make_mesh(t, expert=8)
  msg = str(e.value)
  assert "\n" not in msg and "'expert'=8" in msg and "torus 4x4x4" in msg and "(1, 4, 16, 64)" in msg
  assert "shapes that map: " in msg and "fsdp=16 expert=4" in msg
  mesh = make_mesh(t, fsdp=16, expert=4)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 16, "expert": 4, "tensor": 1}
  assert set(mesh.axis_types) == {AxisType.Auto}


def test_make_mesh_where_jax_finds_no_layout():
  # jax's greedy torus search gives "expert"=4 the two 2s first, then has no 2 left; v4's compile-only devices
  # (2 a chip) are refused by jax's mesh_utils outright. Both map onto whole torus axes.
  mesh = make_mesh(target("v5p:2x2x4"), data=2, fsdp=2, expert=4)
  assert mesh.devices.shape == (2, 2, 4, 1) and len({d.id for d in mesh.devices.flat}) == 16
  mesh = make_mesh(target("v4:2x2x1"), fsdp=4, tensor=2, sequence=1)
  chips = {tuple(d.coords) for d in mesh.devices[0, 0, 0, :]}
  assert mesh.devices.shape == (1, 4, 1, 2) and len(chips) == 1  # tensor on the 2 cores of a chip


def test_multi_slice():
  t = target("v5e:2x2", slices=2)
  assert len(t.devices) == 8 and t.slices == 2
  assert all(s["data"] % 2 == 0 for s in mesh_shapes(t))
  mesh = make_mesh(t, data=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}
  assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]  # a slice per data index
  with pytest.raises(ValueError, match="multiple of the 2 slices"):
    make_mesh(t, data=1)


def test_aot_compile_for_tpu():
  mesh = make_mesh(target("v5e:2x2"), fsdp=2, tensor=2)
  x = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("fsdp", None)))
  w = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec(None, "tensor")))
  compiled = jax.jit(lambda x, w: jnp.tanh(x @ w)).lower(x, w).compile()
  memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
  assert memory.argument_size_in_bytes == (128 * 512 + 512 * 128) * 2  # each device's shards
  assert cost["flops"] > 0


def test_aot_environment_keeps_user_settings(monkeypatch):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "0")
  topology.aot_environment()
  assert os.environ["JAX_PLATFORMS"] == "cpu" and os.environ["TPU_SKIP_MDS_QUERY"] == "0"


def test_missing_or_old_libtpu_is_one_line(monkeypatch):
  from jax.experimental import topologies

  def unknown(**kwargs):
    raise RuntimeError("INVALID_ARGUMENT: Invalid TPU external name: TPU7x")

  monkeypatch.setattr(topologies, "get_topology_desc", unknown)
  with pytest.raises(ValueError, match=r"^libtpu \S+ does not know TPU family tpu7x .*newer jax/libtpu") as e:
    target("tpu7x-8")
  assert "\n" not in str(e.value)
  monkeypatch.setattr(topology.importlib.util, "find_spec", lambda name: None)
  monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
  with pytest.raises(ValueError, match=r"needs libtpu: pip install 'rl-jax\[tpu\]'"):
    target("v5e-4")
