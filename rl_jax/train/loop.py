"""The pretraining loop: mesh, born-sharded state, data, the jitted step, checkpoints, metrics, resume.

Rerunning the same command resumes from the newest checkpoint in <run_dir>/checkpoints (state, RNG,
router bias and the data iterator) and continues exactly as if it had never stopped.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rl_jax import checkpoint as ckpt
from rl_jax import models, report
from rl_jax.bench import train_flops_per_token
from rl_jax.config import RunConfig, model_config, to_dict
from rl_jax.sharding import mesh as smesh
from rl_jax.sharding import rules as srules
from rl_jax.train import state as S
from rl_jax.train import step as ST


class Diverged(FloatingPointError, ValueError):
  """The loss or the parameters went non-finite; a ValueError so the CLI reports it in one line."""


def prepare_tokenizer(run: RunConfig, run_dir: str, vocab_size: int):
  """The run's tokenizer: its saved copy when resuming, a given one, or a byte-level BPE trained now."""
  from rl_jax.data import pipeline
  from rl_jax.data import tokenizer as toks

  saved = os.path.join(run_dir, "tokenizer")
  if os.path.exists(os.path.join(saved, "tokenizer.json")):
    return toks.load(saved), saved
  src = run.data.tokenizer or (ckpt.tokenizer_dir(run.init) if run.init else None)
  if src:
    tok = toks.load(src)
  else:
    docs = pipeline.document_dataset(run.data.source, seed=run.data.seed, text_field=run.data.text_field)
    tok = toks.train_bpe((docs[i] for i in range(min(len(docs), 4000))), vocab_size=vocab_size)
  if jax.process_index() == 0:
    toks.save(tok, saved)
  if tok.get_vocab_size() > vocab_size:
    raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens but model.vocab_size is {vocab_size}")
  return tok, saved


def batch_sharding(mesh, rules):
  spec = srules.logical_to_spec(("batch", None), rules, mesh)
  return NamedSharding(mesh, P(None, *spec))  # [A, B/A, T]: micro-batch axis unsharded


def global_batch(local: dict, sharding, grad_accum: int) -> dict:
  micro = ST.to_micro(local, grad_accum)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v, np.int32)) for k, v in micro.items()}


def train(run: RunConfig, *, stage: str = "pretrain") -> dict:
  """Runs (or resumes) a pretraining stage; returns the last logged metrics."""
  smesh.maybe_initialize_distributed(run.mesh)
  mesh = smesh.mesh_from_config(run.mesh)
  rules = run.mesh.rules
  run_dir = os.path.abspath(run.run_dir or os.path.join("runs", stage))
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  mcfg = S.train_model_config(model_config(run), run.train)
  tcfg = run.train
  n_proc = jax.process_count()
  if tcfg.batch_size % (n_proc * tcfg.grad_accum):
    raise ValueError(
      f"train.batch_size ({tcfg.batch_size}) must divide by processes x grad_accum ({n_proc} x {tcfg.grad_accum})"
    )

  shards = srules.shard_count("batch", rules, mesh)
  micro = tcfg.batch_size // tcfg.grad_accum
  if micro % shards:
    raise ValueError(
      f"train.batch_size / train.grad_accum = {micro} sequences per micro-batch must divide "
      f"by the {shards} batch shards of the mesh (mesh data x fsdp x expert)"
    )

  # TOKENIZER + DATA
  tok, tok_dir = prepare_tokenizer(run, run_dir, mcfg.vocab_size)
  from rl_jax.data import pipeline

  it = pipeline.make_iterator(
    run.data.source,
    tokenizer=tok,
    seq_len=tcfg.seq_len,
    batch_size=tcfg.batch_size // n_proc,
    seed=run.data.seed,
    shard_index=jax.process_index(),
    shard_count=n_proc,
    text_field=run.data.text_field,
  )

  # STATE: resume > --init > random, always born sharded
  mngr = ckpt.manager(
    ckpt_dir,
    keep=run.checkpoint.keep,
    async_save=run.checkpoint.async_save,
    extra_items=[("train", __import__("orbax.checkpoint").checkpoint.StandardCheckpointHandler())],
  )
  start = mngr.latest_step()
  init_params = None
  if start is None and run.init:
    init_params = S.split_model(
      ckpt.load_model(run.init, mesh=mesh, rules=rules, param_dtype=mcfg.param_dtype, dtype=mcfg.dtype)
    )[1:]
    _check_init_shapes(run.init, init_params, mcfg)
  with jax.set_mesh(mesh):
    graphdef, state, shardings, tx = S.init_state(mcfg, run, mesh, rules, init_params)
  if start is not None:
    try:
      state, data_state = ckpt.restore_train(
        mngr, start, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state), shardings, run_dir
      )
      if data_state is None:
        raise ValueError(
          f"{run_dir}: checkpoint step {start} has no data-iterator state for process "
          f"{jax.process_index()}; cannot resume exactly"
        )
    except BaseException:
      mngr.close()
      raise
    it.set_state(data_state)
  start = int(start or 0)

  # STEP: compiled once, explicit shardings, donated state
  bsh = batch_sharding(mesh, rules)
  replicated = NamedSharding(mesh, P())
  step_fn = ST.make_train_step(graphdef, mcfg, tcfg, tx, S.schedule(run.optimizer, tcfg.steps))
  with jax.set_mesh(mesh):
    jstep = jax.jit(
      step_fn,
      in_shardings=(shardings, {k: bsh for k in ST.BATCH_KEYS}),
      out_shardings=(shardings, replicated),
      donate_argnums=0,
    )

  meta = {"stage": stage, "run_config": to_dict(run), "model_config": ckpt.config_to_json(mcfg)}
  if jax.process_index() == 0:
    os.makedirs(ckpt_dir, exist_ok=True)
    with open(os.path.join(ckpt_dir, "model_config.json"), "w") as f:
      json.dump(ckpt.config_to_json(mcfg), f, indent=2)
    ckpt.copy_tokenizer(tok_dir, os.path.join(ckpt_dir, "tokenizer"))
  writer = report.MetricsWriter(
    run_dir, total_steps=tcfg.steps, start_step=start, enabled=jax.process_index() == 0, desc=stage
  )
  fpt = train_flops_per_token(mcfg, tcfg.seq_len)
  every = run.checkpoint.every
  pending, last, logged, saved = None, {}, start, start
  clock = time.perf_counter()
  try:
    for step in range(start, tcfg.steps):
      batch = global_batch(next(it), bsh, tcfg.grad_accum)
      with jax.set_mesh(mesh):
        state, metrics = jstep(state, batch)
      # Read the previous step's metrics now: the host never waits on the step it just launched.
      if pending is not None and _due(pending[0], tcfg):
        last = _log(writer, pending, fpt, clock, pending[0] - logged, saved)
        clock, logged = time.perf_counter(), pending[0]
      pending = (step + 1, metrics)
      writer.advance()
      done = step + 1 == tcfg.steps
      if done or (every and (step + 1) % every == 0):
        _check_finite(step + 1, metrics, saved)  # syncs, but only at saves: never checkpoint a diverged state
        ckpt.save_train(mngr, step + 1, state, meta=meta, data_state=it.get_state(), run_dir=run_dir)
        saved = step + 1
    if pending is not None and pending[0] != logged:
      last = _log(writer, pending, fpt, clock, pending[0] - logged, saved)
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  if jax.process_index() == 0:
    report.plot_metrics(run_dir)
  return last


def _due(step, tcfg):
  return step % tcfg.log_every == 0 or step == 1


def _check_finite(step, metrics, saved):
  m = jax.device_get({k: metrics[k] for k in ("loss", "grad_norm", "param_norm") if k in metrics})
  for k, v in m.items():
    if not np.isfinite(v):
      kept = f"newest checkpoint: step {saved}" if saved else "no checkpoint written"
      raise Diverged(f"{k} is {float(v)} at step {step}; stopped ({kept}; lower optimizer.lr?)")


def _check_init_shapes(path, init_params, mcfg):
  """--init must hold the run's architecture (rope and context length may differ, e.g. `extend`)."""
  want = nnx.eval_shape(lambda: models.Transformer(mcfg, nnx.Rngs(params=0)))
  want = jax.tree.map(lambda x: x.shape, nnx.state(want, nnx.Param).to_pure_dict())
  got = jax.tree.map(lambda x: x.shape, init_params[0].to_pure_dict())
  if want != got:
    raise ValueError(
      f"--init {path}: its parameters do not match the run's model (different architecture; "
      f"only rope / max_position_embeddings / dtypes may differ)"
    )


def _log(writer, pending, fpt, clock, n_steps, saved):
  """Logs one step's metrics; throughput is over the `n_steps` since the previous log."""
  step, metrics = pending
  _check_finite(step, metrics, saved)
  m = {k: float(v) for k, v in jax.device_get(metrics).items()}
  dt = max(time.perf_counter() - clock, 1e-9)
  m["tokens_per_s"] = m["tokens"] * n_steps / dt
  m["model_flops_per_token"] = fpt
  writer.write(step, m)
  return {"step": step, **m}
