"""The pretraining loop end to end on the tiny MoE (CPU): exact resume (cosine schedule, a run that dies
mid-way), learning, bad input, YaRN extension.

The runs happen once, through the CLI, in a child process (tests/_train_worker.py: one device, fast CPU
compiles); the tests below check what they left on disk and reported.
"""

import json
import os
import re

import numpy as np
import pytest

from tests._subproc import run_python

N, L = 15, 32  # as in tests/_train_worker.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("train")
  run_python(["tests/_train_worker.py", str(out)], timeout=900)
  with open(out / "results.json") as f:
    return str(out), json.load(f)


def _ok(res, name):
  r = res[name]
  assert r["rc"] == 0, f"{name} failed:\n{r['err'][-4000:]}"
  return r


def _metrics(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _error_lines(r):
  assert r["rc"] == 2, r["err"][-4000:]
  return [line for line in r["err"].splitlines() if line.startswith("error:")]


def _leaves(model):
  import jax
  from flax import nnx

  return {
    jax.tree_util.keystr(p): np.asarray(v)
    for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model).to_pure_dict())
  }


# STOP AND RESUME
def test_resume_equals_uninterrupted(runs):
  from rl_jax import checkpoint

  out, res = runs
  for name in ("run_a1", "run_a2", "run_b"):
    _ok(res, name)
  assert res["run_a1"]["preempted"]
  a, b = _metrics(f"{out}/A"), _metrics(f"{out}/B")
  # A ran B's command (2N steps, cosine schedule with warmup), died after logging step N, resumed from its
  # step-N checkpoint and logged N+1..2N: the same numbers as B, bit for bit.
  assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 2 * N + 1))
  for key in ("loss", "ce", "mtp", "balance", "grad_norm", "param_norm", "load_imbalance", "lr"):
    assert [m[key] for m in a] == [m[key] for m in b], key
  lr = [m["lr"] for m in b]
  assert lr[0] == 0 and max(lr) == pytest.approx(1e-2) and lr[N] > lr[-1] > 0, lr  # warmup, then decay
  pa, pb = (
    _leaves(checkpoint.load_model(f"{out}/A/checkpoints")),
    _leaves(checkpoint.load_model(f"{out}/B/checkpoints")),
  )
  assert pa.keys() == pb.keys() and len(pa) > 20
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
  assert checkpoint.latest_step(f"{out}/A/checkpoints") == 2 * N


def test_checkpoint_holds_data_state_and_router_bias(runs):
  import jax
  from flax import nnx

  from rl_jax import checkpoint, data
  from rl_jax.models.layers import RouterBias

  out, res = runs
  _ok(res, "run_a1")
  # The data-iterator state saved with step k is a fresh iterator's after k batches (what resume restores).
  it = data.make_iterator("procedural", tokenizer=data.load(f"{out}/tokenizer"), seq_len=L, batch_size=4, seed=0)
  # Only the kept checkpoints' states stay (checkpoint.keep=2).
  assert sorted(os.listdir(f"{out}/A/data_state")) == [f"step_{k}_proc_0.json" for k in (2 * N - 5, 2 * N)]
  for k in range(1, 2 * N + 1):
    next(it)
    if k in (2 * N - 5, 2 * N):
      with open(f"{out}/A/data_state/step_{k}_proc_0.json") as f:
        assert json.load(f) == it.get_state(), k
  # The router bias is saved and trained (aux-loss-free balancing moved it off zero): main MoE layer + MTP.
  for step in (2 * N - 5, 2 * N):  # written while training, and at the end (keep=2)
    model = checkpoint.load_model(f"{out}/A/checkpoints", step=step)
    bias = [np.asarray(b) for b in jax.tree.leaves(nnx.state(model, RouterBias).to_pure_dict())]
    assert len(bias) == 2, bias
    for b in bias:
      assert b.shape in ((1, 8), (8,)) and np.all(np.isfinite(b)) and np.abs(b).max() > 0, b  # stacked main


# LEARNING
def test_loss_falls_on_procedural_corpus(runs):
  out, res = runs
  _ok(res, "run_b")
  loss = [m["loss"] for m in _metrics(f"{out}/B")]
  assert len(loss) == 2 * N and all(np.isfinite(loss))
  assert np.mean(loss[-3:]) < 0.7 * loss[0], loss


# BAD INPUT
def test_unknown_config_key_is_one_line(runs):
  out, res = runs
  r = res["unknown_key"]
  assert _error_lines(r) == ["error: unknown config key 'train.stepz' (did you mean 'train.steps'?)"], r["err"]
  assert "Traceback" not in r["err"] and not os.path.exists(f"{out}/U")


def test_rerun_with_more_steps_extends_a_finished_run(runs):
  from rl_jax import checkpoint

  out, res = runs
  _ok(res, "more_steps")
  assert [m["step"] for m in _metrics(f"{out}/B_more")] == list(range(1, 2 * N + 4))
  assert checkpoint.latest_step(f"{out}/B_more/checkpoints") == 2 * N + 3


def test_nan_steps_are_skipped_then_the_run_stops(runs):
  from rl_jax import checkpoint

  out, res = runs
  r = res["nan_loss"]
  lines = _error_lines(r)
  assert len(lines) == 1 and "Traceback" not in r["err"], r["err"]
  # lr=1e30 from step N+1: every update overflows the parameters, so each step is skipped; the default
  # train.max_bad_steps=3 stops the run after N+3.
  assert lines[0] == (
    f"error: 3 consecutive non-finite steps (loss/grad) up to step {N + 3}; stopped "
    f"(newest checkpoint: step {N}; lower optimizer.lr?)"
  ), lines[0]
  assert r["intact"]  # skipped steps are not saved: no byte of the earlier checkpoints changed, none was added
  assert sorted(os.listdir(f"{out}/A_nan/checkpoints")) == ["10", "15", "model_config.json", "tokenizer"]
  rows = _metrics(f"{out}/A_nan")
  assert [m["step"] for m in rows] == list(range(1, N + 4))
  assert [m["skipped"] for m in rows] == [0] * N + [1] * 3
  assert [m["skipped_total"] for m in rows[N:]] == [1, 2, 3]
  # the state was never updated: the skipped steps report the step-N parameters' norm
  assert [m["param_norm"] for m in rows[N:]] == pytest.approx([rows[N - 1]["param_norm"]] * 3, rel=1e-6)
  params = _leaves(checkpoint.load_model(f"{out}/A_nan/checkpoints"))
  assert all(np.all(np.isfinite(v)) for v in params.values())


def _without_tensorstore_noise(err: str) -> str:
  """stderr less what TensorStore's own threads may print when orbax closes its event loop under a failed
  read's other reads (a bare "Traceback" header over one asyncio frame, from C++ threads, out of Python's
  hooks): any traceback of ours would show more frames."""
  noise = re.compile(
    r"Traceback \(most recent call last\):\n\s+File \"[^\"]*asyncio/base_events\.py\", line \d+, in \w+\n"
    r"(?:\s+\S.*\n)*?(?:RuntimeError: Event loop is closed\n)?"
  )
  return noise.sub("", err)


def test_corrupt_newest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_previous(runs):
  from rl_jax import checkpoint

  out, res = runs
  r = _ok(res, "corrupt")
  ckpts = f"{out}/A_bad/checkpoints"
  # eval/export on the bad checkpoint: one line naming it
  lines = _error_lines(r["export"])
  assert len(lines) == 1 and "Traceback" not in _without_tensorstore_noise(r["export"]["err"]), r["export"]["err"]
  assert lines[0].startswith(f"error: {ckpts}/{N}: checkpoint is unreadable ("), lines[0]
  assert lines[0].endswith("move it away to use step 10"), lines[0]
  # the run: one line, the step directory moved aside (kept), resumed from step 10 and finished
  # (TensorStore's threads may still print "Event loop is closed" tracebacks about the failed read's other
  # reads: orbax closes its event loop under them; the runner drops the "Exception ignored" ones it can)
  warn = [line for line in r["err"].splitlines() if line.startswith("warning:")]
  assert len(warn) == 1 and not [line for line in r["err"].splitlines() if line.startswith("error:")], r["err"]
  moved = [n for n in os.listdir(ckpts) if n.startswith(f"corrupt-{N}-")]
  assert len(moved) == 1, os.listdir(ckpts)
  assert re.fullmatch(
    rf"warning: {ckpts}/{N}: checkpoint is unreadable \(.+\); moved to {ckpts}/{moved[0]}; resuming from step 10",
    warn[0],
  ), warn[0]
  assert os.path.exists(r["victim"].replace(f"/checkpoints/{N}/", f"/checkpoints/{moved[0]}/"))
  assert checkpoint.latest_step(ckpts) == 2 * N
  # steps 11..2N rerun from step 10's state and data position: the uninterrupted run's numbers, bit for bit
  a, b = _metrics(f"{out}/A_bad"), _metrics(f"{out}/B")
  assert [m["step"] for m in a] == list(range(1, 2 * N + 1))
  assert [m["loss"] for m in a] == [m["loss"] for m in b]
  pa, pb = _leaves(checkpoint.load_model(ckpts)), _leaves(checkpoint.load_model(f"{out}/B/checkpoints"))
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_init_from_another_architecture_is_one_line(runs):
  out, res = runs
  r = res["init_mismatch"]
  assert _error_lines(r) == [
    f"error: --init {out}/B/checkpoints: its parameters do not match the run's model "
    "(different architecture; only rope / max_position_embeddings / dtypes may differ)"
  ], r["err"]


# CONTEXT EXTENSION
def test_yarn_extension_lowers_long_context_loss(runs):
  from rl_jax import checkpoint

  out, res = runs
  _ok(res, "extend")
  ev = _ok(res, "long_context_eval")
  rope = checkpoint.read_model_config(f"{out}/E/checkpoints").rope
  assert (rope.type, rope.factor, rope.original_max_position_embeddings) == ("yarn", 4.0, L)
  ext = _metrics(f"{out}/E")
  assert len(ext) == 15 and all(np.isfinite(m["loss"]) for m in ext)
  # The extend stage starts from run B's weights, not from scratch: its first loss is B's level, not ~8.
  assert ext[0]["loss"] < 0.6 * _metrics(f"{out}/B")[0]["loss"], ext[0]
  # On held-out 4L rows, past the pretraining context (positions >= L), the extended model is better than
  # the original one run at 4L with its plain rope.
  assert ev["far_tokens"] > 500
  assert ev["extended_far"] < 0.98 * ev["original_far"], ev
