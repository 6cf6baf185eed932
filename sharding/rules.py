"""Logical axis names -> mesh axes: the one rules table, and the helpers that shard and constrain by it.

Parameters carry logical names in their `axes` metadata (models/); this module turns them into
PartitionSpecs for a mesh with axes ("data", "fsdp", "expert", "tensor"). `rules` arguments take
overrides (e.g. the run config's `mesh.rules`) merged over DEFAULT_RULES; None means the defaults.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import math
from collections.abc import Mapping

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
  # PARAMETERS: FSDP shards the model dimension, tensor parallelism the "wide" ones, experts go to "expert".
  # Outside MoE layers the expert axis is more FSDP (as MaxText); in expert weights "expert" has taken it.
  "embed": ("fsdp", "expert"),
  "vocab": "tensor",
  "heads": "tensor",
  "kv_heads": "tensor",
  "mlp": "tensor",
  "moe_mlp": "tensor",
  "expert": "expert",
  # MLA's latent ranks are the input dim of q_b / kv_b, which have no "embed": FSDP shards them there
  # (else 6.5 GiB of V3-671B is replicated). In q_a / kv_a "embed" comes first and keeps "fsdp".
  "q_lora": ("fsdp", "expert"),
  "kv_lora": ("fsdp", "expert"),
  "head_dim": None,
  "norm": None,
  # ACTIVATIONS: the batch is split over every axis that holds whole tokens. Outside MoE layers the
  # expert axis is just more data parallelism; inside them XLA regroups tokens to their experts.
  # An activation's "embed" dim then loses its mesh axes to the batch (each is used once per spec).
  "batch": ("data", "fsdp", "expert"),
  "seq": None,
}


_ACTIVE: contextvars.ContextVar[Mapping | None] = contextvars.ContextVar("rl_jax_sharding_rules", default=None)


@contextlib.contextmanager
def use_rules(rules: Mapping | None):
  """Sets the rules overrides for everything inside, like `jax.set_mesh` sets the mesh: every spec built
  without an explicit `rules=` argument (parameters, activations, the MoE shard_map) reads them.
  Read at trace time: a function jitted inside one `use_rules` keeps those rules in its compiled form."""
  token = _ACTIVE.set(resolve_rules(rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def current_rules() -> dict[str, tuple[str, ...]]:
  """The rules set by the innermost `use_rules`, else DEFAULT_RULES (resolved)."""
  active = _ACTIVE.get()
  return resolve_rules(active) if active is None else active


def resolve_rules(rules: Mapping | None = None) -> dict[str, tuple[str, ...]]:
  """DEFAULT_RULES updated by `rules`, each value normalised to a tuple of mesh axis names (idempotent)."""
  table = {**DEFAULT_RULES, **(rules or {})}
  out = {}
  for name, target in table.items():
    target = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    if not all(isinstance(a, str) for a in target):
      raise ValueError(f"sharding rule '{name}' must map to a mesh axis name, a list of them or null, got {target!r}")
    out[name] = target
  return out


def _mesh_sizes(mesh) -> dict[str, int]:
  """Axis sizes of a Mesh / AbstractMesh; axes already manual (inside shard_map) count as size 1."""
  if mesh is None:
    return {}
  manual = set(getattr(mesh, "manual_axes", ()) or ())
  return {a: (1 if a in manual else s) for a, s in mesh.shape.items()}


def logical_to_spec(axes, rules: Mapping | None = None, mesh=None, shape=None) -> PartitionSpec:
  """PartitionSpec for logical `axes` (None entries = replicated) under `rules` on `mesh`.

  A mesh axis already used by an earlier dim is dropped, as are size-1 axes. With `shape`, a dim whose
  size is not divisible by its mesh axes keeps the longest prefix of them that divides (often none:
  replicated), so tiny models run on big meshes."""
  table = resolve_rules(rules)
  sizes = _mesh_sizes(mesh)
  used, spec = set(), []
  for i, name in enumerate(axes):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      close = difflib.get_close_matches(str(name), table, n=1)
      hint = f"; did you mean '{close[0]}'?" if close else f"; known: {sorted(table)}"
      raise ValueError(f"no sharding rule for logical axis '{name}'{hint}")
    for a in table[name]:
      if mesh is not None and a not in sizes:
        raise ValueError(f"sharding rule '{name}' -> '{a}': the mesh has no axis '{a}' (axes: {list(sizes)})")
    mesh_axes = [a for a in table[name] if a not in used and (mesh is None or sizes[a] > 1)]
    if shape is not None:
      while mesh_axes and shape[i] % math.prod(sizes[a] for a in mesh_axes):
        mesh_axes.pop()
    used.update(mesh_axes)
    spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
  return PartitionSpec(*spec)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def param_shardings(abstract_state, mesh, rules: Mapping | None = None):
  """NamedSharding per Variable of an nnx.State (abstract or concrete), from its `axes` metadata.

  The result has the state's tree structure with each Variable replaced by its NamedSharding (a valid
  prefix for jit out_shardings and jax.device_put). Variables without `axes` are replicated."""
  table = resolve_rules(rules)

  def one(path, leaf):
    value = leaf.get_value() if _is_var(leaf) else leaf
    axes = leaf.get_metadata().get("axes") if _is_var(leaf) else None
    shape = tuple(getattr(value, "shape", ()))
    if axes is None:
      return NamedSharding(mesh, PartitionSpec())
    if len(axes) != len(shape):
      raise ValueError(f"{jax.tree_util.keystr(path)}: axes {tuple(axes)} do not match shape {shape}")
    return NamedSharding(mesh, logical_to_spec(axes, table, mesh, shape))

  return jax.tree_util.tree_map_with_path(one, abstract_state, is_leaf=_is_var)


def create_sharded(init_fn, mesh, rules: Mapping | None = None):
  """The module `init_fn()` builds, born sharded: no parameter is ever materialised whole on one device."""
  abstract = nnx.eval_shape(init_fn)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = param_shardings(abstract_state, mesh, rules)
  state = jax.jit(lambda: nnx.split(init_fn())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def shard_state(state, mesh, rules: Mapping | None = None):
  """Place an existing state (e.g. a loaded checkpoint) on `mesh` by its parameters' logical axes."""
  return jax.device_put(state, param_shardings(state, mesh, rules))


def constrain(x, logical_axes, rules: Mapping | None = None):
  """with_sharding_constraint by logical names (e.g. ("batch", "seq", "embed")) under `jax.set_mesh(mesh)`;
  a no-op when no mesh is set (single device, or callers that shard only through jit in/out shardings)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules, mesh, x.shape))


def shard_count(logical_name: str, rules: Mapping | None = None, mesh=None) -> int:
  """How many ways the active (or given) mesh splits a logical axis: 1 with no mesh."""
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return 1
  sizes = _mesh_sizes(mesh)
  return math.prod(sizes.get(a, 1) for a in resolve_rules(rules).get(logical_name, ()) or ())
