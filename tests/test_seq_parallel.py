"""Sequence parallelism and blockwise attention: blockwise == dense on one device (forward and gradients, MLA
and GQA, packed documents, a row that is not a multiple of the tile), the zig-zag split, the optional
"sequence" mesh axis, and (in a child process with 8 fake CPU devices) whole-model logits and gradients on
sequence=4 x fsdp=2 and sequence=2 x expert=2 x tensor=2 against one device, the samplers' prefill (blockwise for a
long prompt on one device, sequence-parallel on those meshes) too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

from rl_jax.config import ConfigError, MeshConfig
from rl_jax.models import attention as A
from rl_jax.models import build
from rl_jax.models.config import preset
from rl_jax.sharding import AXES, logical_to_spec, mesh_shape
from tests._subproc import run_python


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense"])
def test_blockwise_equals_dense_forward_and_gradients(name, monkeypatch):
  cfg = preset(name)
  attn = (A.MLA if cfg.is_mla else A.GQA)(cfg, nnx.Rngs(params=0))
  graphdef, params = nnx.split(attn)
  B, T = 2, 37  # 37 = 4 tiles of 8 + a padded one
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(B, T, cfg.hidden_size)), jnp.float32)
  seg = jnp.asarray(np.r_[[1] * 11, [2] * 20, [3] * 6][None].repeat(B, 0))  # a document boundary inside a tile
  pos = jnp.asarray(np.r_[np.arange(11), np.arange(20), np.arange(6)][None].repeat(B, 0))
  w = jnp.asarray(rng.normal(size=(B, T, cfg.hidden_size)), jnp.float32)

  def run(blockwise: bool):
    monkeypatch.setattr(A, "BLOCKWISE_MIN_T", 1 if blockwise else 10**9)
    monkeypatch.setattr(A, "BLOCK", 8)

    def loss(params, x):
      out, _ = nnx.merge(graphdef, params)(x, pos, A.Causal(seg))
      return (out * w).sum(), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return out, grads

  dense, blocked = run(False), run(True)
  np.testing.assert_allclose(blocked[0], dense[0], atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(blocked[1]), jax.tree.leaves(dense[1]), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  # the dense reference itself: the implicit mask is the old explicit one (causal within a document)
  ref, _ = attn(x, pos, A.causal_mask(pos, seg))
  np.testing.assert_allclose(dense[0], ref, atol=1e-6, rtol=0)


def test_blockwise_skips_key_tiles_after_the_queries():
  """Causal skipping is real: a NaN planted in keys after every query of a tile never reaches its output."""
  B, T, d = 1, 16, 4
  q = jnp.ones((B, T, 1, 1, d))
  k = jnp.ones((B, T, 1, d)).at[:, 8:].set(jnp.nan)
  idx = jnp.arange(T, dtype=jnp.int32)[None]
  seg = jnp.zeros((B, T), jnp.int32)
  o = A.blockwise_attention((q,), (k, k), (), A._gqa_expand, idx, seg, idx, seg, 1.0, block=8)
  assert np.isfinite(np.asarray(o[:, :8])).all() and np.isnan(np.asarray(o[:, 8:])).all()


def test_zigzag_order_balances_causal_work():
  order = A.zigzag_order(16, 4)  # chunks of 2: shard i holds chunks i and 7 - i
  np.testing.assert_array_equal(order.reshape(4, 4), [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]])
  work = [sum(int(i) + 1 for i in shard) for shard in order.reshape(4, 4)]  # keys seen by each shard's queries
  assert len(set(work)) == 1
  assert A.zigzag_order(16, 1) is None and A.zigzag_order(12, 4) is None  # 8 chunks do not divide 12


def test_sequence_mesh_axis_is_optional():
  assert mesh_shape(n_devices=8, sequence=4) == (1, 2, 1, 1, 4)
  assert mesh_shape(n_devices=8, sequence=1) == (1, 8, 1, 1)
  with pytest.raises(ValueError, match="'sequence'=3 does not divide"):
    mesh_shape(n_devices=8, sequence=3)
  with_seq = AbstractMesh((1, 2, 1, 1, 4), AXES + ("sequence",))
  without = AbstractMesh((1, 8, 1, 1), AXES)
  assert logical_to_spec(("act_batch", "act_seq", "act_embed"), None, with_seq, (4, 32, 8))[:2] == ("fsdp", "sequence")
  assert logical_to_spec(("act_batch", "act_seq", "act_embed"), None, without, (8, 32, 8))[:2] == ("fsdp", None)
  with pytest.raises(ConfigError, match="mesh.sequence"):
    MeshConfig(sequence=0).validate()


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense"])
def test_long_prefill_is_blockwise_and_equals_the_dense_cached_path(name, monkeypatch):
  """forward(prefill=True) of a prompt of BLOCKWISE_MIN_T tokens: same hidden states, logits and cache as the
  old cached path (dense [T, S] scores over the cache), with compiled temp memory well below [H, T, T] scores."""
  monkeypatch.setattr(A, "BLOCK", 128)
  cfg = preset(name, num_hidden_layers=2)
  graphdef, state = nnx.split(build(cfg, seed=0))
  B, T = 1, A.BLOCKWISE_MIN_T
  S = T + 8  # a cache with room for decoding: the old path's scores are [H, T, S]
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (B, T)))

  def run(state, tokens, prefill: bool):
    model = nnx.merge(graphdef, state)
    kw = {"prefill": True} if prefill else {"positions_BT": jnp.broadcast_to(jnp.arange(T), (B, T))}
    out = model.forward(tokens, cache=model.init_cache(B, S), last_only=True, **kw)
    return out.hidden_BTD, out.logits_BTV, out.cache

  compiled = {p: jax.jit(run, static_argnums=2).lower(state, tokens, p).compile() for p in (True, False)}
  new, old = (jax.device_get(compiled[p](state, tokens)) for p in (True, False))
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  scores = cfg.num_attention_heads * T * T * 4  # one layer's dense float32 scores
  temp = {p: c.memory_analysis().temp_size_in_bytes for p, c in compiled.items()}
  assert temp[False] >= scores > 2 * temp[True], (temp, scores)
  model = nnx.merge(graphdef, state)
  with pytest.raises(ValueError, match="needs a cache"):
    model.forward(tokens[:, :8], prefill=True)
  with pytest.raises(ValueError, match="do not fit the cache"):
    model.forward(tokens[:, :8], cache=model.init_cache(B, 4), prefill=True)


def test_sequence_parallel_matches_one_device_on_8_devices():
  """Training forward + gradients, and `sampling.generate` (sequence-parallel prefill), against one device."""
  proc = run_python(["tests/_seq_parallel_worker.py", "tiny-moe", "tiny-dense"], n_devices=8, timeout=600)
  assert proc.stdout.count("OK") == 2, proc.stdout
