"""Self-describing Orbax checkpoints: a directory that `rl-jax` commands need nothing else to use.

    CHECKPOINT/
      model_config.json     the ModelConfig (what to build)
      tokenizer/            tokenizer.json & co, when the run has one
      <step>/params         the parameters (Orbax, restorable onto any mesh)
      <step>/meta           JSON: step, model config, run config, anything a stage adds

Training stages add items (optimizer state, RNG, data-iterator state) next to `params` in the same
step directory; `load_model` restores `params` alone, so an eval needs only the model part.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

import models
from models.config import ModelConfig, RopeConfig


class CheckpointNotFound(FileNotFoundError):
  pass


def manager(directory: str, *, keep: int | None = None, async_save: bool = False, extra_items=()) -> ocp.CheckpointManager:
  handlers = {"params": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  for name, handler in extra_items:
    handlers[name] = handler
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=opts, item_handlers=handlers)


def config_to_json(cfg: ModelConfig) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def config_from_json(d: dict[str, Any]) -> ModelConfig:
  d = dict(d)
  d["rope"] = RopeConfig(**d["rope"])
  return ModelConfig(**d).validate()


def save_model(directory: str, model: models.Transformer, *, step: int = 0, tokenizer_dir: str | None = None,
               meta: dict[str, Any] | None = None) -> str:
  """Writes the model's params at `step` plus its config (and tokenizer files) to `directory`."""
  os.makedirs(directory, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(directory, "model_config.json"), "w") as f:
      json.dump(config_to_json(model.cfg), f, indent=2)
    if tokenizer_dir:
      copy_tokenizer(tokenizer_dir, os.path.join(directory, "tokenizer"))
  state = nnx.state(model).to_pure_dict()
  meta = {"step": step, "model_config": config_to_json(model.cfg), **(meta or {})}
  mngr = manager(directory)
  mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
  mngr.wait_until_finished()
  mngr.close()
  return directory


def copy_tokenizer(src: str, dst: str) -> None:
  from models.hf import TOKENIZER_FILES
  os.makedirs(dst, exist_ok=True)
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(src, name)):
      shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def read_model_config(directory: str) -> ModelConfig:
  path = os.path.join(directory, "model_config.json")
  if not os.path.exists(path):
    raise CheckpointNotFound(f"{directory}: not an rl-jax checkpoint (no model_config.json)")
  with open(path) as f:
    return config_from_json(json.load(f))


def latest_step(directory: str) -> int:
  mngr = manager(directory)
  step = mngr.latest_step()
  mngr.close()
  if step is None:
    raise CheckpointNotFound(f"{directory}: no saved step (interrupted before the first save?)")
  return step


def load_model(directory: str, *, step: int | None = None, mesh=None, rules=None, **config_overrides
               ) -> models.Transformer:
  """Builds the model described by the checkpoint and restores its params (onto `mesh` when given)."""
  cfg = read_model_config(directory)
  if config_overrides:
    cfg = cfg.replace(**config_overrides)
  abstract = nnx.eval_shape(lambda: models.Transformer(cfg, nnx.Rngs(params=0)))
  graphdef, abs_state = nnx.split(abstract)
  if mesh is not None:
    from sharding.rules import param_shardings
    shardings = param_shardings(abs_state, mesh, rules)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abs_state.to_pure_dict(), shardings.to_pure_dict())
  else:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), abs_state.to_pure_dict())
  mngr = manager(directory)
  step = mngr.latest_step() if step is None else step
  if step is None:
    mngr.close()
    raise CheckpointNotFound(f"{directory}: no saved step (interrupted before the first save?)")
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
  except Exception as e:  # orbax raises many types; name the culprit in one line
    raise ValueError(f"{directory}: cannot restore params of step {step}: {str(e).splitlines()[0][:300]}") from None
  finally:
    mngr.close()
  nnx.replace_by_pure_dict(abs_state, restored["params"])
  return nnx.merge(graphdef, abs_state)


def tokenizer_dir(directory: str) -> str | None:
  d = os.path.join(directory, "tokenizer")
  return d if os.path.exists(os.path.join(d, "tokenizer.json")) else None
