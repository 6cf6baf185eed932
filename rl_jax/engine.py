"""Rollout engine: continuous batching over a fixed number of decode slots, with shared prompt prefill.

The device holds `slots` rows, each with its own cache, step counter, position and budget. Two jitted programs,
compiled once per engine shape, run on it: `prefill` writes newly admitted rows into free slots (each distinct
prompt of the admission is prefilled once and broadcast to its rows, whose first token each samples with its own
key), and `decode` runs up to `chunk` decode steps over all slots, returning early once enough rows finished while
requests wait. The host then reads the finished rows out and refills their slots from the pending queue, so a
long-tailed batch no longer computes every row until its longest one ends.

Row r's sample depends only on (seed, r, its prompt): step t of row r samples with
`fold_in(fold_in(key(seed), r), t)` exactly as `sampling.generate`, so the tokens (and log-probs, up to float
rounding) are the static sampler's whatever the slot count or arrival order. MoE models should use dropless
dispatch (the default), so rows never compete for expert capacity. Under `jax.set_mesh` the slots are split over
the batch mesh axes (`slots` must be a multiple of their size).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rl_jax import sampling as S
from rl_jax.models.transformer import cache_length
from rl_jax.sharding.rules import constrain, current_rules, resolve_rules, shard_count, use_rules


class RowResult(NamedTuple):
  row: int  # the global row index the request gave
  prompt: tuple[int, ...]
  tokens: np.ndarray  # int32 [length]
  logprobs: np.ndarray  # float32 [length]
  experts: np.ndarray | None  # int32 [length, n_moe_layers, K]
  prompt_experts: np.ndarray | None  # int32 [len(prompt), n_moe_layers, K]


@dataclasses.dataclass
class Stats:
  """Work accounting: what was useful against what the device computed."""

  useful_tokens: int = 0  # tokens returned (EOS included)
  decode_steps: int = 0  # decode steps run over all slots
  decode_calls: int = 0  # host round trips
  slot_steps: int = 0  # token-slots computed by decode (slots x steps)
  prefill_calls: int = 0
  prefill_rows: int = 0  # rows admitted
  prefill_tokens: int = 0  # prompt tokens prefilled: each distinct prompt of an admission once (padded to P)
  prefill_tokens_per_row: int = 0  # what prefilling every row's own prompt copy would have taken (rows x P)
  prefill_tokens_computed: int = 0  # prefill_tokens plus the batch-bucket padding the programs computed
  prefill_s: float = 0.0
  decode_s: float = 0.0

  def summary(self) -> dict[str, float]:
    """Flat metrics (ratios included) for logs and benchmarks."""
    d = dataclasses.asdict(self)
    d["slot_utilization"] = self.useful_tokens / max(1, self.slot_steps)
    d["prefill_reduction"] = self.prefill_tokens_per_row / max(1, self.prefill_tokens)
    d["prefill_share"] = self.prefill_s / max(1e-9, self.prefill_s + self.decode_s)
    return d


class _Slots(NamedTuple):
  """Device state of every slot. Step t of a slot feeds its token t-1 and samples token t."""

  t: jax.Array  # int32 [S]
  tokens: jax.Array  # int32 [S, N]
  logprobs: jax.Array  # float32 [S, N]
  experts: Any  # int32 [S, N, L, K] or None
  prompt_experts: Any  # int32 [S, P, L, K] or None
  lengths: jax.Array  # int32 [S]
  done: jax.Array  # bool [S]: no more tokens will be sampled
  busy: jax.Array  # bool [S]: holds a request (finished ones until refilled)
  prompt_len: jax.Array  # int32 [S]
  key: jax.Array  # uint32 [S, ...]: the data of fold_in(key(seed), global row index)
  max_new: jax.Array  # int32 [S]
  cache: Any  # {layer group: {name: [L, S, P + N, ...]}}


def _constrain_slots(s: _Slots) -> _Slots:
  c = lambda x: None if x is None else constrain(x, ("act_batch",) + (None,) * (x.ndim - 1))
  return _Slots(*(c(x) for x in s[:-1]), cache=S.constrain_cache(s.cache))


def _finished(s: _Slots):
  """Rows whose last token was sampled (and, for MoE, fed so its routing is recorded)."""
  fed = s.lengths < s.t if s.experts is not None else True
  return s.busy & s.done & fed


def _row_keys(seed, row_S):
  """Each row's key data, as `sampling` derives it: fold_in(key(seed), global row)."""
  return jax.random.key_data(jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(row_S))


def _select(logits_SV, t_S, key_S, live_S, done_S, max_new_S, cfg):
  """Samples token t of every live row from its own key: (token, log-prob, active), as `sampling` does."""
  temperature, top_k, top_p, lp_temp = cfg
  keys = jax.vmap(lambda k, t: jax.random.fold_in(jax.random.wrap_key_data(k), t))(key_S, t_S)
  tok = S.sample_logits(logits_SV, keys, temperature, top_k, top_p)
  active = live_S & ~done_S & (t_S < max_new_S)
  tok = jnp.where(active, tok, S.PAD_ID)
  lp = jnp.where(active, S._token_logprob(logits_SV / lp_temp, tok), 0.0)
  return tok, lp, active


def _empty(model, slots: int, P: int, N: int) -> _Slots:
  """All slots free."""
  zi = lambda *shape: jnp.zeros(shape, jnp.int32)
  ex = pex = None
  n_moe = model.cfg.n_moe_layers
  if n_moe:
    K = model.cfg.num_experts_per_tok
    ex, pex = zi(slots, N, n_moe, K), zi(slots, P, n_moe, K)
  no, one = jnp.zeros((slots,), bool), jnp.ones((slots,), jnp.int32)
  tokens, lps = zi(slots, N), jnp.zeros((slots, N), jnp.float32)
  keys = _row_keys(jnp.uint32(0), zi(slots))
  return _Slots(one, tokens, lps, ex, pex, zi(slots), ~no, no, one, keys, one, model.init_cache(slots, P + N))


def _prefill(model, s: _Slots, prompts_UP, plen_U, src_R, row_R, max_new_R, slot_R, seed, eos_id, cfg) -> _Slots:
  """Admits rows R into slots `slot_R` (an out-of-range slot: padding, dropped); row r's prompt is
  prompts_UP[src_R[r]]: each distinct prompt is prefilled once and its cache copied to its rows."""
  P, N = prompts_UP.shape[1], s.tokens.shape[1]
  R = src_R.shape[0]
  prompts_UP = constrain(prompts_UP, ("act_batch", None))
  cache_U = S.constrain_cache(model.init_cache(prompts_UP.shape[0], P))
  # positions 0..P-1: the training attention path (blockwise, sequence-parallel on a `sequence` mesh)
  out = model.forward(prompts_UP, cache=cache_U, last_only=True, prefill=True)
  h_UD = jnp.take_along_axis(out.hidden_BTD, (plen_U - 1)[:, None, None], axis=1)[:, 0]
  logits_RV = model.head(h_UD[:, None])[:, 0][src_R]
  valid_R, plen_R = slot_R < s.t.shape[0], plen_U[src_R]
  zeros = jnp.zeros((R,), jnp.int32)
  key_R = _row_keys(seed, row_R)
  tok, lp, active = _select(logits_RV, zeros, key_R, valid_R, ~valid_R, max_new_R, cfg)
  lengths = active.astype(jnp.int32)
  put = lambda a, b: a.at[slot_R].set(b, mode="drop")
  # Slots P.. keep stale entries: a row at position p only attends to slots <= p, all written by then.
  cache = jax.tree.map(lambda a, new: a.at[:, slot_R, :P].set(new[:, src_R], mode="drop"), s.cache, out.cache)
  ex, pex = s.experts, s.prompt_experts
  if ex is not None:
    in_prompt = jnp.arange(P)[None, :, None, None] < plen_R[:, None, None, None]
    ex = put(ex, jnp.zeros((R,) + ex.shape[1:], jnp.int32))
    pex = put(pex, jnp.where(in_prompt, S.stack_experts(out.routing)[src_R], 0))
  return _constrain_slots(
    _Slots(
      t=put(s.t, zeros + 1),
      tokens=put(s.tokens, jnp.zeros((R, N), jnp.int32).at[:, 0].set(tok)),
      logprobs=put(s.logprobs, jnp.zeros((R, N), jnp.float32).at[:, 0].set(lp)),
      experts=ex,
      prompt_experts=pex,
      lengths=put(s.lengths, lengths),
      done=put(s.done, ~active | (tok == eos_id) | (lengths >= max_new_R)),
      busy=put(s.busy, valid_R),
      prompt_len=put(s.prompt_len, plen_R),
      key=put(s.key, key_R),
      max_new=put(s.max_new, max_new_R),
      cache=cache,
    )
  )


def _step(model, s: _Slots, eos_id, cfg) -> _Slots:
  """One decode step of every unfinished slot: feed token t-1 (recording its experts), sample token t."""
  n_slots, N = s.tokens.shape
  live = s.busy & ~_finished(s)
  idx = jnp.arange(n_slots)
  prev = s.tokens[idx, jnp.maximum(s.t - 1, 0)]
  cache_len = cache_length(s.cache)
  pos = jnp.minimum(s.prompt_len + s.t - 1, cache_len - 1)  # idle slots write somewhere harmless
  out = model.forward(prev[:, None], positions_BT=pos[:, None], cache=s.cache)
  experts = s.experts
  if experts is not None:  # a live row's token t-1 is always a sampled one (lengths >= t): record its routing
    at = jnp.where(live, s.t - 1, N)
    experts = experts.at[idx, at].set(S.stack_experts(out.routing)[:, 0], mode="drop")
  tok, lp, active = _select(out.logits_BTV[:, 0], s.t, s.key, live, s.done, s.max_new, cfg)
  lengths = s.lengths + active
  col = jnp.where(active, s.t, N)  # only sampled tokens are written (N: dropped)
  return _constrain_slots(
    s._replace(
      t=jnp.where(live, s.t + 1, s.t),
      tokens=s.tokens.at[idx, col].set(tok, mode="drop"),
      logprobs=s.logprobs.at[idx, col].set(lp, mode="drop"),
      experts=experts,
      lengths=lengths,
      done=s.done | (active & (tok == eos_id)) | (lengths >= s.max_new),
      cache=out.cache,
    )
  )


def _decode(model, s: _Slots, eos_id, chunk, want, cfg):
  """Up to `chunk` steps; stops early once `want` (> 0) rows finished in this call or no slot is live.
  Returns the state, the steps run and the finished mask."""
  before = _finished(s)

  def cond(c):
    i, s = c
    fin = _finished(s)
    newly = jnp.sum(fin & ~before)
    return (i < chunk) & jnp.any(s.busy & ~fin) & ((want <= 0) | (newly < want))

  def body(c):
    i, s = c
    return i + 1, _step(model, s, eos_id, cfg)

  steps, s = jax.lax.while_loop(cond, body, (jnp.int32(0), s))
  return s, steps, _finished(s)


_COMPILED: dict[tuple, Any] = {}


def programs(graphdef, slots: int, P: int, N: int, cfg: tuple, rules: Mapping | None = None):
  """(empty, prefill, decode) jitted for one engine shape (P, N: the padded prompt and budget buckets; cfg:
  (temperature, top_k, top_p, logprob_temperature)); built once per key, then reused. `rl_jax.plan` compiles
  them for a target ahead of time."""
  table = current_rules() if rules is None else resolve_rules(rules)
  key = (graphdef, slots, P, N, cfg, tuple(sorted(table.items())))
  if key not in _COMPILED:

    def wrap(fn, **static):
      def run(state, *args):
        with use_rules(table):
          return fn(nnx.merge(graphdef, state), *args, **static)

      return run

    empty = jax.jit(wrap(lambda m: _constrain_slots(_empty(m, slots, P, N))))
    prefill = jax.jit(wrap(_prefill, cfg=cfg), donate_argnums=1)
    decode = jax.jit(wrap(_decode, cfg=cfg), donate_argnums=1)
    _COMPILED[key] = (empty, prefill, decode)
  return _COMPILED[key]


class Engine:
  """Continuous-batching sampler: `submit` requests, then iterate `run()` for rows as they finish."""

  def __init__(
    self,
    model: nnx.Module,
    *,
    slots: int,
    max_prompt_len: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_id: int | None = None,
    seed: int = 0,
    logprob_temperature: float = 1.0,
    chunk: int = 32,
    refill_at: int | None = None,
    rules: Mapping | None = None,
  ):
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or logprob_temperature <= 0:
      raise ValueError(f"bad sampling settings: temperature={temperature}, top_p={top_p}, top_k={top_k}")
    shards = max(1, shard_count("act_batch", rules))
    if slots < 1 or slots % shards:
      raise ValueError(f"slots must be a positive multiple of the {shards} batch shards, got {slots}")
    if max_new_tokens < 1 or max_prompt_len < 1 or chunk < 1:
      raise ValueError(
        f"max_new_tokens, max_prompt_len and chunk must be >= 1: {max_new_tokens, max_prompt_len, chunk}"
      )
    self.slots, self.shards, self.max_new_tokens = slots, shards, max_new_tokens
    self.P, self.N = S.bucket(max_prompt_len), S.bucket(max_new_tokens)
    self.max_prompt_len, self.chunk = max_prompt_len, chunk
    self.refill_at = refill_at or max(1, slots // 8)  # refill once this many slots are free (or all done)
    cfg = (float(temperature), int(top_k), float(top_p), float(logprob_temperature))
    self.graphdef, self.state = nnx.split(model)
    self._empty, self._prefill, self._decode = programs(self.graphdef, slots, self.P, self.N, cfg, rules)
    self._seed, self._eos = jnp.uint32(seed), jnp.int32(-1 if eos_id is None else eos_id)
    self._pending: collections.deque = collections.deque()
    self._slot_rows: list[tuple | None] = [None] * slots
    self._dev: _Slots | None = None
    self.stats = Stats()

  def submit(self, prompt: Sequence[int], *, num_samples: int = 1, rows: Sequence[int] | None = None,
             max_new_tokens: int | Sequence[int] | None = None) -> None:  # fmt: skip
    """Queues `num_samples` rows of `prompt` with global row indices `rows` (default: 0..num_samples-1)
    and a budget each (default: the engine's)."""
    prompt = tuple(int(x) for x in prompt)
    if not 1 <= len(prompt) <= self.max_prompt_len:
      raise ValueError(f"prompt length {len(prompt)} not in [1, max_prompt_len={self.max_prompt_len}]")
    rows = list(range(num_samples)) if rows is None else [int(r) for r in rows]
    budgets = max_new_tokens if isinstance(max_new_tokens, Sequence) else [max_new_tokens] * len(rows)
    if len(rows) != num_samples or len(budgets) != num_samples:
      raise ValueError(f"rows / max_new_tokens: need {num_samples} entries, got {len(rows)} / {len(budgets)}")
    request = []
    for r, b in zip(rows, budgets):
      b = self.max_new_tokens if b is None else int(b)
      if not 1 <= b <= self.max_new_tokens:
        raise ValueError(f"row {r}: max_new_tokens {b} not in [1, {self.max_new_tokens}]")
      request.append((prompt, r, b))
    if request:
      self._pending.append(request)

  def run(self, callback: Callable[[RowResult], None] | None = None) -> Iterator[RowResult]:
    """Decodes until every submitted row finished, yielding (and passing to `callback`) each as it finishes."""
    if self._dev is None:
      self._dev = self._empty(self.state)
    while self._pending or any(r is not None for r in self._slot_rows):
      self._admit()
      for res in self._decode_chunk():
        if callback is not None:
          callback(res)
        yield res

  def _admit(self) -> None:
    free = [i for i, r in enumerate(self._slot_rows) if r is None]
    admitted = self._take(len(free))
    take = len(admitted)
    if not take:
      return
    t0 = time.perf_counter()
    prompts = list(dict.fromkeys(p for p, _, _ in admitted))  # distinct, in order
    R = min(self.slots, S.bucket(take, self.shards))
    U = min(R, S.bucket(len(prompts), self.shards))
    toks = np.full((U, self.P), S.PAD_ID, np.int32)
    plen = np.ones((U,), np.int32)
    for u, p in enumerate(prompts):
      toks[u, : len(p)], plen[u] = p, len(p)
    where = {p: u for u, p in enumerate(prompts)}
    src, row, budget = (np.zeros((R,), np.int32) for _ in range(3))
    slot = np.full((R,), self.slots, np.int32)  # out of range: a padding row, dropped
    for j, (p, r, b) in enumerate(admitted):
      src[j], row[j], budget[j], slot[j] = where[p], r, b, free[j]
      self._slot_rows[free[j]] = (p, r)
    args = (toks, plen, src, row, budget, slot, self._seed, self._eos)
    self._dev = self._prefill(self.state, self._dev, *args)
    jax.block_until_ready(self._dev.t)
    st = self.stats
    st.prefill_calls, st.prefill_rows = st.prefill_calls + 1, st.prefill_rows + take
    st.prefill_tokens += len(prompts) * self.P
    st.prefill_tokens_per_row += take * self.P
    st.prefill_tokens_computed += U * self.P
    st.prefill_s += time.perf_counter() - t0

  def _take(self, n_free: int) -> list[tuple]:
    """Rows to admit: whole requests in order while they fit (so a prompt is prefilled once for all its
    rows); a request larger than the engine is split."""
    out = []
    while self._pending and n_free:
      req = self._pending[0]
      if len(req) > n_free and len(req) <= self.slots:
        break
      k = min(len(req), n_free)
      out, n_free = out + req[:k], n_free - k
      if k == len(req):
        self._pending.popleft()
      else:
        self._pending[0] = req[k:]
    return out

  def _decode_chunk(self) -> list[RowResult]:
    t0 = time.perf_counter()
    want = 0
    if self._pending:  # return once the next request fits
      free = sum(r is None for r in self._slot_rows)
      want = max(1, min(len(self._pending[0]), self.slots) - free, self.refill_at)
    self._dev, steps, fin = self._decode(self.state, self._dev, self._eos, self.chunk, want)
    steps, fin = int(steps), np.asarray(fin)
    ready = [i for i in np.flatnonzero(fin) if self._slot_rows[i] is not None]
    out = self._read(ready)
    st = self.stats
    st.decode_steps, st.decode_calls = st.decode_steps + steps, st.decode_calls + 1
    st.slot_steps += steps * self.slots
    st.useful_tokens += sum(len(r.tokens) for r in out)
    st.decode_s += time.perf_counter() - t0
    return out

  def _read(self, ready: list[int]) -> list[RowResult]:
    if not ready:
      return []
    d = self._dev
    # Whole slot arrays, indexed on the host: indexing on the device would compile a gather for every new
    # count of finished rows (measured: a GRPO step's sampling 0.10 s -> 0.30 s on average).
    idx = np.asarray(ready)
    parts = [x[idx] for x in jax.device_get((d.tokens, d.logprobs, d.lengths))]
    ex = None if d.experts is None else [x[idx] for x in jax.device_get((d.experts, d.prompt_experts))]
    out = []
    for j, i in enumerate(ready):
      prompt, row = self._slot_rows[i]
      n = int(parts[2][j])
      e = None if ex is None else (ex[0][j, :n], ex[1][j, : len(prompt)])
      out.append(RowResult(row, prompt, parts[0][j, :n], parts[1][j, :n], *(e or (None, None))))
      self._slot_rows[i] = None
    return out


def generate(model, prompts: list[list[int]], *, num_samples: int = 1, max_new_tokens: int, slots: int = 0,
             max_new_per_row: Sequence[int] | None = None, **kw) -> tuple[S.SampleResult, Stats]:  # fmt: skip
  """`sampling.generate`'s rows (p*G + g: prompt p's g-th sample) through the engine, as a SampleResult (rows
  past a per-row budget are padded), with the engine's accounting. `slots` 0: one per row, rounded to shards."""
  n = len(prompts) * num_samples
  slots = slots or S.bucket(n, max(1, shard_count("act_batch", kw.get("rules"))))
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  eng = Engine(model, slots=slots, max_prompt_len=max(len(p) for p in prompts),
               max_new_tokens=max_new_tokens, **kw)  # fmt: skip
  for p, prompt in enumerate(prompts):
    rows = range(p * num_samples, (p + 1) * num_samples)
    budgets = None if max_new_per_row is None else [max_new_per_row[r] for r in rows]
    eng.submit(prompt, num_samples=num_samples, rows=rows, max_new_tokens=budgets)
  return collect(eng.run(), n, max_new_tokens, max(len(p) for p in prompts)), eng.stats


def collect(results, n: int, T: int, max_prompt: int) -> S.SampleResult:
  """Rows 0..n-1 of finished RowResults, padded into a SampleResult."""
  tokens, lps, lengths = np.zeros((n, T), np.int32), np.zeros((n, T), np.float32), np.zeros((n,), np.int32)
  ex = pex = None
  for r in results:
    k = len(r.tokens)
    tokens[r.row, :k], lps[r.row, :k], lengths[r.row] = r.tokens, r.logprobs, k
    if r.experts is not None:
      if ex is None:
        ex = np.zeros((n, T) + r.experts.shape[1:], np.int32)
        pex = np.zeros((n, max_prompt) + r.experts.shape[1:], np.int32)
      ex[r.row, :k], pex[r.row, : len(r.prompt)] = r.experts, r.prompt_experts
  return S.SampleResult(tokens, lps, lengths, ex, pex)


COUNTERS = ("useful_tokens", "slot_steps", "prefill_tokens", "prefill_tokens_per_row", "prefill_s", "decode_s")


def log_metrics(counters: Mapping[str, float]) -> dict[str, float]:
  """A training step's rollout accounting from summed `COUNTERS` (empty: no engine ran, nothing logged)."""
  if not counters:
    return {}
  c = counters
  return {
    "rollout_slot_utilization": c["useful_tokens"] / max(1, c["slot_steps"]),
    "rollout_prefill_reduction": c["prefill_tokens_per_row"] / max(1, c["prefill_tokens"]),
    "time_prefill_s": c["prefill_s"],
    "time_decode_s": c["decode_s"],
  }
