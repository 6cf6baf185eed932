"""The pretraining stage (`rl-jax pretrain`, `rl-jax extend`) on the run skeleton of rl_jax/train/runner.py:
its batches are packed documents from the grain pipeline, its step is next-token + MTP with aux-loss-free
balancing (rl_jax/train/step.py).

Rerunning the same command resumes from the newest checkpoint in <run_dir>/checkpoints (state, router
bias and the data iterator) and continues exactly as if it had never stopped.
"""

from __future__ import annotations

import jax

from rl_jax import checkpoint as ckpt
from rl_jax.config import RunConfig
from rl_jax.data import pipeline
from rl_jax.train import runner
from rl_jax.train import state as S
from rl_jax.train import step as ST
from rl_jax.train.runner import Diverged

__all__ = ["Diverged", "train"]


def train(run: RunConfig, *, stage: str = "pretrain") -> dict:
  """Runs (or resumes) a pretraining stage; returns the last logged metrics."""
  t = run.train
  with runner.setup(run, stage) as ctx:
    tokenizer_dir, data = _data(ctx)
    runner.write_run_files(ctx, tokenizer_dir)
    tx = S.optimizer(run.optimizer, t.steps)
    runner.restore_or_init(ctx, tx, data)
    lr = S.schedule(run.optimizer, t.steps)
    step_fn = ST.build_step(ctx.graphdef, ctx.model_cfg, t, tx, ctx.mesh, ctx.shardings, lr)
    batches = (ST.place_batch(rows, ctx.mesh, t.grad_accum) for rows in data)
    log = runner.MetricsLog(ctx.model_cfg.flops_per_token(t.seq_len, mtp=ST.runs_mtp(ctx.model_cfg, t)))
    runner.run_loop(ctx, step_fn, batches, runner.standard_hooks(ctx, log))
  return log.last


def _data(ctx: runner.Context):
  """(tokenizer dir, this process's checkpointable iterator of [B / processes, T] packed rows)."""
  run, n_proc = ctx.run, jax.process_count()
  tok, tokenizer_dir = pipeline.prepare_tokenizer(
    ctx.run_dir,
    ctx.model_cfg.vocab_size,
    given=run.data.tokenizer or (ckpt.tokenizer_dir(run.init) if run.init else None),
    source=run.data.source,
    seed=run.data.seed,
    text_field=run.data.text_field,
    write=jax.process_index() == 0,
  )
  data = pipeline.make_iterator(
    run.data.source,
    tokenizer=tok,
    seq_len=run.train.seq_len,
    batch_size=run.train.batch_size // n_proc,
    seed=run.data.seed,
    shard_index=jax.process_index(),
    shard_count=n_proc,
    text_field=run.data.text_field,
  )
  return tokenizer_dir, data
