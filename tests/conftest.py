"""Every test runs on the CPU backend, whether or not libtpu (the test extra's TPU compiler) is installed: with
it, jax would first try to start a TPU runtime on this host. The AOT tests compile for TPU targets explicitly
(jax.experimental.topologies), which needs no TPU backend. Set before any test module imports jax; child
processes inherit both."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
