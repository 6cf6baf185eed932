"""Expert parallelism: routed experts split over the "expert" mesh axis, tokens exchanged by all-to-all.

Under `jax.set_mesh(mesh)` with an "expert" axis of size n > 1, `models.moe.MoE` calls `moe_ffn_routed`
(routing, then `moe_ffn`'s body, all inside one shard_map) instead of its single-device dispatch.
`moe_ffn` is a `jax.shard_map` over the whole mesh. Per device:
  1. SEND: each local (token, k) assignment goes to the expert shard holding its expert, into a buffer
     [n, C, D] with C = ceil(cf * T_local * K / n) rows per (source, destination) pair; a pair's
     overflow is dropped in token order (row t*K + k). Dropless (cf None): C = T_local * K, nothing drops.
  2. `all_to_all` over "expert": each shard now holds the rows for its E/n local experts, [n, C, D].
  3. EXPERTS: rows sorted by local expert id, then `ragged_dot` (grouped GEMM; empty slots in no group).
  4. `all_to_all` back, then the weighted scatter-add onto the local tokens.
The routed expert weights never leave their shard. Costs, per MoE layer and device:
  * all-to-all: 2 * n * C * D activations (+ n * C int32 ids) each way, forward and backward; the
    dropless buffer is n times what a capacity factor of 1 needs (exact, but prefer a cf under EP).
  * expert GEMMs over the n * C received rows (CPU lowers ragged_dot densely: E/n times that).
  * weights enter with their "embed" dim replicated: where the rules shard it over "fsdp", XLA
    all-gathers the LOCAL experts' slice over "fsdp" first ([E/n, D, I/tp] per weight, the usual
    ZeRO-3 gather), and in the backward pass their gradients are all-reduced over the token axes other
    than "expert" (data parallelism), then sliced back to the fsdp layout.
  * "moe_mlp" sharded over "tensor": each device runs its I/tp slice of every local expert and the
    partial outputs are summed with one psum over "tensor" of the [T_local, D] result.
Tokens are split over the rules' "batch" axes; where T does not divide them, the leftover axes hold
copies of the tokens (still exact, redundant work), e.g. decoding with a small batch.
With a capacity factor, drops depend on the mesh (per pair instead of per expert over all tokens), so
results match the single-device capacity dispatch only when nothing overflows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .rules import logical_to_spec

AXIS = "expert"


def expert_mesh():
  """The mesh set with `jax.set_mesh` if its "expert" axis has size > 1 (and is not manual yet), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or AXIS not in mesh.axis_names or AXIS in (getattr(mesh, "manual_axes", ()) or ()):
    return None
  return mesh if mesh.shape[AXIS] > 1 else None


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def specs(mesh, T: int, D: int, gate_shape, rules: Mapping | None = None):
  """(token axes, moe_mlp axes) for `moe_ffn` on `mesh`; a ValueError for layouts it cannot run."""
  E, _, I = gate_shape
  n = mesh.shape[AXIS]
  if E % n:
    raise ValueError(f"expert parallelism: {E} routed experts do not divide over mesh axis '{AXIS}'={n}")
  w_spec = logical_to_spec(("expert", "embed", "moe_mlp"), rules, mesh, (E, D, I))
  if _axes(w_spec[0]) != (AXIS,):
    raise ValueError(f"expert parallelism needs the rule 'expert' -> '{AXIS}' (expert weights got {w_spec})")
  mlp_axes = _axes(w_spec[2])
  tok_axes = _axes(logical_to_spec(("batch", None), rules, mesh, (T, D))[0])
  if set(mlp_axes) & set(tok_axes):
    raise ValueError(
      f"expert parallelism: 'moe_mlp' -> {mlp_axes} shares mesh axes with the token "
      f"batch {tok_axes}; shard moe_mlp over axes that do not split tokens (e.g. 'tensor')"
    )
  return tok_axes, mlp_axes


def capacity(T_local: int, K: int, n: int, capacity_factor: float | None) -> int:
  """Rows per (source, destination shard) pair: every assignment fits when dropless (cf None)."""
  if capacity_factor is None:
    return T_local * K
  return max(1, min(T_local * K, math.ceil(capacity_factor * T_local * K / n)))


def _local_experts(rows_RD, ids_R, gate_EDI, up_EDI, down_EID):
  """SwiGLU of each row by its local expert (id == E_local: an empty slot, output 0)."""
  E_l = gate_EDI.shape[0]
  order = jnp.argsort(ids_R, stable=True)
  sizes = jnp.bincount(ids_R, length=E_l).astype(jnp.int32)  # empty slots sort last, uncounted
  xs = rows_RD[order]
  h = jax.nn.silu(jax.lax.ragged_dot(xs, gate_EDI, sizes)) * jax.lax.ragged_dot(xs, up_EDI, sizes)
  ys = jax.lax.ragged_dot(h, down_EID, sizes)
  ys = jnp.zeros_like(ys).at[order].set(ys)  # back to arrival order
  return jnp.where((ids_R < E_l)[:, None], ys, 0)  # rows past the groups: undefined


def _ep_body(x_TD, weights_TK, experts_TK, gate_EDI, up_EDI, down_EID, *, C: int, mlp_axes):
  T, K = experts_TK.shape
  D = x_TD.shape[1]
  E_l = gate_EDI.shape[0]
  n = jax.lax.axis_size(AXIS)

  # SEND BUFFER: rank each assignment within its destination shard, in token order; overflow drops
  flat = experts_TK.reshape(-1)
  shard = flat // E_l
  order = jnp.argsort(shard, stable=True)
  shard_sorted = shard[order]
  sizes = jnp.bincount(shard, length=n)
  slot = jnp.arange(T * K) - (jnp.cumsum(sizes) - sizes)[shard_sorted]
  keep = slot < C
  token = order // K
  dest = jnp.where(keep, shard_sorted * C + slot, n * C)  # n*C: dropped (out of range)
  send_x = jnp.zeros((n * C, D), x_TD.dtype).at[dest].set(x_TD[token], mode="drop")
  send_id = jnp.full((n * C,), E_l, jnp.int32).at[dest].set(flat[order] % E_l, mode="drop")

  # EXCHANGE, RUN THE LOCAL EXPERTS, EXCHANGE BACK
  a2a = lambda v: jax.lax.all_to_all(v, AXIS, 0, 0, tiled=True)
  recv_x = a2a(send_x.reshape(n, C, D)).reshape(n * C, D)
  recv_id = a2a(send_id.reshape(n, C)).reshape(n * C)
  y = _local_experts(recv_x, recv_id, gate_EDI, up_EDI, down_EID)
  back = a2a(y.reshape(n, C, D)).reshape(n * C, D)

  # COMBINE: weighted scatter-add onto the local tokens (dropped rows read zeros)
  ys = back.at[dest].get(mode="fill", fill_value=0)
  w = jnp.where(keep, weights_TK.reshape(-1)[order], 0).astype(ys.dtype)
  out = jnp.zeros_like(x_TD).at[token].add(ys * w[:, None])
  return jax.lax.psum(out, mlp_axes) if mlp_axes else out  # partial sums over moe_mlp slices


def moe_ffn(
  x_TD,
  weights_TK,
  experts_TK,
  gate_EDI,
  up_EDI,
  down_EID,
  *,
  mesh,
  capacity_factor: float | None,
  rules: Mapping | None = None,
):
  """sum_k w_tk * Expert_{e_tk}(x_t) with the experts split over mesh axis "expert" (tokens all-to-all).

  x [T, D]; weights/experts [T, K] (global ids); gate/up [E, D, I], down [E, I, D]; `mesh` a Mesh or the
  AbstractMesh of `jax.set_mesh`; `capacity_factor` None = dropless; `rules` as in sharding.rules."""
  T, D = x_TD.shape
  K = experts_TK.shape[1]
  tok_axes, mlp_axes = specs(mesh, T, D, gate_EDI.shape, rules)
  T_local = T // math.prod(mesh.shape[a] for a in tok_axes)
  C = capacity(T_local, K, mesh.shape[AXIS], capacity_factor)
  tok = P(tok_axes or None, None)
  mlp = mlp_axes or None
  body = lambda *a: _ep_body(*a, C=C, mlp_axes=mlp_axes)
  # check_vma=False: where tokens are copied over some axes (see the module docstring) the outputs are
  # equal copies that the varying-axes checker cannot prove; shard_map's transpose then psums the
  # cotangents of inputs over the axes they are replicated on (data-parallel gradient reduction).
  fn = jax.shard_map(
    body,
    mesh=mesh,
    check_vma=False,
    in_specs=(tok, tok, tok, P(AXIS, None, mlp), P(AXIS, None, mlp), P(AXIS, mlp, None)),
    out_specs=tok,
  )
  return fn(x_TD, weights_TK, experts_TK, gate_EDI, up_EDI, down_EID)


def moe_ffn_routed(
  x_TD,
  logits_TE,
  bias_E,
  replay_TK,
  route_fn,
  gate_EDI,
  up_EDI,
  down_EID,
  *,
  k: int,
  mesh,
  capacity_factor: float | None,
  rules: Mapping | None = None,
):
  """`moe_ffn` with the routing inside the shard_map: `route_fn(logits, bias, replay) -> (weights, experts,
  scores)` runs on each device's own tokens, so router scores are never gathered across token shards.
  Returns (y [T, D], (weights [T, K], experts [T, K], scores [T, E])), all split like the tokens."""
  T, D = x_TD.shape
  tok_axes, mlp_axes = specs(mesh, T, D, gate_EDI.shape, rules)
  T_local = T // math.prod(mesh.shape[a] for a in tok_axes)
  C = capacity(T_local, k, mesh.shape[AXIS], capacity_factor)
  tok = P(tok_axes or None, None)
  mlp = mlp_axes or None
  has_replay = replay_TK is not None
  replay = replay_TK if has_replay else jnp.zeros((T, k), jnp.int32)

  def body(x, logits, bias, rep, g, u, d):
    w, e, s = route_fn(logits, bias, rep if has_replay else None)
    return _ep_body(x, w, e, g, u, d, C=C, mlp_axes=mlp_axes), (w, e, s)

  fn = jax.shard_map(
    body,
    mesh=mesh,
    check_vma=False,  # as in moe_ffn
    in_specs=(tok, tok, P(None), tok, P(AXIS, None, mlp), P(AXIS, None, mlp), P(AXIS, mlp, None)),
    out_specs=(tok, (tok, tok, tok)),
  )
  return fn(x_TD, logits_TE, bias_E, replay, gate_EDI, up_EDI, down_EID)


__all__ = ["expert_mesh", "moe_ffn", "moe_ffn_routed", "capacity", "specs"]
