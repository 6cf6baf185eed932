"""The run skeleton every training stage reuses:

    with setup(run, stage) as ctx:              # mesh + the run's sharding rules, run dir, checkpoints
      restore_or_init(ctx, tx, data)            # newest checkpoint (+ data position) > --init > random
      run_loop(ctx, step_fn, batches, hooks)    # the steps; hooks every N steps: log, checkpoint, plots

A stage brings its own step function, batch source and metrics (rl_jax/train/loop.py: pretrain, extend).
The loop reads a step's metrics only after dispatching the next step, so the host never idles the device;
rerunning the same command resumes from the newest checkpoint as if the run had never stopped (an
unreadable newest checkpoint is moved aside and the previous one used), and with a larger train.steps
extends a finished run. SIGTERM (preemption) lets the step in flight finish, checkpoints it and exits
with status 143 (Preempted). A step whose loss, gradients or update are not finite is skipped inside the jitted
step (its `skipped` metric); the host counts them every step and stops after train.max_bad_steps in a row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from rl_jax import checkpoint as ckpt
from rl_jax import models, report
from rl_jax.config import RunConfig, model_config, to_dict
from rl_jax.models.config import ModelConfig
from rl_jax.sharding import mesh as smesh
from rl_jax.sharding import rules as srules
from rl_jax.train import state as S
from rl_jax.train import step as ST


class Diverged(FloatingPointError, ValueError):
  """The loss or the parameters went non-finite; a ValueError so the CLI reports it in one line."""


class TooManyBadSteps(Diverged):
  """train.max_bad_steps consecutive steps were skipped as non-finite (their state was never applied)."""


class Preempted(SystemExit):
  """SIGTERM (a preemptible VM going away): the step in flight finished and was checkpointed; the process
  exits with status 128 + SIGTERM = 143, as if killed by it, and rerunning the same command resumes."""

  def __init__(self):
    super().__init__(128 + signal.SIGTERM)


@dataclasses.dataclass
class Context:
  """A running stage: `setup` fills the run, `restore_or_init` the state, `run_loop` advances it."""

  run: RunConfig
  stage: str
  mesh: jax.sharding.Mesh
  run_dir: str
  mngr: Any  # orbax CheckpointManager over <run_dir>/checkpoints
  model_cfg: ModelConfig
  graphdef: Any = None
  state: S.TrainState | None = None
  shardings: S.TrainState | None = None
  data: Any = None  # the batch source's iterator (get_state / set_state): its position is checkpointed
  start: int = 0  # the step the state holds when the loop starts (the restored one on resume)
  saved: int = 0  # the newest checkpoint's step; 0: none yet
  skipped: int = 0  # steps skipped as non-finite since this process started the loop
  bad_streak: int = 0  # ... of them in a row, up to the newest step read
  writer: report.MetricsWriter | None = None

  @property
  def ckpt_dir(self) -> str:
    return os.path.join(self.run_dir, "checkpoints")


class Hook(NamedTuple):
  """`fn(ctx, step, metrics)` after every `every`-th step (0: none but the last), after the run's last step,
  and with `first` after step 1. A `state` hook runs as soon as its step is dispatched, with `ctx.state` at
  that step (checkpoints, evals: they may wait for the device); the others run once the next step is
  dispatched, so reading the metrics never leaves the device idle (at a step where a `state` hook is due, the
  step's own row is written first: a checkpoint never gets ahead of its metrics)."""

  fn: Callable[[Context, int, dict], None]
  every: int
  state: bool = False
  first: bool = False

  def due(self, step: int, last: int) -> bool:
    return step == last or (self.every > 0 and step % self.every == 0) or (self.first and step == 1)


# ------------------------------------------------------------------------------------------ skeleton
@contextlib.contextmanager
def setup(run: RunConfig, stage: str) -> Iterator[Context]:
  """The stage's context, inside the run's mesh and sharding rules; at exit checkpoints finish and close."""
  smesh.maybe_initialize_distributed(run.mesh)
  mesh = smesh.mesh_from_config(run.mesh)
  run_dir = run_dir_of(run, stage)
  mcfg = S.train_model_config(model_config(run), run.train)
  with jax.set_mesh(mesh), srules.use_rules(run.mesh.rules):
    ST.check_batch(run.train, mesh)  # before anything is written or trained
    c = run.checkpoint
    mngr = ckpt.manager(os.path.join(run_dir, "checkpoints"), keep=c.keep, async_save=c.async_save, train=True)
    ctx = Context(run, stage, mesh, run_dir, mngr, mcfg)
    try:
      yield ctx
    finally:  # ctx.mngr: restore_or_init may have re-opened it
      ctx.mngr.wait_until_finished()
      ctx.mngr.close()


def run_dir_of(run: RunConfig, stage: str) -> str:
  """run.run_dir (a local path, made absolute, or a URL: gs://bucket/run) or runs/<stage>."""
  return os.fspath(report.run_path(run.run_dir or os.path.join("runs", stage)))


def trained_checkpoint(run: RunConfig, stage: str, what: str) -> tuple[str, str]:
  """(checkpoint, its tokenizer dir) a post-training stage trains: its own when resuming, else --init; `what`
  the stage encodes with the tokenizer (for the error)."""
  own = os.path.join(run_dir_of(run, stage), "checkpoints")
  src = own if ckpt.is_checkpoint(own) else run.init
  if not src:
    raise ValueError(f"rl-jax {stage} trains a checkpoint: pass --init CHECKPOINT")
  tok_dir = ckpt.tokenizer_dir(src)
  if tok_dir is None:
    raise ValueError(f"{src} has no tokenizer/ to encode {what} with")
  return src, tok_dir


def write_run_files(ctx: Context, tokenizer_dir: str | None = None) -> None:
  """The checkpoint directory describes itself: model_config.json and the tokenizer (process 0 writes)."""
  if jax.process_index() != 0:
    return
  ckpt.write_model_config(ctx.ckpt_dir, ctx.model_cfg)
  if tokenizer_dir:
    ckpt.copy_tokenizer(tokenizer_dir, os.path.join(ctx.ckpt_dir, "tokenizer"))


def restore_or_init(ctx: Context, tx, data=None, *, ref: bool = False) -> None:
  """ctx.state, born sharded: the newest checkpoint's (and `data`'s position) > --init's weights > random.
  `ref`: the state carries a reference model, initialised as a copy of the starting weights."""
  ctx.data = data
  latest = ctx.mngr.latest_step()
  seed = ctx.run.train.seed
  if latest is None:
    init = _init_weights(ctx.run.init, ctx.model_cfg) if ctx.run.init else None
    ctx.graphdef, ctx.state, ctx.shardings = S.init_state(
      ctx.model_cfg, tx, ctx.mesh, seed=seed, init_params=init, ref=ref
    )
    return
  ctx.graphdef, abstract, ctx.shardings = S.state_spec(ctx.model_cfg, tx, ctx.mesh, seed, ref=ref)
  latest, ctx.state, data_state = _restore_newest_readable(ctx, abstract)
  if data is not None:
    if data_state is None:
      raise ValueError(
        f"{ctx.run_dir}: checkpoint step {latest} has no data-iterator state for process "
        f"{jax.process_index()}; cannot resume exactly"
      )
    data.set_state(data_state)
  ctx.start = ctx.saved = int(latest)


def _restore_newest_readable(ctx: Context, abstract) -> tuple[int, S.TrainState, Any]:
  """(step, state, data state) of the newest checkpoint that restores. Newer ones that do not (truncated or
  missing files) are reported in one line each and moved aside to <ckpt_dir>/corrupt-<step>-<time>: kept
  for inspection, and out of the way so that their steps can be saved again. If none restores, nothing is
  moved and the newest one's error is raised (one line)."""
  bad = []
  for step in sorted(ctx.mngr.all_steps(), reverse=True):
    try:
      state, data_state = ckpt.restore_train(ctx.mngr, step, abstract, ctx.shardings, ctx.run_dir)
    except ckpt.CheckpointUnreadable as e:
      bad.append(e)
      _drop_failed_reads()
      continue
    if bad:
      _move_aside(ctx, bad, step)
    return step, state, data_state
  if len(bad) > 1:
    raise ValueError(f"{bad[0].path}: checkpoint is unreadable ({bad[0].why}); no earlier checkpoint restores either")
  raise bad[0]


def _drop_failed_reads() -> None:
  """Orbax leaves a failed restore's other reads behind as coroutines that raise when they are collected,
  later in the run ("Exception ignored in ..." with TensorStore's spec dump, after our one line): from now
  on such unraisable read errors, and only those, are dropped."""
  if getattr(sys.unraisablehook, "_rl_jax_drops_failed_reads", False):
    return
  hook = sys.unraisablehook

  def quiet(u):
    if not str(u.exc_value).startswith("Encountered error while reading array index"):
      hook(u)

  quiet._rl_jax_drops_failed_reads = True
  sys.unraisablehook = quiet


def _move_aside(ctx: Context, bad: list[ckpt.CheckpointUnreadable], good: int) -> None:
  stamp = time.strftime("%Y%m%dT%H%M%S")
  lead = jax.process_index() == 0
  for e in bad:
    dst = os.path.join(ctx.ckpt_dir, f"corrupt-{e.step}-{stamp}")
    if lead:
      report.run_path(e.path).rename(dst)
      print(f"warning: {e.path}: checkpoint is unreadable ({e.why}); moved to {dst}; resuming from step {good}",
            file=sys.stderr)  # fmt: skip
  if jax.process_count() > 1:  # every process sees the step gone before any saves it again
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("rl_jax: unreadable checkpoints moved aside")
  ctx.mngr.reload()  # orbax caches the step list


def run_loop(ctx: Context, step_fn: Callable, batches: Iterator, hooks: list[Hook]) -> None:
  """Steps ctx.state from ctx.start to train.steps, calling each hook when it is due (see Hook)."""
  last = ctx.run.train.steps
  on_state = [h for h in hooks if h.state]
  on_metrics = [h for h in hooks if not h.state]
  lead = jax.process_index() == 0
  ctx.writer = report.MetricsWriter(ctx.run_dir, total_steps=last, start_step=ctx.start, enabled=lead, desc=ctx.stage)
  pending = None

  def flush():  # the metrics hooks of the step waiting for them, if one is
    nonlocal pending
    if pending is not None:
      done, pending = pending, None
      _call(on_metrics, ctx, *done, last)

  try:
    with _sigterm_flag() as sigterm:
      for step in range(ctx.start + 1, last + 1):
        ctx.state, metrics = step_fn(ctx.state, next(batches))
        flush()  # the previous step's metrics: the device already has this step to run
        pending = (step, metrics)
        if any(h.due(step, last) for h in on_state):
          flush()  # a checkpoint's row goes first: a kill between the two would resume past a row never written
        _call(on_state, ctx, step, metrics, last)
        if sigterm.count:
          flush()  # its row and progress, before the checkpoint they belong to
          _save_and_exit(ctx, step, metrics)
    flush()
  except BaseException:
    with contextlib.suppress(Exception):  # a crash in the next step: the finished step's row is not lost
      flush()
    raise
  finally:
    ctx.writer.close()


class _Signals:
  count = 0  # SIGTERMs received; the handler only counts, so a second one while saving changes nothing


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[_Signals]:
  """Counts SIGTERMs instead of dying while the loop runs; the previous handler is back afterwards. Only in
  the main thread (where Python delivers signals) of a single-process run: on several hosts every process
  would have to stop at the same step, or the collective save hangs, so there SIGTERM still kills and the
  newest periodic checkpoint is where the rerun resumes."""
  got = _Signals()
  if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
    yield got
    return
  prev = signal.signal(signal.SIGTERM, lambda signum, frame: setattr(got, "count", got.count + 1))
  try:
    yield got
  finally:
    signal.signal(signal.SIGTERM, prev if prev is not None else signal.SIG_DFL)


def _save_and_exit(ctx: Context, step: int, metrics: dict) -> None:
  """After SIGTERM: checkpoints `step` exactly like a periodic save (state + data position), waits until it
  is on disk, says so in one line and exits with status 143."""
  if ctx.saved != step:
    save_checkpoint(ctx, step, metrics)
  ctx.mngr.wait_until_finished()
  if ctx.saved == step:
    where = f"saved step {step} to {ctx.ckpt_dir}"
  else:  # save_checkpoint does not save a non-finite (skipped) step
    where = f"step {step} was skipped as non-finite and not saved ({_kept(ctx)} in {ctx.ckpt_dir})"
  ctx.writer.bar.write(f"SIGTERM: {where}; rerun the same command to resume", file=sys.stderr)  # below the bar
  raise Preempted()


def _call(hooks: list[Hook], ctx: Context, step: int, metrics: dict, last: int) -> None:
  for h in hooks:
    if h.due(step, last):
      h.fn(ctx, step, metrics)


# ------------------------------------------------------------------------------------------ hooks
def standard_hooks(ctx: Context, log: MetricsLog, plot_keys: tuple[str, ...] | None = None) -> list[Hook]:
  """Log every train.log_every steps (and step 1), the progress bar every step, a checkpoint every
  checkpoint.every steps and at the end, plots of `plot_keys` (default: pretraining's) at the end."""
  plot = lambda ctx, step, metrics: plot_metrics(ctx, step, metrics, plot_keys)
  return [
    Hook(count_skipped, 1),
    Hook(log, ctx.run.train.log_every, first=True),
    Hook(stop_after_bad_steps, 1),
    Hook(lambda ctx, step, metrics: ctx.writer.advance(), 1),
    Hook(save_checkpoint, ctx.run.checkpoint.every, state=True),
    Hook(plot, 0),
  ]


class MetricsLog:
  """Log hook: a step's metrics (a skipped step's loss may be NaN; the parameters are finite, or the run
  stops) plus skipped_total, tokens/s since the previous log and the model FLOPs per token, to metrics.jsonl
  and TensorBoard; `last` holds the newest row."""

  def __init__(self, flops_per_token: float | None = None):
    self.flops_per_token, self.last = flops_per_token, {}
    self.clock, self.logged = time.perf_counter(), None

  def __call__(self, ctx: Context, step: int, metrics: dict) -> None:
    check_finite(ctx, step, metrics)
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    if "tokens" in m:
      steps = step - (ctx.start if self.logged is None else self.logged)
      m["tokens_per_s"] = m["tokens"] * steps / max(now - self.clock, 1e-9)
    if self.flops_per_token is not None:
      m["model_flops_per_token"] = self.flops_per_token
    if "skipped" in m:
      m["skipped_total"] = ctx.skipped
    ctx.writer.write(step, m)
    self.clock, self.logged, self.last = now, step, {"step": step, **m}


def save_checkpoint(ctx: Context, step: int, metrics: dict) -> None:
  """Checkpoint hook: the state, the data position and the configs at `step`; never a diverged state."""
  check_finite(ctx, step, metrics)  # waits for the step, but only at saves
  if step != ctx.run.train.steps and float(metrics.get("skipped", 0)) > 0:
    return  # the run may be going bad: copies of the last good state must not rotate good checkpoints out
  meta = {"stage": ctx.stage, "run_config": to_dict(ctx.run), "model_config": ckpt.config_to_json(ctx.model_cfg)}
  data_state = None if ctx.data is None else ctx.data.get_state()
  ckpt.save_train(ctx.mngr, step, ctx.state, meta=meta, data_state=data_state, run_dir=ctx.run_dir)
  ctx.saved = step


def plot_metrics(ctx: Context, step: int, metrics: dict, keys: tuple[str, ...] | None = None) -> None:
  if jax.process_index() == 0:
    report.plot_metrics(ctx.run_dir, **({} if keys is None else {"keys": keys}))


def count_skipped(ctx: Context, step: int, metrics: dict) -> None:
  """Every step: counts the steps skipped as non-finite (the `skipped` metric). Reading it every step is
  cheap: this hook runs once the next step is dispatched (see Hook), so the device never idles for it."""
  if float(metrics.get("skipped", 0)) > 0:
    ctx.skipped, ctx.bad_streak = ctx.skipped + 1, ctx.bad_streak + 1
  else:
    ctx.bad_streak = 0


def stop_after_bad_steps(ctx: Context, step: int, metrics: dict) -> None:
  """After count_skipped and the step's log row: stops at train.max_bad_steps skipped steps in a row."""
  if ctx.bad_streak >= ctx.run.train.max_bad_steps:
    raise TooManyBadSteps(
      f"{ctx.bad_streak} consecutive non-finite steps (loss/grad) up to step {step}; stopped ({_kept(ctx)}; "
      "lower optimizer.lr?)"
    )


def check_finite(ctx: Context, step: int, metrics: dict) -> None:
  """A last guard: steps that skip non-finite updates (`skipped` metric) keep the parameters finite, so
  only their norm is checked there; for other steps the loss and gradient norm too."""
  keys = ("param_norm",) if "skipped" in metrics else ("loss", "grad_norm", "param_norm")
  m = jax.device_get({k: metrics[k] for k in keys if k in metrics})
  for k, v in m.items():
    if not np.isfinite(v):
      raise Diverged(f"{k} is {float(v)} at step {step}; stopped ({_kept(ctx)}; lower optimizer.lr?)")


def _kept(ctx: Context) -> str:
  return f"newest checkpoint: step {ctx.saved}" if ctx.saved else "no checkpoint written"


def _init_weights(path: str, mcfg: ModelConfig):
  """--init's (params, bias) on the ambient mesh; only rope, context length and dtypes may differ from
  the run's model (e.g. `extend`)."""
  _, params, bias = S.split_model(ckpt.load_model(path, param_dtype=mcfg.param_dtype, dtype=mcfg.dtype))
  want = nnx.eval_shape(lambda: models.Transformer(mcfg, nnx.Rngs(params=0)))
  want = jax.tree.map(lambda x: x.shape, nnx.state(want, nnx.Param).to_pure_dict())
  if want != jax.tree.map(lambda x: x.shape, params.to_pure_dict()):
    raise ValueError(
      f"--init {path}: its parameters do not match the run's model (different architecture; "
      f"only rope / max_position_embeddings / dtypes may differ)"
    )
  return params, bias
