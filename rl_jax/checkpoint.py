"""Self-describing Orbax checkpoints: a directory that `rl-jax` commands need nothing else to use.

    CHECKPOINT/
      model_config.json     the ModelConfig (what to build)
      tokenizer/            tokenizer.json & co, when the run has one
      <step>/params         the parameters (Orbax, restorable onto any mesh)
      <step>/meta           JSON: step, model config, run config, anything a stage adds

Training stages add an item (optimizer state and step) next to `params` in the same step directory, and
the data-iterator state beside the checkpoints; `load_model` restores `params` alone, so an eval needs
only the model part.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from rl_jax import models
from rl_jax.models import layout
from rl_jax.models.config import ModelConfig
from rl_jax.models.config import from_dict as model_from_dict
from rl_jax.models.configlib import ConfigError, to_dict
from rl_jax.report import is_url, run_path


class CheckpointNotFound(FileNotFoundError):
  pass


def manager(
  directory: str, *, keep: int | None = None, async_save: bool = False, train: bool = False
) -> ocp.CheckpointManager:
  """Orbax manager for `params` + `meta`; with `train`, also the `train` item `save_train` writes."""
  handlers = {"params": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  if train:
    handlers["train"] = ocp.StandardCheckpointHandler()
  _quiet_orphaned_reads()
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(run_path(directory), options=opts, item_handlers=handlers)


def config_to_json(cfg: ModelConfig) -> dict[str, Any]:
  return to_dict(cfg)


def config_from_json(d: dict[str, Any]) -> ModelConfig:
  """Strict, like every model config: an unknown key or a bad value is a one-line ConfigError."""
  return model_from_dict(d)


def save_model(
  directory: str,
  model: models.Transformer,
  *,
  step: int = 0,
  tokenizer_dir: str | None = None,
  meta: dict[str, Any] | None = None,
) -> str:
  """Writes the model's params at `step` plus its config (and tokenizer files) to `directory`."""
  if jax.process_index() == 0:
    write_model_config(directory, model.cfg)
    if tokenizer_dir:
      copy_tokenizer(tokenizer_dir, os.path.join(directory, "tokenizer"))
  state = nnx.state(model).to_pure_dict()
  meta = {"step": step, "model_config": config_to_json(model.cfg), **(meta or {})}
  mngr = manager(directory)
  mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
  mngr.wait_until_finished()
  mngr.close()
  return directory


def write_model_config(directory: str, cfg: ModelConfig) -> None:
  """<directory>/model_config.json (the directory is created; local or a URL)."""
  d = run_path(directory)
  d.mkdir(parents=True, exist_ok=True)
  (d / "model_config.json").write_text(json.dumps(config_to_json(cfg), indent=2))


def copy_tokenizer(src: str, dst: str) -> None:
  """Copies the HF tokenizer files of directory `src` that exist to `dst` (either local or a URL)."""
  from rl_jax.models.hf import TOKENIZER_FILES

  if _same_path(src, dst):  # a resumed run's tokenizer is already in place
    return
  src, dst = run_path(src), run_path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  for name in TOKENIZER_FILES:
    if (src / name).exists():
      (dst / name).write_bytes((src / name).read_bytes())


def _same_path(a: str, b: str) -> bool:
  if is_url(a) or is_url(b):
    return os.fspath(a).rstrip("/") == os.fspath(b).rstrip("/")
  return os.path.realpath(a) == os.path.realpath(b)


def read_model_config(directory: str) -> ModelConfig:
  path = run_path(directory) / "model_config.json"
  if not path.exists():
    raise CheckpointNotFound(f"{directory}: not an rl-jax checkpoint (no model_config.json)")
  try:
    return config_from_json(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None


def latest_step(directory: str) -> int:
  mngr = manager(directory)
  step = mngr.latest_step()
  mngr.close()
  if step is None:
    raise CheckpointNotFound(f"{directory}: no saved step (interrupted before the first save?)")
  return step


def load_model(
  directory: str, *, step: int | None = None, mesh=None, rules=None, **config_overrides
) -> models.Transformer:
  """Builds the model described by the checkpoint and restores its params onto `mesh` (default: the mesh
  set with `jax.set_mesh`, else one device)."""
  if mesh is None:
    from rl_jax.sharding.mesh import active_mesh

    mesh = active_mesh()
  cfg = read_model_config(directory)
  if config_overrides:
    cfg = cfg.replace(**config_overrides)
  abstract = nnx.eval_shape(lambda: models.Transformer(cfg, nnx.Rngs(params=0)))
  graphdef, abs_state = nnx.split(abstract)
  if mesh is not None:
    from rl_jax.sharding.rules import param_shardings

    shardings = param_shardings(abs_state, mesh, rules)
    target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abs_state.to_pure_dict(),
      shardings.to_pure_dict(),
    )
  else:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), abs_state.to_pure_dict())
  mngr = manager(directory)
  step = mngr.latest_step() if step is None else step
  if step is None:
    mngr.close()
    raise CheckpointNotFound(f"{directory}: no saved step (interrupted before the first save?)")
  try:
    restored = restore_items(mngr, step, {"params": target})
  except Exception as e:  # orbax raises many types; name the culprit in one line
    raise CheckpointUnreadable(mngr, step, e) from None
  finally:
    mngr.close()
  nnx.replace_by_pure_dict(abs_state, restored["params"])
  return nnx.merge(graphdef, abs_state)


def restore_items(mngr: ocp.CheckpointManager, step: int, targets: dict[str, Any]) -> dict[str, Any]:
  """Restores the items named by `targets` (item -> abstract tree of ShapeDtypeStructs with shardings). A
  checkpoint written before scanned layers (one subtree per decoder layer under "layers") is read in its own
  layout, each layer onto its slice of the target sharding, then stacked into the targets' layout."""
  groups = layout.groups_of(targets["params"])
  meta = mngr.item_metadata(step)
  legacy = bool(groups) and layout.is_legacy(meta["params"].keys())
  args = {k: layout.unstack(t, groups, _layer_target) if legacy else t for k, t in targets.items()}
  r = mngr.restore(step, args=ocp.args.Composite(**{k: ocp.args.StandardRestore(v) for k, v in args.items()}))
  if not legacy:
    return {k: r[k] for k in targets}
  out = {}
  for k, t in targets.items():  # matched by key path: nnx.State and dict nest differently after a round trip
    got = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(layout.stack(r[k], groups))}
    place = lambda p, a, got=got: jax.device_put(got[jax.tree_util.keystr(p)], a.sharding)
    out[k] = jax.tree_util.tree_map_with_path(place, t)
  return out


def _layer_target(a: jax.ShapeDtypeStruct, j: int) -> jax.ShapeDtypeStruct:
  """The abstract target of one layer's slice of a stacked leaf: the layers axis (never split) dropped."""
  sh = a.sharding
  if isinstance(sh, jax.sharding.NamedSharding):
    sh = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*tuple(sh.spec)[1:]))
  return jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=sh)


class CheckpointUnreadable(ValueError):
  """A step directory Orbax cannot restore (truncated or missing files): one line naming it, orbax's reason
  (without TensorStore's spec dump) and a way out; `path`, `step` and `why` for callers that recover."""

  def __init__(self, mngr: ocp.CheckpointManager, step: int, e: Exception):
    lines = str(e).strip().splitlines()
    self.why = lines[0].split(" See full TensorStore details")[0][:200] if lines else type(e).__name__
    self.step, self.path = int(step), os.path.join(str(mngr.directory), str(step))
    earlier = [s for s in mngr.all_steps() if s < step]
    way_out = f"move it away to use step {max(earlier)}" if earlier else "no earlier checkpoint"
    super().__init__(f"{self.path}: checkpoint is unreadable ({self.why}); {way_out}")


def _quiet_orphaned_reads() -> None:
  """After a failed restore (a corrupt checkpoint), TensorStore reads still in flight finish on their threads and
  call back into orbax's closed event loop, each printing an 'Event loop is closed' traceback (an unraisable
  exception) that buries the one-line error. Drops exactly those; everything else reaches the previous hook."""
  import sys

  previous = sys.unraisablehook
  if getattr(previous, "_rl_jax_quiet", False):
    return

  def hook(u):
    if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
      previous(u)

  hook._rl_jax_quiet = True
  sys.unraisablehook = hook


def read_meta(directory: str, step: int | None = None) -> dict[str, Any]:
  """The `meta` JSON of a checkpoint step (default: the newest): stage, run config, model config."""
  mngr = manager(directory)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise CheckpointNotFound(f"{directory}: no saved step (interrupted before the first save?)")
    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
  except CheckpointNotFound:
    raise
  except Exception as e:  # orbax raises many types; name the culprit in one line
    raise CheckpointUnreadable(mngr, step, e) from None
  finally:
    mngr.close()


def is_checkpoint(directory: str) -> bool:
  """Whether `directory` (local or a URL) holds an rl-jax checkpoint's model_config.json."""
  return (run_path(directory) / "model_config.json").exists()


def tokenizer_dir(directory: str) -> str | None:
  d = os.path.join(directory, "tokenizer")
  return d if (run_path(d) / "tokenizer.json").exists() else None


# --------------------------------------------------------------------------------------- training state
def save_train(
  mngr: ocp.CheckpointManager, step: int, state, *, meta: dict[str, Any], data_state=None, run_dir: str | None = None
) -> None:
  """Saves params (+ router bias) as `params` (what load_model reads), optimizer state and step as `train`,
  configs as `meta`, and this process's data-iterator state as JSON beside the checkpoints."""
  if data_state is not None and run_dir is not None:
    d = run_path(run_dir) / "data_state"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".step_{step}_proc_{jax.process_index()}.json"
    tmp.write_text(json.dumps(data_state))
    tmp.replace(d / f"step_{step}_proc_{jax.process_index()}.json")
  full = nnx.merge_state(state.params, state.bias).to_pure_dict()
  train = {"step": state.step, "opt_state": state.opt_state}
  if getattr(state, "ref", None) is not None:  # a stage's frozen reference model (GRPO)
    train["ref"] = state.ref.to_pure_dict()
  mngr.save(
    step,
    args=ocp.args.Composite(
      params=ocp.args.StandardSave(full),
      train=ocp.args.StandardSave(train),
      meta=ocp.args.JsonSave({"step": int(step), **meta}),
    ),
  )
  if run_dir is not None:  # drop the iterator states of checkpoints orbax has deleted (checkpoint.keep)
    d, suffix = run_path(run_dir) / "data_state", f"_proc_{jax.process_index()}.json"
    kept = set(mngr.all_steps()) | {step}
    for p in d.iterdir() if d.is_dir() else ():
      if p.name.startswith("step_") and p.name.endswith(suffix) and int(p.name[5 : -len(suffix)]) not in kept:
        p.unlink()


def restore_train(mngr: ocp.CheckpointManager, step: int, abstract_state, shardings, run_dir: str | None = None):
  """Restores a TrainState saved by `save_train` onto `shardings` (any mesh); returns (state, data_state)."""

  def target(abs_tree, sh_tree):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_tree, sh_tree)

  full_abs = nnx.merge_state(abstract_state.params, abstract_state.bias)
  full_sh = nnx.merge_state(shardings.params, shardings.bias)
  train_abs = {"step": abstract_state.step, "opt_state": abstract_state.opt_state}
  train_sh = {"step": shardings.step, "opt_state": shardings.opt_state}
  ref_abs = getattr(abstract_state, "ref", None)
  if ref_abs is not None:
    train_abs["ref"], train_sh["ref"] = ref_abs.to_pure_dict(), shardings.ref.to_pure_dict()
  targets = {"params": target(full_abs.to_pure_dict(), full_sh.to_pure_dict()), "train": target(train_abs, train_sh)}
  try:
    r = restore_items(mngr, step, targets)
  except Exception as e:
    raise CheckpointUnreadable(mngr, step, e) from None
  nnx.replace_by_pure_dict(full_abs, r["params"])
  params = nnx.filter_state(full_abs, nnx.Param)
  from rl_jax.models.layers import RouterBias

  bias = nnx.filter_state(full_abs, RouterBias)
  state = type(abstract_state)(step=r["train"]["step"], params=params, bias=bias, opt_state=r["train"]["opt_state"])
  if ref_abs is not None:
    ref = jax.tree.map(lambda x: x, ref_abs)
    nnx.replace_by_pure_dict(ref, r["train"]["ref"])
    state = state._replace(ref=ref)
  data_state = None
  if run_dir is not None:
    p = run_path(run_dir) / "data_state" / f"step_{step}_proc_{jax.process_index()}.json"
    if p.exists():
      data_state = json.loads(p.read_text())
  return state, data_state
