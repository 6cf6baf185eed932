"""Child process of tests/test_train.py: runs the training scenarios through the CLI, in one process (one
jax start-up; the persistent jit cache shares the compiled steps), and writes OUT/results.json for the
test to check. Usage: python tests/_train_worker.py OUT
"""

import contextlib
import hashlib
import io
import itertools
import json
import os
import shutil
import sys
import time
import traceback

OUT = sys.argv[1]
PRETRAIN, EXTEND = "configs/pretrain_tiny.yaml", "configs/extend_tiny.yaml"
N, L = 15, 32  # steps per leg; pretraining context (the extension trains and evaluates at 4L)
TINY = ["model.num_hidden_layers=2", "train.batch_size=4", "train.log_every=1"]
PRE = [
  *TINY,
  f"train.seq_len={L}",
  "optimizer.schedule=cosine",
  "optimizer.warmup_steps=3",
  "optimizer.lr=1e-2",
  "checkpoint.every=5",
  f"data.tokenizer={OUT}/tokenizer",
]
results = {}


def cli(*args):
  """`rl-jax ARGS` in this process -> {rc, err, secs}."""
  from rl_jax import cli as rl_cli

  err, t0 = io.StringIO(), time.perf_counter()
  with contextlib.redirect_stderr(err):
    rc = rl_cli.main([str(a) for a in args])
  return {"rc": rc, "err": err.getvalue(), "secs": round(time.perf_counter() - t0, 1)}


def digest(directory):
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(directory)):
    for f in sorted(files):
      p = os.path.join(root, f)
      h.update(os.path.relpath(p, directory).encode())
      with open(p, "rb") as fh:
        h.update(fh.read())
  return h.hexdigest()


def scenario(fn):
  """Runs one scenario now (a decorator, so the scenarios read top to bottom); a failure is recorded (with its traceback) and the next scenario still runs."""
  try:
    results[fn.__name__] = fn()
  except Exception:
    results[fn.__name__] = {"rc": "exception", "err": traceback.format_exc()}


def d(name):
  return os.path.join(OUT, name)


# TOKENIZER: trained once, shared by all runs (each run copies it into its checkpoints)
@scenario
def tokenizer():
  from rl_jax import data

  data.save(data.train_bpe(itertools.islice(data.documents(0), 4000), 512), d("tokenizer"))
  return {"rc": 0}


# STOP AND RESUME: the same 2N-step command (cosine schedule with warmup) dies mid-run and is rerun (resumes);
# and the same command straight through
class Preempted(Exception):
  pass


class _Dying:
  """A data iterator whose process 'dies' when asked for batch `k` (steps 1..k-1 have been dispatched)."""

  def __init__(self, it, k):
    self.it, self.left = it, k - 1

  def __iter__(self):
    return self

  def __next__(self):
    if self.left == 0:
      raise Preempted
    self.left -= 1
    return next(self.it)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


@contextlib.contextmanager
def preempted_at_batch(k):
  from rl_jax.data import pipeline

  make = pipeline.make_iterator
  pipeline.make_iterator = lambda *a, **kw: _Dying(make(*a, **kw), k)
  try:
    yield
  finally:
    pipeline.make_iterator = make


@scenario
def run_a1():
  # Dies asking for batch N+2: checkpoints at 5 .. N are written, steps 1..N logged, step N+1 is lost.
  with preempted_at_batch(N + 2):
    try:
      r = cli("pretrain", "--config", PRETRAIN, "--run-dir", d("A"), *PRE, f"train.steps={2 * N}")
    except Preempted:
      r = {"rc": 0, "preempted": True}
  for copy in ("A_nan", "A_bad"):  # the interrupted run, for the failure scenarios below
    shutil.copytree(d("A"), d(copy))
  return r


@scenario
def run_a2():
  return cli("pretrain", "--config", PRETRAIN, "--run-dir", d("A"), *PRE, f"train.steps={2 * N}")


@scenario
def run_b():
  return cli("pretrain", "--config", PRETRAIN, "--run-dir", d("B"), *PRE, f"train.steps={2 * N}")


@scenario
def more_steps():  # rerunning a finished run with a larger train.steps extends it
  shutil.copytree(d("B"), d("B_more"))
  return cli("pretrain", "--config", PRETRAIN, "--run-dir", d("B_more"), *PRE, f"train.steps={2 * N + 3}")


# BAD INPUT
@scenario
def unknown_key():
  return cli("pretrain", "--config", PRETRAIN, "--run-dir", d("U"), *PRE, "train.stepz=3")


@scenario
def nan_loss():
  before = digest(d("A_nan/checkpoints"))
  # every=1: a save is due after each skipped step, which must not be written
  r = cli(
    "pretrain",
    "--config",
    PRETRAIN,
    "--run-dir",
    d("A_nan"),
    *PRE,
    f"train.steps={2 * N}",
    "optimizer.lr=1e30",
    "checkpoint.every=1",
  )
  return {**r, "intact": digest(d("A_nan/checkpoints")) == before}


@scenario
def corrupt():
  files = [
    os.path.join(root, f)
    for root, _, fs in os.walk(d(f"A_bad/checkpoints/{N}/params"))
    for f in fs
    if os.sep + "d" + os.sep in os.path.join(root, f)
  ]  # ocdbt data files: the arrays
  victim = max(files, key=os.path.getsize)
  os.truncate(victim, os.path.getsize(victim) // 2)
  export = cli("export", "--checkpoint", d("A_bad/checkpoints"), "--hf-out", d("hf_bad"))
  return {
    **cli("pretrain", "--config", PRETRAIN, "--run-dir", d("A_bad"), *PRE, f"train.steps={2 * N}"),
    "victim": victim,
    "export": export,
  }


# YARN: extend run B (trained at L) to 4L, then compare both on held-out 4L rows
@scenario
def extend():
  return cli(
    "extend",
    "--config",
    EXTEND,
    "--run-dir",
    d("E"),
    "--init",
    d("B/checkpoints"),
    *TINY,
    f"model.rope.original_max_position_embeddings={L}",
    f"train.seq_len={4 * L}",
    "train.steps=15",
    "optimizer.lr=3e-3",
    "optimizer.warmup_steps=2",
    "checkpoint.every=0",
  )


@scenario
def init_mismatch():  # --init from a checkpoint of another architecture (3 layers, B has 2)
  return cli(
    "extend",
    "--config",
    EXTEND,
    "--run-dir",
    d("E_bad"),
    "--init",
    d("B/checkpoints"),
    *TINY,
    "model.num_hidden_layers=3",
    f"train.seq_len={4 * L}",
  )


@scenario
def long_context_eval():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from rl_jax import checkpoint, data, losses

  tok = data.load(d("tokenizer"))
  it = data.make_iterator("procedural", tokenizer=tok, seq_len=4 * L, batch_size=16, seed=12345)  # held out
  rows = [next(it) for _ in range(2)]
  batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}

  def ce(model, mask):
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, batch, mask):
      out = nnx.merge(graphdef, state).forward(
        batch["tokens"], positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"]
      )
      return losses.cross_entropy(out.logits_BTV, batch["targets"], mask)

    return float(f(state, {k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(mask)))

  far = batch["loss_mask"] * (batch["positions"] >= L)
  near = batch["loss_mask"] * (batch["positions"] < L)
  original = checkpoint.load_model(d("B/checkpoints"))
  yarn_cfg = checkpoint.read_model_config(d("E/checkpoints")).rope
  zero_shot = checkpoint.load_model(d("B/checkpoints"), rope=yarn_cfg)  # YaRN without training
  extended = checkpoint.load_model(d("E/checkpoints"))
  return {
    "rc": 0,
    "far_tokens": int(far.sum()),
    "extended_rope": checkpoint.config_to_json(extended.cfg)["rope"],
    **{
      f"{name}_{part}": ce(m, mask)
      for name, m in (("original", original), ("zero_shot_yarn", zero_shot), ("extended", extended))
      for part, mask in (("near", near), ("far", far))
    },
  }


with open(os.path.join(OUT, "results.json"), "w") as f:
  json.dump(results, f, indent=1)
print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "err"} for k, v in results.items()}, indent=1))
