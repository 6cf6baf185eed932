"""Device meshes with axes ("data", "fsdp", "expert", "tensor"[, "sequence"]), and multi-host initialization.

The "sequence" axis (sequence parallelism: training rows split along T) exists only when its size is > 1, so
meshes without it keep their four axes; rules naming it (DEFAULT_RULES' "act_seq") skip it where it is absent."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "expert", "tensor")
SEQUENCE = "sequence"  # the optional last axis: fastest-varying, so its all-gathers stay between neighbours


def _check_sequence(sequence) -> None:
  if not isinstance(sequence, (int, np.integer)) or sequence < 1:
    raise ValueError(f"mesh axis 'sequence' must be a positive int, got {sequence!r}")


def mesh_shape(
  data: int = 1, fsdp: int = -1, expert: int = 1, tensor: int = 1, *, n_devices: int, sequence: int = 1
) -> tuple:
  """Resolve the one -1 axis to the rest of the devices; a one-line ValueError naming the axis otherwise.
  The shape of AXES, plus a fifth entry for "sequence" when sequence > 1."""
  _check_sequence(sequence)
  if n_devices % sequence:
    raise ValueError(f"mesh axis 'sequence'={sequence} does not divide the {n_devices} devices")
  if sequence > 1:
    return (*mesh_shape(data, fsdp, expert, tensor, n_devices=n_devices // sequence), sequence)
  sizes = dict(zip(AXES, (data, fsdp, expert, tensor)))
  for name, size in sizes.items():
    if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
      raise ValueError(f"mesh axis '{name}' must be a positive int or -1 (the rest), got {size!r}")
  rest = [name for name, size in sizes.items() if size == -1]
  if len(rest) > 1:
    raise ValueError(f"mesh axes {rest} are all -1; at most one mesh axis may be -1")
  fixed = 1
  for name, size in sizes.items():
    if size == -1:
      continue
    if n_devices % (fixed * size):
      taken = f" after {fixed} taken by the axes before it" if fixed > 1 else ""
      raise ValueError(f"mesh axis '{name}'={size} does not divide the {n_devices} devices{taken}")
    fixed *= size
  if rest:
    sizes[rest[0]] = n_devices // fixed
  elif fixed != n_devices:
    spec = " x ".join(f"{k}={v}" for k, v in sizes.items())
    raise ValueError(f"mesh {spec} uses {fixed} of the {n_devices} devices; set one axis to -1 to absorb the rest")
  return tuple(sizes[a] for a in AXES)


def make_mesh(
  data: int = 1, fsdp: int = -1, expert: int = 1, tensor: int = 1, devices=None, *, sequence: int = 1
) -> Mesh:
  """A Mesh over `devices` (default: all) with axes ("data", "fsdp", "expert", "tensor") and, when
  sequence > 1, "sequence" (the -1 axis takes the devices "sequence" leaves), all of type Auto."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(data, fsdp, expert, tensor, n_devices=len(devices), sequence=sequence)
  names = AXES + ((SEQUENCE,) if len(shape) > len(AXES) else ())
  try:
    # Recent jax defaults to Explicit axes; we shard by constraints and out_shardings, so ask for Auto.
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)
  except TypeError:  # older jax: no axis_types / devices keyword
    from jax.experimental import mesh_utils

    return Mesh(mesh_utils.create_device_mesh(shape, devices), names)


def mesh_from_config(mesh_cfg=None, devices=None) -> Mesh:
  """make_mesh from any object with data/fsdp/expert/tensor (and optionally sequence) attributes (e.g.
  rl_jax.config.MeshConfig)."""
  if mesh_cfg is None:
    return make_mesh(devices=devices)
  return make_mesh(*(getattr(mesh_cfg, a) for a in AXES), devices=devices, sequence=getattr(mesh_cfg, SEQUENCE, 1))


def _multi_host_tpu() -> bool:
  """Cloud TPU VM slice with several hosts (or a multi-slice job), judged from the environment alone."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts.strip(",") or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def maybe_initialize_distributed(mesh_cfg=None) -> bool:
  """jax.distributed.initialize when configured or on a multi-host TPU VM; True if running multi-process.

  Call before anything touches jax devices. `mesh_cfg.distributed`: True = initialize (jax autodetects
  the cluster unless coordinator_address/num_processes/process_id are given), False = never,
  None = only with a coordinator_address or on a multi-host Cloud TPU VM. Safe to call twice."""
  if jax.distributed.is_initialized():
    return True
  distributed = getattr(mesh_cfg, "distributed", None)
  coordinator = getattr(mesh_cfg, "coordinator_address", None)
  if distributed is False:
    return False
  if distributed or coordinator:
    kwargs = {
      "coordinator_address": coordinator,
      "num_processes": getattr(mesh_cfg, "num_processes", None),
      "process_id": getattr(mesh_cfg, "process_id", None),
    }
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
    return True
  if _multi_host_tpu():
    jax.distributed.initialize()
    return True
  return False


__all__ = [
  "AXES",
  "SEQUENCE",
  "make_mesh",
  "mesh_from_config",
  "mesh_shape",
  "maybe_initialize_distributed",
  "target_platform",
]


def target_platform() -> str:
  """The platform the program being traced will run on: that of the mesh set with `jax.set_mesh` (compile-only TPU
  devices when `rl-jax plan` compiles for a TPU on a CPU host), else jax's default backend. Code that picks a
  kernel by platform asks this, never jax.default_backend(), so what is compiled for a target is what runs there."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def active_mesh():
  """The concrete mesh set with `jax.set_mesh(...)`, or None."""
  get = getattr(jax.sharding, "get_mesh", None)
  mesh = get() if get is not None else None
  return None if mesh is None or mesh.empty else mesh
