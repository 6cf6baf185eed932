"""Meshes and logical-axis sharding rules; knows logical axis names, nothing of model specifics."""

from .mesh import AXES, SEQUENCE, make_mesh, maybe_initialize_distributed, mesh_from_config, mesh_shape
from .rules import (
  DEFAULT_RULES,
  constrain,
  create_sharded,
  current_rules,
  logical_to_spec,
  mesh_axes,
  param_shardings,
  resolve_rules,
  shard_count,
  shard_state,
  use_rules,
)

__all__ = [
  "AXES",
  "SEQUENCE",
  "DEFAULT_RULES",
  "make_mesh",
  "mesh_from_config",
  "mesh_shape",
  "maybe_initialize_distributed",
  "use_rules",
  "current_rules",
  "resolve_rules",
  "logical_to_spec",
  "mesh_axes",
  "shard_count",
  "param_shardings",
  "create_sharded",
  "shard_state",
  "constrain",
]
