"""Meshes and logical-axis sharding rules; knows parameter axis names, nothing of model specifics."""

from .mesh import AXES, make_mesh, maybe_initialize_distributed, mesh_from_config, mesh_shape
from .rules import (
  DEFAULT_RULES,
  constrain,
  create_sharded,
  logical_to_spec,
  param_shardings,
  resolve_rules,
  shard_state,
)

__all__ = [
  "AXES",
  "DEFAULT_RULES",
  "make_mesh",
  "mesh_from_config",
  "mesh_shape",
  "maybe_initialize_distributed",
  "resolve_rules",
  "logical_to_spec",
  "param_shardings",
  "create_sharded",
  "shard_state",
  "constrain",
]
