"""Real signals on the real CLI: `python -m rl_jax.cli ...` runs in a child process, is sent SIGTERM (what a
preemptible VM gets) or SIGKILL, and the same command is rerun; the result must equal an uninterrupted run of
that command (its own run directory and process) bit for bit: every step's metrics row and the final
parameters.

A child is frozen with SIGSTOP before it is signalled, so the test knows the signal lands mid-run (not after
the last step) however loaded the machine is.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from tests._subproc import REPO, child_env

STEPS, EVERY = 24, 8  # SIGTERM lands between periodic checkpoints: its own save is the one that counts
PRETRAIN = ["pretrain", "--config", "pretrain_tiny", f"train.steps={STEPS}", "model.num_hidden_layers=2",
            "train.batch_size=4", "train.seq_len=32", "train.log_every=1", f"checkpoint.every={EVERY}"]  # fmt: skip
# as tests/_grpo_worker.py, so that the persistent jit cache serves both
BASE = ["pretrain", "--config", "pretrain_r1zero_tiny", "train.steps=20", "train.batch_size=8", "train.seq_len=64",
        "checkpoint.every=0", "train.log_every=10"]  # fmt: skip
GRPO = ["grpo", "--config", "grpo_r1zero_tiny", "train.steps=4", "train.log_every=1", "checkpoint.every=2",
        "grpo.prompts_per_step=4", "grpo.group_size=2", "grpo.max_new_tokens=24", "grpo.eval_problems=2",
        "grpo.eval_k=2"]  # fmt: skip


_children: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_leftover_children():
  """A failed test may leave a child stopped (SIGSTOP) or running: it is killed, not left behind."""
  yield
  while _children:
    p = _children.pop()
    if p.poll() is None:
      p.kill()
      p.wait()


class Child:
  """`python -m rl_jax.cli ARGS --run-dir RUN_DIR` in the background, its stderr in a file."""

  def __init__(self, args: list[str], run_dir: str, tag: str):
    self.run_dir, self.err_path = run_dir, f"{run_dir}.{tag}.stderr"
    with open(self.err_path, "w") as err:
      self.proc = subprocess.Popen(
        [sys.executable, "-m", "rl_jax.cli", *args, "--run-dir", run_dir],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=err,
      )
    _children.append(self.proc)

  @property
  def err(self) -> str:
    with open(self.err_path) as f:
      return f.read()

  def wait(self, timeout: float = 600) -> int:
    return self.proc.wait(timeout)

  def until(self, what: str, cond, timeout: float = 600) -> None:
    """Polls `cond()` until it holds; fails if the child exits first."""
    t0 = time.monotonic()
    while not cond():
      assert self.proc.poll() is None, f"exited ({self.proc.returncode}) before {what}:\n{self.err[-3000:]}"
      assert time.monotonic() - t0 < timeout, f"no {what} after {timeout}s:\n{self.err[-3000:]}"
      time.sleep(0.02)

  def freeze_mid_run(self, what: str, cond, last: int, killed: bool = False) -> None:
    """Waits for `cond`, then stops the child (SIGSTOP) and checks that it cannot get past step `last` - 1
    before it sees a signal (the loop has at most dispatched the step after the newest metrics row). `killed`: the
    child is SIGKILLed while stopped, never runs again, so only step `last` must not be done yet (an async save
    can finalise a checkpoint after the next step's row is out)."""
    self.until(what, cond)
    self.proc.send_signal(signal.SIGSTOP)
    done = len(rows(self.run_dir))
    assert last not in steps_saved(self.run_dir) and done < last - (0 if killed else 1), "finished before the signal"


def run(args: list[str], run_dir: str) -> None:
  c = Child(args, run_dir, f"run{time.monotonic_ns()}")
  assert c.wait() == 0, c.err[-4000:]


def steps_saved(run_dir: str) -> set[int]:
  """Finalised checkpoints (orbax writes a step under a temporary name and renames it when complete)."""
  d = os.path.join(run_dir, "checkpoints")
  return {int(n) for n in os.listdir(d) if n.isdigit()} if os.path.isdir(d) else set()


def rows(run_dir: str) -> dict[int, dict]:
  """metrics.jsonl by step, without the timings (wall-clock)."""
  p = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(p):
    return {}
  with open(p) as f:
    lines = [json.loads(line) for line in f if line.endswith("\n")]  # the row being written may be partial
  out = {}
  for r in lines:  # a step may have several rows (GRPO's evaluation), but each value only once
    row = out.setdefault(r.pop("step"), {})
    assert not row.keys() & r.keys(), f"{p}: a step logged twice: {r}"
    row.update({k: v for k, v in r.items() if not k.startswith("time_") and k != "tokens_per_s"})
  return out


def params(run_dir: str) -> dict[str, np.ndarray]:
  import jax
  from flax import nnx

  from rl_jax import checkpoint

  m = checkpoint.load_model(os.path.join(run_dir, "checkpoints"))
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(m))}


def assert_same_run(got: str, want: str, steps: int) -> None:
  a, b = rows(got), rows(want)
  assert sorted(a) == sorted(b) == list(range(1, steps + 1))
  for s in b:
    assert a[s] == b[s], f"step {s}: {a[s]} != {b[s]}"
  pa, pb = params(got), params(want)
  assert pa.keys() == pb.keys() and len(pa) > 10
  for k in pb:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


# ------------------------------------------------------------------------------------------ pretraining
def test_pretrain_sigterm_then_sigkill_resumes_exactly(tmp_path):
  """SIGTERM mid-run (default async checkpoints; more SIGTERMs keep coming while it saves): exit 143 with a
  checkpoint at the step it stopped; rerun, SIGKILL after its next checkpoint; rerun to the end: the same
  metrics and parameters as an uninterrupted run."""
  ref, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
  run(PRETRAIN, ref)

  c = Child(PRETRAIN, run_dir, "term")
  c.freeze_mid_run("step 3's metrics row", lambda: len(rows(run_dir)) >= 3, EVERY - 1)
  c.proc.send_signal(signal.SIGTERM)
  c.proc.send_signal(signal.SIGCONT)
  # a preemption's supervisor may signal again: none may interrupt the save (the line comes after it)
  while c.proc.poll() is None and "SIGTERM:" not in c.err:
    c.proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
  rc = c.wait()
  said = re.findall(r"^SIGTERM: saved step (\d+) to (\S+); rerun the same command to resume$", c.err, re.M)
  assert len(said) == 1, f"rc {rc}:\n{c.err[-3000:]}"
  # once the line is out, a late SIGTERM may end the process (-15) during teardown: the checkpoint is done
  assert rc == 143 or rc == -signal.SIGTERM, c.err[-3000:]
  stopped = int(said[0][0])
  assert said[0][1] == os.path.join(run_dir, "checkpoints")
  assert 3 <= stopped < EVERY and steps_saved(run_dir) == {stopped}
  assert sorted(rows(run_dir)) == list(range(1, stopped + 1))  # every finished step logged, none lost

  c = Child(PRETRAIN, run_dir, "kill")
  c.freeze_mid_run("a checkpoint after the resume", lambda: max(steps_saved(run_dir)) > stopped, STEPS, killed=True)
  c.proc.send_signal(signal.SIGKILL)
  assert c.wait() == -signal.SIGKILL

  run(PRETRAIN, run_dir)
  assert_same_run(run_dir, ref, STEPS)


def test_sigterm_handler_is_the_loops_only():
  """Inside the loop SIGTERMs are counted (twice: still alive); afterwards, even after an error, the previous
  handler is back."""
  from rl_jax.train import runner

  got = []
  prev = signal.signal(signal.SIGTERM, lambda *a: got.append("previous"))
  try:
    with pytest.raises(RuntimeError), runner._sigterm_flag() as sigterm:
      os.kill(os.getpid(), signal.SIGTERM)
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.01)  # python runs handlers between bytecodes
      assert sigterm.count == 2 and got == []
      raise RuntimeError
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    assert got == ["previous"]
  finally:
    signal.signal(signal.SIGTERM, prev)


def test_sigterm_at_a_checkpoint_step_logs_then_saves_once(tmp_path):
  """SIGTERM during a step that is also a periodic checkpoint: its row is written once, before that save, and the
  save is not repeated (the loop itself, with stand-in hooks)."""
  from rl_jax.train import runner

  events = []

  def step_fn(state, batch):
    if state + 1 == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return state + 1, {"loss": 1.0}

  def save(ctx, step, metrics):
    events.append(("save", step))
    ctx.saved = step

  ctx = types.SimpleNamespace(
    run=types.SimpleNamespace(train=types.SimpleNamespace(steps=6)), start=0, run_dir=str(tmp_path), stage="test",
    state=0, saved=None, ckpt_dir=str(tmp_path / "checkpoints"), mngr=types.SimpleNamespace(wait_until_finished=dict),
  )  # fmt: skip
  hooks = [runner.Hook(lambda c, step, m: events.append(("row", step)), 1), runner.Hook(save, 2, state=True)]
  with pytest.raises(runner.Preempted):
    runner.run_loop(ctx, step_fn, iter(range(6)), hooks)
  assert events == [("row", 1), ("row", 2), ("save", 2)]


# ------------------------------------------------------------------------------------------ GRPO
@pytest.fixture(scope="module")
def grpo_base(tmp_path_factory):
  base = str(tmp_path_factory.mktemp("preempt_grpo") / "base")
  run(BASE, base)
  return os.path.join(base, "checkpoints")


def test_grpo_sigkill_after_checkpoint_resumes_exactly(grpo_base, tmp_path):
  args = [*GRPO, "--init", grpo_base]
  ref, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
  run(args, ref)
  c = Child(args, run_dir, "kill")
  c.freeze_mid_run("the step-2 checkpoint", lambda: 2 in steps_saved(run_dir), 4, killed=True)
  c.proc.send_signal(signal.SIGKILL)
  assert c.wait() == -signal.SIGKILL
  assert steps_saved(run_dir) == {2}
  run(args, run_dir)
  assert_same_run(run_dir, ref, 4)


# ------------------------------------------------------------------------------------------ SFT
def _sft_data(path: str) -> str:
  rng = np.random.default_rng(0)
  with open(path, "w") as f:
    for a, b in rng.integers(0, 50, (32, 2)).tolist():
      f.write(json.dumps({"prompt": f"{a}+{b}=?", "response": f"<answer>{a + b}</answer>"}) + "\n")
  return path


def test_sft_sigterm_resumes_exactly(grpo_base, tmp_path):
  """SIGTERM between periodic checkpoints with synchronous saves: exit 143, rerun: as uninterrupted."""
  args = ["sft", "--init", grpo_base, f"data.source={_sft_data(str(tmp_path / 'sft.jsonl'))}", "sft.template=plain",
          "train.seq_len=64", "train.batch_size=8", "train.compute_dtype=float32", "train.log_every=1",
          "train.steps=12", "checkpoint.every=8", "checkpoint.async_save=false"]  # fmt: skip
  ref, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
  run(args, ref)
  c = Child(args, run_dir, "term")
  c.freeze_mid_run("step 2's metrics row", lambda: len(rows(run_dir)) >= 2, 7)
  c.proc.send_signal(signal.SIGTERM)
  c.proc.send_signal(signal.SIGCONT)
  assert c.wait() == 143, c.err[-3000:]
  stopped = int(re.findall(r"^SIGTERM: saved step (\d+) to ", c.err, re.M)[0])
  assert steps_saved(run_dir) == {stopped} and sorted(rows(run_dir)) == list(range(1, stopped + 1))
  run(args, run_dir)
  assert_same_run(run_dir, ref, 12)
