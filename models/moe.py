"""DeepSeekMoE: sigmoid router with aux-loss-free bias and group-limited top-k; routed + shared experts.

Every dispatch path runs the same SwiGLU (`swiglu`, grouped by a different matmul) and the capacity ones
share one bucketing routine (`to_buckets` / `from_buckets`: rank each (token, k) assignment within its
bucket in token order, keep the first C, weighted scatter-add back). Costs per layer, T tokens, K experts
a token, hidden D, expert width I:
  * dropless (`moe_capacity_factor: null`, default; what V3 trained with): the T*K assignments sorted by
    expert, then a grouped GEMM of 3 * T*K * D * I multiply-adds (`grouped_matmul`): `jax.lax.ragged_dot` on
    GPU; on TPU the Pallas grouped matmul (megablox gmm, and tgmm for the weight gradient), because XLA:TPU
    computes ragged_dot's weight gradient as a masked product over every expert, E times the work (`rl-jax plan`
    shows it). On a CPU target XLA lowers ragged_dot to a masked dense product (E times the work) forward too, so
    there `dispatch_buckets` runs instead: the capacity dispatch with C the smallest power of two holding the
    busiest expert (picked at run time, nothing drops). The target is the ambient mesh's platform
    (`sharding.mesh.target_platform`): a TPU program compiled ahead of time on a CPU host is the TPU path.
  * capacity (`moe_capacity_factor: cf`): buckets = experts, C = ceil(cf * T*K / E) rows each (overflow
    rows contribute zero), then one batched matmul: 3 * E*C * D * I = 3 * cf * T*K * D * I on every backend.
  * gather: when T*K <= E (decoding a handful of rows) each assignment gathers its expert's weights
    (exact; 3 * T*K * D * I reads and multiply-adds, where the others would touch every expert).
  Each adds O(T*K log(T*K)) for the sort and O(T*K*D) for the gathers and the scatter-add.
  * expert parallel: under `jax.set_mesh` where the "expert" rule puts the routed experts on a mesh axis
    of size n > 1, one `jax.shard_map` replaces all of the above (`dispatch_expert_parallel`). Per device:
    route its own tokens; buckets = destination shards, C = ceil(cf * T_local*K / n) rows per (source,
    destination) pair (T_local*K when dropless, nothing drops); all-to-all; the E/n local experts by
    ragged_dot; all-to-all back; scatter-add. Routed weights never leave their shard (where "embed" is
    sharded over "fsdp" XLA gathers the LOCAL experts' slice, the usual ZeRO-3 gather, and their
    gradients are reduced over the other token axes). All-to-all: 2 * n*C * D activations (+ n*C int32
    ids) each way, forward and backward; the dropless buffer is n times what cf = 1 needs. With
    "moe_mlp" over "tensor", each device runs its I/tp slice and one psum over "tensor" sums [T_local, D].
    Tokens split like the activations' (act_batch, act_seq) dims, flattened; axes that do not divide T
    hold copies (exact, redundant). With a capacity factor, drops are per pair instead of per expert, so
    results match the single-device capacity dispatch only when nothing overflows.
All mesh axes come from the ambient rules (`sharding.rules.use_rules`), as for the parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from ..sharding.mesh import target_platform
from ..sharding.rules import logical_to_spec, mesh_axes
from .config import ModelConfig
from .layers import DTYPES, MLP, RouterBias, param

# Logical axes of the routed expert weights: the parameters and the expert-parallel shard_map read them here.
GATE_AXES = ("expert", "embed", "moe_mlp")  # gate and up [E, D, I]
DOWN_AXES = ("expert", "moe_mlp", "embed")  # down [E, I, D]
TOKEN_AXES = ("act_batch", "act_seq")  # the flattened tokens [B*T] of an activation [B, T, D]


class Routing(NamedTuple):
  weights_TK: jax.Array  # combine weights (normalised, scaled), float32
  experts_TK: jax.Array  # chosen expert ids, int32
  scores_TE: jax.Array  # sigmoid affinities, float32 (for the balance loss)


def route(logits_TE, bias_E, *, k: int, n_group: int, topk_group: int, norm_topk_prob: bool, scaling: float) -> Routing:
  """DeepSeek-V3 routing: the bias shifts which experts are chosen, never how much they weigh."""
  T, E = logits_TE.shape
  scores = jax.nn.sigmoid(logits_TE.astype(jnp.float32))
  choice = scores + bias_E.astype(jnp.float32)[None, :]
  if n_group > 1:
    # Group score = sum of its two best biased scores; keep the best topk_group groups.
    grouped = choice.reshape(T, n_group, E // n_group)
    group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [T, G]
    _, keep = jax.lax.top_k(group_scores, topk_group)  # [T, topk_group]
    group_mask = jnp.zeros((T, n_group), bool).at[jnp.arange(T)[:, None], keep].set(True)
    choice = jnp.where(jnp.repeat(group_mask, E // n_group, axis=1), choice, -jnp.inf)
  _, experts = jax.lax.top_k(choice, k)
  weights = jnp.take_along_axis(scores, experts, axis=1)
  if norm_topk_prob:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  return Routing(weights * scaling, experts.astype(jnp.int32), scores)


# ------------------------------------------------------------------ shared pieces of every dispatch
def swiglu(x, gate, up, down, matmul: Callable = jnp.matmul):
  """The expert FFN down(silu(x @ gate) * (x @ up)), rows grouped with their experts by `matmul`."""
  return matmul(jax.nn.silu(matmul(x, gate)) * matmul(x, up), down)


def grouped_matmul(x_RD, w_EDI, sizes_E, *, interpret: bool = False):
  """Rows sorted by group, `sizes_E` rows each, times their group's matrix: [R, I] (rows past the sizes' sum: 0 on
  TPU, undefined elsewhere). On a TPU target (or `interpret`: the same kernel interpreted, for tests) the Pallas
  megablox gmm, whose VJP computes the weight gradient group by group (tgmm); else `jax.lax.ragged_dot`."""
  if target_platform() != "tpu" and not interpret:
    return jax.lax.ragged_dot(x_RD, w_EDI, sizes_E)
  from jax.experimental.pallas.ops.tpu.megablox import ops

  (R, D), N = x_RD.shape, w_EDI.shape[-1]
  tm = min(128, 1 << max(3, (R - 1).bit_length()))  # row tile: 128, or the rows rounded up to a power of two
  # Padding rows belong to no group (never computed); a width under 128 (tiny models) is zero-padded up to one
  # 128 tile, since the tiles serve the backward's transposed product too.
  pd, pn = max(0, 128 - D), max(0, 128 - N)
  x = jnp.pad(x_RD, ((0, -R % tm), (0, pd)))
  w = jnp.pad(w_EDI, ((0, 0), (0, pd), (0, pn)))
  # The kernel leaves rows outside every group (and their input gradient) unwritten: zeros in and out, so that
  # neither the values nor the gradients of those rows are ever garbage.
  in_group = (jnp.arange(x.shape[0]) < sizes_E.sum())[:, None]
  sizes = sizes_E.astype(jnp.int32)
  out = ops.gmm(jnp.where(in_group, x, 0), w, sizes, x_RD.dtype, (tm, 128, 128), None, None, False, interpret)
  return jnp.where(in_group, out, 0)[:R, :N]


def _ragged_swiglu(xs_RD, sizes_E, gate_EDI, up_EDI, down_EID):
  """SwiGLU of rows sorted by expert, `sizes_E` rows each (rows past their sum: undefined)."""
  return swiglu(xs_RD, gate_EDI, up_EDI, down_EID, lambda a, w: grouped_matmul(a, w, sizes_E))


def _sort(keys_R, n: int):
  """(stable order sorting `keys_R`, sorted keys, count of each key in [0, n))."""
  order = jnp.argsort(keys_R, stable=True)
  return order, keys_R[order], jnp.bincount(keys_R, length=n).astype(jnp.int32)


def _combine(ys_RD, order_R, weights_TK, T: int):
  """sum_k w_tk * y_(t,k): weighted scatter-add of the outputs of the assignments t*K + k = order_R."""
  K = weights_TK.shape[1]
  w = weights_TK.reshape(-1)[order_R].astype(ys_RD.dtype)
  return jnp.zeros((T, ys_RD.shape[-1]), ys_RD.dtype).at[order_R // K].add(ys_RD * w[:, None])


class Buckets(NamedTuple):
  order_R: jax.Array  # assignment index t*K + k of each row, sorted by bucket (token order inside)
  dest_R: jax.Array  # its row in the [n * C] buffer; n * C where it overflowed (dropped)


def to_buckets(x_TD, bucket_TK, n: int, C: int):
  """THE capacity dispatch: each (token, k) assignment joins bucket `bucket_TK` (of n) at its rank in
  token order; the first C of a bucket keep their row of the buffer [n, C, D], the rest drop."""
  T, K = bucket_TK.shape
  order, b_sorted, sizes = _sort(bucket_TK.reshape(-1), n)
  slot = jnp.arange(T * K) - (jnp.cumsum(sizes) - sizes)[b_sorted]  # rank within its bucket
  dest = jnp.where(slot < C, b_sorted * C + slot, n * C)
  buf = jnp.zeros((n * C, x_TD.shape[1]), x_TD.dtype).at[dest].set(x_TD[order // K], mode="drop")
  return buf.reshape(n, C, -1), Buckets(order, dest)


def from_buckets(y_NCD, b: Buckets, weights_TK, T: int):
  """The weighted scatter-add of the bucket rows onto their tokens; dropped assignments add zero."""
  ys = y_NCD.reshape(-1, y_NCD.shape[-1]).at[b.dest_R].get(mode="fill", fill_value=0)
  return _combine(ys, b.order_R, weights_TK, T)


# ------------------------------------------------------------------ single-device dispatch paths
def dispatch_dropless(x_TD, r: Routing, gate_EDI, up_EDI, down_EID):
  T, K = r.experts_TK.shape
  order, _, sizes = _sort(r.experts_TK.reshape(-1), gate_EDI.shape[0])
  ys = _ragged_swiglu(x_TD[order // K], sizes, gate_EDI, up_EDI, down_EID)
  return _combine(ys, order, r.weights_TK, T)


def dispatch_capacity(x_TD, r: Routing, gate_EDI, up_EDI, down_EID, capacity_factor: float, *, C=None):
  T, K = r.experts_TK.shape
  E = gate_EDI.shape[0]
  C = C or max(1, math.ceil(capacity_factor * T * K / E))
  buf_ECD, b = to_buckets(x_TD, r.experts_TK, E, C)
  y = swiglu(buf_ECD, gate_EDI, up_EDI, down_EID, lambda a, w: jnp.einsum("eca,eab->ecb", a, w))
  return from_buckets(y, b, r.weights_TK, T)


def dispatch_buckets(x_TD, r: Routing, gate_EDI, up_EDI, down_EID):
  """Dropless without ragged_dot (for CPU, where XLA computes ragged_dot densely over all experts): a
  capacity dispatch whose capacity is the smallest power-of-two bucket holding the busiest expert,
  picked at run time by `lax.switch`, so nothing drops. Costs 3 * E * C_bucket * D * I multiply-adds,
  between 1x and 2x of the busiest expert's load times E, never more than the dense fallback."""
  T, K = r.experts_TK.shape
  E = gate_EDI.shape[0]
  caps, c = [], 1 << max(0, math.ceil(T * K / E) - 1).bit_length()  # from the mean load, doubling
  while c < T:
    caps.append(c)
    c *= 2
  caps.append(T)  # an expert serves a token once
  busiest = jnp.bincount(r.experts_TK.reshape(-1), length=E).max()
  branch = jnp.searchsorted(jnp.asarray(caps), busiest)  # first capacity >= busiest
  fns = [lambda x, c=c: dispatch_capacity(x, r, gate_EDI, up_EDI, down_EID, 0.0, C=c) for c in caps]
  return jax.lax.switch(branch, fns, x_TD)


def dispatch_gather(x_TD, r: Routing, gate_EDI, up_EDI, down_EID):
  """Gathers each assignment's expert weights: 3 * T*K * D * I multiply-adds AND weight reads, the least
  possible when T*K <= E (decoding a few rows), where the other dispatchers touch every expert."""
  e_TK = r.experts_TK
  x_TKD = jnp.broadcast_to(x_TD[:, None], e_TK.shape + x_TD.shape[1:])
  mm = lambda a, w: jnp.einsum("tka,tkab->tkb", a, w)
  y = swiglu(x_TKD, gate_EDI[e_TK], up_EDI[e_TK], down_EID[e_TK], mm)
  return jnp.einsum("tkd,tk->td", y, r.weights_TK.astype(y.dtype))


# ------------------------------------------------------------------ expert parallelism
def expert_axis() -> str | None:
  """The mesh axis the "expert" rule puts routed experts on, when the active mesh splits it (size > 1,
  not already manual), else None (no mesh, or experts replicated: a single-device path runs)."""
  axes = mesh_axes("expert")
  if len(axes) > 1:
    raise ValueError(f"expert parallelism: the rule 'expert' must map to one mesh axis, got {axes}")
  return axes[0] if axes else None


def ep_specs(mesh, axis: str, T: int, gate_shape) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(token axes, moe_mlp axes) for the expert-parallel shard_map under the ambient rules; a ValueError
  for layouts it cannot run."""
  E, n = gate_shape[0], mesh.shape[axis]
  if E % n:
    raise ValueError(f"expert parallelism: {E} routed experts do not divide over mesh axis '{axis}'={n}")
  mlp = logical_to_spec(GATE_AXES, None, mesh, gate_shape)[2]  # as the weights are stored
  mlp_axes = () if mlp is None else (mlp,) if isinstance(mlp, str) else tuple(mlp)
  tok_axes = mesh_axes(TOKEN_AXES, mesh=mesh, size=T)
  if set(mlp_axes) & set(tok_axes):
    raise ValueError(
      f"expert parallelism: 'moe_mlp' -> {mlp_axes} shares mesh axes with the tokens {tok_axes} "
      f"(rules {TOKEN_AXES}); shard moe_mlp over axes that do not split tokens (e.g. 'tensor')"
    )
  return tok_axes, mlp_axes


def ep_capacity(T_local: int, K: int, n: int, capacity_factor: float | None) -> int:
  """Rows per (source, destination shard) pair: every assignment fits when dropless (cf None)."""
  if capacity_factor is None:
    return T_local * K
  return max(1, min(T_local * K, math.ceil(capacity_factor * T_local * K / n)))


def _local_experts(rows_RD, ids_R, gate_EDI, up_EDI, down_EID):
  """SwiGLU of each received row by its local expert (id == E_local: an empty slot, output 0)."""
  order, _, sizes = _sort(ids_R, gate_EDI.shape[0])  # empty slots sort last, uncounted
  ys = _ragged_swiglu(rows_RD[order], sizes, gate_EDI, up_EDI, down_EID)
  ys = jnp.zeros_like(ys).at[order].set(ys)  # back to arrival order
  return jnp.where((ids_R < gate_EDI.shape[0])[:, None], ys, 0)


def _ep_body(x_TD, r: Routing, gate_EDI, up_EDI, down_EID, *, axis: str, C: int, mlp_axes):
  """One device: its tokens to the shards holding their experts, the local experts, and back."""
  T = x_TD.shape[0]
  E_l = gate_EDI.shape[0]
  n = jax.lax.axis_size(axis)
  a2a = lambda v: jax.lax.all_to_all(v, axis, 0, 0, tiled=True)
  send_NCD, b = to_buckets(x_TD, r.experts_TK // E_l, n, C)
  local_ids = (r.experts_TK.reshape(-1) % E_l)[b.order_R]
  send_id = jnp.full((n * C,), E_l, jnp.int32).at[b.dest_R].set(local_ids, mode="drop")
  recv_id = a2a(send_id.reshape(n, C)).reshape(-1)
  y = _local_experts(a2a(send_NCD).reshape(n * C, -1), recv_id, gate_EDI, up_EDI, down_EID)
  out = from_buckets(a2a(y.reshape(n, C, -1)), b, r.weights_TK, T)
  return jax.lax.psum(out, mlp_axes) if mlp_axes else out  # partial sums over moe_mlp slices


def _per_device(x_TD, logits_TE, bias_E, replay_TK, route_fn, weights, *, k, tok, w_specs, dispatch):
  """y [T, D] and Routing ([T, K], [T, K], [T, E]) from one shard_map over the active mesh in which `route_fn(logits,
  bias, replay) -> Routing` runs on each device's own tokens (`tok`: how they split; router scores are never
  gathered) and `dispatch(x, routing, *weights)` computes their experts' output."""
  has_replay = replay_TK is not None
  replay = replay_TK if has_replay else jnp.zeros((x_TD.shape[0], k), jnp.int32)

  def body(x, logits, bias, rep, *w):
    r = route_fn(logits, bias, rep if has_replay else None)
    return dispatch(x, r, *w), tuple(r)

  # check_vma=False: where tokens are copied over some axes the outputs are equal copies that the
  # varying-axes checker cannot prove; shard_map's transpose then psums the cotangents of inputs over
  # the axes they are replicated on (data-parallel gradient reduction).
  fn = jax.shard_map(
    body,
    mesh=jax.sharding.get_abstract_mesh(),
    check_vma=False,
    in_specs=(tok, tok, P(None), tok, *w_specs),
    out_specs=(tok, (tok, tok, tok)),
  )
  y, r = fn(x_TD, logits_TE, bias_E, replay, *weights)
  return y, Routing(*r)


def dispatch_expert_parallel(
  x_TD, logits_TE, bias_E, replay_TK, route_fn, gate_EDI, up_EDI, down_EID, *, k: int, capacity_factor
):
  """The experts split over `expert_axis()`: each device routes its own tokens, then `_ep_body`."""
  mesh = jax.sharding.get_abstract_mesh()
  axis = expert_axis()
  T = x_TD.shape[0]
  tok_axes, mlp_axes = ep_specs(mesh, axis, T, gate_EDI.shape)
  T_local = T // math.prod(mesh.shape[a] for a in tok_axes)
  C = ep_capacity(T_local, k, mesh.shape[axis], capacity_factor)
  mlp = mlp_axes or None
  dispatch = lambda x, r, g, u, d: _ep_body(x, r, g, u, d, axis=axis, C=C, mlp_axes=mlp_axes)
  w_specs = (P(axis, None, mlp), P(axis, None, mlp), P(axis, mlp, None))
  tok = P(tok_axes or None, None)
  weights = (gate_EDI, up_EDI, down_EID)
  return _per_device(x_TD, logits_TE, bias_E, replay_TK, route_fn, weights, k=k, tok=tok, w_specs=w_specs,
                     dispatch=dispatch)  # fmt: skip


def dispatch_local(x_TD, logits_TE, bias_E, replay_TK, route_fn, gate_EDI, up_EDI, down_EID, *, k: int):
  """Dropless without expert parallelism, device by device: each device routes its own tokens (split like the
  activations' rows) and runs `dispatch_dropless` on them with the whole expert weights (gathered from their FSDP
  shards on the way in, the usual ZeRO-3 gather; their gradients summed on the way back). For TPU targets, whose
  grouped-matmul kernel XLA cannot partition by itself."""
  tok = P(mesh_axes(TOKEN_AXES, size=x_TD.shape[0]) or None, None)
  weights = (gate_EDI, up_EDI, down_EID)
  return _per_device(x_TD, logits_TE, bias_E, replay_TK, route_fn, weights, k=k, tok=tok,
                     w_specs=(P(None, None, None),) * 3, dispatch=dispatch_dropless)  # fmt: skip


# ------------------------------------------------------------------ the layer
class MoE(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    E, d, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    self.cfg = cfg
    self.router = param(rngs, (d, E), ("embed", None), cfg, dtype=jnp.float32)  # kept fp32, as HF
    self.bias = RouterBias(jnp.zeros((E,), jnp.float32), axes=(None,))
    self.gate = param(rngs, (E, d, I), GATE_AXES, cfg)
    self.up = param(rngs, (E, d, I), GATE_AXES, cfg)
    self.down = param(rngs, (E, I, d), DOWN_AXES, cfg)
    if cfg.n_shared_experts:
      self.shared = MLP(cfg, cfg.n_shared_experts * I, rngs)
    self.dtype = DTYPES[cfg.dtype]

  def _route(self, logits_TE, bias_E, replay_TK=None) -> Routing:
    """Per-token routing; `replay_TK` forces the experts (weights recomputed from this forward's scores)."""
    cfg = self.cfg
    r = route(
      logits_TE,
      bias_E,
      k=cfg.num_experts_per_tok,
      n_group=cfg.n_group,
      topk_group=cfg.topk_group,
      norm_topk_prob=cfg.norm_topk_prob,
      scaling=cfg.routed_scaling_factor,
    )
    if replay_TK is None:
      return r
    w = jnp.take_along_axis(r.scores_TE, replay_TK, axis=1)
    if cfg.norm_topk_prob:
      w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return Routing(w * cfg.routed_scaling_factor, replay_TK, r.scores_TE)

  def _dispatch(self, x_TD, r: Routing, *weights):
    """The single-device path for this many rows on this backend (see the module docstring)."""
    cfg = self.cfg
    if x_TD.shape[0] * cfg.num_experts_per_tok <= cfg.n_routed_experts:  # static: few rows (decode)
      return dispatch_gather(x_TD, r, *weights)
    if cfg.moe_capacity_factor is not None:
      return dispatch_capacity(x_TD, r, *weights, cfg.moe_capacity_factor)
    if target_platform() == "cpu":
      return dispatch_buckets(x_TD, r, *weights)
    return dispatch_dropless(x_TD, r, *weights)

  def _kernel_needs_shard_map(self, T: int) -> bool:
    """Dropless on a TPU target under a multi-device mesh: the grouped-matmul kernel (a Mosaic call) cannot be
    partitioned by XLA, so each device runs it on its own tokens (`dispatch_local`)."""
    cfg, mesh = self.cfg, jax.sharding.get_abstract_mesh()
    few_rows = T * cfg.num_experts_per_tok <= cfg.n_routed_experts
    multi = not mesh.empty and math.prod(s for a, s in mesh.shape.items() if a not in (mesh.manual_axes or ())) > 1
    return cfg.moe_capacity_factor is None and not few_rows and multi and target_platform() == "tpu"

  def __call__(self, x_BTD, experts_BTK=None):
    """Returns (y, routing); `experts_BTK` replays a given routing (weights recomputed from the scores)."""
    cfg, dt = self.cfg, self.dtype
    B, T, D = x_BTD.shape
    x_TD = x_BTD.reshape(B * T, D)
    logits = x_TD.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
    replay = None if experts_BTK is None else experts_BTK.reshape(B * T, -1).astype(jnp.int32)
    weights = self.gate[...].astype(dt), self.up[...].astype(dt), self.down[...].astype(dt)
    if expert_axis() is not None:  # experts split over a mesh axis: tokens go all-to-all
      k, cf = cfg.num_experts_per_tok, cfg.moe_capacity_factor
      y, r = dispatch_expert_parallel(
        x_TD, logits, self.bias[...], replay, self._route, *weights, k=k, capacity_factor=cf
      )
    elif self._kernel_needs_shard_map(B * T):
      y, r = dispatch_local(x_TD, logits, self.bias[...], replay, self._route, *weights, k=cfg.num_experts_per_tok)
    else:
      r = self._route(logits, self.bias[...], replay)
      y = self._dispatch(x_TD, r, *weights)
    y = y.reshape(B, T, D)
    if cfg.n_shared_experts:
      y = y + self.shared(x_BTD)
    return y, Routing(*(a.reshape(B, T, -1) for a in r))
