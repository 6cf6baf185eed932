"""The reward-model stage (`rl-jax train-rm`) on the run skeleton of rl_jax/train/runner.py.

A checkpoint (--init) gains a scalar `score` head (zero-initialised) and is trained on preference pairs, JSONL
rows {"prompt", "chosen", "rejected"} from data.source, with the Bradley-Terry loss -log sigmoid(r_chosen -
r_rejected) averaged over pairs; r is the head's score at a sequence's last real token (rl_jax/reward_model.py).
A sequence is [bos] + encode(render(prompt, sft.template)) + encode(response) + [eos], as GRPO encodes prompts.
The model is routed dropless (rows never compete for expert capacity, so padding never changes a score); the
router biases are not moved. Rerunning resumes like every stage (state, data position).
"""

from __future__ import annotations

import dataclasses
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rl_jax import checkpoint as ckpt
from rl_jax import models
from rl_jax.config import RunConfig
from rl_jax.data import tokenizer as toks
from rl_jax.reward_model import encode_pair_text, pad_rows, sequence_scores
from rl_jax.train import runner
from rl_jax.train import state as S
from rl_jax.train import step as ST

PLOT_KEYS = ("loss", "accuracy", "margin", "grad_norm")
PAIR_KEYS = ("chosen", "rejected", "chosen_len", "rejected_len")


def train(run: RunConfig, *, stage: str = "train-rm") -> dict:
  """Runs (or resumes) a reward-model stage; returns the last logged metrics."""
  run, tok_dir = _reward_model_config(run, stage)
  t = run.train
  with runner.setup(run, stage) as ctx:
    ctx.model_cfg = ctx.model_cfg.replace(moe_capacity_factor=None)
    runner.write_run_files(ctx, tok_dir)
    pairs = PairSource(
      encode_pairs(run.data.source, toks.load(tok_dir), run.sft.template, t.seq_len, run.sft.too_long),
      t.batch_size // jax.process_count(), t.seq_len, seed=run.data.seed,
    )  # fmt: skip
    tx = S.optimizer(run.optimizer, t.steps)
    _restore_or_init(ctx, tx, pairs)
    step_fn = build_rm_step(ctx.graphdef, t, tx, ctx.mesh, ctx.shardings, S.schedule(run.optimizer, t.steps))
    batches = (place_pairs(b, ctx.mesh, t.grad_accum) for b in pairs)
    log = runner.MetricsLog()
    runner.run_loop(ctx, step_fn, batches, runner.standard_hooks(ctx, log, PLOT_KEYS))
  return log.last


def _reward_model_config(run: RunConfig, stage: str) -> tuple[RunConfig, str]:
  """The run with the model section of --init (or of its own checkpoints when resuming) plus a score head,
  and that checkpoint's tokenizer directory."""
  src, tok_dir = runner.trained_checkpoint(run, stage, "pairs")
  model = {**ckpt.config_to_json(ckpt.read_model_config(src)), "score_head": True}
  return dataclasses.replace(run, model=model), tok_dir


def _restore_or_init(ctx: runner.Context, tx, data) -> None:
  """The newest own checkpoint (runner.restore_or_init) or --init's weights with a zero score head."""
  if ctx.mngr.latest_step() is not None:
    runner.restore_or_init(ctx, tx, data)
    return
  ctx.data = data
  init = init_weights(ctx.run.init, ctx.model_cfg)
  ctx.graphdef, ctx.state, ctx.shardings = S.init_state(
    ctx.model_cfg, tx, ctx.mesh, seed=ctx.run.train.seed, init_params=init
  )


def init_weights(path: str, mcfg):
  """(params, bias) of checkpoint `path` on the run's model `mcfg` (which has a score head): a checkpoint
  without one gets a zero head; any other difference is a one-line error."""
  src = ckpt.load_model(path, param_dtype=mcfg.param_dtype, dtype=mcfg.dtype)
  _, params, bias = S.split_model(src)
  pure = params.to_pure_dict()
  pure.setdefault("score", jnp.zeros((mcfg.hidden_size, 1), jnp.dtype(mcfg.param_dtype)))
  _, want, _ = S.split_model(nnx.eval_shape(lambda: models.Transformer(mcfg, nnx.Rngs(params=0))))
  if jax.tree.map(lambda x: x.shape, want.to_pure_dict()) != jax.tree.map(lambda x: x.shape, pure):
    raise ValueError(f"--init {path}: its parameters do not match the reward model's (different architecture)")
  nnx.replace_by_pure_dict(want, pure)
  return want, bias


# ------------------------------------------------------------------------------------------ data
def encode_pairs(path: str, tok, template: str, seq_len: int, too_long: str = "drop") -> list[tuple]:
  """(chosen ids, rejected ids) of every JSONL row of `path`; a malformed row is a one-line error naming
  file:line; a pair longer than seq_len is dropped (too_long=drop, counted on stderr) or an error."""
  out, dropped = [], 0
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      row = _pair_row(path, n, line)
      c, r = (encode_pair_text(tok, row["prompt"], row[k], template) for k in ("chosen", "rejected"))
      if max(len(c), len(r)) > seq_len:
        if too_long == "error":
          raise ValueError(f"{path}:{n}: pair has {max(len(c), len(r))} tokens > train.seq_len={seq_len}")
        dropped += 1
        continue
      out.append((c, r))
  if dropped:
    print(f"train-rm: dropped {dropped} pairs longer than train.seq_len={seq_len}", flush=True)
  if not out:
    raise ValueError(f"{path}: no preference pairs (JSONL rows {{prompt, chosen, rejected}}) within train.seq_len")
  return out


def _pair_row(path: str, n: int, line: str) -> dict:
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
  if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")):
    raise ValueError(f"{path}:{n}: expected an object with string fields prompt, chosen, rejected")
  return row


class PairSource:
  """Endless batches of this process's pairs in a reshuffled order each epoch; checkpointable (get_state /
  set_state): the position is the number of pairs taken, the order a function of (seed, epoch)."""

  def __init__(self, pairs: list[tuple], batch_size: int, seq_len: int, *, seed: int = 0):
    self.pairs, self.batch_size, self.seq_len, self.seed = pairs, batch_size, seq_len, seed
    self.index, self._order = 0, {}
    self.proc, self.n_proc = jax.process_index(), jax.process_count()

  def _at(self, i: int) -> tuple:
    epoch, k = divmod(i * self.n_proc + self.proc, len(self.pairs))
    if epoch not in self._order:
      self._order = {epoch: random.Random(f"{self.seed}/{epoch}").sample(range(len(self.pairs)), len(self.pairs))}
    return self.pairs[self._order[epoch][k]]

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rows = [self._at(self.index + i) for i in range(self.batch_size)]
    self.index += self.batch_size
    chosen, c_len = pad_rows([c for c, _ in rows], self.seq_len)
    rejected, r_len = pad_rows([r for _, r in rows], self.seq_len)
    return {"chosen": chosen, "rejected": rejected, "chosen_len": c_len, "rejected_len": r_len}

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])


def pair_shardings(mesh) -> dict:
  """Tokens [A, B/A, T] like the pretraining batch; lengths [A, B/A] split the same way."""
  rows = ST.batch_sharding(mesh)
  lengths = NamedSharding(mesh, P(*rows.spec[:2]))
  return {k: lengths if k.endswith("_len") else rows for k in PAIR_KEYS}


def place_pairs(batch: dict, mesh, grad_accum: int) -> dict:
  """This process's pair rows -> global [A, B/A, ...] int32 arrays split over the batch shards."""
  sh = pair_shardings(mesh)
  micro = {k: np.asarray(batch[k], np.int32).reshape(grad_accum, -1, *batch[k].shape[1:]) for k in PAIR_KEYS}
  return {k: jax.make_array_from_process_local_data(sh[k], v) for k, v in micro.items()}


# ------------------------------------------------------------------------------------------ step
def bt_loss(r_chosen, r_rejected):
  """Bradley-Terry: mean over pairs of -log sigmoid(r_chosen - r_rejected) (softplus form: stable)."""
  return jnp.mean(jax.nn.softplus(-(r_chosen - r_rejected)))


def make_loss_fn(graphdef, remat: bool = False):
  def loss_fn(params, bias, batch):
    model = nnx.merge(graphdef, params, bias)
    tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])  # one forward for both sides
    lengths = jnp.concatenate([batch["chosen_len"], batch["rejected_len"]])
    r_c, r_r = jnp.split(sequence_scores(model, tokens, lengths, remat=remat), 2)
    loss = bt_loss(r_c, r_r)
    metrics = {"loss": loss, "accuracy": jnp.mean(r_c > r_r), "margin": jnp.mean(r_c - r_r)}
    return loss, metrics

  return loss_fn


def make_rm_step(graphdef, train, tx: optax.GradientTransformation, lr_schedule=None):
  grad_fn = jax.value_and_grad(make_loss_fn(graphdef, train.remat), has_aux=True)

  def step(state: S.TrainState, batch) -> tuple[S.TrainState, dict]:
    # MICRO-BATCHES: batch leaves are [A, B/A, ...]; sum gradients and metrics, average at the end.
    def micro(carry, mb):
      (_, metrics), grads = grad_fn(state.params, state.bias, mb)
      return jax.tree.map(jnp.add, carry, (grads, metrics)), None

    A = batch["chosen"].shape[0]
    zeros_m = {k: jnp.zeros((), jnp.float32) for k in ("loss", "accuracy", "margin")}
    zero = (jax.tree.map(jnp.zeros_like, state.params), zeros_m)
    (grads, metrics), _ = jax.lax.scan(micro, zero, batch)
    grads, metrics = jax.tree.map(lambda x: x / A, (grads, metrics))

    # UPDATE; a non-finite step is skipped (the host stops after train.max_bad_steps in a row)
    return ST.apply_update(state, grads, metrics, tx, lr_schedule)

  return step


def build_rm_step(graphdef, train, tx, mesh, shardings, lr_schedule=None):
  """The step jitted once: explicit in/out shardings, the state donated."""
  return jax.jit(
    make_rm_step(graphdef, train, tx, lr_schedule),
    in_shardings=(shardings, pair_shardings(mesh)),
    out_shardings=(shardings, NamedSharding(mesh, P())),
    donate_argnums=0,
  )
