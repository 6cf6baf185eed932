"""Every test runs on the CPU backend, whether or not libtpu (the test extra's TPU compiler) is installed: with
it, jax would first try to start a TPU runtime on this host. The AOT tests compile for TPU targets explicitly
(jax.experimental.topologies), which needs no TPU backend. Set before any test module imports jax; child
processes inherit both."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

# The slowest files first (seconds of setup + calls on the 2-core VM, 2026-12-03): pytest-xdist hands whole files
# to its workers in collection order, so a slow file collected last leaves one worker running it alone.
SLOW_FIRST = (
  "test_preemption", "test_expert_parallel", "test_grpo", "test_grpo_two_process", "test_models", "test_r1_pipeline",
  "test_plan", "test_sampling_devices", "test_scan_layers", "test_train_two_process", "test_speculative",
  "test_grpo_run", "test_train", "test_quickstart", "test_longctx", "test_step", "test_sft", "test_sharding",
)  # fmt: skip


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: each file's own order is kept
