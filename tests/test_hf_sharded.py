"""load_hf with a mesh: parameters land already sharded (each device reads only its slice) and the
model computes the same logits as the single-device load."""

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
  import os, sys
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  import jax, jax.numpy as jnp, numpy as np
  from rl_jax import models
  from flax import nnx
  from rl_jax.sharding import make_mesh
  from tests import hf_models
  path = sys.argv[1]
  hf_models.deepseek_v3(path)
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 256, (4, 16)), jnp.int32)
  ref = np.asarray(models.load_hf(path, dtype=jnp.float32)(ids))
  for shape in [dict(data=2, fsdp=2, tensor=2), dict(data=2, expert=4)]:
    mesh = make_mesh(**shape)
    with jax.set_mesh(mesh):                       # "with a mesh active": no mesh argument needed
      m = models.load_hf(path, dtype=jnp.float32)
    experts = m.moe_layers.mlp.gate[...]  # [L_moe, E, D, I]
    q_b = m.dense_layers.attn.q_b[...]  # [L_dense, q_lora, H, head_dim]
    local = {d: s.data.shape for d, s in zip(range(8), experts.addressable_shards)}
    assert experts.sharding.mesh.shape == mesh.shape
    if shape.get("expert"):
      assert experts.addressable_shards[0].data.shape[1] == 2, local     # 8 experts over 4 expert shards
    else:
      assert q_b.addressable_shards[0].data.shape[2] == 2, q_b.sharding   # 4 heads over tensor=2
    with jax.set_mesh(mesh):
      out = np.asarray(jax.jit(lambda x: m(x))(ids))
    assert np.abs(out - ref).max() < 1e-5, np.abs(out - ref).max()
  print("OK")
""")


def test_load_hf_onto_a_mesh(tmp_path):
  pytest.importorskip("transformers")
  env = {**os.environ, "PYTHONPATH": REPO}
  r = subprocess.run(
    [sys.executable, "-c", SCRIPT, str(tmp_path / "ds")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
  )
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
