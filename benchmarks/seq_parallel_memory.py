"""Per-device memory of a training step's forward + backward vs the `sequence` mesh axis (not in CI).

One row of T tokens (the global batch is 1 long row, as in context extension) of the tiny V3 MoE (MLA + MoE +
MTP; or the dense GQA student) on simulated CPU devices, meshes sequence=n x expert=2 for the MoE (n = 1, 2,
4; its routed experts split, so the MoE runs on each device's own tokens) and sequence=n alone for the dense
model (n = 1, 2, 4, 8). Nothing runs: each step is
only compiled, and XLA's `compiled.memory_analysis()` reports per device the temporaries (activations,
gradients in flight, attention tiles), arguments (parameters, the row) and outputs. With sequence=1 the row
is not split along T, so each device holds the activations of all of it (the MoE's expert axis still splits
the flattened tokens inside MoE layers). A last line compiles the
sequence=1 step with the dense attention path forced (scores [B, H, T, T]) to show what blockwise saves.

  python benchmarks/seq_parallel_memory.py [--seq-len 8192] [--layers 3]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from rl_jax.models import attention as A  # noqa: E402
from rl_jax.models import build  # noqa: E402
from rl_jax.models.config import preset  # noqa: E402
from rl_jax.sharding import create_sharded, make_mesh  # noqa: E402

MIB = 2**20


def step_memory(cfg, T: int, sequence: int, other: str) -> dict:
  """memory_analysis() of the jitted loss-and-gradient step of one T-token row on sequence x `other`."""
  n_other = 2 if other == "expert" else 1
  devices = jax.devices()[: sequence * n_other]
  mesh = make_mesh(**{"fsdp": 1, other: n_other}, sequence=sequence, devices=devices)
  tokens = jax.ShapeDtypeStruct((1, T), jnp.int32)
  with jax.set_mesh(mesh):
    graphdef, state = nnx.split(create_sharded(lambda: build(cfg, seed=0), mesh))

    def loss(state, tokens):
      out = nnx.merge(graphdef, state).forward(tokens, mtp=cfg.num_nextn_predict_layers > 0)
      logp = jax.nn.log_softmax(out.logits_BTV)
      return -jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1).mean()

    compiled = jax.jit(jax.value_and_grad(loss)).lower(state, tokens).compile()
  m = compiled.memory_analysis()
  return {"temp": m.temp_size_in_bytes, "args": m.argument_size_in_bytes, "out": m.output_size_in_bytes}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seq-len", type=int, default=8192)
  ap.add_argument("--layers", type=int, default=3)
  ap.add_argument("--model", default="tiny-moe", help="a preset: tiny-moe (MLA + MoE) or tiny-dense (GQA)")
  ap.add_argument("--sequence", type=int, nargs="+", default=None, help="default 1 2 4 8 (MoE: 1 2 4)")
  # MoE: the experts over "expert" run token-local in a shard_map; the single-device dispatch (experts not
  # split) sorts all T*K assignments of the row at once, a per-device floor that no token split removes.
  ap.add_argument("--other", choices=["fsdp", "expert"], default=None, help="the second mesh axis (MoE: expert=2)")
  args = ap.parse_args(argv)
  T = args.seq_len
  cfg = preset(args.model, num_hidden_layers=args.layers, max_position_embeddings=T)
  assert jax.device_count() == 8, jax.devices()
  other = args.other or ("expert" if cfg.n_routed_experts else "fsdp")
  print(f"{args.model} ({args.layers} layers), one row of T={T} tokens, 8 simulated CPU devices")
  print(f"{'mesh':<24}{'temp MiB/device':>16}{'x seq=1':>9}{'args MiB':>10}{'out MiB':>9}")
  base = None
  for n in args.sequence or ([1, 2, 4] if other == "expert" else [1, 2, 4, 8]):
    m = step_memory(cfg, T, n, other)
    base = base or m["temp"]
    mesh = f"sequence={n} x {other}={2 if other == 'expert' else 1}"
    print(f"{mesh:<24}{m['temp'] / MIB:>16.1f}{m['temp'] / base:>9.3f}{m['args'] / MIB:>10.2f}{m['out'] / MIB:>9.2f}")
    sys.stdout.flush()
  A.BLOCKWISE_MIN_T = 10**9  # the dense path: full [B, H, T, T] scores (read at trace time)
  m = step_memory(cfg, T, 1, other)
  label = "sequence=1, dense attn"
  print(f"{label:<24}{m['temp'] / MIB:>16.1f}{m['temp'] / base:>9.3f}{m['args'] / MIB:>10.2f}{m['out'] / MIB:>9.2f}")


if __name__ == "__main__":
  main()
