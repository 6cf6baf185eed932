"""The train step on 8 fake CPU devices: (data, fsdp, tensor) and (data, expert) meshes train like one device
(losses, gradient norms, parameters after AdamW steps, and one SGD step's parameter change), and a checkpoint
saved from the 8-device state restores onto one device."""

from tests._subproc import run_python

SCRIPT = r"""
import sys, tempfile
import jax, numpy as np, optax
from rl_jax import checkpoint as ckpt
from rl_jax.config import load_run_config, model_config
from rl_jax.train import state as S, step as ST
from rl_jax.sharding import make_mesh

assert jax.device_count() == 8, jax.devices()
# Dropless MoE: with a capacity factor, what overflows depends on the mesh (models/moe.py).
run = load_run_config("configs/pretrain_tiny.yaml", [
    "model.num_hidden_layers=2", "model.moe_capacity_factor=null", "train.batch_size=8", "train.seq_len=16", "train.steps=3",
    "optimizer.schedule=constant", "optimizer.warmup_steps=1", "optimizer.lr=1e-2"])
mcfg = S.train_model_config(model_config(run), run.train)

# A FIXED SYNTHETIC BATCH: two packed documents per row (10 + 6 tokens), positions restarting per document.
B, T = 8, 16
rng = np.random.default_rng(0)
seg = np.array([1] * 10 + [2] * 6)
host = {"tokens": rng.integers(3, mcfg.vocab_size, (B, T)), "targets": rng.integers(3, mcfg.vocab_size, (B, T)),
        "segment_ids": np.tile(seg, (B, 1)), "positions": np.tile(np.r_[np.arange(10), np.arange(6)], (B, 1)),
        "loss_mask": np.ones((B, T), np.int32)}


def train(mesh, tx, n_steps):
  # n_steps of the jitted train step on `mesh` from the same seed; (state, shardings, metrics per step).
  with jax.set_mesh(mesh):
    graphdef, state, shardings = S.init_state(mcfg, tx, mesh, seed=run.train.seed)
    step = ST.build_step(graphdef, mcfg, run.train, tx, mesh, shardings, S.schedule(run.optimizer, run.train.steps))
    batch = ST.place_batch(host, mesh, run.train.grad_accum)
    metrics = []
    for _ in range(n_steps):
      state, m = step(state, batch)
      metrics.append({k: float(v) for k, v in m.items()})
  return state, shardings, metrics


def flat(state):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


def sgd_change(mesh):
  # Parameter change of one plain SGD step (lr 1): minus the gradient itself, so a scaled gradient shows.
  with jax.set_mesh(mesh):
    before = flat(S.init_state(mcfg, optax.sgd(1.0), mesh, seed=run.train.seed)[1].params)
  after = flat(train(mesh, optax.sgd(1.0), 1)[0].params)
  return {k: after[k] - before[k] for k in before}


adamw = S.optimizer(run.optimizer, run.train.steps)
one = make_mesh(devices=jax.devices()[:1])
ref_state, ref_shardings, ref_metrics = train(one, adamw, 3)
ref = flat(ref_state)
ref_sgd = sgd_change(one)
print("1 device", ref_metrics)
for sizes in (dict(data=2, fsdp=2, tensor=2), dict(data=2, fsdp=1, expert=4)):
  mesh = make_mesh(**sizes)
  state, shardings, metrics = train(mesh, adamw, 3)
  print(sizes, metrics)
  # sharded for real: the MoE layer's gate and the embedding are split across devices
  gate = state.params["moe_layers"]["mlp"]["gate"].get_value()
  assert len(gate.sharding.device_set) == 8 and gate.addressable_shards[0].data.shape != gate.shape, gate.sharding
  # AdamW cancels a constant gradient scale, so the losses and parameters alone would not see one: the
  # gradient norm and one SGD step's parameter change (minus the gradient) must match one device too.
  for key in ("loss", "grad_norm"):
    on_mesh, on_one = [m[key] for m in metrics], [m[key] for m in ref_metrics]
    np.testing.assert_allclose(on_mesh, on_one, rtol=1e-5, err_msg=f"{sizes} {key}")
  got = flat(state)
  assert got.keys() == ref.keys()
  worst = max(got, key=lambda k: np.abs(got[k] - ref[k]).max())
  print(sizes, "max |param - 1 device| =", np.abs(got[worst] - ref[worst]).max(), "at", worst)
  for k in ref:
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-4, err_msg=f"{sizes} {k}")
  assert int(state.step) == 3
  sgd = sgd_change(mesh)
  assert sgd.keys() == ref_sgd.keys()
  for k, d in ref_sgd.items():
    assert np.abs(d).max() > 0, k  # every parameter gets a gradient
    np.testing.assert_allclose(sgd[k], d, rtol=1e-3, atol=1e-3 * np.abs(d).max(), err_msg=f"{sizes} SGD {k}")

  # CHECKPOINT: saved from 8 devices, restored onto 1 device, value for value
  with tempfile.TemporaryDirectory() as d:
    mngr = ckpt.manager(d, train=True)
    ckpt.save_train(mngr, 3, state, meta={"sizes": sizes})
    mngr.wait_until_finished()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored, data_state = ckpt.restore_train(mngr, 3, abstract, ref_shardings)
    mngr.close()
  assert data_state is None
  for k, v in flat(restored).items():
    np.testing.assert_array_equal(v, got[k], err_msg=k)
  assert all(x.sharding.device_set == {jax.devices()[0]} for x in jax.tree.leaves(restored))
print("OK")
"""


def test_meshes_train_like_one_device_and_checkpoint_moves_between_meshes():
  proc = run_python(["-c", SCRIPT], n_devices=8, timeout=600)
  assert proc.stdout.strip().endswith("OK"), proc.stdout
