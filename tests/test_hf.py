"""Parity with transformers' own DeepseekV3 / Qwen2 / Llama models and export round trips (needs transformers;
the checkpoint I/O tests that do not are in test_hf_io.py)."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from rl_jax import models
from tests import hf_models

pytest.importorskip("transformers")
IDS = np.random.RandomState(0).randint(0, 256, size=(2, 37))  # crosses several rope periods


@pytest.fixture(scope="module", params=["deepseek_v3", "qwen2", "llama"])
def ref(request, tmp_path_factory):
  model, path = hf_models.build(request.param, str(tmp_path_factory.mktemp("hf")))
  return request.param, model, path


def test_logits_match_transformers(ref):
  kind, hf_model, path = ref
  ours = models.load_hf(path, dtype=jnp.float32)
  want = hf_models.logits(hf_model, IDS)
  got = np.asarray(ours(jnp.asarray(IDS, jnp.int32)))
  assert np.abs(want).max() > 0.5, "reference logits too flat to test anything"
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_export_round_trip_reloads_in_transformers(ref, tmp_path):
  from transformers import AutoModelForCausalLM

  kind, hf_model, path = ref
  ours = models.load_hf(path, dtype=jnp.float32)
  models.save_hf(ours, str(tmp_path / "export"), max_shard_bytes=100_000)  # forces a sharded index
  assert os.path.exists(tmp_path / "export" / "model.safetensors.index.json")
  back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), dtype=hf_models._torch().float32)
  np.testing.assert_allclose(hf_models.logits(back, IDS), hf_models.logits(hf_model, IDS), atol=1e-5, rtol=0)
  again = models.load_hf(str(tmp_path / "export"), dtype=jnp.float32)
  np.testing.assert_array_equal(
    np.asarray(again(jnp.asarray(IDS, jnp.int32))), np.asarray(ours(jnp.asarray(IDS, jnp.int32)))
  )
