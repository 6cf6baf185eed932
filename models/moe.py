"""DeepSeekMoE: sigmoid router with aux-loss-free bias and group-limited top-k; routed + shared experts.

Dispatch sorts the T*K (token, expert) assignments by expert so each expert multiplies only its own
tokens. Two dispatchers, both product features:
  * dropless (`moe_capacity_factor: null`, default; what V3 trained with): `jax.lax.ragged_dot` over the
    sorted rows, a grouped GEMM costing 3 * T*K * D * I multiply-adds on GPU/TPU. On CPU, XLA lowers
    ragged_dot to a masked dense product (E times that cost), so CPU training presets use capacity.
  * capacity (`moe_capacity_factor: cf`): each expert takes at most C = ceil(cf * T*K / E) rows into an
    [E, C, D] buffer (overflow rows are dropped, i.e. contribute zero), then one batched matmul:
    3 * E*C * D * I = 3 * cf * T*K * D * I multiply-adds on every backend.
Both add O(T*K log(T*K)) for the sort and O(T*K*D) for the gather and the weighted scatter-add.
On CPU the dropless default uses `dispatch_buckets` (capacity dispatch sized at run time so nothing
drops) instead of ragged_dot's dense fallback.
When T*K <= E (decoding a handful of rows), both would touch every expert for a few rows, so the layer
gathers each assignment's expert weights instead (exact, 3 * T*K * D * I reads and multiply-adds).
Under `jax.set_mesh` with an "expert" mesh axis > 1, sharding.expert_parallel replaces both: experts stay
on their shard and tokens travel by all-to-all.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .config import ModelConfig
from .layers import DTYPES, MLP, RouterBias, param


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


def _sort_by_expert(experts_TK, E):
  flat = experts_TK.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  return flat, order, jnp.bincount(flat, length=E).astype(jnp.int32)


def dispatch_dropless(x_TD, r: Routing, gate_EDI, up_EDI, down_EID):
  T, K = r.experts_TK.shape
  E = gate_EDI.shape[0]
  _, order, sizes = _sort_by_expert(r.experts_TK, E)
  token = order // K
  xs = x_TD[token]  # [TK, D] sorted by expert
  h = jax.nn.silu(jax.lax.ragged_dot(xs, gate_EDI, sizes)) * jax.lax.ragged_dot(xs, up_EDI, sizes)
  ys = jax.lax.ragged_dot(h, down_EID, sizes)  # [TK, D]
  w = r.weights_TK.reshape(-1)[order].astype(ys.dtype)
  return jnp.zeros_like(x_TD).at[token].add(ys * w[:, None])


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
  h = jax.nn.silu(jnp.einsum("td,tkdi->tki", x_TD, gate_EDI[e_TK])) * jnp.einsum("td,tkdi->tki", x_TD, up_EDI[e_TK])
  y = jnp.einsum("tki,tkid->tkd", h, down_EID[e_TK])
  return jnp.einsum("tkd,tk->td", y, r.weights_TK.astype(y.dtype))


def dispatch_capacity(x_TD, r: Routing, gate_EDI, up_EDI, down_EID, capacity_factor: float, *, C=None):
  T, K = r.experts_TK.shape
  E, D, _ = gate_EDI.shape
  C = C or max(1, math.ceil(capacity_factor * T * K / E))
  flat, order, sizes = _sort_by_expert(r.experts_TK, E)
  e_sorted = flat[order]
  starts = jnp.cumsum(sizes) - sizes
  slot = jnp.arange(T * K) - starts[e_sorted]  # rank within its expert
  keep = slot < C
  token = order // K
  dest = jnp.where(keep, e_sorted * C + slot, E * C)  # E*C: dropped (out of range)
  buf = jnp.zeros((E * C, D), x_TD.dtype).at[dest].set(x_TD[token], mode="drop").reshape(E, C, D)
  h = jax.nn.silu(jnp.einsum("ecd,edi->eci", buf, gate_EDI)) * jnp.einsum("ecd,edi->eci", buf, up_EDI)
  y = jnp.einsum("eci,eid->ecd", h, down_EID).reshape(E * C, D)
  ys = y.at[dest].get(mode="fill", fill_value=0)  # [TK, D], zeros if dropped
  w = jnp.where(keep, r.weights_TK.reshape(-1)[order], 0).astype(ys.dtype)
  return jnp.zeros_like(x_TD).at[token].add(ys * w[:, None])


class MoE(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    E, d, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    self.cfg = cfg
    self.router = param(rngs, (d, E), ("embed", None), cfg, dtype=jnp.float32)  # kept fp32, as HF
    self.bias = RouterBias(jnp.zeros((E,), jnp.float32), axes=(None,))
    self.gate = param(rngs, (E, d, I), ("expert", "embed", "moe_mlp"), cfg)
    self.up = param(rngs, (E, d, I), ("expert", "embed", "moe_mlp"), cfg)
    self.down = param(rngs, (E, I, d), ("expert", "moe_mlp", "embed"), cfg)
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

  def __call__(self, x_BTD, experts_BTK=None):
    """Returns (y, routing); `experts_BTK` replays a given routing (weights recomputed from the scores)."""
    cfg, dt = self.cfg, self.dtype
    B, T, D = x_BTD.shape
    x_TD = x_BTD.reshape(B * T, D)
    logits = x_TD.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
    replay = None if experts_BTK is None else experts_BTK.reshape(B * T, -1).astype(jnp.int32)
    g, u, dn = self.gate[...].astype(dt), self.up[...].astype(dt), self.down[...].astype(dt)
    from ..sharding.expert_parallel import expert_mesh, moe_ffn_routed  # models may import sharding

    mesh = expert_mesh()  # under jax.set_mesh with an "expert" axis > 1: tokens go all-to-all
    if mesh is not None:  # routing runs inside the shard_map too, on each device's tokens
      y, r = moe_ffn_routed(
        x_TD,
        logits,
        self.bias[...],
        replay,
        self._route,
        g,
        u,
        dn,
        k=cfg.num_experts_per_tok,
        mesh=mesh,
        capacity_factor=cfg.moe_capacity_factor,
      )
      r = Routing(*r)
    else:
      r = self._route(logits, self.bias[...], replay)
      if B * T * cfg.num_experts_per_tok <= cfg.n_routed_experts:  # static: few rows (decode)
        y = dispatch_gather(x_TD, r, g, u, dn)
      elif cfg.moe_capacity_factor is None and jax.default_backend() == "cpu":
        y = dispatch_buckets(x_TD, r, g, u, dn)
      elif cfg.moe_capacity_factor is None:
        y = dispatch_dropless(x_TD, r, g, u, dn)
      else:
        y = dispatch_capacity(x_TD, r, g, u, dn, cfg.moe_capacity_factor)
    y = y.reshape(B, T, D)
    if cfg.n_shared_experts:
      y = y + self.shared(x_BTD)
    return y, Routing(r.weights_TK.reshape(B, T, -1), r.experts_TK.reshape(B, T, -1), r.scores_TE.reshape(B, T, -1))
