"""Tiny random Hugging Face reference models, built offline with transformers' own classes."""

from __future__ import annotations

import os

import numpy as np

torch = None


def _torch():
  global torch
  if torch is None:
    import torch as t

    t.set_num_threads(1)
    torch = t
  return torch


def deepseek_v3(path: str, *, mtp: bool = False, seed: int = 0):
  """YaRN on, nonzero e_score_correction_bias, n_group > 1, first_k_dense_replace = 1."""
  t = _torch()
  from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

  t.manual_seed(seed)
  cfg = DeepseekV3Config(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    rope_interleave=True,
    initializer_range=0.1,
    num_nextn_predict_layers=1 if mtp else 0,
    rope_parameters={
      "rope_type": "yarn",
      "rope_theta": 10000.0,
      "factor": 4.0,
      "original_max_position_embeddings": 128,
      "beta_fast": 32,
      "beta_slow": 1,
      "mscale": 1.0,
      "mscale_all_dim": 1.0,
    },
  )
  model = DeepseekV3ForCausalLM(cfg).eval()
  with t.no_grad():
    for layer in model.model.layers[cfg.first_k_dense_replace :]:
      layer.mlp.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    for layer in model.model.layers:  # norms away from 1 so a swapped norm would show
      for mod in layer.modules():
        if type(mod).__name__.endswith("RMSNorm"):
          mod.weight.uniform_(0.5, 1.5)
  model.save_pretrained(path)
  return model


def qwen2(path: str, seed: int = 0):
  t = _torch()
  from transformers import Qwen2Config, Qwen2ForCausalLM

  t.manual_seed(seed)
  cfg = Qwen2Config(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    initializer_range=0.1,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
  )
  model = Qwen2ForCausalLM(cfg).eval()
  with t.no_grad():
    for layer in model.model.layers:
      for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
        proj.bias.normal_(0, 0.5)
  model.save_pretrained(path)
  return model


def llama3(path: str, seed: int = 0):
  """Llama 3.1-style: GQA, llama3 rope scaling, head_dim != hidden/heads."""
  t = _torch()
  from transformers import LlamaConfig, LlamaForCausalLM

  t.manual_seed(seed)
  cfg = LlamaConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    initializer_range=0.1,
    rms_norm_eps=1e-5,
    rope_parameters={
      "rope_type": "llama3",
      "rope_theta": 500000.0,
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64,
    },
  )
  model = LlamaForCausalLM(cfg).eval()
  model.save_pretrained(path)
  return model


def logits(model, ids: np.ndarray) -> np.ndarray:
  t = _torch()
  with t.no_grad():
    return model(t.tensor(np.asarray(ids), dtype=t.long)).logits.float().numpy()


BUILDERS = {"deepseek_v3": deepseek_v3, "qwen2": qwen2, "llama": llama3}


def build(kind: str, root: str):
  path = os.path.join(root, kind)
  return BUILDERS[kind](path), path
