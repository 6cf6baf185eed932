"""The train step's pieces on one CPU device: FLOPs per token against hand counts, and the router-bias update
of aux-loss-free balancing against loads counted independently in numpy (the steps run in a child process:
fast CPU compiles, the shared jit cache)."""

import pickle

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from rl_jax import models
from rl_jax.config import TrainConfig
from rl_jax.models.config import ModelConfig, preset
from rl_jax.sharding import make_mesh
from rl_jax.train import state as S
from rl_jax.train import step as ST
from tests._subproc import run_python


# FLOPS PER TOKEN
def _flops_from_shapes(cfg: ModelConfig, seq_len: int, mtp: bool) -> float:
  """6 x the model's own matmul weights (from its parameter shapes) + causal attention, counted by hand."""
  head = cfg.vocab_size * cfg.hidden_size
  n = head if cfg.tie_word_embeddings else 0  # the tied head: embed.T @ h
  n += cfg.num_nextn_predict_layers * head if mtp else 0  # each MTP depth runs the shared head again
  flat = nnx.to_flat_state(nnx.state(models.abstract(cfg), nnx.Param))
  for path, var in flat:
    shape = var.get_value().shape
    axes = [a for a in var.get_metadata().get("axes") or () if a != "layers"]  # a layer group's stacked axis
    if path[0] == "embed" or len(axes) < 2 or (path[0] == "mtp" and not mtp):
      continue  # the lookup, norm scales, MTP modules that do not run
    size = int(np.prod(shape))
    routed = "expert" in (var.get_metadata().get("axes") or ())  # [E, ., .]: a token meets its top-k only
    n += size * cfg.num_experts_per_tok / cfg.n_routed_experts if routed else size
  layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
  d_qk, d_v = (cfg.qk_head_dim, cfg.v_head_dim) if cfg.is_mla else (cfg.gqa_head_dim, cfg.gqa_head_dim)
  # causal attention: QK^T and AV, 2 FLOPs a multiply-add, x3 for the backward, half the positions
  return 6.0 * n + 3.0 * layers * cfg.num_attention_heads * (d_qk + d_v) * seq_len


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("mtp", [False, True])
def test_flops_per_token_matches_the_model_weights(tied, mtp):
  cfg = preset("tiny-moe", tie_word_embeddings=tied)
  assert cfg.num_nextn_predict_layers == 1 and cfg.n_routed_experts == 8 and cfg.q_lora_rank
  assert cfg.flops_per_token(64, mtp=mtp) == _flops_from_shapes(cfg, 64, mtp)


def test_flops_per_token_dense_by_hand():
  """A GQA model, by hand: attention 64*16*(4+2*2) + 4*16*64 = 12288, MLP 3*64*128 = 24576, two layers,
  head 256*64 = 16384 (tied or not): 90112 weights; attention 3 * 2 layers * 4 heads * (16+16) * 32."""
  kw = dict(arch="llama", vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
  kw.update(num_key_value_heads=2, intermediate_size=128)
  for tied in (False, True):
    cfg = ModelConfig(**kw, tie_word_embeddings=tied).validate()
    assert cfg.flops_per_token(32, mtp=True) == 6 * 90112 + 3 * 2 * 4 * 32 * 32 == 565248
    assert _flops_from_shapes(cfg, 32, mtp=False) == 565248


# ROUTER BIAS
def _bias(state) -> dict:
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state.bias)}


def _loads(graphdef, state, host, cfg, A):
  """Tokens per expert over the global batch (unmasked tokens only), per routing: main MoE layers, then MTP."""

  @jax.jit
  def experts(params, bias, tokens, positions, segment_ids):
    out = nnx.merge(graphdef, params, bias).forward(
      tokens, positions_BT=positions, segment_ids_BT=segment_ids, mtp=True
    )
    return list(out.routing.experts_TK) + [r.experts_TK for r in out.mtp_routing]

  micro, loads = ST.to_micro(host, A), 0
  for a in range(A):
    chosen = experts(state.params, state.bias, micro["tokens"][a], micro["positions"][a], micro["segment_ids"][a])
    keep = micro["loss_mask"][a].reshape(-1) > 0
    E = cfg.n_routed_experts
    loads = loads + np.stack(
      [np.bincount(np.asarray(e).reshape(keep.size, -1)[keep].ravel(), minlength=E) for e in chosen]
    )
  return loads.astype(np.float64)


def _host_batch(cfg, B: int, T: int, mask_share: float = 1.0) -> dict:
  """Random one-document rows [B, T]; a `mask_share` of the targets count."""
  rs = np.random.RandomState(0)
  return {
    "tokens": rs.randint(3, cfg.vocab_size, (B, T)),
    "targets": rs.randint(3, cfg.vocab_size, (B, T)),
    "segment_ids": np.ones((B, T), np.int32),
    "positions": np.tile(np.arange(T), (B, 1)),
    "loss_mask": (rs.rand(B, T) < mask_share).astype(np.int32),
  }


def _one_step(mtp_lambda: float):
  """(bias before, bias after, loads) of one train step of a 2-layer tiny MoE with one MoE MTP block."""
  cfg = preset("tiny-moe", num_hidden_layers=2)  # layer 0 dense, layer 1 MoE; the MTP block is MoE
  train = TrainConfig(
    batch_size=4, seq_len=16, grad_accum=2, mtp_lambda=mtp_lambda, bias_gamma=0.01, compute_dtype="float32"
  )
  cfg = S.train_model_config(cfg, train)
  B, T = train.batch_size, train.seq_len
  host = _host_batch(cfg, B, T, mask_share=0.8)  # masked tokens do not count as load
  mesh = make_mesh(devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    tx = optax.sgd(1e-2)
    graphdef, state, shardings = S.init_state(cfg, tx, mesh, seed=0)
    before, loads = _bias(state), _loads(graphdef, state, host, cfg, train.grad_accum)
    step = ST.build_step(graphdef, cfg, train, tx, mesh, shardings)
    state, _ = step(state, ST.place_batch(host, mesh, train.grad_accum))
  return before, _bias(state), loads


MAIN, MTP = ("moe_layers", "mlp", "bias"), ("mtp", 0, "block", "mlp", "bias")  # MAIN: [L_moe=1, E]


def save_steps(path):
  """Child-process entry: both steps, pickled to `path` (a fresh process compiles fast, with the jit cache)."""
  with open(path, "wb") as f:
    pickle.dump({lam: _one_step(lam) for lam in (0.0, 0.3)}, f)


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
  path = tmp_path_factory.mktemp("step") / "steps.pkl"
  run_python(["-c", f"from tests.test_step import save_steps; save_steps({str(path)!r})"])
  with open(path, "rb") as f:
    return pickle.load(f)


def _expected(bias, load, gamma=0.01):
  return (bias + np.float32(gamma) * np.sign(load.mean() - load).astype(np.float32)).astype(np.float32)


def test_bias_of_mtp_router_that_does_not_run_stays(steps):
  before, after, (main_load, _) = steps[0.0]
  assert set(after) == {MAIN, MTP}
  np.testing.assert_array_equal(after[MTP], before[MTP])  # no MTP routing ran: nothing to follow
  np.testing.assert_allclose(after[MAIN], _expected(before[MAIN], main_load), rtol=0, atol=1e-9)
  assert np.abs(after[MAIN] - before[MAIN]).max() > 0


def test_bias_of_mtp_router_follows_its_own_load(steps):
  before, after, (main_load, mtp_load) = steps[0.3]
  assert not np.array_equal(np.sign(main_load.mean() - main_load), np.sign(mtp_load.mean() - mtp_load))
  np.testing.assert_allclose(after[MAIN], _expected(before[MAIN], main_load), rtol=0, atol=1e-9)
  np.testing.assert_allclose(after[MTP], _expected(before[MTP], mtp_load), rtol=0, atol=1e-9)


# NON-FINITE STEPS
def _leaves_of(tree) -> list:
  return [np.array(x, copy=True) for x in jax.tree.leaves(jax.device_get(tree))]  # copies: the step donates


def test_non_finite_step_is_skipped(monkeypatch):
  """A step whose loss and gradients are NaN leaves params, optimizer state and router bias bitwise unchanged
  and reports skipped=1; the step counter (and the data) move on."""
  from rl_jax import losses

  cfg = preset("tiny-moe", num_hidden_layers=2)
  train = TrainConfig(batch_size=2, seq_len=8, mtp_lambda=0.3, bias_gamma=0.01, compute_dtype="float32")
  cfg = S.train_model_config(cfg, train)
  B, T = train.batch_size, train.seq_len
  host = _host_batch(cfg, B, T)
  mesh = make_mesh(devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    tx = optax.adam(1e-2)
    graphdef, state, shardings = S.init_state(cfg, tx, mesh, seed=0)
    state, m = ST.build_step(graphdef, cfg, train, tx, mesh, shardings)(state, ST.place_batch(host, mesh, 1))
    assert float(m["skipped"]) == 0  # a normal step (it also makes the optimizer state non-trivial)
    before = _leaves_of((state.params, state.opt_state, state.bias))
    ce = losses.cross_entropy
    monkeypatch.setattr(losses, "cross_entropy", lambda *a, **kw: ce(*a, **kw) * np.nan)
    state, m = ST.build_step(graphdef, cfg, train, tx, mesh, shardings)(state, ST.place_batch(host, mesh, 1))
    assert np.isnan(float(m["loss"])) and float(m["skipped"]) == 1 and int(state.step) == 2
    after = _leaves_of((state.params, state.opt_state, state.bias))
  assert len(before) == len(after) > 20
  for a, b in zip(before, after):
    np.testing.assert_array_equal(a, b)
