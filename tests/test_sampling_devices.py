"""Sampler on 8 simulated CPU devices: a model born sharded on a (data=2, fsdp=2, tensor=2) mesh and sampled
under `jax.set_mesh` gives the single-device tokens, with the batch, loop state and cache split batch-wise."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh process: the device-count flag only holds if it is set before jax is imported.
SCRIPT = r"""
import re
import jax, numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P
from rl_jax import sharding
from rl_jax.models import Transformer, build
from rl_jax import sampling
from tests.test_sampling import GQA_CFG, MLA_CFG

assert jax.device_count() == 8, jax.devices()
PROMPTS = [[5, 17, 33], [200, 3, 9, 41, 77, 12, 150], list(range(1, 21))]   # prompt bucket 32: cache 48 slots
T = 10
mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)


def sharpen(m):      # embed / lm_head x20: greedy argmaxes far from ties (as tests/test_sampling.py)
  m.embed[...] = m.embed[...] * 20.0
  m.lm_head[...] = m.lm_head[...] * 20.0
  return m


for name, cfg in (("mla_moe", MLA_CFG), ("gqa", GQA_CFG)):
  one = sharpen(build(cfg, seed=1))
  want = sampling.generate(one, PROMPTS, max_new_tokens=T, temperature=0.0)
  want_s = sampling.generate(one, PROMPTS, max_new_tokens=T, temperature=1.0, seed=4, num_samples=2)
  model = sharding.create_sharded(lambda: sharpen(Transformer(cfg, nnx.Rngs(params=1))), mesh)
  first_group = getattr(model, cfg.layer_groups()[0][0])  # [L, heads, head_dim, embed]
  assert first_group.attn.o[...].sharding.spec == P(None, "tensor", None, "fsdp")
  with jax.set_mesh(mesh):
    got = sampling.generate(model, PROMPTS, max_new_tokens=T, temperature=0.0)
    got_s = sampling.generate(model, PROMPTS, max_new_tokens=T, temperature=1.0, seed=4, num_samples=2)
    # SHARDINGS: outputs split over the batch axes (data x fsdp = 4); each device's cache holds B / 4 rows.
    (B, Pb, N), args = sampling.device_inputs(PROMPTS, max_new_tokens=T)
    graphdef, state = nnx.split(model)
    fn = sampling.compiled(graphdef, B, Pb, N, 0.0, 0, 1.0)
    out = fn(state, *args)
    hlo = fn.lower(state, *args).compile().as_text()
  for x in out:
    if x is not None:
      assert x.sharding.spec[0] == ("data", "fsdp"), x.sharding
  assert B == 4                                  # 3 rows -> the batch bucket of the 4 batch shards
  cache_rows = set(re.findall(r"f32\[(\d+),%d," % (Pb + N), hlo))
  assert cache_rows == {"1"}, cache_rows
  if name == "gqa":   # 2 kv heads over tensor=2: one per device
    assert "f32[1,%d,1,16]" % (Pb + N) in hlo
  # SAME SAMPLES as one device
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.lengths, want.lengths)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
  np.testing.assert_array_equal(got_s.tokens, want_s.tokens)
  np.testing.assert_allclose(got_s.logprobs, want_s.logprobs, atol=1e-4)
  if name == "mla_moe":
    np.testing.assert_array_equal(got.experts, want.experts)
    np.testing.assert_array_equal(got.prompt_experts, want.prompt_experts)
  assert len({tuple(r) for r in got.tokens}) == 3
  print(name, "sharded == single device")

# AMBIENT RULES: a run's rules set with use_rules reach the sampler (batch over "data" only: 2 shards)
with jax.set_mesh(mesh), sharding.use_rules({"act_batch": "data"}):
  (B, Pb, N), args = sampling.device_inputs(PROMPTS, max_new_tokens=T)
  out = sampling.compiled(graphdef, B, Pb, N, 0.0, 0, 1.0)(state, *args)
assert B == 4 and out[0].sharding.spec[0] == "data", (B, out[0].sharding)
np.testing.assert_array_equal(np.asarray(out[0])[:3, :T], want.tokens)
print("ambient rules reach the sampler")
"""


def test_sharded_generate_matches_single_device():
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
  }
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  assert proc.stdout.count("sharded == single device") == 2, proc.stdout
  assert "ambient rules reach the sampler" in proc.stdout, proc.stdout
