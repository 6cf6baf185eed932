"""The SFT stage (`rl-jax sft`) on the run skeleton of rl_jax/train/runner.py: the pretraining step
(rl_jax/train/step.py, next-token + MTP) on rows from rl_jax/data/sft.py, whose loss mask covers the response
tokens only. --init is an rl-jax checkpoint or a Hugging Face directory (converted once into
<run_dir>/init_hf); the model section and the tokenizer are the checkpoint's. The MoE routes dropless (as in
GRPO), so packing examples together changes no example's loss. Rerunning resumes exactly like pretraining.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from rl_jax import checkpoint as ckpt
from rl_jax.config import RunConfig
from rl_jax.data import pipeline
from rl_jax.data import sft as sft_data
from rl_jax.train import runner
from rl_jax.train import state as S
from rl_jax.train import step as ST


def train(run: RunConfig, *, stage: str = "sft") -> dict:
  """Runs (or resumes) an SFT stage; returns the last logged metrics ({} when already finished)."""
  run, tok_dir = _checkpoint_model(run, stage)
  t = run.train
  with runner.setup(run, stage) as ctx:
    ctx.model_cfg = ctx.model_cfg.replace(moe_capacity_factor=None)
    tokenizer_dir, data = _data(ctx, tok_dir)
    runner.write_run_files(ctx, tokenizer_dir)
    tx = S.optimizer(run.optimizer, t.steps)
    runner.restore_or_init(ctx, tx, data)
    lr = S.schedule(run.optimizer, t.steps)
    step_fn = ST.build_step(ctx.graphdef, ctx.model_cfg, t, tx, ctx.mesh, ctx.shardings, lr)
    batches = (ST.place_batch(rows, ctx.mesh, t.grad_accum) for rows in data)
    log = runner.MetricsLog(ctx.model_cfg.flops_per_token(t.seq_len, mtp=ST.runs_mtp(ctx.model_cfg, t)))
    runner.run_loop(ctx, step_fn, batches, runner.standard_hooks(ctx, log))
  return log.last


def _checkpoint_model(run: RunConfig, stage: str) -> tuple[RunConfig, str | None]:
  """The run with the model section of the checkpoint it trains (its own when resuming, else --init, a HF
  directory converted first) and that checkpoint's tokenizer directory; without either, the run's model
  from scratch with data.tokenizer."""
  own = os.path.join(runner.run_dir_of(run, stage), "checkpoints")
  if run.init:
    run = dataclasses.replace(run, init=_as_checkpoint(run.init, run, stage))
  src = own if ckpt.is_checkpoint(own) else run.init
  if not src:
    if not run.data.tokenizer:
      raise ValueError("rl-jax sft fine-tunes a model: pass --init CHECKPOINT_OR_HF_DIR (or data.tokenizer)")
    return run, run.data.tokenizer
  model = ckpt.config_to_json(ckpt.read_model_config(src))
  return dataclasses.replace(run, model=model), run.data.tokenizer or ckpt.tokenizer_dir(src)


def _as_checkpoint(path: str, run: RunConfig, stage: str) -> str:
  """`path` if it is an rl-jax checkpoint; a HF directory (config.json + safetensors) is converted once to
  <run_dir>/init_hf (with its tokenizer) and that returned."""
  if os.path.exists(os.path.join(path, "model_config.json")) or not os.path.exists(os.path.join(path, "config.json")):
    return path  # not HF: load_model names what is missing
  from rl_jax import models

  dst = os.path.join(runner.run_dir_of(run, stage), "init_hf")
  if not ckpt.is_checkpoint(dst):
    model = models.load_hf(path, dtype=jnp.dtype(run.train.param_dtype))
    tok = path if os.path.exists(os.path.join(path, "tokenizer.json")) else None
    ckpt.save_model(dst, model, tokenizer_dir=tok, meta={"source": os.path.abspath(path)})
  return dst


def _data(ctx: runner.Context, tok_dir: str | None):
  """(tokenizer dir, this process's checkpointable iterator of [B / processes, T] SFT rows)."""
  run, n_proc = ctx.run, jax.process_count()
  if tok_dir is None and ckpt.tokenizer_dir(ctx.run_dir) is None:
    raise ValueError(f"{run.init}: no tokenizer/ to encode the SFT data with (set data.tokenizer)")
  tok, tokenizer_dir = pipeline.prepare_tokenizer(
    ctx.run_dir, ctx.model_cfg.vocab_size, given=tok_dir, write=jax.process_index() == 0
  )
  data = sft_data.make_iterator(
    run.data.source,
    tokenizer=tok,
    sft_cfg=run.sft,
    seq_len=run.train.seq_len,
    batch_size=run.train.batch_size // n_proc,
    seed=run.data.seed,
    shard_index=jax.process_index(),
    shard_count=n_proc,
  )
  return tokenizer_dir, data
