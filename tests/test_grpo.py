"""The GRPO update against an independent reference, and the rollout layout it trains on.

The reference recomputes everything the plain way: full logits from `model(tokens)`, log_softmax, the
advantages by the group formula in numpy, `losses.policy_loss` (itself checked against the published formulas
in test_policy_loss.py); with plain SGD the update must move the parameters by exactly -lr x its gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rl_jax import losses, models, rollout, sampling
from rl_jax.config import GRPOConfig, TrainConfig
from rl_jax.models.config import preset
from rl_jax.train import grpo as G
from rl_jax.train import state as S

CFG = preset("tiny-moe", num_hidden_layers=2, num_nextn_predict_layers=0, moe_capacity_factor=None)
N_PROMPTS, GS, T, LR = 4, 2, 16, 0.5


def _model_and_batch(seed=0):
  model = models.build(CFG, seed=seed)
  graphdef, params, bias = S.split_model(model)
  rs = np.random.RandomState(seed)
  N = N_PROMPTS * GS
  tokens = rs.randint(3, CFG.vocab_size, (N, T)).astype(np.int32)
  mask = np.zeros((N, T), np.float32)
  for i in range(N):  # completions of different lengths after prompts of different lengths
    start = rs.randint(2, 6)
    mask[i, start : start + rs.randint(3, T - start)] = 1.0
  batch = {
    "tokens": tokens,
    "targets": np.roll(tokens, -1, 1),
    "positions": np.tile(np.arange(T, dtype=np.int32), (N, 1)),
    "mask": mask,
    "rewards": rs.randint(0, 3, N).astype(np.float32),
  }
  return model, graphdef, params, bias, batch


def _true_logp(model, batch, temperature=1.0):
  logits = model(jnp.asarray(batch["tokens"])) / temperature
  lp = jax.nn.log_softmax(logits, -1)
  return np.asarray(jnp.take_along_axis(lp, jnp.asarray(batch["targets"])[..., None], -1)[..., 0])


def _run(graphdef, params, bias, batch, g, train, steps=1, ref=None):
  tx = optax.sgd(LR)
  state = S.TrainState(jnp.zeros((), jnp.int32), params, bias, tx.init(params), ref)
  fn = jax.jit(G.make_grpo_step(graphdef, g, train, tx))
  for _ in range(steps):
    state, m = fn(state, {k: jnp.asarray(v) for k, v in batch.items()})
  return state, m


def _delta(before, after):
  return jax.tree.map(lambda a, b: np.asarray(b) - np.asarray(a), before, after)


def test_update_equals_sgd_on_the_reference_loss():
  model, graphdef, params, bias, batch = _model_and_batch()
  temp = 0.8
  sampler = _true_logp(model, batch, temp) + np.random.RandomState(1).normal(0, 0.3, batch["mask"].shape)
  batch["old_logp"] = (sampler * batch["mask"]).astype(np.float32)  # an off-policy "sampler"
  g = GRPOConfig(group_size=GS, prompts_per_step=N_PROMPTS, beta=0.0, tis_cap=None, temperature=temp,
                 loss_agg="seq-mean-token-mean", max_new_tokens=T)  # fmt: skip
  state, m = _run(graphdef, params, bias, batch, g, TrainConfig())

  r = batch["rewards"].reshape(-1, GS)
  adv = ((r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)).ravel()

  def ref_loss(p):
    m2 = nnx.merge(graphdef, p, bias)
    lp = jax.nn.log_softmax(m2(jnp.asarray(batch["tokens"])) / temp, -1)
    logp = jnp.take_along_axis(lp, jnp.asarray(batch["targets"])[..., None], -1)[..., 0]
    return losses.policy_loss(logp, batch["old_logp"], adv, batch["mask"], loss_agg="seq-mean-token-mean")[0]

  loss, grads = jax.value_and_grad(ref_loss)(params)
  np.testing.assert_allclose(float(m["loss"]), float(loss), rtol=1e-5)
  got, want = _delta(params, state.params), jax.tree.map(lambda x: -LR * np.asarray(x), grads)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)
  assert float(optax.global_norm(grads)) > 1e-3  # the reference gradient is not trivially zero


def test_micro_batches_and_minibatch_shapes_do_not_change_the_update():
  """token-mean over 2 micro-batches == over 1 (the denominator is the minibatch's, not each micro-batch's)."""
  model, graphdef, params, bias, batch = _model_and_batch(seed=2)
  batch["old_logp"] = _true_logp(model, batch) * batch["mask"]
  g = GRPOConfig(group_size=GS, prompts_per_step=N_PROMPTS, beta=0.0, tis_cap=None, loss_agg="token-mean")
  one, _ = _run(graphdef, params, bias, batch, g, TrainConfig(grad_accum=1))
  two, _ = _run(graphdef, params, bias, batch, g, TrainConfig(grad_accum=2))
  for a, b in zip(jax.tree.leaves(_delta(params, one.params)), jax.tree.leaves(_delta(params, two.params))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)


def test_truncated_importance_weights_scale_the_gradient():
  """A sampler whose log-probs sit 1 nat below the trainer's gets weights min(e, cap=2) = 2: the update is
  twice that of a sampler that agrees with the trainer (old log-probs are the trainer's in both)."""
  model, graphdef, params, bias, batch = _model_and_batch(seed=3)
  true = _true_logp(model, batch) * batch["mask"]
  g = GRPOConfig(group_size=GS, prompts_per_step=N_PROMPTS, beta=0.0, tis_cap=2.0)
  agree, m1 = _run(graphdef, params, bias, {**batch, "old_logp": true}, g, TrainConfig())
  shifted, m2 = _run(graphdef, params, bias, {**batch, "old_logp": (true - 1.0) * batch["mask"]}, g, TrainConfig())
  for a, b in zip(jax.tree.leaves(_delta(params, agree.params)), jax.tree.leaves(_delta(params, shifted.params))):
    np.testing.assert_allclose(b, 2 * a, rtol=1e-4, atol=1e-6)  # deltas ~1e-4; params' ulp ~1e-7
  assert abs(float(m1["logp_gap"])) < 1e-4 and abs(float(m2["logp_gap"]) - 1.0) < 1e-4
  np.testing.assert_allclose(float(m2["is_weight_mean"]), 2.0, rtol=1e-6)


def test_reference_resets_to_the_policy_on_schedule():
  model, graphdef, params, bias, batch = _model_and_batch(seed=4)
  batch["old_logp"] = _true_logp(model, batch) * batch["mask"]
  g = GRPOConfig(group_size=GS, prompts_per_step=N_PROMPTS, beta=0.04, ref_reset_every=2, tis_cap=None)
  stale = lambda: jax.tree.map(lambda p: p * 1.1, params)  # a reference that differs from the policy
  s2, m2 = _run(graphdef, params, bias, batch, g, TrainConfig(), steps=2, ref=stale())
  s3, _ = _run(graphdef, params, bias, batch, g, TrainConfig(), steps=3, ref=stale())
  leaves = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]
  for r, p in zip(leaves(s2.ref), leaves(params)):
    np.testing.assert_array_equal(r, p)  # reset at step 0 to the initial policy, kept through step 1
  for r, p in zip(leaves(s3.ref), leaves(s2.params)):
    np.testing.assert_array_equal(r, p)  # step 2 reset it to the policy after two updates
  assert float(m2["kl_ref"]) > 0  # the policy moved away from its reference


def test_assemble_places_completions_after_their_prompts():
  prompts = [[1, 5, 6], [1, 7]]
  L, K = 2, 2
  res = sampling.SampleResult(
    tokens=np.array([[9, 10, 2, 0], [11, 2, 0, 0], [12, 13, 14, 2], [15, 0, 0, 0]], np.int32),
    logprobs=np.array([[-1, -2, -3, 0], [-4, -5, 0, 0], [-6, -7, -8, -9], [-1.5, 0, 0, 0]], np.float32),
    lengths=np.array([3, 2, 4, 1], np.int32),
    experts=np.arange(4 * 4 * L * K, dtype=np.int32).reshape(4, 4, L, K),
    prompt_experts=100 + np.arange(4 * 3 * L * K, dtype=np.int32).reshape(4, 3, L, K),
  )
  ro = rollout.Rollout([{}] * 4, [prompts[i // 2] for i in range(4)], res, [""] * 4, np.arange(4, dtype=np.float32), {})
  a = rollout.assemble(ro, seq_len=8)
  np.testing.assert_array_equal(a["tokens"][0], [1, 5, 6, 9, 10, 0, 0, 0])  # seq[:-1]: the EOS is no input
  np.testing.assert_array_equal(a["targets"][0], [5, 6, 9, 10, 2, 0, 0, 0])
  np.testing.assert_array_equal(a["mask"][0], [0, 0, 1, 1, 1, 0, 0, 0])  # targets 9, 10, EOS
  np.testing.assert_array_equal(a["old_logp"][0], [0, 0, -1, -2, -3, 0, 0, 0])
  np.testing.assert_array_equal(a["tokens"][2], [1, 7, 12, 13, 14, 0, 0, 0])
  np.testing.assert_array_equal(a["mask"][2], [0, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(a["mask"][3], [0, 1, 0, 0, 0, 0, 0, 0])
  # replay: the prompt's routing at prompt positions, completion token j's at position P + j
  np.testing.assert_array_equal(a["experts"][0, :3], res.prompt_experts[0, :3])
  np.testing.assert_array_equal(a["experts"][0, 3:5], res.experts[0, :2])
  assert (a["experts"][0, 5:] == 0).all()


MESH_SCRIPT = r"""
import jax, numpy as np, optax
from rl_jax.config import GRPOConfig, TrainConfig
from rl_jax.models.config import preset
from rl_jax.sharding import make_mesh
from rl_jax.sharding import rules as srules
from rl_jax.train import grpo as G
from rl_jax.train import state as S

assert jax.device_count() == 8
cfg = preset("tiny-moe", num_hidden_layers=2, num_nextn_predict_layers=0, moe_capacity_factor=None)
g = GRPOConfig(group_size=4, prompts_per_step=4, beta=0.04, tis_cap=2.0, minibatches=2, routing_replay=True)
train = TrainConfig(grad_accum=2, steps=3)
tx = optax.sgd(1.0)  # linear in the gradient: a mis-scaled or mis-summed gradient shows in the parameters
rs = np.random.RandomState(0)
N, T = 16, 12
tokens = rs.randint(3, cfg.vocab_size, (N, T)).astype(np.int32)
mask = np.zeros((N, T), np.float32)
mask[:, 4:10] = 1
batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "positions": np.tile(np.arange(T, dtype=np.int32), (N, 1)),
         "mask": mask, "old_logp": (-2.0 + 0.1 * rs.randn(N, T)).astype(np.float32) * mask,
         "rewards": rs.randint(0, 2, N).astype(np.float32),
         "experts": rs.randint(0, cfg.n_routed_experts, (N, T, 1, cfg.num_experts_per_tok)).astype(np.int32)}


def run(mesh):
  with jax.set_mesh(mesh), srules.use_rules(None):
    graphdef, state, sh = S.init_state(cfg, tx, mesh, seed=0, ref=True)
    step = G.build_grpo_step(graphdef, g, train, tx, mesh, sh, n_experts=cfg.n_routed_experts)
    out = []
    for _ in range(2):
      state, m = step(state, G.place_rollout(batch, mesh))
      out.append({k: float(v) for k, v in m.items()})
  leaves = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state.params)}
  return out, leaves, state


ref_m, ref_p, _ = run(make_mesh(devices=jax.devices()[:1]))
for sizes in (dict(data=2, fsdp=2, expert=2), dict(data=1, fsdp=4, tensor=2), dict(fsdp=2, expert=2, sequence=2)):
  m, p, state = run(make_mesh(**sizes))
  gate = state.params["moe_layers"]["mlp"]["gate"].get_value()
  assert len(gate.sharding.device_set) == 8 and gate.addressable_shards[0].data.shape != gate.shape
  for a, b in zip(ref_m, m):
    for k in ("loss", "grad_norm", "kl_ref", "entropy", "is_weight_mean", "clip_frac"):
      np.testing.assert_allclose(b[k], a[k], rtol=2e-5, atol=1e-6, err_msg=f"{sizes} {k}")
  for k in ref_p:
    np.testing.assert_allclose(p[k], ref_p[k], rtol=1e-5, atol=1e-6, err_msg=f"{sizes} {k}")
  print(sizes, "OK", m[-1]["loss"], m[-1]["grad_norm"])
print("DONE")
"""


def test_update_on_8_devices_equals_one_device():
  """The jitted update sharded over (data, fsdp, expert), (fsdp, tensor) and (fsdp, expert, sequence) meshes: same
  metrics and parameters as on one device after two steps, with minibatches, micro-batches, a reference model and
  routing replay (the sequence mesh: the rows' T split, the state sharded over that axis too)."""
  from tests._subproc import run_python

  proc = run_python(["-c", MESH_SCRIPT], n_devices=8, timeout=600)
  assert "DONE" in proc.stdout, proc.stdout[-2000:]


def test_non_finite_update_is_skipped():
  """NaN rewards (so NaN advantages, loss and gradients): params and optimizer state stay bitwise as they
  were, the step reports skipped=1, its counter moves on."""
  model, graphdef, params, bias, batch = _model_and_batch()
  batch["old_logp"] = _true_logp(model, batch) * batch["mask"]
  g = GRPOConfig(group_size=GS, prompts_per_step=N_PROMPTS, beta=0.0, tis_cap=None)
  tx = optax.adam(1e-2)
  fn = jax.jit(G.make_grpo_step(graphdef, g, TrainConfig(), tx))
  put = lambda b: {k: jnp.asarray(v) for k, v in b.items()}
  state, m = fn(S.TrainState(jnp.zeros((), jnp.int32), params, bias, tx.init(params), None), put(batch))
  assert float(m["skipped"]) == 0
  leaves = lambda s: [np.asarray(x) for x in jax.tree.leaves(jax.device_get((s.params, s.opt_state, s.bias)))]
  before = leaves(state)
  batch["rewards"] = np.full_like(batch["rewards"], np.nan)
  state, m = fn(state, put(batch))
  assert float(m["skipped"]) == 1 and int(state.step) == 2
  after = leaves(state)
  assert len(before) == len(after) > 10
  for a, b in zip(before, after):
    np.testing.assert_array_equal(a, b)
