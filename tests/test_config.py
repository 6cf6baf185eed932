"""Tests for rl_jax.config: strict YAML -> frozen dataclass loading."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from rl_jax import config as C
from rl_jax.config import ConfigError, RunConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the shipped YAML, read directly as the reference


def _err(fn, *args, **kwargs) -> str:
  with pytest.raises(ConfigError) as ei:
    fn(*args, **kwargs)
  msg = str(ei.value)
  assert "\n" not in msg, msg
  return msg


def _write(tmp_path, text: str, name: str = "run.yaml") -> str:
  p = tmp_path / name
  p.write_text(text)
  return str(p)


# A schema defined outside rl_jax.config, like models.config.ModelConfig.
@dataclass(frozen=True)
class Inner:
  kind: Literal["mla", "gqa"] = "mla"
  dims: tuple[int, ...] = (1, 2)
  names: tuple[str, ...] = ()
  pair: tuple[int, str] = (0, "a")
  scale: float = 1.0


@dataclass(frozen=True)
class Outer:
  width: int  # required
  inner: Inner = field(default_factory=Inner)
  maybe: int | None = 3
  extra: dict[str, Any] = field(default_factory=dict)
  anything: Any = None
  flag: bool = False


# ---------------------------------------------------------------- loading


def test_defaults_without_file():
  cfg = C.load_run_config()
  assert cfg == RunConfig()
  assert cfg.model == "tiny-moe" and cfg.mesh.fsdp == -1
  assert dataclasses.is_dataclass(cfg) and cfg.__dataclass_params__.frozen


def test_nested_load_and_overrides(tmp_path):
  path = _write(
    tmp_path,
    """
model: {preset: tiny-moe, hidden_size: 64, num_hidden_layers: 2}
mesh: {data: 2, fsdp: -1, rules: {act_batch: [data, fsdp]}}
optimizer: {lr: 1.0e-3, schedule: wsd}
train:
  steps: 50
  batch_size: 16
  grad_accum: 4
data:
  source: data/*.jsonl
checkpoint:
""",
  )
  cfg = C.load_run_config(
    path,
    [
      "train.steps=10",
      "optimizer.lr=1e-4",
      "data.seed=3",
      "run_dir=/tmp/x",
      "model.num_hidden_layers=4",
      "mesh.tensor=2",
    ],
  )
  assert cfg.train.steps == 10 and cfg.train.batch_size == 16 and cfg.train.grad_accum == 4
  assert cfg.optimizer.lr == 1e-4 and isinstance(cfg.optimizer.lr, float)
  assert cfg.optimizer.schedule == "wsd"
  assert cfg.data.seed == 3 and cfg.data.source == "data/*.jsonl"
  assert cfg.run_dir == "/tmp/x"
  assert cfg.model == {"preset": "tiny-moe", "hidden_size": 64, "num_hidden_layers": 4}
  assert C.model_config(cfg).num_hidden_layers == 4 and C.model_config(cfg).hidden_size == 64
  assert cfg.mesh.rules == {"act_batch": ["data", "fsdp"]} and cfg.mesh.tensor == 2
  assert cfg.checkpoint == C.CheckpointConfig()  # empty section -> defaults


def test_empty_file_is_defaults(tmp_path):
  assert C.load_run_config(_write(tmp_path, "")) == RunConfig()
  assert C.load_run_config(_write(tmp_path, "# only a comment\n")) == RunConfig()


def test_generic_schema_from_dict():
  obj = C.from_dict(
    Outer,
    {
      "width": 3,
      "inner": {"kind": "gqa", "dims": [4, 5], "pair": [7, "b"], "scale": 2},
      "extra": {"a": [1]},
      "anything": {"x": 1},
    },
  )
  assert obj.inner == Inner(kind="gqa", dims=(4, 5), names=(), pair=(7, "b"), scale=2.0)
  assert isinstance(obj.inner.scale, float)
  assert obj.extra == {"a": [1]} and obj.anything == {"x": 1} and obj.maybe == 3


def test_missing_required_key():
  msg = _err(C.from_dict, Outer, {"inner": {}})
  assert "'width'" in msg and "missing" in msg
  msg = _err(C.from_dict, Outer, {}, path="model")
  assert msg == "missing required config key 'model.width'"


# ---------------------------------------------------------------- errors


def test_unknown_key_suggests():
  msg = _err(C.load_run_config, None, ["train.stesp=10"])
  assert "unknown config key 'train.stesp'" in msg
  assert "did you mean 'train.steps'?" in msg
  msg = _err(C.load_run_config, None, ["optimiser.lr=1"])
  assert "'optimiser'" in msg and "'optimizer'" in msg
  msg = _err(C.load_run_config, None, ["train.zzzzzz=1"])
  assert "'train.zzzzzz'" in msg and "steps" in msg  # lists valid keys instead


def test_wrong_types_name_the_key():
  msg = _err(C.load_run_config, None, ["train.steps=ten"])
  assert msg == "config key 'train.steps' expects int, got str 'ten'"
  msg = _err(C.load_run_config, None, ["train.remat=1"])
  assert "'train.remat'" in msg and "bool" in msg
  msg = _err(C.load_run_config, None, ['train.remat="yes"'])
  assert "'train.remat'" in msg
  msg = _err(C.load_run_config, None, ["train.steps=true"])  # bool is not an int
  assert "'train.steps'" in msg
  msg = _err(C.load_run_config, None, ["train.steps=1.5"])
  assert "'train.steps'" in msg
  msg = _err(C.load_run_config, None, ["optimizer.lr=fast"])
  assert "'optimizer.lr'" in msg and "float" in msg
  msg = _err(C.load_run_config, None, ["data.source=3"])
  assert "'data.source'" in msg and "str" in msg
  msg = _err(C.load_run_config, None, ["train=5"])
  assert "'train'" in msg and "mapping" in msg
  msg = _err(C.load_run_config, None, ["model=3"])
  assert "'model'" in msg


def test_nested_generic_errors():
  assert "'model.inner.dims[1]'" in _err(C.from_dict, Outer, {"width": 1, "inner": {"dims": [1, "x"]}}, path="model")
  assert "'inner.pair'" in _err(C.from_dict, Outer, {"width": 1, "inner": {"pair": [1]}})
  assert "'inner.dims'" in _err(C.from_dict, Outer, {"width": 1, "inner": {"dims": 3}})
  assert "'maybe'" in _err(C.from_dict, Outer, {"width": 1, "maybe": "x"})
  assert "'extra'" in _err(C.from_dict, Outer, {"width": 1, "extra": [1]})


def test_literal_rejected():
  msg = _err(C.from_dict, Outer, {"width": 1, "inner": {"kind": "foo"}}, path="model")
  assert msg == "config key 'model.inner.kind' must be one of ['mla', 'gqa'], got 'foo'"
  msg = _err(C.load_run_config, None, ["optimizer.schedule=linear"])
  assert "'optimizer.schedule'" in msg and "'cosine'" in msg
  msg = _err(C.load_run_config, None, ["train.param_dtype=float16"])
  assert "'train.param_dtype'" in msg


def test_float_from_yaml_string(tmp_path):
  # PyYAML reads 1e-3 (no dot) as a string; float fields must still accept it.
  assert yaml.safe_load("1e-3") == "1e-3"
  cfg = C.load_run_config(_write(tmp_path, "optimizer:\n  lr: 1e-3\n  eps: 1e-12\n"))
  assert cfg.optimizer.lr == 1e-3 and cfg.optimizer.eps == 1e-12
  cfg = C.load_run_config(None, ["optimizer.lr=1e-3", "optimizer.grad_clip=2"])
  assert cfg.optimizer.lr == pytest.approx(1e-3) and isinstance(cfg.optimizer.lr, float)
  assert cfg.optimizer.grad_clip == 2.0 and isinstance(cfg.optimizer.grad_clip, float)


def test_null_override_for_optional(tmp_path):
  path = _write(tmp_path, "run_dir: runs/a\ndata: {tokenizer: tok/}\nmesh: {num_processes: 2}\n")
  cfg = C.load_run_config(path, ["run_dir=null", "data.tokenizer=null", "mesh.num_processes=~"])
  assert cfg.run_dir is None and cfg.data.tokenizer is None and cfg.mesh.num_processes is None
  msg = _err(C.load_run_config, None, ["train.steps=null"])  # not Optional
  assert "'train.steps'" in msg and "null" in msg


def test_validate_errors():
  msg = _err(C.load_run_config, None, ["train.batch_size=8", "train.grad_accum=3"])
  assert "'train.grad_accum'" in msg and "8" in msg
  msg = _err(C.load_run_config, None, ["mesh.data=-1"])  # fsdp is already -1
  assert "mesh.data" in msg and "mesh.fsdp" in msg and "-1" in msg
  msg = _err(C.load_run_config, None, ["mesh.expert=0"])
  assert "'mesh.expert'" in msg
  assert "'train.steps'" in _err(C.load_run_config, None, ["train.steps=0"])
  assert "'optimizer.lr'" in _err(C.load_run_config, None, ["optimizer.lr=0"])
  assert "'optimizer.b2'" in _err(C.load_run_config, None, ["optimizer.b2=1.0"])
  assert "'mesh.process_id'" in _err(C.load_run_config, None, ["mesh.num_processes=2", "mesh.process_id=2"])
  # a valid combination passes
  cfg = C.load_run_config(None, ["mesh.fsdp=2", "mesh.tensor=-1", "train.grad_accum=4"])
  assert cfg.mesh.tensor == -1 and cfg.train.grad_accum == 4


def test_plain_value_error_in_validate_becomes_config_error():
  @dataclass(frozen=True)
  class V:
    a: int = 1

    def validate(self):
      if self.a < 0:
        raise ValueError("a must be >= 0")

  msg = _err(C.from_dict, V, {"a": -1}, path="model")
  assert "'model'" in msg and "a must be >= 0" in msg


# ---------------------------------------------------------------- files


def test_missing_file(tmp_path):
  path = str(tmp_path / "nope.yaml")
  msg = _err(C.load_run_config, path)
  assert path in msg and "not found" in msg


def test_malformed_yaml(tmp_path):
  path = _write(tmp_path, "train:\n  steps: 10\n  batch_size: [1, 2\nmodel: x\n")
  msg = _err(C.load_run_config, path)
  assert path in msg and "line" in msg
  path = _write(tmp_path, "a: b\n c: d\n", name="bad2.yaml")
  msg = _err(C.load_run_config, path)
  assert path in msg and "line 2" in msg


def test_top_level_must_be_mapping(tmp_path):
  path = _write(tmp_path, "- 1\n- 2\n")
  msg = _err(C.load_run_config, path)
  assert path in msg and "mapping" in msg


# ---------------------------------------------------------------- overrides


def test_parse_override():
  assert C.parse_override("train.steps=10") == ("train.steps", 10)
  assert C.parse_override("x=null") == ("x", None)
  assert C.parse_override("x=a=b") == ("x", "a=b")
  assert C.parse_override("x=[1, 2]") == ("x", [1, 2])
  assert C.parse_override("data.source=*.jsonl") == ("data.source", "*.jsonl")
  assert C.parse_override("data.source=tfds:tiny") == ("data.source", "tfds:tiny")
  assert "train.steps" in _err(C.parse_override, "train.steps")
  _err(C.parse_override, "=3")
  _err(C.parse_override, "a..b=3")


def test_apply_overrides_deep_copies():
  data = {"train": {"steps": 1}, "model": "tiny-moe"}
  out = C.apply_overrides(data, ["train.steps=2", "a.b.c=3", "mesh.rules={x: y}"])
  assert data == {"train": {"steps": 1}, "model": "tiny-moe"}
  assert out == {"train": {"steps": 2}, "model": "tiny-moe", "a": {"b": {"c": 3}}, "mesh": {"rules": {"x": "y"}}}
  msg = _err(C.apply_overrides, data, ["model.d_model=8"])  # model is a preset name
  assert "'model'" in msg


# ---------------------------------------------------------------- round trip


def test_round_trip_run_config(tmp_path):
  cfg = C.load_run_config(
    None,
    [
      "model={preset: tiny-moe, hidden_size: 32}",
      "mesh.rules={act_batch: [data]}",
      "optimizer.lr=1e-5",
      "run_dir=runs/x",
      "train.remat=true",
      "mesh.coordinator_address=host:1234",
    ],
  )
  d = C.to_dict(cfg)
  assert isinstance(d, dict) and isinstance(d["train"], dict)
  assert C.from_dict(RunConfig, d) == cfg
  text = C.dump_yaml(cfg)
  assert C.from_dict(RunConfig, yaml.safe_load(text)) == cfg
  assert C.load_run_config(_write(tmp_path, text)) == cfg
  assert C.dump_yaml(RunConfig()).startswith("model: tiny-moe\n")  # field order kept


def test_round_trip_tuples():
  obj = C.from_dict(Outer, {"width": 2, "inner": {"dims": [3, 4, 5], "names": ["a", "b"], "pair": [1, "z"]}})
  d = C.to_dict(obj)
  assert d["inner"]["dims"] == [3, 4, 5] and d["inner"]["names"] == ["a", "b"]
  assert d["inner"]["pair"] == [1, "z"]
  assert C.from_dict(Outer, yaml.safe_load(C.dump_yaml(obj))) == obj
  assert obj.inner.dims == (3, 4, 5)


# ---------------------------------------------------------------- model config: one strict path

# (key, value, message with {p} where the run config adds its 'model.' section prefix)
BAD_MODEL = [
  ("dtype", "bf16", "config key '{p}dtype' must be one of ['float32', 'bfloat16', 'float16'], got 'bf16'"),
  ("hiden_size", 3, "unknown config key '{p}hiden_size' (did you mean '{p}hidden_size'?)"),
  ("num_hidden_layers", "two", "config key '{p}num_hidden_layers' expects int, got str 'two'"),
  ("n_group", 3, "config key '{p}n_group' must divide n_routed_experts (8), got 3"),
]


@pytest.mark.parametrize("key,value,expected", BAD_MODEL, ids=[b[0] for b in BAD_MODEL])
def test_bad_model_value_same_line_through_every_entry(tmp_path, capsys, key, value, expected):
  import json

  from rl_jax import checkpoint, cli
  from rl_jax.models.config import from_dict

  msg = expected.format(p="")
  assert _err(from_dict, {**yaml.safe_load((CONFIGS / "models" / "tiny-moe.yaml").read_text()), key: value}) == msg
  assert _err(C.load_run_config, None, [f"model.{key}={value}"]) == expected.format(p="model.")
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  good = json.loads(json.dumps(C.to_dict(C.model_config(RunConfig()))))
  (ckpt / "model_config.json").write_text(json.dumps({**good, key: value}))
  assert _err(checkpoint.read_model_config, str(ckpt)) == f"{ckpt / 'model_config.json'}: {msg}"
  out = tmp_path / "out"
  assert cli.main(["init", "--model", "tiny-moe", "--set", f"{key}={value}", "--out", str(out)]) == 2
  assert capsys.readouterr().err == f"error: {msg}\n"
  assert not out.exists()


def test_model_section_forms(tmp_path):
  from rl_jax.models.config import preset

  own = _write(tmp_path, "arch: llama\nnum_key_value_heads: 2\n", name="my_model.yaml")
  assert C.model_config(C.load_run_config(None, [f"model={own}"])) == preset(own)
  assert preset(own).num_key_value_heads == 2 and preset(own).arch == "llama"
  cfg = C.load_run_config(None, ["model.rope.theta=500.0"])  # tweaks the default preset, rope merged
  assert C.model_config(cfg) == preset("tiny-moe", rope={"theta": 500.0})
  assert C.model_config(cfg).rope.interleave  # kept from the preset
  assert _err(C.load_run_config, None, ["model={preset: 3}"]).startswith("config key 'model.preset'")
  assert _err(C.load_run_config, None, ["model=tiny-mo"]) == "unknown model preset 'tiny-mo' (did you mean 'tiny-moe'?)"


def test_checkpoint_model_config_round_trip_and_bad_json(tmp_path):
  from rl_jax import checkpoint

  cfg = C.model_config(C.load_run_config(None, ["model.rope={type: yarn, factor: 4.0}"]))
  (tmp_path / "model_config.json").write_text(__import__("json").dumps(checkpoint.config_to_json(cfg)))
  assert checkpoint.read_model_config(str(tmp_path)) == cfg
  (tmp_path / "model_config.json").write_text('{"arch": ')
  msg = _err(checkpoint.read_model_config, str(tmp_path))
  assert msg.startswith(f"{tmp_path / 'model_config.json'}: invalid JSON at line 1")


# ---------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("name", ["pretrain_tiny", "pretrain_tiny.yaml"])
def test_config_by_shipped_name_from_any_directory(tmp_path, monkeypatch, name):
  from rl_jax import cli

  monkeypatch.chdir(tmp_path)
  with open(CONFIGS / "pretrain_tiny.yaml") as f:  # the reference: the shipped file read directly
    want = C.from_dict(RunConfig, {**yaml.safe_load(f), "run_dir": "r"})
  args = cli.build_parser().parse_args(["pretrain", "--config", name, "--run-dir", "r"])
  assert cli._run_config(args) == want
  assert want.train.steps == 300 and want.model == {"preset": "tiny-moe", "moe_capacity_factor": 2.0}
  (tmp_path / "pretrain_tiny.yaml").write_text("train: {steps: 7}\n")  # a file in the cwd wins over the name
  assert C.load_run_config("pretrain_tiny.yaml").train.steps == 7


def test_unknown_config_name_lists_shipped(tmp_path, monkeypatch, capsys):
  from rl_jax import cli

  monkeypatch.chdir(tmp_path)
  stems = [p.stem for p in CONFIGS.glob("*.yaml")]
  stems += [f"{d}/{p.stem}" for d in ("pipelines", "plan") for p in CONFIGS.glob(f"{d}/*.yaml")]
  shipped = ", ".join(sorted(stems))
  assert "extend_tiny" in shipped and "pretrain_tiny" in shipped
  msg = _err(C.load_run_config, "pretrain_tny")
  assert msg == f"config file not found: pretrain_tny (did you mean 'pretrain_tiny'? shipped configs: {shipped})"
  assert cli.main(["pretrain", "--config", "zzz"]) == 2
  assert capsys.readouterr().err == f"error: config file not found: zzz (shipped configs: {shipped})\n"
