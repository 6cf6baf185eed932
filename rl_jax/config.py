"""The run-config schema: one frozen dataclass per concern, composed into ``RunConfig``.

Loading is the strict loader of ``rl_jax.models.configlib`` (re-exported here): YAML files plus
``key.path=value`` overrides, every problem a one-line ``ConfigError`` naming the dotted key. ``--config``
and ``model:`` take a path or the name of a config shipped in rl_jax/configs.
"""

from __future__ import annotations

import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from rl_jax.models.config import ModelConfig, config_path, preset_dict
from rl_jax.models.config import from_dict as model_from_dict
from rl_jax.models.configlib import (
  ConfigError,
  apply_overrides,
  dump_yaml,
  from_dict,
  load,
  merge,
  parse_override,
  read_yaml,
  to_dict,
)

__all__ = [
  "CheckpointConfig",
  "ConfigError",
  "DataConfig",
  "DistillConfig",
  "GRPOConfig",
  "MeshConfig",
  "OptimizerConfig",
  "RunConfig",
  "SFTConfig",
  "TrainConfig",
  "apply_overrides",
  "dump_yaml",
  "from_dict",
  "load",
  "load_run_config",
  "merge",
  "model_config",
  "parse_override",
  "read_yaml",
  "to_dict",
]

# ---------------------------------------------------------------- run-config schema

_RULES = {
  "> 0": lambda v: v > 0,
  ">= 0": lambda v: v >= 0,
  ">= 1": lambda v: v >= 1,
  "in [0, 1]": lambda v: 0 <= v <= 1,
  "in [0, 1)": lambda v: 0 <= v < 1,
}


def _check(obj: Any, section: str, **rules: str) -> None:
  """``_check(self, "train", steps="> 0")``: range checks naming the dotted key."""
  for name, rule in rules.items():
    v = getattr(obj, name)
    if v is not None and not _RULES[rule](v):
      raise ConfigError(f"config key '{section}.{name}' must be {rule}, got {v!r}")


@dataclass(frozen=True)
class MeshConfig:
  data: int = 1  # pure data-parallel replicas
  fsdp: int = -1  # fully-sharded data parallel (params/optimizer sharded); -1 = the rest
  expert: int = 1  # expert parallelism for MoE layers
  tensor: int = 1  # tensor (model) parallelism inside layers
  sequence: int = 1  # sequence parallelism: training rows split along T (zig-zag); attention exchanges K/V
  rules: dict[str, Any] | None = None  # logical-axis-name -> mesh-axis overrides
  distributed: bool | None = None  # jax.distributed.initialize(); None = auto-detect
  coordinator_address: str | None = None  # "host:port" of process 0 (multi-host)
  num_processes: int | None = None
  process_id: int | None = None

  def validate(self) -> None:
    axes = ("data", "fsdp", "expert", "tensor")
    for a in axes:
      v = getattr(self, a)
      if v < 1 and v != -1:
        raise ConfigError(f"config key 'mesh.{a}' must be >= 1 or -1 (the rest), got {v}")
    if not isinstance(self.sequence, int) or self.sequence < 1:
      raise ConfigError(f"config key 'mesh.sequence' must be >= 1, got {self.sequence!r}")
    rest = [f"mesh.{a}" for a in axes if getattr(self, a) == -1]
    if len(rest) > 1:
      raise ConfigError(f"config keys {', '.join(rest)} are all -1; at most one mesh axis may be -1")
    _check(self, "mesh", num_processes=">= 1", process_id=">= 0")
    if self.process_id is not None and self.num_processes is not None and self.process_id >= self.num_processes:
      raise ConfigError(
        f"config key 'mesh.process_id' must be < mesh.num_processes ({self.num_processes}), got {self.process_id}"
      )


@dataclass(frozen=True)
class OptimizerConfig:
  lr: float = 3e-4  # peak learning rate (AdamW)
  schedule: Literal["cosine", "wsd", "constant"] = "cosine"  # wsd = warmup-stable-decay
  warmup_steps: int = 100  # linear warmup from 0 to lr
  decay_fraction: float = 0.1  # wsd only: final fraction of steps spent decaying
  min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine / wsd)
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1  # decoupled (AdamW) weight decay
  grad_clip: float = 1.0  # global-norm gradient clipping; 0 disables

  def validate(self) -> None:
    _check(
      self,
      "optimizer",
      lr="> 0",
      warmup_steps=">= 0",
      decay_fraction="in [0, 1]",
      min_lr_ratio="in [0, 1]",
      b1="in [0, 1)",
      b2="in [0, 1)",
      eps="> 0",
      weight_decay=">= 0",
      grad_clip=">= 0",
    )


@dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000  # optimizer steps
  batch_size: int = 8  # global sequences per optimizer step
  seq_len: int = 256  # tokens per sequence
  grad_accum: int = 1  # micro-batches per step (batch_size must divide evenly)
  mtp_lambda: float = 0.3  # weight of the multi-token-prediction loss
  balance_alpha: float = 1e-4  # sequence-wise MoE balance loss weight
  bias_gamma: float = 1e-3  # aux-loss-free router bias update speed
  z_loss: float = 0.0  # router/logit z-loss weight; 0 = off
  param_dtype: Literal["float32", "bfloat16"] = "float32"
  compute_dtype: Literal["float32", "bfloat16"] = "bfloat16"
  remat: bool = False  # rematerialise (gradient-checkpoint) each block
  seed: int = 0
  log_every: int = 10  # steps between metric logs
  max_bad_steps: int = 3  # consecutive non-finite (skipped) steps before the run stops

  def validate(self) -> None:
    _check(
      self,
      "train",
      steps="> 0",
      batch_size="> 0",
      seq_len="> 0",
      grad_accum=">= 1",
      mtp_lambda=">= 0",
      balance_alpha=">= 0",
      bias_gamma=">= 0",
      z_loss=">= 0",
      log_every=">= 1",
      max_bad_steps=">= 1",
    )
    if self.batch_size % self.grad_accum:
      raise ConfigError(
        f"config key 'train.grad_accum' ({self.grad_accum}) must divide train.batch_size ({self.batch_size})"
      )


@dataclass(frozen=True)
class DataConfig:
  # "procedural[:kind]" | .jsonl/.txt path, glob or directory | "tfds:<name>[:split]" (ArrayRecord)
  source: str = "procedural"
  tokenizer: str | None = None  # dir with tokenizer.json; None = byte-level BPE of model.vocab_size
  text_field: str = "text"  # jsonl field holding the document text
  seed: int = 0  # shuffling seed (documents are always packed into full seq_len rows)


@dataclass(frozen=True)
class CheckpointConfig:
  every: int = 100  # steps between saves; 0 = only at the end of the run
  keep: int = 3  # most recent checkpoints kept on disk
  async_save: bool = True  # write in the background while training continues

  def validate(self) -> None:
    _check(self, "checkpoint", every=">= 0", keep=">= 1")


@dataclass(frozen=True)
class SFTConfig:
  """Supervised fine-tuning data (`rl-jax sft`, `rl-jax distill`, `rl-jax train-rm`): rows are JSONL objects
  {"prompt", "response"} or {"messages": [{"role", "content"}, ...]} (or the same fields in a TFDS ArrayRecord
  dataset), from `data.source`; the loss covers response (assistant) tokens only."""

  template: str = "r1_zero_short"  # how a `prompt` is rendered (rl_jax/data/tasks.py TEMPLATES or a {prompt} string)
  chat_format: Literal["chatml", "deepseek_r1", "plain"] = "chatml"  # how `messages` rows are rendered
  prompt_field: str = "prompt"
  response_field: str = "response"
  messages_field: str = "messages"
  pack: bool = True  # several examples per row with segment ids; False = one example per row, padded
  too_long: Literal["drop", "error"] = "drop"  # an example longer than train.seq_len (dropped ones are counted)


@dataclass(frozen=True)
class DistillConfig:
  """Logit distillation (`rl-jax distill` with a teacher): the student is the run's model (or --init), the
  teacher a checkpoint sharing its tokenizer; the loss is losses.distill_loss, chunked over the sequence."""

  teacher: str | None = None  # teacher checkpoint dir; None = SFT on teacher traces only (R1's distillation)
  divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
  temperature: float = 1.0
  jsd_beta: float = 0.5
  top_k: int = 0  # teacher logits kept per token (renormalised over the top k); 0 = the full vocabulary
  cache: bool = False  # compute the teacher's top-k logits in a first pass to <run_dir>/teacher_cache, then free it
  kd_weight: float = 1.0  # weight of the distillation loss
  ce_weight: float = 0.0  # weight of plain next-token CE on the same (response) tokens
  chunk: int = 128  # sequence positions per chunk of the chunked loss

  def validate(self) -> None:
    _check(self, "distill", temperature="> 0", jsd_beta="in [0, 1]", top_k=">= 0", kd_weight=">= 0", ce_weight=">= 0")
    if self.chunk < 1:
      raise ConfigError(f"config key 'distill.chunk' must be >= 1, got {self.chunk}")
    if self.cache and not self.top_k:
      raise ConfigError("config key 'distill.cache' needs distill.top_k > 0 (the cache holds the teacher's top-k)")


# GRPO-family algorithms: the defaults each one gives the `grpo` keys the config leaves unset.
ALGORITHMS: dict[str, dict[str, Any]] = {
  "grpo": {},  # DeepSeekMath / R1: group-normalised advantages, per-sequence token means, k3 KL in the loss
  "dapo": {"loss_agg": "token-mean", "clip_high": 0.28, "beta": 0.0, "dynamic_sampling": True, "overlong_buffer": -1},
  "dr_grpo": {"advantage": "none", "loss_agg": "seq-mean-token-sum-norm", "beta": 0.0},
  "gspo": {"ratio_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4, "beta": 0.0},
}


@dataclass(frozen=True)
class GRPOConfig:
  algorithm: Literal["grpo", "dapo", "dr_grpo", "gspo"] = "grpo"  # presets for the keys below (ALGORITHMS)
  task: str = "chain"  # procedural kind, GSM8K/MATH-style .jsonl, rg:NAME[:CONFIG] (reasoning-gym) or tfds:NAME[:SPLIT]
  template: str = "r1_zero_short"  # prompt template name (rl_jax/data/tasks.py) or a string with {prompt}
  think_prefix: bool = False  # the template ends by opening <think>: the format reward counts it
  prompts_per_step: int = 16  # questions per RL step
  group_size: int = 8  # G completions per question
  max_prompt_len: int = 64  # tokens; longer prompts are an error
  max_new_tokens: int = 64  # completion budget (tokens)
  temperature: float = 1.0  # rollouts; log-probs (sampler and trainer) are those of logits / temperature
  top_p: float = 1.0
  rollout_slots: int = 0  # engine decode slots (a multiple of the batch shards); 0 = one per row; fewer: rows queue
  rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 1.0})  # weights
  reward_model: str | None = None  # checkpoint of `rl-jax train-rm`: the "rm" reward (sigmoid of its score)
  advantage: Literal["group", "batch", "none"] = "group"  # std scaling of r - group mean
  loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = (
    "seq-mean-token-mean"
  )
  clip_low: float = 0.2  # ratio clip range [1 - clip_low, 1 + clip_high]
  clip_high: float = 0.2
  beta: float = 0.001  # KL weight (R1: 0.001)
  kl: Literal["k1", "k2", "k3"] = "k3"  # KL estimator
  kl_in_reward: bool = False  # subtract beta * KL(sequence) from the reward instead of adding it to the loss
  ratio_level: Literal["token", "sequence"] = "token"  # "sequence": GSPO's length-normalised sequence ratio
  epochs: int = 1  # mu: passes over each rollout batch
  minibatches: int = 1  # optimizer steps per pass
  ref_reset_every: int = 0  # reset the reference model to the policy every N steps (R1: 400); 0 = never
  tis_cap: float | None = 2.0  # truncated importance weight cap for the sampler/trainer mismatch; null = off
  routing_replay: bool = False  # MoE: train on the experts the sampler chose
  dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, sample more to refill
  max_resample: int = 4  # dynamic sampling: extra rollout rounds at most per step
  overlong_buffer: int = 0  # DAPO soft overlong penalty over the last N tokens of the budget; 0 off, -1 = budget/4
  eval_every: int = 0  # held-out evaluation every N steps (and at the end); 0 = only at the end
  eval_problems: int = 64
  eval_k: int = 4

  def validate(self) -> None:
    _check(
      self,
      "grpo",
      prompts_per_step=">= 1",
      max_prompt_len=">= 1",
      max_new_tokens=">= 1",
      rollout_slots=">= 0",
      temperature="> 0",
      clip_low=">= 0",
      clip_high=">= 0",
      beta=">= 0",
      epochs=">= 1",
      minibatches=">= 1",
      ref_reset_every=">= 0",
      max_resample=">= 0",
      eval_every=">= 0",
      eval_problems=">= 1",
      eval_k=">= 1",
    )
    if self.group_size < 2:
      raise ConfigError(
        f"config key 'grpo.group_size' must be >= 2 (advantages compare a group), got {self.group_size}"
      )
    if not 0 < self.top_p <= 1:
      raise ConfigError(f"config key 'grpo.top_p' must be in (0, 1], got {self.top_p}")
    if (self.prompts_per_step * self.group_size) % self.minibatches:
      raise ConfigError(
        f"config key 'grpo.minibatches' ({self.minibatches}) must divide grpo.prompts_per_step x grpo.group_size "
        f"({self.prompts_per_step * self.group_size})"
      )
    from rl_jax.rewards import COMPONENTS

    for name in self.rewards:
      if name not in COMPONENTS:
        raise ConfigError(f"config key 'grpo.rewards.{name}' is not a reward (known: {', '.join(COMPONENTS)})")
    if "rm" in self.rewards and not self.reward_model:
      raise ConfigError("config key 'grpo.reward_model' must name a train-rm checkpoint when grpo.rewards has rm")


@dataclass(frozen=True)
class RunConfig:
  model: str | dict[str, Any] = "tiny-moe"  # preset name or YAML path, {preset: NAME, ...overrides}, or a mapping
  mesh: MeshConfig = field(default_factory=MeshConfig)
  optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
  train: TrainConfig = field(default_factory=TrainConfig)
  data: DataConfig = field(default_factory=DataConfig)
  checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
  grpo: GRPOConfig = field(default_factory=GRPOConfig)  # read by `rl-jax grpo` only
  sft: SFTConfig = field(default_factory=SFTConfig)  # read by `rl-jax sft`, `distill`, `train-rm`
  distill: DistillConfig = field(default_factory=DistillConfig)  # read by `rl-jax distill` only
  run_dir: str | None = None  # where checkpoints/logs go; None = let the CLI decide
  init: str | None = None  # checkpoint to initialise weights from


def load_run_config(path: str | os.PathLike | None = None, overrides: typing.Iterable[str] = ()) -> RunConfig:
  """Load a run config (a path or a shipped name like ``pretrain_tiny``), then ``key.path=value`` overrides."""
  data = {} if path is None else read_yaml(config_path(path, "run"))
  data = _model_from_init(data, overrides)
  for o in overrides:
    model = data.get("model", RunConfig.model)
    if o.split("=", 1)[0].strip().startswith("model.") and isinstance(model, str):
      data["model"] = {"preset": model}  # `model.key=value` tweaks the named preset
    data = apply_overrides(data, [o])
  grpo = data.get("grpo")
  if isinstance(grpo, dict) and grpo.get("algorithm") in ALGORITHMS:  # the algorithm's defaults, then the keys set
    data = {**data, "grpo": {**ALGORITHMS[grpo["algorithm"]], **grpo}}
  cfg = from_dict(RunConfig, data)
  model_config(cfg)  # validate the model section now, with its dotted key names
  return cfg


def _model_from_init(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
  """With `init` set, an absent `model` section (or `model: {from_init: true, ...}`) means the init checkpoint's
  own model config, with the section's keys and `model.*` overrides laid on top (rope, context, dtypes)."""
  model = data.get("model")
  if model is not None and not (isinstance(model, dict) and model.get("from_init")):
    return data
  init = data.get("init")
  for o in overrides:
    key, value = parse_override(o)
    init = value if key == "init" else init
  if not init:
    if model is None:
      return data  # no checkpoint to take it from: the default preset, as before
    raise ConfigError("config key 'model.from_init' needs a checkpoint to take the model from: pass --init CKPT")
  from etils import epath

  path = epath.Path(str(init)) / "model_config.json"
  if not path.exists():
    raise ConfigError(f"--init {init}: not an rl-jax checkpoint (no model_config.json) to take the model from")
  rest = {k: v for k, v in (model or {}).items() if k != "from_init"}
  return {**data, "model": merge(json.loads(path.read_text()), rest)}


def model_config(cfg: RunConfig) -> ModelConfig:
  """Resolve ``cfg.model`` (preset name or YAML path, ``{preset: NAME, ...overrides}`` or a full mapping)."""
  spec = cfg.model
  if isinstance(spec, ModelConfig):
    return spec
  spec = {"preset": spec} if isinstance(spec, str) else dict(spec)
  name = spec.pop("preset", None)
  if name is not None and not isinstance(name, str):
    raise ConfigError(f"config key 'model.preset' expects a preset name or YAML path, got {name!r}")
  base = {} if name is None else preset_dict(name)
  return model_from_dict(merge(base, spec), path="model")
