"""Fresh Python processes for the training tests: own device count, fast CPU compiles, a shared jit cache.

A pytest session may already hold a jax backend (or another test module's device-count flag), so tests
that need a device count or compile whole train steps run in a child process set up here:
  - `--xla_force_host_platform_device_count=N` fake CPU devices,
  - `--xla_backend_optimization_level=0`: XLA:CPU compiles the tiny train steps ~3x faster,
  - a persistent compilation cache shared by the children (and by later sessions), so the same
    program (e.g. the step of a resumed run) compiles once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JIT_CACHE = os.environ.get(
  "RL_JAX_TEST_JIT_CACHE", os.path.join(tempfile.gettempdir(), f"rl_jax_test_jit_cache_{os.getuid()}")
)


def child_env(n_devices: int = 1) -> dict:
  env = {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={n_devices} --xla_backend_optimization_level=0",
    "JAX_PLATFORMS": "cpu",
    "JAX_COMPILATION_CACHE_DIR": JIT_CACHE,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
  }
  return env


def run_python(args: list[str], *, n_devices: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
  """`python ARGS` in the repo root; asserts success and shows the child's output tail otherwise."""
  proc = subprocess.run(
    [sys.executable, *args], cwd=REPO, env=child_env(n_devices), capture_output=True, text=True, timeout=timeout
  )
  assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
  return proc
