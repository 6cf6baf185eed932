"""Checkpoints written before scanned layers (one subtree per decoder layer) still restore: the model for eval and
the whole training state (AdamW moments, a GRPO reference model) for a resumed run.

tests/data/legacy_unscanned was written by the code before the change (commit 7b2ce16): a 3-layer tiny
DeepSeek-V3 (1 dense + 2 MoE layers, an MTP block) after one AdamW step, with a reference model (2 x the
parameters), and reference.npz holding, from that code, its logits on fixed tokens and every parameter and first
moment by its old path (`['layers'][i]...`)."""

import re
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from rl_jax import checkpoint as ckpt
from rl_jax.config import OptimizerConfig
from rl_jax.sharding import make_mesh
from rl_jax.train import state as S

DATA = "tests/data/legacy_unscanned"
OLD = re.compile(r"\['layers'\]\[(\d+)\]")


@pytest.fixture
def legacy(tmp_path):
  shutil.copytree(DATA, tmp_path / "ckpt")
  return str(tmp_path / "ckpt"), np.load(f"{DATA}/reference.npz")


def _by_old_path(tree, cfg) -> dict:
  """{old key path: value} of a tree in today's layout: layer i is index i - start of its group's stacked leaf."""
  out = {}
  starts = {g: idx.start for g, idx in cfg.layer_groups()}
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    key = jax.tree_util.keystr(tuple(k for k in path if getattr(k, "name", None) != "value"))
    group = next((g for g in starts if key.startswith(f"['{g}']")), None)
    if group is None:
      out[key] = np.asarray(x)
      continue
    for j in range(x.shape[0]):
      out[key.replace(f"['{group}']", f"['layers'][{starts[group] + j}]", 1)] = np.asarray(x[j])
  return out


def test_legacy_model_checkpoint_restores_with_the_same_logits(legacy):
  path, ref = legacy
  model = ckpt.load_model(path)
  assert model.cfg.layer_groups() == [("dense_layers", range(0, 1)), ("moe_layers", range(1, 3))]
  got = _by_old_path(nnx.state(model).to_pure_dict(), model.cfg)
  want = {k[len("params") :]: ref[k] for k in ref.files if k.startswith("params")}
  assert got.keys() == want.keys() and any(OLD.search(k) for k in want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  np.testing.assert_allclose(np.asarray(model(ref["tokens"])), ref["logits"], rtol=0, atol=1e-6)


def test_legacy_training_checkpoint_restores_moments_and_reference(legacy):
  path, ref = legacy
  cfg = ckpt.read_model_config(path)
  mesh = make_mesh(devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    tx = S.optimizer(OptimizerConfig(lr=1e-2, warmup_steps=0), 2)
    _, abstract, shardings = S.state_spec(cfg, tx, mesh, seed=5, ref=True)
    mngr = ckpt.manager(path, train=True)
    state, _ = ckpt.restore_train(mngr, 1, abstract, shardings)
    mngr.close()
  assert int(state.step) == 1
  mu = _by_old_path(state.opt_state[1][0].mu, cfg)
  want_mu = {k[len("mu") :].removesuffix(".value"): ref[k] for k in ref.files if k.startswith("mu")}
  assert mu.keys() == want_mu.keys()
  for k, v in want_mu.items():
    assert np.abs(v).max() > 0, k  # one AdamW step: every first moment is nonzero
    np.testing.assert_array_equal(mu[k], v, err_msg=k)
  params = _by_old_path(nnx.merge_state(state.params, state.bias).to_pure_dict(), cfg)
  ref_model = _by_old_path(state.ref.to_pure_dict(), cfg)
  for k, v in ref_model.items():
    np.testing.assert_allclose(v, 2 * params[k], rtol=0, atol=0, err_msg=k)  # saved as 2 x the parameters
    np.testing.assert_array_equal(params[k], ref["params" + k], err_msg=k)
