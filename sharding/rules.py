"""Logical axis names -> mesh axes: the one rules table, and the helpers that shard and constrain by it.

Parameters carry logical names in their `axes` metadata (models/); activations have their own names
(`act_*`), used by `constrain` at layer boundaries. This module turns them into PartitionSpecs for a mesh
with axes ("data", "fsdp", "expert", "tensor") and optionally "sequence" (OPTIONAL_AXES: a rule naming it does
not split over it on meshes without it). The rules in force are set once, like the mesh, with
`use_rules(overrides)` (e.g. the run config's `mesh.rules`, merged over DEFAULT_RULES); every helper's
`rules=None` means those ambient rules (DEFAULT_RULES outside any `use_rules`), and an explicit `rules`
mapping means DEFAULT_RULES updated by it.
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
  # The sequence axis is more FSDP too (as MaxText): it splits the activations' T, and without it here the
  # whole state would be held `sequence` times over (671B GRPO on v5p-256: 159 GiB a chip, against 40 with it).
  "embed": ("fsdp", "expert", "sequence"),
  "vocab": "tensor",
  "heads": "tensor",
  "kv_heads": "tensor",
  "mlp": "tensor",
  "moe_mlp": "tensor",
  "expert": "expert",
  # MLA's latent ranks are the input dim of q_b / kv_b, which have no "embed": FSDP shards them there
  # (else 6.5 GiB of V3-671B is replicated). In q_a / kv_a "embed" comes first and keeps "fsdp".
  "q_lora": ("fsdp", "expert", "sequence"),
  "kv_lora": ("fsdp", "expert", "sequence"),
  "head_dim": None,
  "norm": None,
  # The stacked-layers axis of a scanned layer group (models/transformer.py): never split, so each scan
  # iteration reads its own layer's full shards; splitting it would gather a layer per step.
  "layers": None,
  # ACTIVATIONS: the batch is split over every axis that holds whole tokens. Outside MoE layers the
  # expert axis is just more data parallelism; inside them the expert-parallel dispatch sends tokens to
  # their experts by all-to-all. The residual stream's model dim stays whole on each device (as in
  # Megatron tensor parallelism); heads, MLP hidden units and logits follow their weights over "tensor".
  "act_batch": ("data", "fsdp", "expert"),
  # Sequence parallelism: the "sequence" axis (only in meshes built with sequence > 1) splits every
  # activation's T; attention exchanges keys/values across it (models/attention.py).
  "act_seq": "sequence",
  "act_embed": None,
  "act_heads": "tensor",
  "act_kv_heads": "tensor",
  "act_mlp": "tensor",
  "act_vocab": "tensor",
}


# Mesh axes a rule may name although a mesh lacks them (then that dim is not split over them).
OPTIONAL_AXES = ("sequence",)

_ACTIVE: contextvars.ContextVar[Mapping | None] = contextvars.ContextVar("rl_jax_sharding_rules", default=None)


@contextlib.contextmanager
def use_rules(rules: Mapping | None):
  """Sets the rules overrides for everything inside, like `jax.set_mesh` sets the mesh: every spec built
  without an explicit `rules=` argument (parameters, activations, the MoE shard_map) reads them.
  Read at trace time, and unlike the mesh not part of jit's cache key: jax reuses the trace of a function
  it has already traced for the same argument types, whatever rules are set now, so jit a fresh function
  (e.g. a closure built per run or per rules table) for each rules table."""
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
  """DEFAULT_RULES updated by `rules`, each value normalised to a tuple of mesh axis names (idempotent).
  A name DEFAULT_RULES lacks is an error: no code reads it, so the override would silently do nothing."""
  for name in rules or {}:
    if name not in DEFAULT_RULES:
      close = difflib.get_close_matches(str(name), DEFAULT_RULES, n=1)
      hint = f"did you mean '{close[0]}'?" if close else f"known: {sorted(DEFAULT_RULES)}"
      raise ValueError(f"sharding rules: unknown logical axis '{name}' ({hint})")
  table = {**DEFAULT_RULES, **(rules or {})}
  out = {}
  for name, target in table.items():
    target = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    if not all(isinstance(a, str) for a in target):
      raise ValueError(f"sharding rule '{name}' must map to a mesh axis name, a list of them or null, got {target!r}")
    out[name] = target
  return out


def _table(rules: Mapping | None) -> dict[str, tuple[str, ...]]:
  """The ambient rules for None, else DEFAULT_RULES updated by `rules`."""
  return current_rules() if rules is None else resolve_rules(rules)


def _mesh_sizes(mesh) -> dict[str, int]:
  """Axis sizes of a Mesh / AbstractMesh; axes already manual (inside shard_map) count as size 1."""
  if mesh is None:
    return {}
  manual = set(getattr(mesh, "manual_axes", ()) or ())
  return {a: (1 if a in manual else s) for a, s in mesh.shape.items()}


def _lookup(name, table, sizes, has_mesh: bool) -> tuple[str, ...]:
  if name not in table:
    close = difflib.get_close_matches(str(name), table, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known: {sorted(table)}"
    raise ValueError(f"no sharding rule for logical axis '{name}'{hint}")
  for a in table[name]:
    if has_mesh and a not in sizes and a not in OPTIONAL_AXES:
      raise ValueError(f"sharding rule '{name}' -> '{a}': the mesh has no axis '{a}' (axes: {list(sizes)})")
  return tuple(a for a in table[name] if not has_mesh or a in sizes)  # an absent optional axis: size 1


def _dim_axes(names, table, mesh, used=(), size=None) -> list[str]:
  """Mesh axes of one dim named by a logical name (or a tuple of them, merged in order): axes already
  `used`, repeated or of size 1 are dropped, then trailing ones until the product divides `size`."""
  sizes = _mesh_sizes(mesh)
  axes = []
  for name in (names,) if isinstance(names, str) else names:
    for a in _lookup(name, table, sizes, mesh is not None):
      if a not in used and a not in axes and (mesh is None or sizes[a] > 1):
        axes.append(a)
  if size is not None and mesh is not None:
    while axes and size % math.prod(sizes[a] for a in axes):
      axes.pop()
  return axes


def logical_to_spec(axes, rules: Mapping | None = None, mesh=None, shape=None) -> PartitionSpec:
  """PartitionSpec for logical `axes` (None entries = replicated; a tuple of names = one dim split over
  all their mesh axes, e.g. flattened batch x seq) under `rules` on `mesh`.

  A mesh axis already used by an earlier dim is dropped, as are size-1 axes. With `shape`, a dim whose
  size is not divisible by its mesh axes keeps the longest prefix of them that divides (often none:
  replicated), so tiny models run on big meshes."""
  table = _table(rules)
  used, spec = set(), []
  for i, names in enumerate(axes):
    dim = [] if names is None else _dim_axes(names, table, mesh, used, None if shape is None else shape[i])
    used.update(dim)
    spec.append(None if not dim else dim[0] if len(dim) == 1 else tuple(dim))
  return PartitionSpec(*spec)


def mesh_axes(names, rules: Mapping | None = None, mesh=None, size: int | None = None) -> tuple[str, ...]:
  """The mesh axes of the active (or given) mesh that split a dim named `names` (a logical name or a tuple
  of them, merged), of `size` if given; () with no mesh. Axes that are manual (inside shard_map) do not."""
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return ()
  return tuple(_dim_axes(names, _table(rules), mesh, size=size))


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def param_shardings(abstract_state, mesh, rules: Mapping | None = None):
  """NamedSharding per Variable of an nnx.State (abstract or concrete), from its `axes` metadata.

  The result has the state's tree structure with each Variable replaced by its NamedSharding (a valid
  prefix for jit out_shardings and jax.device_put). Variables without `axes` are replicated."""
  table = _table(rules)

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
  """with_sharding_constraint by logical names (e.g. ("act_batch", "act_seq", "act_embed")) under
  `jax.set_mesh(mesh)`; a no-op when no mesh is set (single device, or callers that shard only through jit
  in/out shardings)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules, mesh, x.shape))


def shard_count(logical_name: str, rules: Mapping | None = None, mesh=None) -> int:
  """How many ways the active (or given) mesh splits a logical axis: 1 with no mesh."""
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  sizes = _mesh_sizes(mesh)
  return math.prod(sizes[a] for a in mesh_axes(logical_name, rules, mesh))
