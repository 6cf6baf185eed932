"""The logit-distillation stage (`rl-jax distill` with a teacher) on the run skeleton of rl_jax/train/runner.py.

The student is the run's model (random, or --init's weights) and the only thing trained and checkpointed; the
teacher (distill.teacher, a checkpoint sharing the student's tokenizer) is loaded onto the same mesh with its
parameters sharded by the same rules, frozen: it is not in the TrainState nor the optimizer, and a resumed run
loads it again. Per step: loss = kd_weight * KD + ce_weight * CE over the batch's loss_mask tokens, KD being
losses.chunked_distill_loss (never the whole [B, T, V] student logits) against the teacher's logits, or their
top distill.top_k taken inside the jitted step. Router biases stay frozen.

With distill.cache a first pass writes the teacher's top-k values and indices for every step's batch to
<run_dir>/teacher_cache/step_NNNNNN.npz (the data iterator replayed from its start, so step n's file holds
the batch the training pass sees at step n, resumed or not); the teacher is then freed and the training
pass reads step n's file at step n (its tokens are checked against the batch's).

Batches: rl_jax.data.sft rows (loss on response tokens) when data.source holds SFT examples ({prompt,
response} or {messages}), else packed pretraining documents (every real token).
"""

from __future__ import annotations

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rl_jax import checkpoint as ckpt
from rl_jax import losses
from rl_jax.config import DistillConfig, RunConfig, TrainConfig
from rl_jax.data import pipeline
from rl_jax.sharding import rules as srules
from rl_jax.train import runner
from rl_jax.train import state as S
from rl_jax.train import step as ST
from rl_jax.train.state import TrainState

PLOT_KEYS = ("loss", "kd", "ce", "agreement", "teacher_entropy", "grad_norm")
CACHE_DIR = "teacher_cache"
TEACHER_KEYS = ("teacher_values", "teacher_indices")


def train(run: RunConfig, *, stage: str = "distill") -> dict:
  """Runs (or resumes) a distillation stage; returns the last logged metrics. Without a teacher it is R1's
  distillation: SFT of the student on the teacher's traces (data.source, e.g. rejection-sampled kept.jsonl)."""
  d, t = run.distill, run.train
  if not d.teacher:
    from rl_jax.train import sft

    return sft.train(run, stage=stage)
  with runner.setup(run, stage) as ctx:
    tok_dir, make_data = _data(ctx)
    check_shared_tokenizer(d.teacher, ckpt.read_model_config(d.teacher).vocab_size, tok_dir, ctx.model_cfg.vocab_size)
    runner.write_run_files(ctx, tok_dir)
    cache_dir = os.path.join(ctx.run_dir, CACHE_DIR) if d.cache else None
    teacher = None
    if cache_dir:
      write_cache(ctx, make_data(), cache_dir)
    else:
      teacher = load_teacher(d.teacher, t)
    tx = S.optimizer(run.optimizer, t.steps)
    data = make_data()
    runner.restore_or_init(ctx, tx, data)
    lr = S.schedule(run.optimizer, t.steps)
    jstep = build_distill_step(ctx.graphdef, teacher, d, t, tx, ctx.mesh, ctx.shardings, lr)
    frozen = () if teacher is None else teacher[1:]
    step_fn = lambda state, batch: jstep(state, frozen, batch)
    log = runner.MetricsLog(ctx.model_cfg.flops_per_token(t.seq_len, mtp=False))
    runner.run_loop(ctx, step_fn, _batches(ctx, data, cache_dir), runner.standard_hooks(ctx, log, PLOT_KEYS))
  return log.last


# ------------------------------------------------------------------------------------------ data
def _data(ctx: runner.Context):
  """(the run's tokenizer dir, a function making a fresh checkpointable iterator of this process's rows)."""
  run, n_proc = ctx.run, jax.process_count()
  given = run.data.tokenizer or (ckpt.tokenizer_dir(run.init) if run.init else None)
  tok, tok_dir = pipeline.prepare_tokenizer(
    ctx.run_dir,
    ctx.model_cfg.vocab_size,
    given=given or ckpt.tokenizer_dir(run.distill.teacher),
    source=run.data.source,
    seed=run.data.seed,
    text_field=run.data.text_field,
    write=jax.process_index() == 0,
  )
  common = dict(
    tokenizer=tok,
    seq_len=run.train.seq_len,
    batch_size=run.train.batch_size // n_proc,
    seed=run.data.seed,
    shard_index=jax.process_index(),
    shard_count=n_proc,
  )
  if is_sft_source(run):
    from rl_jax.data import sft

    return tok_dir, lambda: sft.make_iterator(run.data.source, sft_cfg=run.sft, **common)
  return tok_dir, lambda: pipeline.make_iterator(run.data.source, text_field=run.data.text_field, **common)


def is_sft_source(run: RunConfig) -> bool:
  """Whether data.source holds SFT examples: its first record has a prompt or messages field."""
  src = run.data.source
  if not isinstance(src, str) or src.startswith("procedural"):
    return False
  if not src.startswith("tfds:"):
    paths = pipeline._expand(src)
    if any(os.path.splitext(p)[1] not in (".jsonl", ".json") for p in paths):
      return False
  from rl_jax.data import sft

  _, first = sft.open_source(src)[0]
  return isinstance(first, dict) and (run.sft.prompt_field in first or run.sft.messages_field in first)


def _batches(ctx: runner.Context, data, cache_dir: str | None):
  """Placed batches from step ctx.start + 1 on (`data` is already at that position), with step n's cached
  teacher top-k attached."""
  step = ctx.start
  for rows in data:
    step += 1
    if cache_dir:
      rows = {**rows, **read_cache(cache_dir, step, rows["tokens"])}
    yield place_batch(rows, ctx.mesh, ctx.run.train.grad_accum)


def teacher_sharding(mesh) -> NamedSharding:
  """[A, B/A, T, k] teacher top-k arrays: split like the batch's rows."""
  return NamedSharding(mesh, P(*ST.batch_sharding(mesh).spec, None))


def place_batch(rows: dict, mesh, grad_accum: int) -> dict:
  """ST.place_batch, plus the cached teacher top-k (float32 values, int32 indices) when the rows carry it."""
  out = ST.place_batch(rows, mesh, grad_accum)
  for k, dtype in zip(TEACHER_KEYS, (np.float32, np.int32)):
    if k in rows:
      local = np.asarray(rows[k], dtype).reshape(grad_accum, -1, *rows[k].shape[1:])
      out[k] = jax.make_array_from_process_local_data(teacher_sharding(mesh), local)
  return out


# ------------------------------------------------------------------------------------------ teacher
def check_shared_tokenizer(teacher: str, teacher_vocab: int, student_tok_dir: str | None, student_vocab: int) -> None:
  """Teacher and student must read the same token ids: equal vocab sizes and tokenizer.json vocabularies."""
  teacher_tok = ckpt.tokenizer_dir(teacher)
  same = teacher_vocab == student_vocab and teacher_tok is not None and student_tok_dir is not None
  same = same and _vocabulary(teacher_tok) == _vocabulary(student_tok_dir)
  if not same:
    raise ValueError(
      f"teacher and student must share a tokenizer: teacher vocabulary {teacher_vocab} ids "
      f"({_where(teacher_tok)}) vs student vocabulary {student_vocab} ids ({_where(student_tok_dir)})"
    )


def _vocabulary(tok_dir: str) -> tuple:
  """What fixes the token ids of a tokenizer.json: its model (vocab, merges) and added tokens."""
  j = json.loads((epath.Path(tok_dir) / "tokenizer.json").read_text())
  return json.dumps(j.get("model"), sort_keys=True), json.dumps(j.get("added_tokens"), sort_keys=True)


def _where(tok_dir: str | None) -> str:
  return os.path.join(tok_dir, "tokenizer.json") if tok_dir else "no tokenizer.json"


def load_teacher(path: str, t: TrainConfig):
  """(graphdef, params, bias) of the teacher checkpoint on the ambient mesh, sharded by the ambient rules;
  routed dropless, so its logits do not depend on what else is in the batch."""
  model = ckpt.load_model(path, dtype=t.compute_dtype, moe_capacity_factor=None)
  return S.split_model(model)


def teacher_targets(teacher_graphdef, frozen, mb, top_k: int):
  """The teacher's logits [B, T, V] (or its top-k (values, indices)) for a micro-batch, without gradient:
  the cached top-k when the batch carries it, else a forward of the frozen teacher."""
  if TEACHER_KEYS[0] in mb:
    return mb["teacher_values"], mb["teacher_indices"]
  model = nnx.merge(teacher_graphdef, *frozen)
  out = model.forward(mb["tokens"], positions_BT=mb["positions"], segment_ids_BT=mb["segment_ids"])
  logits = jax.lax.stop_gradient(out.logits_BTV)
  return tuple(jax.lax.top_k(logits, top_k)) if top_k else logits


# ------------------------------------------------------------------------------------------ cache
def cache_path(cache_dir: str, step: int) -> str:
  return os.path.join(cache_dir, f"step_{step:06d}.npz")


def write_cache(ctx: runner.Context, data, cache_dir: str) -> None:
  """The teacher's top-k for the batches of steps 1..train.steps (those already cached are skipped; with
  none missing the teacher is never loaded); the teacher is freed at the end."""
  run = ctx.run
  steps = run.train.steps
  missing = [s for s in range(1, steps + 1) if not epath.Path(cache_path(cache_dir, s)).exists()]
  if not missing:
    return
  if jax.process_count() > 1:
    raise ValueError("distill.cache runs in one process; use distill.cache=false (online top_k) with several")
  epath.Path(cache_dir).mkdir(parents=True, exist_ok=True)
  graphdef, params, bias = load_teacher(run.distill.teacher, run.train)
  top_k = jax.jit(lambda frozen, b: jax.lax.map(lambda mb: teacher_targets(graphdef, frozen, mb, run.distill.top_k), b))
  for step in range(1, max(missing) + 1):
    rows = next(data)
    if step not in missing:
      continue
    values, indices = jax.device_get(top_k((params, bias), ST.place_batch(rows, ctx.mesh, run.train.grad_accum)))
    path, buf = epath.Path(cache_path(cache_dir, step)), io.BytesIO()
    np.savez(buf, tokens=rows["tokens"], values=values.reshape(*rows["tokens"].shape, -1),
             indices=indices.reshape(*rows["tokens"].shape, -1))  # fmt: skip
    tmp = path.with_name(path.name + ".tmp")  # whole files only: a crash mid-write leaves no step_N.npz
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
  jax.tree.map(lambda x: x.delete(), (params, bias))


def read_cache(cache_dir: str, step: int, tokens) -> dict:
  """Step `step`'s cached teacher top-k; its tokens must be the batch's."""
  path = cache_path(cache_dir, step)
  if not epath.Path(path).exists():
    raise ValueError(f"{path}: no teacher cache for step {step}; rerun to write it")
  with np.load(io.BytesIO(epath.Path(path).read_bytes())) as z:
    if not np.array_equal(z["tokens"], tokens):
      raise ValueError(f"{path}: cached for other data than step {step}'s batch; delete {cache_dir} and rerun")
    return {"teacher_values": z["values"], "teacher_indices": z["indices"]}


# ------------------------------------------------------------------------------------------ step
def make_loss_fn(graphdef, teacher_graphdef, d: DistillConfig, train: TrainConfig):
  """loss(params, bias, frozen teacher (params, bias) or (), micro-batch) -> (loss, metrics)."""

  def loss_fn(params, bias, frozen, mb):
    model = nnx.merge(graphdef, params, bias)
    out = model.forward(mb["tokens"], positions_BT=mb["positions"], segment_ids_BT=mb["segment_ids"], remat=train.remat)
    teacher = teacher_targets(teacher_graphdef, frozen, mb, d.top_k)
    mask = mb["loss_mask"]
    kd, m = losses.chunked_distill_loss(
      model.head, out.hidden_BTD, teacher, mask, targets_BT=mb["targets"], chunk=d.chunk,
      divergence=d.divergence, temperature=d.temperature, jsd_beta=d.jsd_beta,
    )  # fmt: skip
    loss = d.kd_weight * kd + d.ce_weight * m["ce"]
    return loss, {**m, "loss": loss, "tokens": mask.sum().astype(jnp.float32)}

  return loss_fn


def make_distill_step(graphdef, teacher_graphdef, d: DistillConfig, train: TrainConfig, tx, lr_schedule=None):
  """(state, frozen teacher, batch [A, B/A, T]) -> (state, metrics): gradients summed over the A
  micro-batches and averaged, one optimizer update, skipped (state kept) when not finite."""
  loss_fn = make_loss_fn(graphdef, teacher_graphdef, d, train)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, frozen, batch):
    def micro(carry, mb):
      (_, metrics), grads = grad_fn(state.params, state.bias, frozen, mb)
      return jax.tree.map(jnp.add, carry, (grads, metrics)), None

    A = batch["tokens"].shape[0]
    m0 = jax.eval_shape(loss_fn, state.params, state.bias, frozen, jax.tree.map(lambda x: x[0], batch))[1]
    zeros = (jax.tree.map(jnp.zeros_like, state.params), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0))
    (grads, metrics), _ = jax.lax.scan(micro, zeros, batch)
    grads = jax.tree.map(lambda g: g / A, grads)
    metrics = {k: (v if k == "tokens" else v / A) for k, v in metrics.items()}
    return ST.apply_update(state, grads, metrics, tx, lr_schedule)

  return step


def build_distill_step(graphdef, teacher, d: DistillConfig, train: TrainConfig, tx, mesh, shardings, lr_schedule=None):
  """The step jitted once: the state donated; the teacher's (params, bias) an argument sharded like its
  arrays (None: the batches carry the cached top-k)."""
  ST.check_batch(train, mesh)
  batch_sh = {k: ST.batch_sharding(mesh) for k in ST.BATCH_KEYS}
  teacher_sh = ()
  if teacher is None:
    batch_sh.update({k: teacher_sharding(mesh) for k in TEACHER_KEYS})
  else:
    teacher_sh = tuple(srules.param_shardings(x, mesh) for x in teacher[1:])
  return jax.jit(
    make_distill_step(graphdef, None if teacher is None else teacher[0], d, train, tx, lr_schedule),
    in_shardings=(shardings, teacher_sh, batch_sh),
    out_shardings=(shardings, NamedSharding(mesh, P())),
    donate_argnums=0,
  )
