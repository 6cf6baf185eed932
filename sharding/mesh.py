"""Device meshes with axes ("data", "fsdp", "expert", "tensor"), and multi-host initialization."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "expert", "tensor")


def mesh_shape(data: int = 1, fsdp: int = -1, expert: int = 1, tensor: int = 1, *, n_devices: int) -> tuple:
  """Resolve the one -1 axis to the rest of the devices; a one-line ValueError naming the axis otherwise."""
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


def make_mesh(data: int = 1, fsdp: int = -1, expert: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A Mesh over `devices` (default: all) with axes ("data", "fsdp", "expert", "tensor"), all of type Auto."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(data, fsdp, expert, tensor, n_devices=len(devices))
  try:
    # Recent jax defaults to Explicit axes; we shard by constraints and out_shardings, so ask for Auto.
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
  except TypeError:  # older jax: no axis_types / devices keyword
    from jax.experimental import mesh_utils

    return Mesh(mesh_utils.create_device_mesh(shape, devices), AXES)


def mesh_from_config(mesh_cfg=None, devices=None) -> Mesh:
  """make_mesh from any object with data/fsdp/expert/tensor attributes (e.g. rl_jax.config.MeshConfig)."""
  if mesh_cfg is None:
    return make_mesh(devices=devices)
  return make_mesh(*(getattr(mesh_cfg, a) for a in AXES), devices=devices)


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


__all__ = ["AXES", "make_mesh", "mesh_from_config", "mesh_shape", "maybe_initialize_distributed"]


def active_mesh():
  """The concrete mesh set with `jax.set_mesh(...)`, or None."""
  get = getattr(jax.sharding, "get_mesh", None)
  mesh = get() if get is not None else None
  return None if mesh is None or mesh.empty else mesh
