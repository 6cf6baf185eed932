"""MTP against an independent float64 numpy reference that reads the exported HF-layout checkpoint.

The released DeepSeek-V3 weights expect eh_proj([enorm(emb(t_{i+1})) ; hnorm(h_i)]), embedding first (the
paper writes the hidden state first). The reference below is written from DEEPSEEK_V3.md alone: it shares
no code with models/ (its own RMSNorm, YaRN table, interleaved RoPE, naive MLA, sigmoid group routing)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from rl_jax import models
from rl_jax.models.config import RopeConfig, preset

CFG = preset(
  "tiny-moe",
  vocab_size=256,
  initializer_range=0.15,  # sharp enough attention and routing that a wrong input order shows
  rope=RopeConfig(
    type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=1.0, mscale_all_dim=1.0, interleave=True
  ),
)


# ------------------------------------------------------------------------------------ float64 reference
def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _silu(x):
  return x / (1 + np.exp(-x))


def _yarn_inv_freq(r, dim):
  """DEEPSEEK_V3.md "RoPE and YaRN", with the truncated correction range."""
  inv = r.theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)

  def corr(n):
    return dim * math.log(r.original_max_position_embeddings / (2 * math.pi * n)) / (2 * math.log(r.theta))

  low, high = max(math.floor(corr(r.beta_fast)), 0), min(math.ceil(corr(r.beta_slow)), dim - 1)
  high = high + 0.001 if low == high else high
  ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
  return inv / r.factor * ramp + inv * (1 - ramp)


def _rope_pairs(x_TR, inv_R2):
  """Rotates interleaved pairs (x0, x1), (x2, x3), ... by position * frequency, in place (official layout)."""
  ang = np.arange(x_TR.shape[0])[:, None] * inv_R2[None, :]
  shape = (x_TR.shape[0],) + (1,) * (x_TR.ndim - 2) + (-1,)
  cos, sin = np.cos(ang).reshape(shape), np.sin(ang).reshape(shape)
  out = x_TR.copy()
  a, b = x_TR[..., 0::2], x_TR[..., 1::2]
  out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
  return out


def _mla(x_TD, w, cfg):
  """Naive MLA for one sequence, weights [out, in] as in the checkpoint."""
  T, H, nope, v = x_TD.shape[0], cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
  eps, r = cfg.rms_norm_eps, cfg.rope
  q = _rms(x_TD @ w["q_a_proj"].T, w["q_a_layernorm"], eps) @ w["q_b_proj"].T
  q = q.reshape(T, H, nope + cfg.qk_rope_head_dim)
  ckv = x_TD @ w["kv_a_proj_with_mqa"].T
  c, k_pe = _rms(ckv[:, : cfg.kv_lora_rank], w["kv_a_layernorm"], eps), ckv[:, cfg.kv_lora_rank :]
  inv = _yarn_inv_freq(r, cfg.qk_rope_head_dim)
  q_pe, k_pe = _rope_pairs(q[..., nope:], inv), _rope_pairs(k_pe, inv)
  kv = (c @ w["kv_b_proj"].T).reshape(T, H, nope + v)
  m = 0.1 * r.mscale_all_dim * math.log(r.factor) + 1
  scale = (nope + cfg.qk_rope_head_dim) ** -0.5 * m * m
  s = (np.einsum("thn,shn->hts", q[..., :nope], kv[..., :nope]) + np.einsum("thr,sr->hts", q_pe, k_pe)) * scale
  s = np.where(np.tril(np.ones((T, T), bool))[None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  o = np.einsum("hts,shv->thv", p, kv[..., nope:]).reshape(T, H * v)
  return o @ w["o_proj"].T


def _ffn(x_D, w, prefix):
  g, u, d = (w[f"{prefix}{n}_proj"] for n in ("gate", "up", "down"))
  return d @ (_silu(g @ x_D) * (u @ x_D))


def _moe(x_TD, w, cfg):
  """Sigmoid scores; the bias picks experts but never weighs them; group-limited top-k; shared expert added."""
  E, G = cfg.n_routed_experts, cfg.n_group
  y = np.zeros_like(x_TD)
  for t, x in enumerate(x_TD):
    s = 1 / (1 + np.exp(-(w["gate"] @ x)))
    choice = s + w["gate.e_score_correction_bias"]
    groups = choice.reshape(G, E // G)
    group_score = np.sort(groups, axis=1)[:, -2:].sum(1)
    keep = np.argsort(-group_score, kind="stable")[: cfg.topk_group]
    masked = np.full(E, -np.inf)
    for g in keep:
      masked[g * (E // G) : (g + 1) * (E // G)] = choice[g * (E // G) : (g + 1) * (E // G)]
    top = np.argsort(-masked, kind="stable")[: cfg.num_experts_per_tok]
    weights = s[top] / s[top].sum() * cfg.routed_scaling_factor
    y[t] = sum(wk * _ffn(x, w, f"experts.{e}.") for wk, e in zip(weights, top)) + _ffn(x, w, "shared_experts.")
  return y


def mtp_reference(ckpt, cfg, ids_T, h_TD):
  """One MTP depth: logits at position i predict token i+2 from h_i and the embedding of token i+1."""
  L, eps = cfg.num_hidden_layers, cfg.rms_norm_eps
  pre = f"model.layers.{L}."
  w = {k[len(pre) :].removesuffix(".weight"): v for k, v in ckpt.items() if k.startswith(pre)}
  attn = {k[len("self_attn.") :]: v for k, v in w.items() if k.startswith("self_attn.")}
  mlp = {k[len("mlp.") :]: v for k, v in w.items() if k.startswith("mlp.")}
  emb = w["embed_tokens"][ids_T[1:]]  # t_{i+1} for i < T-1
  x = np.concatenate([_rms(emb, w["enorm"], eps), _rms(h_TD[:-1], w["hnorm"], eps)], axis=-1) @ w["eh_proj"].T
  x = x + _mla(_rms(x, w["input_layernorm"], eps), attn, cfg)
  x = x + _moe(_rms(x, w["post_attention_layernorm"], eps), mlp, cfg)
  return _rms(x, w["shared_head.norm"], eps) @ w["shared_head.head"].T


# ------------------------------------------------------------------------------------------------ test
def _perturbed_model(cfg, seed=0):
  """Random norm scales (enorm != hnorm) and a nonzero router bias, so a swapped input would change the output."""
  model = models.build(cfg, seed=seed)
  rng = np.random.RandomState(seed)
  for path, var in nnx.to_flat_state(nnx.state(model)):
    if path[-1] == "scale":
      var.set_value(jnp.asarray(rng.uniform(0.5, 1.5, var.shape), var.get_value().dtype))
    elif path[-1] == "bias":
      var.set_value(jnp.asarray(rng.uniform(-0.3, 0.3, var.shape), jnp.float32))
  return model


def test_mtp_matches_float64_reference_embedding_first(tmp_path):
  """model.forward(mtp=True).mtp_logits[0] vs the numpy reference on the exported HF-named weights."""
  model = _perturbed_model(CFG)
  models.save_hf(model, str(tmp_path / "ckpt"))
  ckpt = {k: v.astype(np.float64) for k, v in load_file(str(tmp_path / "ckpt" / "model.safetensors")).items()}
  ids = np.random.RandomState(1).randint(0, 256, (2, 20))
  out = model.forward(jnp.asarray(ids, jnp.int32), mtp=True)
  h = np.asarray(jax.device_get(out.hidden_BTD), np.float64)  # main stack: HF-checked in test_hf.py
  got = np.asarray(out.mtp_logits[0])[:, :-1]  # the last position's target wraps around (invalid)
  want = np.stack([mtp_reference(ckpt, CFG, ids[b], h[b]) for b in range(2)])
  assert np.abs(want).max() > 0.5, "reference logits too flat to test anything"
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _hf_mtp_state(ckpt, cfg):
  """Our exported layer num_hidden_layers renamed for transformers' MtpModel (experts fused: gate rows first)."""
  import torch

  pre, E = f"model.layers.{cfg.num_hidden_layers}.", cfg.n_routed_experts
  top = {"enorm.weight", "hnorm.weight", "eh_proj.weight"}
  out = {}
  for k, v in ckpt.items():
    if not k.startswith(pre) or ".experts." in k or k[len(pre) :] in ("embed_tokens.weight", "shared_head.head.weight"):
      continue
    name = k[len(pre) :]
    name = "post_norm.weight" if name == "shared_head.norm.weight" else name if name in top else "mtp_block." + name
    out["layers.0." + name] = torch.tensor(v)
  experts = pre + "mlp.experts.{}.{}_proj.weight"
  out["layers.0.mtp_block.mlp.experts.gate_up_proj"] = torch.tensor(
    np.stack([np.concatenate([ckpt[experts.format(e, "gate")], ckpt[experts.format(e, "up")]]) for e in range(E)])
  )
  out["layers.0.mtp_block.mlp.experts.down_proj"] = torch.tensor(
    np.stack([ckpt[experts.format(e, "down")] for e in range(E)])
  )
  return out


def test_mtp_matches_transformers_mtp_layer(tmp_path):
  """transformers' generic MtpLayer (embedding first unless `mtp_hidden_states_first`) on the same weights."""
  pytest.importorskip("transformers")
  from tests import hf_models

  torch = hf_models._torch()
  from transformers import DeepseekV3ForCausalLM
  from transformers.modeling_layers import MtpModel

  model = _perturbed_model(CFG, seed=2)
  models.save_hf(model, str(tmp_path / "ckpt"))
  ckpt = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
  main = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.float32).eval()
  mtp = MtpModel(main, 1).eval()
  missing, unexpected = mtp.load_state_dict(_hf_mtp_state(ckpt, CFG), strict=False)
  assert not unexpected and set(missing) <= {"embed_tokens.weight", "shared_head.weight"}, (missing, unexpected)
  assert not getattr(mtp.config, "mtp_hidden_states_first", False)
  ids = np.random.RandomState(3).randint(0, 256, (2, 20))
  with torch.no_grad():
    h = main.model(torch.tensor(ids)).last_hidden_state[:, :-1]
    pos = torch.arange(ids.shape[1] - 1)[None].expand(2, -1)
    want = mtp.shared_head(mtp.forward_layer(0, h, pos, None, input_ids=torch.tensor(ids[:, 1:]))).numpy()
  got = np.asarray(model.forward(jnp.asarray(ids, jnp.int32), mtp=True).mtp_logits[0])[:, :-1]
  assert np.abs(want).max() > 0.5, "reference logits too flat to test anything"
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
