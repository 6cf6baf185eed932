"""Parameter trees in the layout before scanned layers (one subtree per decoder layer under "layers": {i: ...})
and in today's (one subtree per layer group, every leaf stacked on a leading layers axis): checkpoints written
before the change restore by asking Orbax for the old layout, then stacking.

Both functions walk any pytree (pure dicts, nnx.State, optax states holding them) and rewrite every mapping
that holds the layer groups (or "layers"), so the parameters, the optimizer moments and a reference model all
convert the same way."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

LEGACY = "layers"
GROUPS = ("dense_layers", "moe_layers")  # in stack order (ModelConfig.layer_groups)
Groups = list[tuple[str, range]]


def groups_of(params: Mapping) -> Groups:
  """The layer groups of a parameter tree in today's layout: (name, the layer indices it stacks), in order."""
  out, start = [], 0
  for g in GROUPS:
    if g in params:
      n = jax.tree.leaves(params[g])[0].shape[0]
      out.append((g, range(start, start + n)))
      start += n
  return out


def _rebuild(node: Mapping, items: dict):
  """A mapping of `node`'s type (dict, nnx.State) holding `items`."""
  return dict(items) if isinstance(node, dict) else type(node)(items)


def unstack(tree, groups: Groups, take: Callable):
  """Today's layout -> the old one: group g's leaves become layers idx[j] = take(leaf, j) (`take` slices an array
  or describes the slice of an abstract target)."""
  is_node = lambda x: isinstance(x, Mapping) and any(g in x for g, _ in groups)

  def convert(node):
    if not is_node(node):
      return node
    items = {k: v for k, v in node.items() if k not in dict(groups)}
    layers = {}
    for g, idx in groups:
      for j, i in enumerate(idx):
        layers[i] = jax.tree.map(lambda a, j=j: take(a, j), node[g])
    items[LEGACY] = _rebuild(node[groups[0][0]], layers)
    return _rebuild(node, items)

  return jax.tree.map(convert, tree, is_leaf=is_node)


def stack(tree, groups: Groups):
  """The old layout -> today's: layers idx of group g stacked on a new leading axis."""
  is_node = lambda x: isinstance(x, Mapping) and LEGACY in x

  def convert(node):
    if not is_node(node):
      return node
    layers = {int(k): v for k, v in node[LEGACY].items()}
    items = {k: v for k, v in node.items() if k != LEGACY}
    for g, idx in groups:
      items[g] = jax.tree.map(lambda *a: jnp.stack(a), *[layers[i] for i in idx])
    return _rebuild(node, items)

  return jax.tree.map(convert, tree, is_leaf=is_node)


def is_legacy(keys) -> bool:
  """Whether a saved parameter tree's top-level keys are the old layout's."""
  return LEGACY in set(keys)
