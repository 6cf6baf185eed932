"""GRPO over two processes (jax.distributed on CPU, 1 CPU device each, one 2-device mesh): each process
samples and scores its own half of every step's prompts, the update runs on the global batch, a checkpoint
is saved together; the run dies after its step-2 checkpoint and is rerun. The reference is the same command
in ONE process over 2 devices, uninterrupted: every step's metrics and the final parameters must agree."""

import json
import os
import subprocess
import sys
import time

import numpy as np

from tests._subproc import REPO, child_env
from tests.test_train_two_process import _free_port, _result

TIMEOUT_S = 240
# the samples and their scores are the same per global row, so these are equal; the update's numbers differ by
# reduction order across devices only (seen: a few 1e-7 relative, 4e-7 absolute on parameters moved by ~1e-4)
SAMPLED = ("reward", "reward_overlong", "response_len_mean", "response_len_max", "all_equal_groups", "load_imbalance",
           "eval_pass@1", "eval_mean_response_tokens")  # fmt: skip
UPDATE = ("loss", "pg_loss", "grad_norm", "param_norm", "kl", "kl_ref", "entropy", "logp_gap", "is_weight_mean")


def _workers(out: str, ids: list[str], n_devices: int, tmp_path) -> list[dict]:
  """The worker processes, run together (output to files: a blocked pipe would stall a collective)."""
  port = _free_port()
  logs = [(open(tmp_path / f"w{i}.out", "w+"), open(tmp_path / f"w{i}.err", "w+")) for i in ids]
  procs = [
    subprocess.Popen(
      [sys.executable, "tests/_two_process_grpo_worker.py", out, str(port), i],
      cwd=REPO,
      env=child_env(n_devices),
      stdout=o,
      stderr=e,
      text=True,
    )  # fmt: skip
    for i, (o, e) in zip(ids, logs)
  ]
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
      p.wait()
  outs = []
  for p, (o, e) in zip(procs, logs):
    o.seek(0), e.seek(0)
    outs.append((o.read(), e.read()))
    assert p.returncode == 0, (
      f"worker failed or timed out ({p.returncode}):\n{outs[-1][0][-2000:]}\n{outs[-1][1][-6000:]}"
    )
  return [_result(out) for out, _ in outs]


def _rows(run_dir: str) -> dict[int, dict]:
  rows = {}
  for line in open(os.path.join(run_dir, "metrics.jsonl")):  # the eval row and the step's row merge
    r = json.loads(line)
    rows.setdefault(r["step"], {}).update(r)
  return rows


def _params(ckpt_dir: str) -> dict:
  import jax
  from flax import nnx

  from rl_jax import checkpoint

  m = checkpoint.load_model(ckpt_dir)
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(m))}


def test_two_process_grpo_matches_one_process_and_resumes(tmp_path):
  out = str(tmp_path)
  (one,) = _workers(out, ["single"], 2, tmp_path)  # also pretrains the base both runs start from
  two = _workers(out, ["0", "1"], 1, tmp_path)
  assert one["rc"] == 0 and one["calls"] == [1, 2, 3] and (one["processes"], one["devices"]) == (1, 2)
  for p, r in enumerate(two):
    assert (r["process"], r["processes"], r["devices"]) == (p, 2, 2)
    # died before step 3's rollout, after the step-2 checkpoint; the rerun resumed there: only step 3 sampled
    assert r["crashed"] is True and r["first_calls"] == [1, 2] and r["steps_before"] == ["2"]
    assert r["rc"] == 0 and r["calls"] == [3], r

  # EACH PROCESS SAMPLED ITS OWN HALF of every step's prompts (steps 1, 2, then 3 in the rerun): together the
  # reference's, in its row order
  assert len(one["prompts"]) == 3 and all(len(p) == 4 for p in one["prompts"])
  assert [a + b for a, b in zip(*(r["prompts"] for r in two))] == one["prompts"]

  # ONLY PROCESS 0 WROTE THE SHARED FILES; they describe the run like the reference's
  two_dir, one_dir = os.path.join(out, "two"), os.path.join(out, "one")
  lines = open(os.path.join(two_dir, "metrics.jsonl")).read().splitlines()
  assert len(lines) == len(open(os.path.join(one_dir, "metrics.jsonl")).read().splitlines())  # no duplicate rows
  for f in ("checkpoints/model_config.json", "checkpoints/tokenizer"):
    assert os.path.exists(os.path.join(two_dir, f)), f

  # EVERY STEP'S METRICS (steps 1-2 of the first run, 3 of the rerun) EQUAL THE ONE-PROCESS RUN'S
  got, want = _rows(two_dir), _rows(one_dir)
  assert sorted(got) == sorted(want) == [1, 2, 3]
  assert any(want[s]["grad_norm"] > 0 for s in want) and len({want[s]["reward"] for s in want}) > 1  # real signal
  for s in want:
    assert {k: got[s].get(k) for k in SAMPLED} == {k: want[s].get(k) for k in SAMPLED}, s
    for k in UPDATE:  # loss, pg_loss, logp_gap: ~1e-7 around zero; kl ~6e-5
      np.testing.assert_allclose(got[s][k], want[s][k], rtol=1e-5, atol=1e-6, err_msg=f"step {s} {k}")
  pa, pb = _params(os.path.join(two_dir, "checkpoints")), _params(os.path.join(one_dir, "checkpoints"))
  assert pa.keys() == pb.keys() and len(pa) > 20
  for k in pb:
    np.testing.assert_allclose(pa[k], pb[k], rtol=0, atol=1e-6, err_msg=k)
