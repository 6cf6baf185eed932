"""Model invariants: absorbed == naive MLA, causality, routing vs its formula, dispatch, presets, configs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_jax import models
from rl_jax.models.config import ModelConfig, RopeConfig, from_dict, preset
from rl_jax.models.configlib import ConfigError
from rl_jax.models.moe import dispatch_buckets, dispatch_capacity, dispatch_dropless, dispatch_gather, route

TINY_DS = preset(
  "tiny-moe",
  vocab_size=256,
  rope=RopeConfig(
    type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=1.0, mscale_all_dim=1.0, interleave=True
  ),
)
TINY_LLAMA = ModelConfig(
  arch="llama",
  vocab_size=256,
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
)


def _ids(B=2, T=24, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, 256, (B, T)), jnp.int32)


def test_absorbed_mla_equals_naive():
  """The latent-cache (absorbed) path equals the naive per-head path: whole prompt, then token by token."""
  model = models.build(TINY_DS, seed=1)
  ids = _ids()
  naive = np.asarray(model(ids))
  cache = model.init_cache(2, 32)
  full = model.forward(ids, cache=cache)
  np.testing.assert_allclose(np.asarray(full.logits_BTV), naive, atol=1e-5, rtol=0)
  # prefill 10 tokens, then one token at a time through the absorbed decode path
  out = model.forward(ids[:, :10], cache=model.init_cache(2, 32))
  cache, steps = out.cache, [np.asarray(out.logits_BTV)]
  for t in range(10, 24):
    pos = jnp.full((2, 1), t, jnp.int32)
    o = model.forward(ids[:, t : t + 1], positions_BT=pos, cache=cache)
    cache = o.cache
    steps.append(np.asarray(o.logits_BTV))
  np.testing.assert_allclose(np.concatenate(steps, axis=1), naive, atol=1e-5, rtol=0)
  first = cache["dense_layers"]  # stacked over the group's layers: [L, B, S, ...]
  assert first["c"].shape == (1, 2, 32, TINY_DS.kv_lora_rank) and first["k_pe"].shape == (1, 2, 32, 8)


@pytest.mark.parametrize("cfg", [TINY_DS, TINY_LLAMA], ids=["deepseek_v3", "llama"])
def test_causality(cfg):
  """Changing token t+1 never changes the logits at positions <= t."""
  model = models.build(cfg, seed=2)
  ids = _ids(1, 20)
  base = np.asarray(model.forward(ids, mtp=cfg.num_nextn_predict_layers > 0).logits_BTV)
  for t in (0, 7, 18):
    changed = ids.at[0, t + 1].set((ids[0, t + 1] + 17) % 256)
    out = np.asarray(model(changed))
    np.testing.assert_array_equal(out[0, : t + 1], base[0, : t + 1])
    assert np.abs(out[0, t + 1 :] - base[0, t + 1 :]).max() > 0


def test_segments_keep_packed_documents_apart():
  model = models.build(TINY_LLAMA, seed=0)
  a, b = _ids(1, 8, 1), _ids(1, 8, 2)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.asarray([[1] * 8 + [2] * 8])
  pos = jnp.asarray([list(range(8)) * 2])
  out = np.asarray(model.forward(packed, positions_BT=pos, segment_ids_BT=seg).logits_BTV)
  np.testing.assert_allclose(out[:, 8:], np.asarray(model(b)), atol=1e-5)


def _route_reference(logits, bias, k, n_group, topk_group, scaling):
  """The DEEPSEEK_V3.md formula, one token at a time in float64."""
  T, E = logits.shape
  s = 1 / (1 + np.exp(-logits.astype(np.float64)))
  w_out, i_out = np.zeros((T, k)), np.zeros((T, k), int)
  per = E // n_group
  for t in range(T):
    sc = s[t] + bias
    gs = [np.sort(sc[g * per : (g + 1) * per])[-2:].sum() for g in range(n_group)]
    keep = np.argsort(gs)[::-1][:topk_group]
    masked = np.full(E, -np.inf)
    for g in keep:
      masked[g * per : (g + 1) * per] = sc[g * per : (g + 1) * per]
    idx = np.argsort(masked)[::-1][:k]
    w = s[t, idx] / s[t, idx].sum()
    w_out[t], i_out[t] = w * scaling, idx
  return w_out, i_out


def test_routing_matches_formula():
  rs = np.random.RandomState(0)
  logits = rs.normal(size=(64, 16)).astype(np.float32)
  bias = rs.uniform(-0.5, 0.5, 16)
  r = route(
    jnp.asarray(logits), jnp.asarray(bias, jnp.float32), k=3, n_group=4, topk_group=2, norm_topk_prob=True, scaling=2.5
  )
  w_ref, i_ref = _route_reference(logits, bias, 3, 4, 2, 2.5)
  got_i, got_w = np.asarray(r.experts_TK), np.asarray(r.weights_TK)
  order = np.argsort(got_i, 1)
  ref_order = np.argsort(i_ref, 1)
  np.testing.assert_array_equal(np.take_along_axis(got_i, order, 1), np.take_along_axis(i_ref, ref_order, 1))
  np.testing.assert_allclose(np.take_along_axis(got_w, order, 1), np.take_along_axis(w_ref, ref_order, 1), rtol=1e-5)
  # the bias steers selection only: chosen weights come from the unbiased scores
  assert not np.allclose(
    got_w,
    np.asarray(
      route(
        jnp.asarray(logits), jnp.zeros(16), k=3, n_group=4, topk_group=2, norm_topk_prob=True, scaling=2.5
      ).weights_TK
    ),
  )
  # group limit: every token's experts fall in at most topk_group groups
  assert max(len(set(row // 4)) for row in got_i) <= 2


def _expert_loop(x, r, g, u, d, capacity=None):
  """Per-token reference; with `capacity`, each expert serves its first `capacity` assignments in (t, k) order."""
  out, used = np.zeros_like(x), {}
  for t, k in itertools.product(range(x.shape[0]), range(r.experts_TK.shape[1])):
    e = int(r.experts_TK[t, k])
    used[e] = used.get(e, 0) + 1
    if capacity is not None and used[e] > capacity:
      continue
    h = jax.nn.silu(x[t] @ g[e]) * (x[t] @ u[e])
    out[t] += float(r.weights_TK[t, k]) * np.asarray(h @ d[e])
  return out


def test_dispatchers_equal_a_per_token_loop():
  rs = np.random.RandomState(0)
  T, D, I, E, K = 40, 8, 6, 8, 2
  x = rs.normal(size=(T, D)).astype(np.float32)
  g, u = rs.normal(size=(2, E, D, I)).astype(np.float32)
  d = rs.normal(size=(E, I, D)).astype(np.float32)
  r = route(
    jnp.asarray(rs.normal(size=(T, E)), jnp.float32),
    jnp.zeros(E),
    k=K,
    n_group=1,
    topk_group=1,
    norm_topk_prob=True,
    scaling=1.0,
  )
  want = _expert_loop(x, r, g, u, d)
  np.testing.assert_allclose(np.asarray(dispatch_dropless(x, r, g, u, d)), want, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dispatch_gather(x, r, g, u, d)), want, atol=1e-4)
  np.testing.assert_allclose(np.asarray(jax.jit(dispatch_buckets)(x, r, g, u, d)), want, atol=1e-4)
  skewed = r._replace(experts_TK=jnp.asarray(np.stack([np.zeros(T, int), 1 + np.arange(T) % 7], 1), jnp.int32))
  np.testing.assert_allclose(
    np.asarray(dispatch_buckets(x, skewed, g, u, d)),  # expert 0 takes all T
    _expert_loop(x, skewed, g, u, d),
    atol=1e-4,
  )
  np.testing.assert_allclose(np.asarray(dispatch_capacity(x, r, g, u, d, capacity_factor=E / 2)), want, atol=1e-4)
  # with a small capacity, overflow assignments are dropped (contribute zero), in token order
  C = int(np.ceil(0.5 * T * K / E))
  small = np.asarray(dispatch_capacity(x, r, g, u, d, capacity_factor=0.5))
  np.testing.assert_allclose(small, _expert_loop(x, r, g, u, d, capacity=C), atol=1e-4)
  assert np.abs(small - want).max() > 1e-3


def test_routing_replay_reproduces_the_forward():
  model = models.build(TINY_DS, seed=4)
  ids = _ids()
  out = model.forward(ids)
  replay = jnp.moveaxis(out.routing.experts_TK, 0, 2)  # [L, B, T, K] -> the sampler's [B, T, L, K]
  again = model.forward(ids, replay_experts=replay)
  np.testing.assert_allclose(np.asarray(again.logits_BTV), np.asarray(out.logits_BTV), atol=1e-6)


def test_mtp_outputs():
  model = models.build(TINY_DS, seed=0)
  out = model.forward(_ids(), mtp=True)
  assert len(out.mtp_logits) == 1 and out.mtp_logits[0].shape == (2, 24, 256)
  assert out.routing.experts_TK.shape == (2, 2, 24, 2)  # [L_moe, B, T, K]


def test_671b_preset_eval_shape_counts():
  """jax.eval_shape of the full DeepSeek-V3 preset: published 671B total (main model) and ~37B active."""
  cfg = preset("deepseek-v3-671b")
  abstract = models.abstract(cfg)
  leaves = jax.tree.leaves(
    jax.tree.map(lambda v: v, __import__("flax").nnx.state(abstract, __import__("flax").nnx.Param))
  )
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
  n = sum(int(np.prod(x.shape)) for x in leaves)
  counts = cfg.param_counts()
  assert n == counts["total"] + counts["mtp"]  # analytic count equals the real shapes
  assert abs(counts["total"] / 671e9 - 1) < 0.01
  # "37B activated" (paper): we count 37.55B incl. embedding + head; the paper rounds down.
  assert abs(counts["active"] / 37e9 - 1) < 0.02
  assert abs(counts["mtp"] / 11.6e9 - 1) < 0.01 and abs((counts["total"] + counts["mtp"]) / 682.6e9 - 1) < 0.01


@pytest.mark.parametrize("name,total", [("qwen2.5-1.5b", 1.54e9), ("qwen2.5-7b", 7.62e9), ("llama3.1-8b", 8.03e9)])
def test_dense_presets_eval_shape(name, total):
  from flax import nnx

  cfg = preset(name)
  leaves = jax.tree.leaves(nnx.state(models.abstract(cfg), nnx.Param))
  n = sum(int(np.prod(x.shape)) for x in leaves)
  assert n == cfg.param_counts()["total"] and abs(n / total - 1) < 0.01


def test_config_errors_are_one_line_and_named():
  # Built through the shared strict loader: types and literals are checked, not only validate()'s ranges.
  with pytest.raises(ConfigError, match=r"^unknown config key 'hiden_size' \(did you mean 'hidden_size'\?\)$"):
    from_dict({"hiden_size": 3})
  with pytest.raises(ConfigError, match=r"^config key 'n_group' must divide n_routed_experts \(8\), got 3$"):
    preset("tiny-moe", n_group=3)
  with pytest.raises(ConfigError, match="'num_key_value_heads'"):
    TINY_LLAMA.replace(num_key_value_heads=3)
  with pytest.raises(ConfigError, match=r"^unknown model preset 'tiny-mo' \(did you mean 'tiny-moe'\?\)$"):
    preset("tiny-mo")
  with pytest.raises(ConfigError, match=r"^config key 'dtype' must be one of \['float32', 'bfloat16', 'float16'\]"):
    preset("tiny-moe", dtype="bf16")
  with pytest.raises(ConfigError, match=r"^config key 'num_hidden_layers' expects int, got str 'two'$"):
    preset("tiny-moe", num_hidden_layers="two")
  with pytest.raises(ConfigError, match=r"^config key 'rope.type' must be one of \['default', 'yarn', 'llama3'\]"):
    preset("tiny-moe", rope={"type": "linear"})
  # a rope override merges into the preset's rope instead of replacing it
  assert preset("tiny-moe", rope={"theta": 500.0}).rope == RopeConfig(theta=500.0, interleave=True)


def test_from_hf_reads_legacy_rope_scaling():
  legacy = dict(
    model_type="deepseek_v3",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    kv_lora_rank=16,
    q_lora_rank=None,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    rope_theta=10000.0,
    max_position_embeddings=163840,
    rope_scaling={
      "type": "yarn",
      "factor": 40,
      "original_max_position_embeddings": 4096,
      "beta_fast": 32,
      "beta_slow": 1,
      "mscale": 1.0,
      "mscale_all_dim": 1.0,
    },
  )
  cfg = ModelConfig.from_hf(legacy)
  assert cfg.rope.type == "yarn" and cfg.rope.factor == 40 and cfg.rope.interleave and cfg.q_lora_rank is None
  new = ModelConfig.from_hf(cfg.to_hf())
  assert new == cfg
  from rl_jax.models.rope import softmax_scale

  assert abs(softmax_scale(preset("deepseek-v3-671b")) - 0.1352338) < 1e-6  # 192^-0.5 * (0.1 ln 40 + 1)^2


def test_tpu_grouped_matmul_matches_ragged_dot():
  """The TPU path of the dropless experts (megablox gmm / tgmm, interpreted here on the CPU) computes what
  ragged_dot does, values and both gradients, with rows outside every group (the expert-parallel buffer's empty
  slots) zero and gradient-free."""
  from rl_jax.models.moe import grouped_matmul

  k = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(k[0], (50, 64)), jax.random.normal(k[1], (4, 64, 32))
  sizes = jnp.array([10, 0, 25, 11], jnp.int32)  # 46 of the 50 rows
  ct = jax.random.normal(k[2], (50, 32))

  def loss(x, w, interpret):
    y = grouped_matmul(x, w, sizes, interpret=interpret) if interpret else jax.lax.ragged_dot(x, w, sizes)
    return (y[:46] * ct[:46]).sum(), y

  (_, y_tpu), g_tpu = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w, True)
  (_, y_ref), g_ref = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w, False)
  np.testing.assert_allclose(np.asarray(y_tpu[:46]), np.asarray(y_ref[:46]), rtol=1e-5, atol=1e-4)
  assert not np.asarray(y_tpu[46:]).any() and not np.asarray(g_tpu[0][46:]).any()
  for a, b in zip(g_tpu, g_ref):
    np.testing.assert_allclose(np.asarray(a)[:46], np.asarray(b)[:46], rtol=1e-5, atol=1e-4)
