"""Strict YAML -> frozen dataclass config loading, plus the run-config schema.

``from_dict`` builds any tree of (frozen) dataclasses from a mapping, checking
each value against the field's type hint; ``load`` adds YAML files and
``key.path=value`` overrides.  Every problem is a one-line ``ConfigError``
naming the dotted key.  The ``model`` section is kept as-is (preset name or
mapping) for the model package to resolve, typically via ``from_dict``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
  """A bad config value or file; the message is always a single line."""

  def __init__(self, msg: str):
    super().__init__(" ".join(str(msg).splitlines()))


_NoneType = type(None)


def _key(path: str, name: Any) -> str:
  return f"{path}.{name}" if path else str(name)


def _tname(tp: Any) -> str:
  if tp is _NoneType:
    return "None"
  if isinstance(tp, type) and not typing.get_args(tp):
    return tp.__name__
  return repr(tp).replace("typing.", "")


def _got(value: Any) -> str:
  r = repr(value)
  r = r if len(r) <= 60 else r[:57] + "..."
  return "got null" if value is None else f"got {type(value).__name__} {r}"


def _type_error(tp: Any, value: Any, key: str) -> ConfigError:
  return ConfigError(f"config key '{key}' expects {_tname(tp)}, {_got(value)}")


def _convert(tp: Any, value: Any, key: str) -> Any:
  """Check/convert one value against type hint ``tp``; ``key`` is its dotted name."""
  if tp is Any or tp is object:
    return value
  origin, args = typing.get_origin(tp), typing.get_args(tp)

  if origin is typing.Union or origin is types.UnionType:
    if value is None and _NoneType in args:
      return None
    options = [a for a in args if a is not _NoneType]
    if len(options) == 1:  # Optional[X]: let X give the precise error
      return _convert(options[0], value, key)
    for opt in options:
      try:
        return _convert(opt, value, key)
      except ConfigError:
        pass
    raise _type_error(tp, value, key)

  if origin is Literal:
    if any(value == a and type(value) is type(a) for a in args):
      return value
    raise ConfigError(f"config key '{key}' must be one of {list(args)}, got {value!r}")

  if dataclasses.is_dataclass(tp) and isinstance(tp, type):
    # an instance passes through; None -> defaults (e.g. "train:" left empty)
    return value if isinstance(value, tp) else from_dict(tp, value, path=key)

  if tp in (bool, int, str, _NoneType):
    ok = value is None if tp is _NoneType else isinstance(value, tp)
    if ok and (tp is bool or not isinstance(value, bool)):
      return value
    raise _type_error(tp, value, key)
  if tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
      try:
        return float(value)
      except ValueError:
        pass
    raise _type_error(tp, value, key)

  if origin in (tuple, list) or tp in (tuple, list):
    container = origin or tp
    if not isinstance(value, (list, tuple)):
      raise _type_error(tp, value, key)
    if not args:
      items = list(value)
    elif container is list or (len(args) == 2 and args[1] is Ellipsis):
      items = [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    else:
      if len(value) != len(args):
        raise ConfigError(f"config key '{key}' expects {_tname(tp)}, got {len(value)} items")
      items = [_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
    return container(items)

  if origin is dict or tp is dict or origin is Mapping:
    if not isinstance(value, Mapping):
      raise _type_error(tp, value, key)
    kt, vt = args if args else (Any, Any)
    return {_convert(kt, k, f"{key}.{k}"): _convert(vt, v, _key(key, k)) for k, v in value.items()}

  if isinstance(tp, type) and origin is None and not isinstance(value, tp):
    raise _type_error(tp, value, key)  # some other plain class
  return value  # (or an unsupported typing construct: accepted as-is)


_hints = functools.cache(typing.get_type_hints)


def from_dict(cls: type, data: Mapping[str, Any] | None, *, path: str = "") -> Any:
  """Build dataclass ``cls`` (recursively) from ``data``, strictly; then call
  ``obj.validate()`` if defined.  ``path`` prefixes keys in error messages."""
  if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
    raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
  data = {} if data is None else data
  if not isinstance(data, Mapping):
    where = f"config key '{path}'" if path else "config"
    raise ConfigError(f"{where} expects a mapping, {_got(data)}")
  hints = _hints(cls)
  fields = [f for f in dataclasses.fields(cls) if f.init]
  names = [f.name for f in fields]
  for k in data:
    if k not in names:
      close = difflib.get_close_matches(str(k), names, n=1)
      hint = f"did you mean '{_key(path, close[0])}'?" if close else f"valid keys: {', '.join(names)}"
      raise ConfigError(f"unknown config key '{_key(path, k)}' ({hint})")
  kwargs = {}
  for f in fields:
    if f.name in data:
      kwargs[f.name] = _convert(hints[f.name], data[f.name], _key(path, f.name))
    elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
      raise ConfigError(f"missing required config key '{_key(path, f.name)}'")
  try:
    obj = cls(**kwargs)
    if callable(getattr(obj, "validate", None)):
      obj.validate()
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:  # from __post_init__ / validate
    raise ConfigError(f"invalid config section '{path or cls.__name__}': {e}") from e
  return obj


def to_dict(obj: Any) -> Any:
  """Plain, YAML-serialisable form: dataclasses -> dicts, tuples -> lists."""
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
  if isinstance(obj, Mapping):
    return {k: to_dict(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_dict(v) for v in obj]
  return obj


def dump_yaml(obj: Any) -> str:
  return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False)


def parse_override(s: str) -> tuple[str, Any]:
  """``"train.steps=10"`` -> ``("train.steps", 10)``; the value is parsed as YAML."""
  if "=" not in s:
    raise ConfigError(f"override '{s}' must look like key.path=value")
  key, raw = s.split("=", 1)
  key = key.strip()
  if not key or any(not part for part in key.split(".")):
    raise ConfigError(f"override '{s}' has an invalid key '{key}'")
  try:
    value = yaml.safe_load(raw)
  except yaml.YAMLError:  # e.g. a glob like "*.jsonl": keep the raw string
    value = raw
  return key, value


def apply_overrides(data: Mapping[str, Any], overrides: typing.Iterable[str]) -> dict:
  """Return a deep copy of ``data`` with each ``key.path=value`` override set."""
  out = copy.deepcopy(dict(data))
  for s in overrides:
    key, value = parse_override(s)
    parts = key.split(".")
    node = out
    for i, part in enumerate(parts[:-1]):
      child = node.get(part)
      if child is None:
        child = node[part] = {}
      elif not isinstance(child, dict):
        raise ConfigError(
          f"cannot apply override '{s}': config key '{'.'.join(parts[: i + 1])}' is {_got(child)[4:]}, not a mapping"
        )
      node = child
    node[parts[-1]] = value
  return out


def load(cls: type, path: str | os.PathLike | None = None, overrides: typing.Iterable[str] = ()) -> Any:
  """Read YAML ``path`` (None -> empty), apply ``overrides``, build ``cls``."""
  data: Any = {}
  if path is not None:
    path = os.fspath(path)
    try:
      with open(path, encoding="utf-8") as fh:
        text = fh.read()
    except FileNotFoundError:
      raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
      raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
      data = yaml.safe_load(text)
    except yaml.YAMLError as e:
      mark = getattr(e, "problem_mark", None)
      where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
      problem = getattr(e, "problem", None) or str(e)
      raise ConfigError(f"invalid YAML in {path}{where}: {problem}") from None
    data = {} if data is None else data
    if not isinstance(data, Mapping):
      raise ConfigError(f"config file {path} must contain a mapping at top level, got {type(data).__name__}")
  data = apply_overrides(data, list(overrides))
  return from_dict(cls, data)


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
class RunConfig:
  model: Any = "tiny-moe"  # preset name or inline mapping; resolved by the model package
  mesh: MeshConfig = field(default_factory=MeshConfig)
  optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
  train: TrainConfig = field(default_factory=TrainConfig)
  data: DataConfig = field(default_factory=DataConfig)
  checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
  run_dir: str | None = None  # where checkpoints/logs go; None = let the CLI decide
  init: str | None = None  # checkpoint to initialise weights from

  def validate(self) -> None:
    if not isinstance(self.model, (str, Mapping)):
      raise ConfigError(f"config key 'model' must be a preset name or a mapping, {_got(self.model)}")


def load_run_config(path: str | os.PathLike | None = None, overrides: typing.Iterable[str] = ()) -> RunConfig:
  """Load a run config; ``model.key=value`` overrides tweak a preset named by ``model: NAME``."""
  overrides = list(overrides)
  if any(o.split("=", 1)[0].startswith("model.") for o in overrides):
    # `model.key=value` tweaks a preset named by the YAML or by an earlier `model=NAME` override.
    for i, o in enumerate(overrides):
      key, value = parse_override(o)
      if key == "model" and isinstance(value, str):
        overrides[i] = f"model={{preset: {value}}}"
    base = load(RunConfig, path).model
    if isinstance(base, str):
      overrides.insert(0, f"model={{preset: {base}}}")
  cfg = load(RunConfig, path, overrides)
  model_config(cfg)  # validate the model section now, with its dotted key names
  return cfg


def model_config(cfg: RunConfig):
  """Resolve ``cfg.model`` (preset name, ``{preset: NAME, ...overrides}`` or a full mapping)."""
  from rl_jax.models.config import ModelConfig, preset
  from rl_jax.models.config import from_dict as model_from_dict

  spec = cfg.model
  try:
    if isinstance(spec, ModelConfig):
      return spec
    if isinstance(spec, str):
      return preset(spec)
    spec = dict(spec)
    if "preset" in spec:
      name = spec.pop("preset")
      rope = spec.pop("rope", None)
      base = preset(name)
      if rope is not None:
        spec["rope"] = {**to_dict(base.rope), **dict(rope)}
      return model_from_dict({**to_dict(base), **spec})
    return model_from_dict(spec)
  except (ValueError, TypeError) as e:
    msg = str(e).replace("model config key '", "config key 'model.").replace("did you mean '", "did you mean 'model.")
    raise ConfigError(msg) from None
