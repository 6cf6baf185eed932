"""ModelConfig: one frozen dataclass for DeepSeek-V3/R1 (MLA + DeepSeekMoE + MTP) and dense Qwen2 / Llama 3."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import configlib
from .configlib import ConfigError

ARCHS = ("deepseek_v3", "qwen2", "llama")
HF_ARCH = {"deepseek_v3": "DeepseekV3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@dataclass(frozen=True)
class RopeConfig:
  type: Literal["default", "yarn", "llama3"] = "default"
  theta: float = 10000.0
  factor: float = 1.0  # yarn / llama3 context-extension factor
  original_max_position_embeddings: int = 4096
  beta_fast: float = 32.0  # yarn: extrapolate dims rotating > beta_fast times in L0
  beta_slow: float = 1.0  # yarn: interpolate dims rotating < beta_slow times in L0
  mscale: float = 1.0  # yarn: cos/sin scale numerator (HF `mscale`)
  mscale_all_dim: float = 0.0  # yarn: also squares into the MLA softmax scale when nonzero
  attention_factor: float | None = None  # yarn: explicit cos/sin scale, overrides mscale
  truncate: bool = True  # yarn: floor/ceil the correction range (HF default)
  low_freq_factor: float = 1.0  # llama3
  high_freq_factor: float = 4.0  # llama3
  interleave: bool = False  # DeepSeek rotates pairs (x0,x1),(x2,x3)...; Qwen/Llama rotate halves


@dataclass(frozen=True)
class ModelConfig:
  arch: Literal["deepseek_v3", "qwen2", "llama"] = "deepseek_v3"
  vocab_size: int = 256
  hidden_size: int = 64
  num_hidden_layers: int = 2
  num_attention_heads: int = 4
  num_key_value_heads: int = 4  # GQA only; MLA has one shared latent
  head_dim: int | None = None  # GQA head dim; None = hidden_size // heads
  intermediate_size: int = 128  # dense MLP width (dense layers, dense models)
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # Qwen2: bias on q/k/v projections
  rope: RopeConfig = field(default_factory=RopeConfig)
  # --- MLA (deepseek_v3) ---
  q_lora_rank: int | None = None  # None: a single q_proj (V2-Lite style)
  kv_lora_rank: int = 16
  qk_nope_head_dim: int = 16
  qk_rope_head_dim: int = 8
  v_head_dim: int = 16
  # --- DeepSeekMoE ---
  n_routed_experts: int = 0  # 0: every layer dense
  n_shared_experts: int = 0
  num_experts_per_tok: int = 1
  moe_intermediate_size: int = 32
  n_group: int = 1
  topk_group: int = 1
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 1.0
  first_k_dense_replace: int = 0  # layers [0, k) use the dense MLP
  moe_capacity_factor: float | None = None  # None: dropless (ragged_dot); else capacity = cf*T*K/E per expert
  # --- multi-token prediction ---
  num_nextn_predict_layers: int = 0
  # --- reward model ---
  score_head: bool = False  # a scalar head `score` [hidden, 1] (a Bradley-Terry reward model; never in HF files)
  # --- numerics ---
  dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute
  param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
  initializer_range: float = 0.02
  # --- execution (no effect on parameters, files or results) ---
  scan_layers: bool = True  # each layer group runs as one lax.scan (compile time flat in depth); False: unrolled

  # ------------------------------------------------------------------ derived
  @property
  def is_mla(self) -> bool:
    return self.arch == "deepseek_v3"

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def gqa_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @property
  def rope_dim(self) -> int:
    return self.qk_rope_head_dim if self.is_mla else self.gqa_head_dim

  def is_moe_layer(self, i: int) -> bool:
    return self.n_routed_experts > 0 and i >= self.first_k_dense_replace

  def layer_groups(self) -> list[tuple[str, range]]:
    """The decoder stack as runs of identical layers, in order: (the Transformer attribute holding the run's
    parameters stacked on a leading "layers" axis, the layer indices it covers). Dense models have one group;
    DeepSeek-V3 has its first_k_dense_replace dense layers, then the MoE layers."""
    L = self.num_hidden_layers
    k = min(self.first_k_dense_replace, L) if self.n_routed_experts else L
    return [(name, r) for name, r in (("dense_layers", range(0, k)), ("moe_layers", range(k, L))) if len(r)]

  @property
  def n_moe_layers(self) -> int:
    return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

  def validate(self) -> ModelConfig:
    def bad(key, problem):
      raise ConfigError.at(key, problem)  # the loader prefixes the section ('model.')

    if self.arch not in ARCHS:
      bad("arch", f"must be one of {list(ARCHS)}, got {self.arch!r}")
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
      if getattr(self, k) <= 0:
        bad(k, f"must be > 0, got {getattr(self, k)}")
    if not self.is_mla and self.num_attention_heads % self.num_key_value_heads:
      bad(
        "num_key_value_heads",
        f"must divide num_attention_heads ({self.num_attention_heads}), got {self.num_key_value_heads}",
      )
    if self.rope_dim % 2:
      bad("qk_rope_head_dim" if self.is_mla else "head_dim", f"must give an even rope dim, got {self.rope_dim}")
    if self.n_routed_experts:
      if self.n_routed_experts % self.n_group:
        bad("n_group", f"must divide n_routed_experts ({self.n_routed_experts}), got {self.n_group}")
      if not 1 <= self.topk_group <= self.n_group:
        bad("topk_group", f"must be in [1, n_group={self.n_group}], got {self.topk_group}")
      per_group = self.n_routed_experts // self.n_group
      if self.n_group > 1 and per_group < 2:
        bad("n_group", f"must leave >= 2 experts per group (group scores sum the top 2), got {per_group}")
      if not 1 <= self.num_experts_per_tok <= self.topk_group * per_group:
        bad(
          "num_experts_per_tok",
          f"must be in [1, experts in topk_group groups={self.topk_group * per_group}], got {self.num_experts_per_tok}",
        )
    if self.num_nextn_predict_layers and not self.is_mla:
      bad("num_nextn_predict_layers", "must be 0: multi-token prediction is only implemented for deepseek_v3")
    for k in ("score_head", "scan_layers"):
      if not isinstance(getattr(self, k), bool):
        bad(k, f"must be true or false, got {getattr(self, k)!r}")
    if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
      bad("moe_capacity_factor", f"must be > 0 or null, got {self.moe_capacity_factor}")
    return self

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw).validate()

  # ------------------------------------------------------------------ counts
  def param_counts(self) -> dict[str, int]:
    """Analytic parameter counts: total (main model), active per token, mtp."""
    d, L, V = self.hidden_size, self.num_hidden_layers, self.vocab_size
    if self.is_mla:
      H = self.num_attention_heads
      q = (
        d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
        if self.q_lora_rank
        else d * H * self.qk_head_dim
      )
      attn = (
        q
        + d * (self.kv_lora_rank + self.qk_rope_head_dim)
        + self.kv_lora_rank
        + self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
        + H * self.v_head_dim * d
      )
    else:
      hd, H, Hk = self.gqa_head_dim, self.num_attention_heads, self.num_key_value_heads
      attn = d * hd * (H + 2 * Hk) + H * hd * d + (hd * (H + 2 * Hk) if self.attention_bias else 0)
    dense = 3 * d * self.intermediate_size
    expert = 3 * d * self.moe_intermediate_size
    moe_total = self.n_routed_experts * expert + self.n_shared_experts * expert + d * self.n_routed_experts
    moe_active = (self.num_experts_per_tok + self.n_shared_experts) * expert + d * self.n_routed_experts
    n_moe = sum(self.is_moe_layer(i) for i in range(L))
    layer_base = attn + 2 * d
    embed = V * d * (1 if self.tie_word_embeddings else 2)
    total = L * layer_base + (L - n_moe) * dense + n_moe * moe_total + embed + d
    active = L * layer_base + (L - n_moe) * dense + n_moe * moe_active + embed + d
    mtp_layer = layer_base + (moe_total if self.n_routed_experts else dense) + 2 * d * d + 3 * d
    return {"total": total, "active": active, "mtp": self.num_nextn_predict_layers * mtp_layer}

  def flops_per_token(self, seq_len: int, *, mtp: bool) -> float:
    """Training FLOPs per token (forward + backward): 6 x the matmul weights a token meets (routed experts:
    only its top-k; the LM head also when tied to the embedding, whose lookup is no matmul) + causal
    attention over `seq_len`. The MTP blocks and their head count only with `mtp` (the run trains them)."""
    d, V, H = self.hidden_size, self.vocab_size, self.num_attention_heads
    if self.is_mla:
      r, c, d_qk, d_v = self.q_lora_rank, self.kv_lora_rank, self.qk_head_dim, self.v_head_dim
      q = d * r + r * H * d_qk if r else d * H * d_qk
      kv = d * (c + self.qk_rope_head_dim) + c * H * (self.qk_nope_head_dim + d_v)
      attn = q + kv + H * d_v * d
    else:
      hd = self.gqa_head_dim
      attn, d_qk, d_v = d * hd * (H + 2 * self.num_key_value_heads) + H * hd * d, hd, hd
    dense = 3 * d * self.intermediate_size
    moe = (self.num_experts_per_tok + self.n_shared_experts) * 3 * d * self.moe_intermediate_size
    moe += d * self.n_routed_experts  # the router
    matmul = sum(attn + (moe if self.is_moe_layer(i) else dense) for i in range(self.num_hidden_layers)) + d * V
    n_attn = self.num_hidden_layers
    if mtp and self.num_nextn_predict_layers:
      block = 2 * d * d + attn + (moe if self.n_routed_experts else dense) + d * V  # eh_proj, layer, shared head
      matmul += self.num_nextn_predict_layers * block
      n_attn += self.num_nextn_predict_layers
    return 6.0 * matmul + 3.0 * n_attn * H * (d_qk + d_v) * seq_len

  # ------------------------------------------------------------------ HF interop
  @classmethod
  def from_hf(cls, config: dict[str, Any] | str, **overrides) -> ModelConfig:
    """Reads a HF config.json (dict or path); both `rope_parameters` and legacy `rope_scaling` + `rope_theta`."""
    if isinstance(config, str):
      with open(config) as f:
        config = json.load(f)
    c = dict(config)
    model_type = c.get("model_type", "")
    arch = {"deepseek_v3": "deepseek_v3", "qwen2": "qwen2", "llama": "llama"}.get(model_type)
    if arch is None:
      archs = c.get("architectures") or ["?"]
      raise ValueError(
        f"unsupported architecture: model_type={model_type!r} architectures={archs} "
        f"(supported: {', '.join(HF_ARCH.values())})"
      )
    rp = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = rp.get("rope_theta", c.get("rope_theta", 10000.0))
    rtype = rp.get("rope_type", rp.get("type", "default"))
    if rtype not in ("default", "yarn", "llama3"):
      raise ValueError(f"unsupported rope type {rtype!r} in config.json (supported: default, yarn, llama3)")
    rope = dict(
      type=rtype,
      theta=float(theta),
      interleave=bool(c.get("rope_interleave", True)) if arch == "deepseek_v3" else False,
    )
    if rtype != "default":
      rope["factor"] = float(rp["factor"])
      rope["original_max_position_embeddings"] = int(
        rp.get("original_max_position_embeddings") or c.get("max_position_embeddings")
      )
    if rtype == "yarn":
      rope["beta_fast"] = float(rp.get("beta_fast") or 32.0)
      rope["beta_slow"] = float(rp.get("beta_slow") or 1.0)
      rope["mscale"] = float(rp.get("mscale") or 0.0)
      rope["mscale_all_dim"] = float(rp.get("mscale_all_dim") or 0.0)
      if rp.get("attention_factor") is not None:
        rope["attention_factor"] = float(rp["attention_factor"])
      rope["truncate"] = bool(rp.get("truncate", True))
    if rtype == "llama3":
      rope["low_freq_factor"] = float(rp["low_freq_factor"])
      rope["high_freq_factor"] = float(rp["high_freq_factor"])
    kw: dict[str, Any] = dict(
      arch=arch,
      vocab_size=c["vocab_size"],
      hidden_size=c["hidden_size"],
      num_hidden_layers=c["num_hidden_layers"],
      num_attention_heads=c["num_attention_heads"],
      num_key_value_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
      intermediate_size=c["intermediate_size"],
      rms_norm_eps=c.get("rms_norm_eps", 1e-6),
      max_position_embeddings=c.get("max_position_embeddings", 4096),
      tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
      rope=RopeConfig(**rope),
      initializer_range=c.get("initializer_range", 0.02),
    )
    if arch == "deepseek_v3":
      if c.get("attention_bias"):
        raise ValueError("unsupported config.json: attention_bias=true for deepseek_v3")
      kw.update(
        q_lora_rank=c.get("q_lora_rank"),
        kv_lora_rank=c["kv_lora_rank"],
        qk_nope_head_dim=c["qk_nope_head_dim"],
        qk_rope_head_dim=c["qk_rope_head_dim"],
        v_head_dim=c["v_head_dim"],
        n_routed_experts=c.get("n_routed_experts") or 0,
        n_shared_experts=c.get("n_shared_experts") or 0,
        num_experts_per_tok=c.get("num_experts_per_tok") or 1,
        moe_intermediate_size=c.get("moe_intermediate_size") or 1,
        n_group=c.get("n_group") or 1,
        topk_group=c.get("topk_group") or 1,
        norm_topk_prob=bool(c.get("norm_topk_prob", True)),
        routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
        first_k_dense_replace=c.get("first_k_dense_replace", 0),
        num_nextn_predict_layers=c.get("num_nextn_predict_layers", 0) or 0,
      )
      if c.get("scoring_func", "sigmoid") != "sigmoid":
        raise ValueError(f"unsupported scoring_func {c['scoring_func']!r} (DeepSeek-V3 uses sigmoid)")
    else:
      hd = c.get("head_dim")
      kw.update(
        head_dim=hd if hd and hd != c["hidden_size"] // c["num_attention_heads"] else None,
        attention_bias=(arch == "qwen2") or bool(c.get("attention_bias", False)),
      )
      if c.get("mlp_bias"):
        raise ValueError("unsupported config.json: mlp_bias=true")
    kw.update(overrides)
    return cls(**kw).validate()

  def to_hf(self) -> dict[str, Any]:
    """A config.json dict that transformers loads (rope in the transformers 5 `rope_parameters` format)."""
    r = self.rope
    rp: dict[str, Any] = {"rope_type": r.type, "rope_theta": r.theta}
    if r.type != "default":
      rp.update(factor=r.factor, original_max_position_embeddings=r.original_max_position_embeddings)
    if r.type == "yarn":
      rp.update(
        beta_fast=r.beta_fast,
        beta_slow=r.beta_slow,
        mscale=r.mscale,
        mscale_all_dim=r.mscale_all_dim,
        truncate=r.truncate,
      )
      if r.attention_factor is not None:
        rp["attention_factor"] = r.attention_factor
    if r.type == "llama3":
      rp.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor)
    c: dict[str, Any] = dict(
      architectures=[HF_ARCH[self.arch]],
      model_type=self.arch,
      vocab_size=self.vocab_size,
      hidden_size=self.hidden_size,
      num_hidden_layers=self.num_hidden_layers,
      num_attention_heads=self.num_attention_heads,
      num_key_value_heads=self.num_key_value_heads,
      intermediate_size=self.intermediate_size,
      rms_norm_eps=self.rms_norm_eps,
      max_position_embeddings=self.max_position_embeddings,
      tie_word_embeddings=self.tie_word_embeddings,
      hidden_act="silu",
      rope_parameters=rp,
      rope_theta=r.theta,
      initializer_range=self.initializer_range,
      torch_dtype=self.param_dtype,
      dtype=self.param_dtype,
    )
    if self.is_mla:
      c.update(
        q_lora_rank=self.q_lora_rank,
        kv_lora_rank=self.kv_lora_rank,
        qk_nope_head_dim=self.qk_nope_head_dim,
        qk_rope_head_dim=self.qk_rope_head_dim,
        v_head_dim=self.v_head_dim,
        n_routed_experts=self.n_routed_experts,
        n_shared_experts=self.n_shared_experts,
        num_experts_per_tok=self.num_experts_per_tok,
        moe_intermediate_size=self.moe_intermediate_size,
        n_group=self.n_group,
        topk_group=self.topk_group,
        norm_topk_prob=self.norm_topk_prob,
        routed_scaling_factor=self.routed_scaling_factor,
        first_k_dense_replace=self.first_k_dense_replace,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        rope_interleave=r.interleave,
        num_nextn_predict_layers=self.num_nextn_predict_layers,
        attention_bias=False,
      )
    else:
      c.update(head_dim=self.gqa_head_dim, attention_bias=self.attention_bias and self.arch != "qwen2", mlp_bias=False)
      if self.arch == "qwen2":
        c.update(use_sliding_window=False)
    return c


def from_dict(data: dict[str, Any], *, path: str = "") -> ModelConfig:
  """Strict construction through the shared loader: one ConfigError line naming the (``path``-prefixed) key."""
  return configlib.from_dict(ModelConfig, data, path=path)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # shipped YAML (rl_jax/configs when installed)
PRESET_DIR = CONFIG_DIR / "models"
_SHIPPED = {"model": (PRESET_DIR, ("*.yaml",)), "run": (CONFIG_DIR, ("*.yaml", "pipelines/*.yaml", "plan/*.yaml"))}


def shipped_names(kind: Literal["model", "run"] = "run") -> list[str]:
  """Names of the shipped model presets or run/pipeline configs ('tiny-moe', 'pretrain_tiny', 'pipelines/x')."""
  base, globs = _SHIPPED[kind]
  return sorted(p.relative_to(base).with_suffix("").as_posix() for g in globs for p in base.glob(g))


def preset_names() -> list[str]:
  return shipped_names("model")


def config_path(name: str | os.PathLike, kind: Literal["model", "run"] = "run") -> Path:
  """A YAML file by path (relative to the cwd) or, when no such file exists, by shipped name."""
  name = os.fspath(name)
  if os.path.isfile(name):
    return Path(name)
  base, _ = _SHIPPED[kind]
  stem = name.removesuffix(".yaml").removesuffix(".yml")
  if (base / f"{stem}.yaml").is_file():
    return base / f"{stem}.yaml"
  names = shipped_names(kind)
  close = difflib.get_close_matches(stem, names, n=1)
  if kind == "model":
    hint = f"did you mean '{close[0]}'?" if close else f"presets: {', '.join(names)}"
    raise ConfigError(f"unknown model preset '{name}' ({hint})")
  hint = f"did you mean '{close[0]}'? " if close else ""
  raise ConfigError(f"config file not found: {name} ({hint}shipped configs: {', '.join(names)})")


def preset_dict(name: str) -> dict[str, Any]:
  """The raw mapping of a model preset (shipped name or YAML path), for overrides before construction."""
  return configlib.read_yaml(config_path(name, "model"))


def preset(name: str, **overrides) -> ModelConfig:
  """A named preset from configs/models/ (or a path to a YAML file), with field overrides (mappings merge)."""
  return from_dict(configlib.merge(preset_dict(name), overrides))
