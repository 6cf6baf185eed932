"""TPU targets for ahead-of-time compilation on a CPU-only host: a name like "v5p:4x4x4" or "v5p-128" becomes
libtpu's compile-only devices, the per-device chip figures a planner needs, and meshes that map onto the torus.

    aot_environment()                       # before jax starts a backend
    t = target("v5p-128", slices=2)         # 128 compile-only devices, t.chip: per-device HBM / FLOP/s
    mesh = make_mesh(t, fsdp=16, expert=4)  # data=2 (the slices), laid on whole torus axes
    jax.jit(step, ...).lower(...).compile().memory_analysis()
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import itertools
import math
import os
import re

from .mesh import AXES, SEQUENCE, mesh_shape


@dataclasses.dataclass(frozen=True)
class Chip:
  """What one jax device gets: a chip's figures divided by devices_per_chip (the 2 TensorCores of a tpu7x chip, or
  of a v4 chip in libtpu's compile-only topologies, are 2 devices; v5p's megacore is 1). ici_bandwidth is the
  bidirectional inter-chip interconnect bandwidth of the chip, all its links together, as Google lists it."""

  name: str
  hbm_bytes: int
  peak_bf16_flops: float  # FLOP/s, dense
  hbm_bandwidth: float  # bytes/s
  ici_bandwidth: float  # bytes/s, bidirectional, all links
  devices_per_chip: int = 1


def _chip(name: str, hbm_gib: float, bf16_tflops: float, hbm_gbps: float, ici_gbps: float, devices: int = 1) -> Chip:
  """A chip's figures split over its devices, but for `hbm_gib`, already a device's."""
  return Chip(name, int(hbm_gib * 2**30), bf16_tflops * 1e12 / devices, hbm_gbps * 1e9 / devices,
              ici_gbps * 1e9 / devices, devices)  # fmt: skip


# Per chip: bf16 TFLOP/s, HBM GB/s, bidirectional ICI GB/s, jax devices. Sources: cloud.google.com/tpu/docs/ v4, v5e,
# v5p, v6e and tpu7x (2307 bf16 / 4614 FP8 TFLOP/s, 7380 GB/s). v4's ICI is not on its page: 6 links x 400 Gb/s each
# way (TPU v4 paper, ISCA 2023). libtpu's compile-only v4 has no megacore: a device per TensorCore.
# HBM per DEVICE as libtpu 0.0.42 reports it available to a program (its out-of-memory message; the chips' nominal
# 16 / 16 / 95 / 32 / 192 GiB less the runtime's reserve, tpu7x and v4 per TensorCore): what a plan must fit in.
CHIPS: dict[str, Chip] = {
  "v4": _chip("v4", 15.25, 275, 1200, 600, devices=2),
  "v5e": _chip("v5e", 15.75, 197, 819, 400),
  "v5p": _chip("v5p", 95.74, 459, 2765, 1200),
  "v6e": _chip("v6e", 31.25, 918, 1640, 800),
  "tpu7x": _chip("tpu7x", 94.75, 2307, 7380, 1200, devices=2),
}
# family: (torus dims, whether slice names count TensorCores rather than chips, jax device_kind strings)
_FAMILIES = {
  "v4": (3, True, ("TPU v4",)),
  "v5e": (2, False, ("TPU v5 lite", "TPU v5e")),
  "v5p": (3, True, ("TPU v5", "TPU v5p")),
  "v6e": (2, False, ("TPU v6 lite", "TPU v6e")),
  "tpu7x": (3, True, ("TPU7x",)),
}
_ALIASES = {"v5litepod": "v5e"}
_STANDARD = {  # chips -> the standard slice shape
  2: {math.prod(s): s for s in ((1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16))},
  3: {
    math.prod(s): s
    for s in ((2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8), (4, 8, 8), (8, 8, 8), (8, 8, 16))
    + ((8, 16, 16), (16, 16, 16), (16, 16, 24))
  },
}
_NAME = re.compile(r"([a-z][a-z0-9]*)(?::(\d+(?:x\d+){1,2})|-(\d+))")
_EXAMPLES = "e.g. v5p:4x4x4, v5p-128, v6e:4x4, v6e-16, v5litepod-16, v4-32, tpu7x:2x2x1"


def parse(name: str) -> tuple[str, tuple[int, ...]]:
  """(family, torus dims) of "v5p:4x4x4" or of a Cloud TPU slice name: v4-N, v5p-N and tpu7x-N count TensorCores
  (2 a chip), v5e-N / v5litepod-N / v6e-N count chips; a slice gets its standard shape."""
  m = _NAME.fullmatch(str(name).strip().lower())
  family = m and _ALIASES.get(m[1], m[1])
  if not m or family not in _FAMILIES:
    raise ValueError(f"unknown TPU target {name!r}: use family:topology or a slice name, {_EXAMPLES}")
  ndim, counts_cores, _ = _FAMILIES[family]
  if m[2]:
    dims = tuple(int(d) for d in m[2].split("x"))
    if 0 in dims:
      raise ValueError(f"TPU target {name!r} has a zero dimension; {_EXAMPLES}")
    return family, dims
  count = int(m[3])
  per_chip = 2 if counts_cores else 1
  dims = _STANDARD[ndim].get(count // per_chip) if count % per_chip == 0 else None
  if dims is None:
    sizes = ", ".join(f"{m[1]}-{chips * per_chip}" for chips in _STANDARD[ndim])
    raise ValueError(f"{name!r} is not a standard {family} slice ({sizes}); give other shapes as {family}:AxBxC")
  return family, dims


@dataclasses.dataclass(frozen=True)
class Target:
  """Compile-only devices of `slices` copies of one TPU slice, and what each device is."""

  name: str  # as given
  topology: str  # canonical, e.g. "v5p:4x4x4"
  family: str
  chip: Chip
  dims: tuple[int, ...]
  slices: int
  devices: tuple = dataclasses.field(repr=False, compare=False)

  @property
  def torus(self) -> tuple[int, ...]:
    """The physical axes of one slice a mesh axis can take whole: dims > 1, then the 2 cores of a chip."""
    cores = self.chip.devices_per_chip
    return tuple(d for d in self.dims if d > 1) + ((cores,) if cores > 1 else ())


def _libtpu_version() -> str:
  try:
    return f"libtpu {importlib.metadata.version('libtpu')}"
  except importlib.metadata.PackageNotFoundError:
    return "libtpu (version unknown)"


@contextlib.contextmanager
def _quiet_libtpu(accelerator: str):
  """When jax first loads libtpu on a host that is not a TPU VM, libtpu's C++ side writes warnings straight to fd 2
  (no Python warnings or logging) about the unknown accelerator type and worker hostnames. A one-host slice's
  values, set only where unset and only during the call, silence them; the compiled programs are byte-identical
  either way, and real errors still raise."""
  quiet = {"TPU_ACCELERATOR_TYPE": accelerator, "TPU_WORKER_HOSTNAMES": "localhost"}
  added = [k for k in quiet if k not in os.environ]
  os.environ.update({k: quiet[k] for k in added})
  try:
    yield
  finally:
    for k in added:
      os.environ.pop(k, None)


def target(name: str, slices: int = 1) -> Target:
  """libtpu's compile-only devices for `name` (see parse) times `slices` (multi-slice over DCN); a one-line
  ValueError when libtpu is missing or cannot build it."""
  family, dims = parse(name)
  if not isinstance(slices, int) or slices < 1:
    raise ValueError(f"slices must be a positive int, got {slices!r}")
  topology = f"{family}:{'x'.join(map(str, dims))}"
  chip = CHIPS[family]
  if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
    raise ValueError(f"compiling for {topology} needs libtpu: pip install 'rl-jax[tpu]' (Linux x86_64)")
  # libtpu takes a host-wide lock (/tmp/libtpu_lockfile) when it loads, for the chips it would drive; compiling
  # touches no chip, so two processes may compile at once (a plan beside the test suite)
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  kwargs = {"num_slices": slices} if slices > 1 else {}
  if min(dims[:2]) == 1:  # libtpu's default host is 2x2 chips; a smaller slice is its own host
    kwargs["chips_per_host_bounds"] = [*dims, 1, 1][:3]
  cores = 2 if _FAMILIES[family][1] else 1
  where = topology + (f" x {slices} slices" if slices > 1 else "")
  prefix = "v5litepod" if family == "v5e" else family
  try:
    with _quiet_libtpu(f"{prefix}-{math.prod(dims) * cores}"):
      devices = tuple(topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs).devices)
  except (RuntimeError, ValueError, NotImplementedError) as e:
    msg = " ".join(str(e).split()).removeprefix("INVALID_ARGUMENT: ")
    if "not installed" in msg:
      raise ValueError(f"compiling for {topology} needs libtpu: pip install 'rl-jax[tpu]' (Linux x86_64)") from None
    if "external name" in msg:
      newer = "; tpu7x needs a newer jax/libtpu (jax 0.12 on Python 3.13)" if family == "tpu7x" else ""
      raise ValueError(f"{_libtpu_version()} does not know TPU family {family} ({msg}){newer}") from None
    raise ValueError(f"{_libtpu_version()} cannot build {where}: {msg}") from None
  expected = slices * math.prod(dims) * chip.devices_per_chip
  kinds = {d.device_kind for d in devices}
  if len(devices) != expected or not kinds <= set(_FAMILIES[family][2]):
    raise ValueError(
      f"{_libtpu_version()} built {len(devices)} devices of kind {sorted(kinds)} for {where};"
      f" expected {expected} ({chip.devices_per_chip} a chip) of kind {_FAMILIES[family][2][0]!r}"
    )
  return Target(str(name), topology, family, chip, dims, slices, devices)


def _sizes(torus: tuple[int, ...], owners: tuple[int, ...], n_axes: int) -> tuple[int, ...]:
  sizes = [1] * n_axes
  for size, axis in zip(torus, owners):
    sizes[axis] *= size
  return tuple(sizes)


def _assignment(torus: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...] | None:
  """Which mesh axis takes each torus axis so that the mesh has `shape`; None if no such assignment."""
  for owners in itertools.product(range(len(shape)), repeat=len(torus)):
    if _sizes(torus, owners, len(shape)) == tuple(shape):
      return owners
  return None


def mesh_shapes(target: Target, *, sequence: bool = True) -> list[dict[str, int]]:
  """Every mesh {data, fsdp, expert, tensor[, sequence]} whose axes each take whole torus axes of a slice (a
  2-device chip's cores count as one more axis of 2); the slices multiply `data` (DCN data parallelism, as
  MaxText's dcn_data_parallelism). Sorted, no duplicates."""
  names = AXES + ((SEQUENCE,) if sequence else ())
  torus = target.torus
  shapes = {_sizes(torus, owners, len(names)) for owners in itertools.product(range(len(names)), repeat=len(torus))}
  return [dict(zip(names, (s[0] * target.slices, *s[1:]))) for s in sorted(shapes)]


def _spec(names, shape) -> str:
  return " ".join(f"{k}={v}" for k, v in zip(names, shape) if v != 1) or "fsdp=1"


def _no_map(target: Target, names: tuple, shape: tuple, ici: tuple, rest: str | None) -> ValueError:
  """The one-line error for a shape that does not map: the axis at fault, and the nearest shapes that do."""
  torus = target.torus
  allowed = sorted({math.prod(c) for r in range(len(torus) + 1) for c in itertools.combinations(torus, r)})
  # blame an axis the caller set before the one that took the rest (-1)
  bad = sorted(((k, v) for k, v in zip(names, ici) if v not in allowed), key=lambda kv: kv[0] == rest)
  where = target.topology + (f" x {target.slices} slices" if target.slices > 1 else "")
  dims = "x".join(map(str, target.dims))
  if target.chip.devices_per_chip > 1:
    dims += f", {target.chip.devices_per_chip} devices a chip"
  per_slice = (
    f" (data={shape[0]} over {target.slices} slices leaves data={ici[0]} in each)" if target.slices > 1 else ""
  )
  why = (
    f"axis '{bad[0][0]}'={bad[0][1]} is not a product of whole torus axes ({', '.join(map(str, allowed))})"
    if bad
    else f"its axes cannot take whole torus axes ({', '.join(map(str, torus))}) together"
  )
  shapes = [tuple(s.values()) for s in mesh_shapes(target, sequence=len(names) > len(AXES))]
  near = sorted(shapes, key=lambda s: sum(abs(math.log2(a) - math.log2(b)) for a, b in zip(s, shape)))[:3]
  examples = ", ".join(_spec(names, s) for s in near)
  spec = _spec(names, shape)
  return ValueError(
    f"mesh {spec}{per_slice} does not map onto {where} (torus {dims}): {why}; shapes that map: {examples}"
  )


def _own_layout(target: Target, ici: tuple, owners: tuple):
  """Devices laid out by `owners` (mesh axis of each torus axis), slices stacked on data: for shapes jax's greedy
  torus search misses, and for libtpu's compile-only v4 (2 devices a chip, which jax's mesh_utils refuses)."""
  import numpy as np

  order = [i for axis in range(len(ici)) for i, o in enumerate(owners) if o == axis]
  grids = []
  for s in range(target.slices):
    devs = [d for d in target.devices if getattr(d, "slice_index", 0) == s]
    lo = [min(d.coords[i] for d in devs) for i in range(3)]
    phys = np.empty([*[*target.dims, 1][:3], target.chip.devices_per_chip], dtype=object)
    for d in devs:
      phys[(*(c - m for c, m in zip(d.coords, lo)), d.core_on_chip)] = d
    grids.append(phys.reshape(target.torus).transpose(order).reshape(ici))
  return np.concatenate(grids, axis=0)


def make_mesh(target: Target, data: int = 1, fsdp: int = -1, expert: int = 1, tensor: int = 1, sequence: int = 1):
  """A Mesh over the target's devices with sharding/mesh.py's axes (all Auto; "sequence" only when > 1) and the
  slices on "data". Shapes of mesh_shapes() always work (jax.make_mesh also splits v5e torus axes); any other is a
  one-line ValueError naming the axis at fault and shapes that map."""
  import jax
  from jax.experimental import mesh_utils
  from jax.sharding import AxisType, Mesh

  shape = mesh_shape(data, fsdp, expert, tensor, n_devices=len(target.devices), sequence=sequence)
  names = AXES + ((SEQUENCE,) if len(shape) > len(AXES) else ())
  types = (AxisType.Auto,) * len(names)
  if shape[0] % target.slices:
    raise ValueError(
      f"mesh data={shape[0]} must be a multiple of the {target.slices} slices of {target.topology}:"
      f" the slices (DCN) sit on the data axis"
    )
  ici = (shape[0] // target.slices, *shape[1:])
  owners = _assignment(target.torus, ici)
  try:
    if target.slices == 1:
      return jax.make_mesh(shape, names, axis_types=types, devices=list(target.devices))
    dcn = (target.slices,) + (1,) * (len(ici) - 1)
    return Mesh(mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=list(target.devices)), names, axis_types=types)
  except (NotImplementedError, AssertionError, ValueError):  # jax's search found no layout, or refuses 2-core v4
    if owners is None:
      rest = next((k for k, v in zip(AXES, (data, fsdp, expert, tensor)) if v == -1), None)
      raise _no_map(target, names, shape, ici, rest) from None
  return Mesh(_own_layout(target, ici, owners), names, axis_types=types)


def aot_environment() -> None:
  """Let jax compile for TPU targets on a CPU-only host without the user setting anything: the CPU backend (where
  JAX_PLATFORMS is unset) and no Cloud-TPU metadata-server query. jax reads JAX_PLATFORMS once, when it first
  starts a backend: call this before that (best before importing jax). The user's own settings win."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


__all__ = ["CHIPS", "Chip", "Target", "aot_environment", "make_mesh", "mesh_shapes", "parse", "target"]
