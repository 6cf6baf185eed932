"""HF-layout checkpoint I/O that needs no torch or transformers: MTP round trip, FP8 dequantisation, errors.

Checkpoints here are written by our own exporter, so these tests run where transformers is not installed."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from rl_jax import models
from rl_jax.models import safetensors_io as st
from rl_jax.models.config import preset
from rl_jax.models.hf import CheckpointError, dequantize_fp8

IDS = np.random.RandomState(0).randint(0, 256, size=(2, 16))


def _tiny_checkpoint(path: str, seed: int = 0) -> str:
  """The tiny DeepSeek-V3 of tests/hf_models.py's shape (3 layers, 8 experts), exported by save_hf."""
  models.save_hf(models.build(preset("tiny-moe", vocab_size=256, num_nextn_predict_layers=0), seed=seed), path)
  return path


def test_mtp_layers_round_trip(tmp_path):
  """transformers drops MTP layers; our export writes them at index num_hidden_layers and reads them back."""
  cfg = models.config.preset("tiny-moe", vocab_size=256)
  model = models.build(cfg, seed=3)
  models.save_hf(model, str(tmp_path / "mtp"))
  names = st.Checkpoint(str(tmp_path / "mtp")).keys()
  L = cfg.num_hidden_layers
  for n in (
    "eh_proj.weight",
    "enorm.weight",
    "hnorm.weight",
    "shared_head.norm.weight",
    "shared_head.head.weight",
    "embed_tokens.weight",
    "mlp.experts.7.down_proj.weight",
  ):
    assert f"model.layers.{L}.{n}" in names
  back = models.load_hf(str(tmp_path / "mtp"), dtype=jnp.float32)
  ids = jnp.asarray(IDS, jnp.int32)
  a, b = model.forward(ids, mtp=True), back.forward(ids, mtp=True)
  np.testing.assert_array_equal(np.asarray(a.mtp_logits[0]), np.asarray(b.mtp_logits[0]))


def _reference_dequant(w, s, block):
  out = np.empty(w.shape, np.float32)
  for i in range(w.shape[0]):
    for j in range(w.shape[1]):
      out[i, j] = float(w[i, j]) * float(s[i // block, j // block])
  return out


def _quantize(w, block):
  """The quantizing side: scale = amax / 448 per block (edge blocks padded)."""
  import ml_dtypes

  o, i = w.shape
  so, si = -(-o // block), -(-i // block)
  scale = np.zeros((so, si), np.float32)
  q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
  for a in range(so):
    for b in range(si):
      blk = w[a * block : (a + 1) * block, b * block : (b + 1) * block]
      scale[a, b] = max(np.abs(blk).max(), 1e-12) / 448.0
      q[a * block : (a + 1) * block, b * block : (b + 1) * block] = (blk / scale[a, b]).astype(ml_dtypes.float8_e4m3fn)
  return q, scale


def test_fp8_block_dequantisation_matches_direct_reference():
  w = np.random.RandomState(1).normal(size=(37, 21)).astype(np.float32)
  q, s = _quantize(w, 16)
  got = dequantize_fp8(q, s, (16, 16))
  np.testing.assert_array_equal(got, _reference_dequant(q, s, 16))
  assert np.abs(got - w).max() < 0.07 * np.abs(w).max()  # e4m3 keeps ~3 significant bits


def test_fp8_checkpoint_loads_dequantised(tmp_path):
  """A checkpoint whose linear weights are FP8 + _scale_inv loads to the dequantised weights."""
  kind_path = tmp_path / "fp32"
  _tiny_checkpoint(str(kind_path))
  src = st.Checkpoint(str(kind_path))
  tensors, deq = [], {}
  for name in src.keys():
    w = np.array(src.get(name))
    if name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight"):
      q, s = _quantize(w, 16)
      deq[name] = _reference_dequant(q, s, 16)
      tensors += [(name, q.shape, q.dtype, lambda q=q: q), (name + "_scale_inv", s.shape, s.dtype, lambda s=s: s)]
    else:
      tensors.append((name, w.shape, w.dtype, lambda w=w: w))
  out = tmp_path / "fp8"
  out.mkdir()
  st.write(str(out / "model.safetensors"), tensors)
  cfg = json.load(open(kind_path / "config.json"))
  cfg["quantization_config"] = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [16, 16],
  }
  json.dump(cfg, open(out / "config.json", "w"))
  model = models.load_hf(str(out), dtype=jnp.float32)
  np.testing.assert_array_equal(
    np.asarray(model.layer(1).attn.kv_b[...]).reshape(16, -1).T, deq["model.layers.1.self_attn.kv_b_proj.weight"]
  )
  np.testing.assert_array_equal(
    np.asarray(model.layer(2).mlp.down[...][5]).T, deq["model.layers.2.mlp.experts.5.down_proj.weight"]
  )


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory):
  return _tiny_checkpoint(str(tmp_path_factory.mktemp("ds") / "m"))


def _rewrite(src, dst, drop=(), add=(), reshape=None):
  ck = st.Checkpoint(src)
  tensors = [(n, ck.shape(n), ck.get(n).dtype, lambda n=n: np.array(ck.get(n))) for n in ck.keys() if n not in drop]
  for n, arr in add:
    tensors.append((n, arr.shape, arr.dtype, lambda a=arr: a))
  if reshape:
    name, arr = reshape
    tensors = [(n, s, d, f) if n != name else (n, arr.shape, arr.dtype, lambda a=arr: a) for n, s, d, f in tensors]
  os.makedirs(dst)
  st.write(os.path.join(dst, "model.safetensors"), tensors)
  shutil.copy(os.path.join(src, "config.json"), dst)


def test_missing_tensor_is_named(ds_dir, tmp_path):
  name = "model.layers.2.mlp.experts.3.up_proj.weight"
  _rewrite(ds_dir, str(tmp_path / "x"), drop=[name])
  with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
    models.load_hf(str(tmp_path / "x"), dtype=jnp.float32)


def test_unexpected_tensor_is_named(ds_dir, tmp_path):
  _rewrite(ds_dir, str(tmp_path / "x"), add=[("model.layers.1.mlp.extra.weight", np.zeros(3, np.float32))])
  with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.1.mlp.extra.weight'"):
    models.load_hf(str(tmp_path / "x"), dtype=jnp.float32)


def test_shape_mismatch_names_both_shapes(ds_dir, tmp_path):
  name = "model.layers.0.self_attn.q_b_proj.weight"
  _rewrite(ds_dir, str(tmp_path / "x"), reshape=(name, np.zeros((96, 31), np.float32)))
  with pytest.raises(CheckpointError) as e:
    models.load_hf(str(tmp_path / "x"), dtype=jnp.float32)
  msg = str(e.value)
  assert name in msg and "(96, 31)" in msg and "(96, 32)" in msg and "\n" not in msg


def test_unsupported_architecture_and_corrupt_file(ds_dir, tmp_path):
  d = tmp_path / "mixtral"
  shutil.copytree(ds_dir, d)
  cfg = json.load(open(d / "config.json"))
  cfg.update(model_type="mixtral", architectures=["MixtralForCausalLM"])
  json.dump(cfg, open(d / "config.json", "w"))
  with pytest.raises(ValueError, match="unsupported architecture.*MixtralForCausalLM"):
    models.load_hf(str(d))
  c = tmp_path / "corrupt"
  shutil.copytree(ds_dir, c)
  with open(c / "model.safetensors", "r+b") as f:
    f.truncate(os.path.getsize(c / "model.safetensors") // 2)
  with pytest.raises(ValueError, match="truncated"):
    models.load_hf(str(c))
  with pytest.raises(CheckpointError, match="no config.json"):
    models.load_hf(str(tmp_path))
