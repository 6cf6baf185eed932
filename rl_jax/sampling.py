"""Sampling: one jitted prefill + `lax.while_loop` decode over a preallocated cache, per shape bucket.

`generate(model, prompts, ...)` pads the batch, the longest prompt and the budget up to power-of-two
buckets, so a new request shape rarely recompiles. Prompts are right-padded: the whole padded batch is
prefilled once with positions 0..P-1, each row's first token comes from its logits at len-1, and row b
then decodes at positions len_b, len_b + 1, ... (its pad slots are overwritten before they are seen).
The prefill is `forward(prefill=True)`: the prompt attends among itself as in training (blockwise for long
prompts, no [P, P + N] scores; under a mesh with a `sequence` axis, split over it, sequence-parallel), and only
the decode steps attend over the cache.

Every row draws from its own key, `fold_in(fold_in(key(seed), global_row), step)`, so a row's sample
depends only on (seed, its index in the result, its prompt), never on its batch neighbours. Log-probs
are those of the model's unmodified distribution (temperature 1, no top-k/top-p), or with
`logprob_temperature=T` of softmax(logits / T), the distribution a GRPO rollout at temperature T drew from
(so the trainer's ratios compare like with like): GRPO's old log-probs.
For MoE models the routed experts of every generated (and prompt) token are returned for replay.
With `num_samples=G` each distinct prompt is prefilled once and its cache broadcast to its G rows (shared prompt
prefill; every row's first token still draws from its own key). rl_jax/engine.py runs the same steps with
continuous batching (finished rows' slots refilled from a queue).

Under `jax.set_mesh(mesh)` (parameters placed by `sharding.create_sharded` / `shard_state`) the batch, the
cache and the loop state are constrained to the batch mesh axes by the logical rules (heads of a GQA
cache over "tensor"): the ambient ones of `sharding.rules.use_rules`, or `rules=` overrides, which the
model's own constraints then follow too; with no mesh the constraints are no-ops. `stream=` adds an ordered host callback
to the decode loop (a separate compiled variant: the plain sampler carries no callback).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from rl_jax.sharding.rules import constrain, current_rules, resolve_rules, shard_count, use_rules

PAD_ID = 0
MIN_BUCKET = 8
SHARED_PREFILL = True  # generate(num_samples=G) prefills each prompt once; False: every row its own (reference)


class SampleResult(NamedTuple):
  tokens: np.ndarray  # int32 [N, max_new_tokens]; PAD_ID after a row's end (EOS included)
  logprobs: np.ndarray  # float32 [N, max_new_tokens]; unmodified log p(token); 0 after the end
  lengths: np.ndarray  # int32 [N]; generated tokens, EOS counted
  experts: np.ndarray | None  # int32 [N, max_new_tokens, n_moe_layers, K]; None for dense models
  prompt_experts: np.ndarray | None  # int32 [N, max_prompt_len, n_moe_layers, K]; 0 past a prompt's end


class _State(NamedTuple):
  """The decode loop carry. Step t feeds token t-1 (recording its experts) and samples token t."""

  t: jax.Array  # int32 []
  tokens: jax.Array  # int32 [B, N]
  logprobs: jax.Array  # float32 [B, N]
  experts: Any  # int32 [B, N, L, K] or None
  lengths: jax.Array  # int32 [B]
  done: jax.Array  # bool [B]: no more tokens will be sampled for this row
  cache: Any  # per-layer cache, [B, P + N, ...]


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
  """Smallest power of two >= max(n, minimum)."""
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


# ------------------------------------------------------------------ token selection
def sample_logits(logits_BV, key_B, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """Draws one token per row: temperature, then top-k, then top-p (nucleus) on the tempered, top-k
  renormalised distribution. temperature == 0 is greedy. Settings are Python scalars (static);
  ties at a top-k / top-p threshold are all kept."""
  logits_BV = logits_BV.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  V = logits_BV.shape[-1]
  if 0 < top_k < V:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV >= kth_B1, logits_BV, -jnp.inf)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
    n_keep_B = jnp.maximum(jnp.sum(mass_before_BV < top_p, axis=-1), 1)
    cut_B1 = jnp.take_along_axis(sorted_BV, n_keep_B[:, None] - 1, axis=-1)
    logits_BV = jnp.where(logits_BV >= cut_B1, logits_BV, -jnp.inf)
  return jax.vmap(jax.random.categorical)(key_B, logits_BV).astype(jnp.int32)


def _token_logprob(logits_BV, tok_B):
  return jnp.take_along_axis(jax.nn.log_softmax(logits_BV.astype(jnp.float32), -1), tok_B[:, None], -1)[:, 0]


def stack_experts(routing):
  """A forward's stacked routing [L, B, T, K] -> the experts [B, T, L, K] int32 (None for dense models)."""
  if routing is None:
    return None
  return jnp.moveaxis(routing.experts_TK, 0, 2).astype(jnp.int32)


# ------------------------------------------------------------------ sharding and streaming
# Logical axes of the cache leaves (models/attention.py layouts, stacked per layer group by models/transformer.py).
# The MLA latent is shared by all heads, so only its batch dim is split; a GQA cache also splits its kv heads
# (over "tensor" by default); the layers axis never.
CACHE_AXES = {
  "c": ("layers", "act_batch", "act_seq", None),
  "k_pe": ("layers", "act_batch", "act_seq", None),
  "k": ("layers", "act_batch", "act_seq", "act_kv_heads", None),
  "v": ("layers", "act_batch", "act_seq", "act_kv_heads", None),
}
CACHE_BATCH_AXIS = 1  # every cache leaf is [L, B, S, ...]


def constrain_cache(cache):
  """The cache {group: {name: [L, B, S, ...]}} constrained to its logical axes (a no-op without a mesh)."""
  return {g: {name: constrain(x, CACHE_AXES[name]) for name, x in layer.items()} for g, layer in cache.items()}


def _constrain_state(s: _State) -> _State:
  c = lambda x, *axes: constrain(x, ("act_batch",) + axes)
  return s._replace(
    tokens=c(s.tokens, None),
    logprobs=c(s.logprobs, None),
    lengths=c(s.lengths),
    done=c(s.done),
    cache=constrain_cache(s.cache),
    experts=None if s.experts is None else c(s.experts, None, None, None),
  )


_SINKS: dict[int, Callable] = {}  # live stream callbacks, by the id passed to the compiled sampler
_SINK_IDS = itertools.count()


def _emit(sink_id, t, tok_B, active_B):
  sink = _SINKS.get(int(sink_id))
  if sink is not None:
    sink(int(t), np.asarray(tok_B), np.asarray(active_B))


# ------------------------------------------------------------------ the jitted program
def group_rows(B: int, group: int, rules: Mapping | None = None) -> int:
  """Prompts prefilled for B rows in groups of `group`: ceil(B / group), rounded up to the batch shards."""
  n, groups = max(1, shard_count("act_batch", rules)), -(-B // group)
  return -(-groups // n) * n


def prefill(model, prompts_BP, prompt_len_B, cache_len: int, group: int = 1):
  """Prefills the first row of every `group` of rows (the rows of a group share their prompt) into a cache of
  `cache_len` slots and broadcasts it to the group: (last-token logits [B, V], cache [B, ...], prompt routing
  [B, P, L, K] or None). group == 1 prefills every row."""
  B = prompts_BP.shape[0]
  src_B = jnp.arange(B) // group
  if group > 1:
    first_U = jnp.minimum(jnp.arange(group_rows(B, group)) * group, B - 1)
    prompts_BP, prompt_len_B = constrain(prompts_BP[first_U], ("act_batch", None)), prompt_len_B[first_U]
  U = prompts_BP.shape[0]
  cache = constrain_cache(model.init_cache(U, cache_len))
  out = model.forward(prompts_BP, cache=cache, last_only=True, prefill=True)  # positions 0..P-1
  h_UD = jnp.take_along_axis(out.hidden_BTD, (prompt_len_B - 1)[:, None, None], axis=1)[:, 0]
  logits_UV = model.head(h_UD[:, None])[:, 0]
  experts = stack_experts(out.routing)
  if group == 1:
    return logits_UV, out.cache, experts
  take = lambda x: x[src_B]
  cache = constrain_cache(jax.tree.map(lambda x: jnp.take(x, src_B, axis=CACHE_BATCH_AXIS), out.cache))
  return take(logits_UV), cache, None if experts is None else take(experts)


def _generate_device(
  graphdef,
  state,
  prompts_BP,
  prompt_len_B,
  row_ids_B,
  real_B,
  seed,
  max_new,
  eos_id,
  sink_id=None,
  *,
  budget: int,
  temperature: float,
  top_k: int,
  top_p: float,
  logprob_temperature: float = 1.0,
  group: int = 1,
):
  """prompts [B, P] right-padded (rows of a `group` share their prompt: it is prefilled once); prompt_len [B] >= 1; row_ids [B] global row index; real [B] False
  for bucket padding rows; seed, max_new (<= budget) and eos_id (-1: none) are traced scalars; with
  `sink_id` every sampling step calls `_SINKS[sink_id](t, tokens [B], active [B])` on the host, in order."""
  model = nnx.merge(graphdef, state)
  B, P = prompts_BP.shape
  N = budget
  prompts_BP = constrain(prompts_BP, ("act_batch", None))
  prompt_len_B, row_ids_B, real_B = (constrain(x, ("act_batch",)) for x in (prompt_len_B, row_ids_B, real_B))
  keys_B = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(row_ids_B)  # loop constants

  def select(logits_BV, t, done_B):
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(keys_B)
    tok_B = sample_logits(logits_BV, step_keys, temperature, top_k, top_p)
    active_B = ~done_B & (t < max_new)
    tok_B = jnp.where(active_B, tok_B, PAD_ID)
    lp_B = jnp.where(active_B, _token_logprob(logits_BV / logprob_temperature, tok_B), 0.0)
    if sink_id is not None:  # replicated first: the host callback reads them whole
      io_callback(_emit, None, sink_id, t, constrain(tok_B, (None,)), constrain(active_B, (None,)), ordered=True)
    return tok_B, lp_B, active_B

  # PREFILL: each distinct prompt once (rows g*G .. g*G+G-1 share one), its cache and last logits then
  # gathered to its G rows; each row's next-token logits sit at index len-1.
  logits_BV, cache, prompt_experts = prefill(model, prompts_BP, prompt_len_B, P + N, group)
  tok_B, lp_B, active_B = select(logits_BV, 0, ~real_B)
  experts = None
  if prompt_experts is not None:
    experts = jnp.zeros((B, N) + prompt_experts.shape[2:], jnp.int32)
  lengths_B = active_B.astype(jnp.int32)
  s = _State(
    t=jnp.int32(1),
    tokens=jnp.zeros((B, N), jnp.int32).at[:, 0].set(tok_B),
    logprobs=jnp.zeros((B, N), jnp.float32).at[:, 0].set(lp_B),
    experts=experts,
    lengths=lengths_B,
    done=~active_B | (tok_B == eos_id) | (lengths_B >= max_new),
    cache=cache,
  )
  s = _constrain_state(s)

  # DECODE: MoE models take one extra step so the last sampled token's routing gets recorded too.
  def cond(s: _State):
    if s.experts is None:
      return jnp.any(~s.done)
    return jnp.any(s.lengths >= s.t)  # some row still has an unfed token t-1

  def body(s: _State):
    t = s.t
    prev_B = s.tokens[:, t - 1]
    pos_B1 = (prompt_len_B + t - 1)[:, None]
    out = model.forward(prev_B[:, None], positions_BT=pos_B1, cache=s.cache)
    experts = s.experts
    if experts is not None:
      fed_B = s.lengths >= t
      step_experts = stack_experts(out.routing)[:, 0]  # [B, L, K]
      old = experts[:, t - 1]
      experts = experts.at[:, t - 1].set(jnp.where(fed_B[:, None, None], step_experts, old))
    tok_B, lp_B, active_B = select(out.logits_BTV[:, 0], t, s.done)
    lengths_B = s.lengths + active_B
    done_B = s.done | (active_B & (tok_B == eos_id)) | (lengths_B >= max_new)
    # t == N only happens on the MoE feed-only step: 'drop' discards that out-of-range write.
    return _constrain_state(
      _State(
        t=t + 1,
        tokens=s.tokens.at[:, t].set(tok_B, mode="drop"),
        logprobs=s.logprobs.at[:, t].set(lp_B, mode="drop"),
        experts=experts,
        lengths=lengths_B,
        done=done_B,
        cache=out.cache,
      )
    )

  s = jax.lax.while_loop(cond, body, s)
  if prompt_experts is not None:
    in_prompt = jnp.arange(P)[None, :] < prompt_len_B[:, None]
    prompt_experts = jnp.where(in_prompt[:, :, None, None], prompt_experts, 0)
  return s.tokens, s.logprobs, s.lengths, s.experts, prompt_experts


_COMPILED: dict[tuple, Any] = {}


def compiled(
  graphdef,
  batch: int,
  prompt: int,
  budget: int,
  temperature: float,
  top_k: int,
  top_p: float,
  rules: Mapping | None = None,
  stream: bool = False,
  logprob_temperature: float = 1.0,
  group: int = 1,
):
  """The jitted sampler for one (model structure, bucket, sampling settings, rules, streaming or not, prompt
  group): built once, then reused. The streaming variant takes one more argument, the sink id. `rules` None
  means the ambient ones (`use_rules`); either way they are part of the key, as they are read at trace time.
  `group` G > 1: rows g*G .. g*G+G-1 share one prompt, prefilled once (shared prompt prefill)."""
  table = current_rules() if rules is None else resolve_rules(rules)
  rules_key = tuple(sorted(table.items()))
  settings = (float(temperature), int(top_k), float(top_p), float(logprob_temperature))
  key = (graphdef, batch, prompt, budget, settings, rules_key, bool(stream), int(group))
  if key not in _COMPILED:

    def fn(state, *args):
      with use_rules(table):  # the model's constraints and MoE dispatch read them while tracing
        return _generate_device(
          graphdef,
          state,
          *args,
          budget=budget,
          temperature=float(temperature),
          top_k=int(top_k),
          top_p=float(top_p),
          logprob_temperature=float(logprob_temperature),
          group=int(group),
        )

    _COMPILED[key] = jax.jit(fn)
  return _COMPILED[key]


# ------------------------------------------------------------------ host entry point
def device_inputs(
  prompts: list[list[int]],
  *,
  max_new_tokens: int,
  eos_id: int | None = None,
  seed: int = 0,
  num_samples: int = 1,
  rules: Mapping | None = None,
):
  """Buckets (B, P, N) and the sampler's array arguments for `prompts`, padded to the buckets."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  rows = [list(p) for p in prompts for _ in range(num_samples)]
  n = len(rows)
  lens = np.array([len(r) for r in rows], np.int32)
  # Batch buckets start at 1 (a single CLI request must not pay for 8 rows), or at the number of batch
  # shards under a mesh so every device gets rows; lengths start at 8.
  B, P, N = bucket(n, shard_count("act_batch", rules)), bucket(lens.max()), bucket(max_new_tokens)

  # PAD: right-pad prompts to P, rows to B (padding rows: a 1-token prompt, done from the start).
  tokens_BP = np.full((B, P), PAD_ID, np.int32)
  for i, r in enumerate(rows):
    tokens_BP[i, : len(r)] = r
  len_B = np.ones((B,), np.int32)
  len_B[:n] = lens
  real_B = np.arange(B) < n
  eos = -1 if eos_id is None else int(eos_id)
  args = (
    jnp.asarray(tokens_BP),
    jnp.asarray(len_B),
    jnp.arange(B, dtype=jnp.int32),
    jnp.asarray(real_B),
    jnp.uint32(seed),
    jnp.int32(max_new_tokens),
    jnp.int32(eos),
  )
  return (B, P, N), args


def generate(
  model: nnx.Module,
  prompts: list[list[int]],
  *,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_p: float = 1.0,
  top_k: int = 0,
  eos_id: int | None = None,
  seed: int = 0,
  num_samples: int = 1,
  rules: Mapping | None = None,
  stream: Callable[[np.ndarray, np.ndarray], None] | None = None,
  logprob_temperature: float = 1.0,
) -> SampleResult:
  """Samples `num_samples` completions per prompt (rows p*G .. p*G+G-1 belong to prompt p).

  `rules` overrides the ambient logical sharding rules (used under `jax.set_mesh`). `stream(tokens [n], active [n])`
  is called on the host after each sampling step, in order, with every row's new token; rows whose
  `active` is False had already finished (their token is padding). `logprob_temperature`: the returned
  log-probs are those of softmax(logits / it) (default 1: the model's own distribution)."""
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or logprob_temperature <= 0:
    raise ValueError(f"bad sampling settings: temperature={temperature}, top_p={top_p}, top_k={top_k}")
  (B, P, N), args = device_inputs(
    prompts, max_new_tokens=max_new_tokens, eos_id=eos_id, seed=seed, num_samples=num_samples, rules=rules
  )
  n, max_prompt = len(prompts) * num_samples, max(len(p) for p in prompts)

  graphdef, state = nnx.split(model)
  group = num_samples if SHARED_PREFILL else 1
  fn = compiled(graphdef, B, P, N, temperature, top_k, top_p, rules, stream is not None, logprob_temperature, group)
  sink_id = None
  if stream is not None:
    sink_id = next(_SINK_IDS)
    _SINKS[sink_id] = lambda t, tok, active: stream(tok[:n], active[:n]) if active[:n].any() else None
    args = args + (jnp.int32(sink_id),)
  try:
    out = jax.device_get(fn(state, *args))
    if sink_id is not None:
      jax.effects_barrier()  # every callback has run before the sink goes
  finally:
    _SINKS.pop(sink_id, None)
  tok, lp, length, ex, pex = out
  T = max_new_tokens
  return SampleResult(
    tokens=np.asarray(tok[:n, :T], np.int32),
    logprobs=np.asarray(lp[:n, :T], np.float32),
    lengths=np.asarray(length[:n], np.int32),
    experts=None if ex is None else np.asarray(ex[:n, :T], np.int32),
    prompt_experts=None if pex is None else np.asarray(pex[:n, :max_prompt], np.int32),
  )
