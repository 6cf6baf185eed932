"""Strict YAML -> frozen dataclass loading, shared by every config type (model, run, checkpoint).

``from_dict`` builds any tree of (frozen) dataclasses from a mapping, checking each value against the
field's type hint, then calls the object's ``validate()``; ``load`` adds YAML files and ``key.path=value``
overrides. Every problem is a one-line ``ConfigError`` naming the dotted key. Dependency-free (stdlib +
PyYAML) so the model package can use it without importing the rest of rl_jax.
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
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
  """A bad config value or file; the message is always a single line."""

  def __init__(self, msg: str):
    super().__init__(" ".join(str(msg).splitlines()))
    self.key: str | None = None
    self.problem: str | None = None

  @classmethod
  def at(cls, key: str, problem: str) -> ConfigError:
    """``config key 'KEY' PROBLEM`` from a ``validate()``: ``from_dict`` prefixes KEY with the section's path."""
    err = cls(f"config key '{key}' {problem}")
    err.key, err.problem = key, problem
    return err


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
  """Build dataclass ``cls`` (recursively) from ``data`` strictly, then ``validate()`` it; ``path`` prefixes keys."""
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
  except ConfigError as e:
    if path and e.key is not None:  # a validate() names keys relative to its own section
      raise ConfigError.at(_key(path, e.key), e.problem) from None
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


def read_yaml(path: str | os.PathLike) -> dict:
  """The mapping in YAML file ``path``; a missing file, bad YAML or a non-mapping is a one-line error."""
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
  return dict(data)


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict:
  """``over`` laid on ``base``; mappings present in both are merged key by key, anything else replaced."""
  out = dict(base)
  for k, v in over.items():
    out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
  return out


def load(cls: type, path: str | os.PathLike | None = None, overrides: typing.Iterable[str] = ()) -> Any:
  """Read YAML ``path`` (None -> empty), apply ``overrides``, build ``cls``."""
  data = {} if path is None else read_yaml(path)
  return from_dict(cls, apply_overrides(data, list(overrides)))
