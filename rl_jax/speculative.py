"""MTP speculative decoding: the model's multi-token-prediction module drafts, one main forward verifies.

State after a step (per row): the last accepted token x_L sits at position L = prompt_len + length - 1; the
main cache is valid for slots < L; the MTP cache for slots < L (slot j holds the MTP block's input made of the
main hidden h_j and the embedding of x_{j+1}); `draft` holds the next K drafted tokens x_{L+1..L+K}.

One step (all fixed shapes, one `lax.while_loop` iteration):
  1. VERIFY: the main model runs over [x_L, d_1 .. d_K] at positions L .. L+K (writing its cache there).
  2. ACCEPT: greedy accepts the longest prefix of drafts equal to the main argmax; sampled accepts d_j with
     probability min(1, p(d_j) / q(d_j)) (p: the main model's tempered distribution, q: the draft's); the token
     after the accepted prefix is the main argmax (greedy), a draw from normalize(max(0, p - q)) after a
     rejection, or a draw from p when every draft was accepted. So greedy output is plain greedy decoding's and
     sampled output has exactly the model's distribution (Leviathan et al. 2023; Chen et al. 2023).
  3. DRAFT: MTP module 1 runs over positions L .. L+K with the verify step's hidden states and the tokens just
     emitted, writing its cache; its output at the last accepted position drafts d'_1. A model with D > 1 MTP
     modules (V3's sequential design) drafts d'_j with module j, which reads module j-1's hidden states and the
     tokens one further along (d'_{j-1} at the last accepted position), as in training. Drafts past D chain the
     last module (its output hidden and the previous draft, one position further, as vLLM does), which only
     ever makes drafts worse, never the output wrong.
Rejected drafts leave stale cache slots behind the row's end: they are overwritten (the next step writes from
the new L) before any query can see them, so nothing is rolled back or reallocated. Module j > 1 is the
exception: its slot p holds x_{p+j}, so its j-1 slots before the new L were written with drafts; those a step
rejected stay wrong, which can only lower later acceptance, never change the output.

Log-probs are the main model's unmodified ones (temperature 1), as `rl_jax.sampling.generate` returns by
default. A row's sample depends only on (seed, its row index, its prompt). MoE models should use dropless
dispatch (`moe_capacity_factor: null`) so that verifying K+1 tokens at once routes exactly as decoding one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rl_jax.models.attention import Causal, causal_mask
from rl_jax.sampling import PAD_ID, bucket


class SpecResult(NamedTuple):
  tokens: np.ndarray  # int32 [N, max_new_tokens]; PAD_ID after a row's end (EOS included)
  logprobs: np.ndarray  # float32 [N, max_new_tokens]; the main model's log p(token); 0 after the end
  lengths: np.ndarray  # int32 [N]; generated tokens, EOS counted
  acceptance_rate: float  # accepted drafts / drafted tokens
  drafted: int
  accepted: int
  steps: int  # verify forwards (the prefill not counted)


class _Carry(NamedTuple):
  t: jax.Array  # int32 []: step counter (0 is the prefill)
  tokens: jax.Array  # int32 [B, N + K + 1]
  logprobs: jax.Array  # float32 [B, N + K + 1]
  lengths: jax.Array  # int32 [B]
  done: jax.Array  # bool [B]
  cache: Any  # main model cache
  mtp_cache: Any  # one cache per MTP module drafting (min(K, D) of them)
  draft: jax.Array  # int32 [B, K]
  q: jax.Array  # float32 [B, K, V] draft probabilities (sampled) or [B, K, 1] zeros (greedy)
  drafted: jax.Array  # int32 [B]
  accepted: jax.Array  # int32 [B]


# ------------------------------------------------------------------ acceptance (module level: tests break them)
def accept_rule(p_BKV, q_BKV, draft_BK, u_BK):
  """Per draft: accepted with probability min(1, p(d) / q(d)), i.e. u * q(d) < p(d) for u ~ U[0, 1)."""
  p_d = jnp.take_along_axis(p_BKV, draft_BK[..., None], -1)[..., 0]
  q_d = jnp.take_along_axis(q_BKV, draft_BK[..., None], -1)[..., 0]
  return u_BK * q_d < p_d


def residual(p_BV, q_BV):
  """normalize(max(0, p - q)): what a rejection draws from (q = 0 after a full accept: plain p)."""
  r = jnp.maximum(p_BV - q_BV, 0.0)
  total = r.sum(-1, keepdims=True)
  return jnp.where(total > 0, r / jnp.where(total > 0, total, 1.0), p_BV)  # p = q exactly: never reached


# ------------------------------------------------------------------ the MTP block with a cache
def _mtp_hidden(model, module, h_BTD, tok_BT, pos_BT, cache, prefill: bool = False):
  """The MTP block's output at positions `pos` from the main hidden h_i and token x_{i+1}; writes its cache.
  `prefill`: pos are 0..T-1, attended among themselves as in training (models/attention.py)."""
  emb = model.embed_tokens(tok_BT)
  x = jnp.concatenate([module.enorm(emb), module.hnorm(h_BTD)], axis=-1) @ module.eh_proj[...].astype(module.dtype)
  mask = Causal() if prefill else causal_mask(pos_BT, None, next(iter(cache.values())).shape[1])
  x, cache, _ = module.block(x, pos_BT, mask, cache)
  return x, cache


def _pick(logits_BV, key_B, temperature: float):
  """A draft token and its distribution q ([B, 1] zeros when greedy: never read)."""
  if temperature == 0:
    return jnp.argmax(logits_BV, -1).astype(jnp.int32), jnp.zeros(logits_BV.shape[:1] + (1,), jnp.float32)
  scaled = logits_BV.astype(jnp.float32) / temperature
  return jax.vmap(jax.random.categorical)(key_B, scaled).astype(jnp.int32), jax.nn.softmax(scaled, -1)


def _module_tokens(seq_BT, drafts, idx_B, j: int):
  """MTP module j's input tokens x_{p+j} at the T positions: `seq` (x_{p+1} at index p, known up to idx) shifted by
  j-1, then the drafts made so far past idx (module j at idx reads draft j-1)."""
  T = seq_BT.shape[1]
  u_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) + (j - 1), seq_BT.shape)
  tok_BT = jnp.take_along_axis(seq_BT, jnp.minimum(u_BT, T - 1), axis=1)
  if not drafts:
    return tok_BT
  past = u_BT - idx_B[:, None] - 1
  d_BT = jnp.take_along_axis(jnp.stack(drafts, 1), jnp.clip(past, 0, len(drafts) - 1), axis=1)
  return jnp.where(past >= 0, d_BT, tok_BT)


def _draft(model, h_BTD, seq_BT, pos_BT, idx_B, mcaches, key_B, temperature: float, K: int, prefill: bool = False):
  """Drafts K tokens from the T positions given (`prefill`: the prompt's 0..T-1): MTP module j (j <= D, the
  model's modules, in V3's sequence: module j reads module j-1's hidden) runs over all T positions, writing its
  cache, and drafts from its output at index idx; drafts past D chain the last module one position at a time."""
  D = min(K, len(model.mtp))
  h, drafts, qs, mcaches = h_BTD, [], [], list(mcaches)
  key = lambda j: jax.vmap(lambda k: jax.random.fold_in(k, j))(key_B)
  for j in range(D):
    module = model.mtp[j]
    tok_BT = _module_tokens(seq_BT, drafts, idx_B, j + 1)
    h, mcaches[j] = _mtp_hidden(model, module, h, tok_BT, pos_BT, mcaches[j], prefill)
    hk_B1D = jnp.take_along_axis(h, idx_B[:, None, None], axis=1)
    d_B, q_B = _pick(model.head(module.head_norm(hk_B1D))[:, 0], key(j), temperature)
    drafts.append(d_B)
    qs.append(q_B)
  pos_B = jnp.take_along_axis(pos_BT, idx_B[:, None], axis=1)[:, 0]
  for j in range(D, K):  # chain: the last module's output hidden and the last draft, one position further
    hk_B1D, mcaches[-1] = _mtp_hidden(
      model, module, hk_B1D, drafts[-1][:, None], (pos_B + j - D + 1)[:, None], mcaches[-1]
    )
    d_B, q_B = _pick(model.head(module.head_norm(hk_B1D))[:, 0], key(j), temperature)
    drafts.append(d_B)
    qs.append(q_B)
  return jnp.stack(drafts, 1), jnp.stack(qs, 1), tuple(mcaches)


# ------------------------------------------------------------------ one verify step
def _accept(logits_BJV, draft_BK, q_BKV, key_B, temperature: float):
  """(n accepted drafts [B], the token after them [B]) from the main logits at the K+1 verified positions."""
  B, J, V = logits_BJV.shape
  K = J - 1
  if temperature == 0:
    ok_BK = jnp.argmax(logits_BJV[:, :K], -1) == draft_BK
  else:
    p_BJV = jax.nn.softmax(logits_BJV.astype(jnp.float32) / temperature, -1)
    u_BK = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1), (K,)))(key_B)
    ok_BK = accept_rule(p_BJV[:, :K], q_BKV, draft_BK, u_BK)
  n_B = jnp.sum(jnp.cumprod(ok_BK.astype(jnp.int32), axis=1), axis=1)
  if temperature == 0:
    last_B = jnp.argmax(jnp.take_along_axis(logits_BJV, n_B[:, None, None], 1)[:, 0], -1).astype(jnp.int32)
    return n_B, last_B
  q_pad = jnp.concatenate([q_BKV, jnp.zeros((B, 1, V), q_BKV.dtype)], axis=1)  # after a full accept: q = 0
  p_n = jnp.take_along_axis(p_BJV, n_B[:, None, None], 1)[:, 0]
  q_n = jnp.take_along_axis(q_pad, n_B[:, None, None], 1)[:, 0]
  r_BV = residual(p_n, q_n)
  logr = jnp.where(r_BV > 0, jnp.log(jnp.where(r_BV > 0, r_BV, 1.0)), -jnp.inf)
  last_B = jax.vmap(lambda k, lr: jax.random.categorical(jax.random.fold_in(k, 2), lr))(key_B, logr)
  return n_B, last_B.astype(jnp.int32)


def _emit(s: _Carry, logits_BJV, n_B, last_B, max_new, eos_id):
  """Writes the step's tokens (accepted drafts, then the main model's token) after each row's end,
  cut at EOS and at the budget; returns the new carry fields and the emitted tokens [B, J]."""
  B, J, _ = logits_BJV.shape
  j = jnp.arange(J)[None, :]
  emitted_BJ = jnp.where(j < n_B[:, None], jnp.pad(s.draft, ((0, 0), (0, 1))), last_B[:, None])
  count_B = jnp.where(s.done, 0, n_B + 1)
  is_eos = (emitted_BJ == eos_id) & (j < count_B[:, None])
  first_eos = jnp.where(is_eos.any(1), jnp.argmax(is_eos, 1), J)
  count_B = jnp.minimum(jnp.minimum(count_B, first_eos + 1), max_new - s.lengths)
  keep = j < count_B[:, None]
  lp_BJ = jnp.take_along_axis(jax.nn.log_softmax(logits_BJV.astype(jnp.float32), -1), emitted_BJ[..., None], -1)
  put = jax.vmap(lambda buf, new, at: jax.lax.dynamic_update_slice_in_dim(buf, new, at, axis=0))
  tokens = put(s.tokens, jnp.where(keep, emitted_BJ, PAD_ID), s.lengths)
  logprobs = put(s.logprobs, jnp.where(keep, lp_BJ[..., 0], 0.0), s.lengths)
  lengths = s.lengths + count_B
  done = s.done | (first_eos < count_B) | (lengths >= max_new)
  return tokens, logprobs, lengths, done, emitted_BJ


def _step(model, s: _Carry, prompt_len_B, keys_B, max_new, eos_id, temperature: float, K: int) -> _Carry:
  """VERIFY the drafts, ACCEPT a prefix plus one main token, DRAFT the next K."""
  L_B = prompt_len_B + s.lengths - 1
  pos_BJ = L_B[:, None] + jnp.arange(K + 1, dtype=jnp.int32)[None, :]
  last_tok = jnp.take_along_axis(s.tokens, (s.lengths - 1)[:, None], axis=1)
  out = model.forward(jnp.concatenate([last_tok, s.draft], 1), positions_BT=pos_BJ, cache=s.cache)
  step_keys = jax.vmap(lambda k: jax.random.fold_in(k, s.t))(keys_B)
  n_B, last_B = _accept(out.logits_BTV, s.draft, s.q, step_keys, temperature)
  tokens, logprobs, lengths, done, emitted_BJ = _emit(s, out.logits_BTV, n_B, last_B, max_new, eos_id)
  draft_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(step_keys)
  draft, q, mcache = _draft(model, out.hidden_BTD, emitted_BJ, pos_BJ, n_B, s.mtp_cache, draft_keys, temperature, K)
  active = (~s.done).astype(jnp.int32)
  return _Carry(
    s.t + 1, tokens, logprobs, lengths, done, out.cache, mcache, draft, q,
    s.drafted + active * K, s.accepted + active * n_B,
  )  # fmt: skip


# ------------------------------------------------------------------ the jitted program
def _prefill(model, prompts_BP, prompt_len_B, keys_B, max_new, eos_id, temperature: float, K: int, S: int):
  """Main and MTP caches over the prompts, the first token (main model) and the first K drafts."""
  B, P = prompts_BP.shape
  pos_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  out = model.forward(prompts_BP, cache=model.init_cache(B, S), last_only=True, prefill=True)  # positions 0..P-1
  h_BD = jnp.take_along_axis(out.hidden_BTD, (prompt_len_B - 1)[:, None, None], axis=1)[:, 0]
  logits_BV = model.head(h_BD[:, None])[:, 0]
  k0 = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys_B)
  if temperature == 0:
    tok_B = jnp.argmax(logits_BV, -1).astype(jnp.int32)
  else:
    pick = lambda k, lg: jax.random.categorical(jax.random.fold_in(k, 2), lg / temperature)
    tok_B = jax.vmap(pick)(k0, logits_BV.astype(jnp.float32)).astype(jnp.int32)
  lp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV.astype(jnp.float32), -1), tok_B[:, None], -1)[:, 0]
  # MTP position j pairs h_j with x_{j+1}: the prompt shifted left, the first generated token at len-1.
  shifted = jnp.roll(prompts_BP, -1, axis=1).at[jnp.arange(B), prompt_len_B - 1].set(tok_B)
  mcache = tuple(m.block.attn.init_cache(B, S, model.dtype) for m in model.mtp[: min(K, len(model.mtp))])
  draft_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(k0)
  draft, q, mcache = _draft(
    model, out.hidden_BTD, shifted, pos_BP, prompt_len_B - 1, mcache, draft_keys, temperature, K, prefill=True
  )
  N = S - P - 2 * K - 2  # the budget bucket
  lengths = jnp.ones((B,), jnp.int32)
  zeros = jnp.zeros((B,), jnp.int32)
  return _Carry(
    jnp.int32(1),
    jnp.zeros((B, N + K + 1), jnp.int32).at[:, 0].set(tok_B),
    jnp.zeros((B, N + K + 1), jnp.float32).at[:, 0].set(lp_B),
    lengths, (tok_B == eos_id) | (lengths >= max_new), out.cache, mcache, draft, q, zeros, zeros,
  )  # fmt: skip


def _device(graphdef, state, prompts_BP, prompt_len_B, row_ids_B, real_B, seed, max_new, eos_id, *, budget, K, temp):
  model = nnx.merge(graphdef, state)
  S = prompts_BP.shape[1] + budget + 2 * K + 2
  keys_B = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(row_ids_B)
  s = _prefill(model, prompts_BP, prompt_len_B, keys_B, max_new, eos_id, temp, K, S)
  s = s._replace(done=s.done | ~real_B)
  body = lambda s: _step(model, s, prompt_len_B, keys_B, max_new, eos_id, temp, K)
  s = jax.lax.while_loop(lambda s: jnp.any(~s.done), body, s)
  return s.tokens, s.logprobs, s.lengths, s.drafted, s.accepted, s.t - 1


_COMPILED: dict[tuple, Any] = {}


def compiled(graphdef, batch: int, prompt: int, budget: int, draft_len: int, temperature: float):
  """The jitted speculative sampler for one (model structure, bucket, draft length, temperature)."""
  key = (graphdef, batch, prompt, budget, int(draft_len), float(temperature))
  if key not in _COMPILED:

    def fn(state, *args):
      return _device(graphdef, state, *args, budget=budget, K=int(draft_len), temp=float(temperature))

    _COMPILED[key] = jax.jit(fn)
  return _COMPILED[key]


# ------------------------------------------------------------------ host entry point
def _check(model, prompts, max_new_tokens: int, temperature: float, draft_len: int) -> None:
  if not len(getattr(model, "mtp", ())):
    raise ValueError("speculative decoding needs an MTP module (model.num_nextn_predict_layers >= 1)")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if draft_len < 1:
    raise ValueError(f"draft_len must be >= 1, got {draft_len}")
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")


def generate(
  model: nnx.Module,
  prompts: list[list[int]],
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  seed: int = 0,
  eos_id: int | None = None,
  draft_len: int = 1,
) -> SpecResult:
  """Speculative decoding with the model's MTP module drafting `draft_len` tokens a step: greedy
  (temperature 0) output equals plain greedy decoding, sampled output has the model's distribution at
  `temperature` (no top-k / top-p). Row i draws from fold_in(key(seed), i)."""
  _check(model, prompts, max_new_tokens, temperature, draft_len)
  n = len(prompts)
  lens = np.array([len(p) for p in prompts], np.int32)
  B, P, N = bucket(n, 1), bucket(lens.max()), bucket(max_new_tokens)
  tokens_BP = np.full((B, P), PAD_ID, np.int32)
  for i, p in enumerate(prompts):
    tokens_BP[i, : len(p)] = p
  len_B = np.ones((B,), np.int32)
  len_B[:n] = lens
  args = (
    jnp.asarray(tokens_BP), jnp.asarray(len_B), jnp.arange(B, dtype=jnp.int32), jnp.asarray(np.arange(B) < n),
    jnp.uint32(seed), jnp.int32(max_new_tokens), jnp.int32(-1 if eos_id is None else eos_id),
  )  # fmt: skip
  graphdef, state = nnx.split(model)
  fn = compiled(graphdef, B, P, N, draft_len, temperature)
  tok, lp, length, drafted, accepted, steps = jax.device_get(fn(state, *args))
  d, a = int(drafted[:n].sum()), int(accepted[:n].sum())
  T = max_new_tokens
  return SpecResult(
    tokens=np.asarray(tok[:n, :T], np.int32),
    logprobs=np.asarray(lp[:n, :T], np.float32),
    lengths=np.asarray(length[:n], np.int32),
    acceptance_rate=a / d if d else 0.0,
    drafted=d,
    accepted=a,
    steps=int(steps),
  )
