"""GRPO runs through the CLI: a run stopped after a checkpoint and rerun continues bit for bit like an
uninterrupted one (rollout seeds, prompt position and reference model restored); the DAPO preset and routing
replay with KL in the reward run with their metrics."""

import json
import os

import numpy as np
import pytest

from tests._subproc import run_python


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("grpo")
  run_python(["tests/_grpo_worker.py", str(out)], timeout=900)
  with open(out / "results.json") as f:
    return str(out), json.load(f)


def _rows(run_dir):
  rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
  return {r["step"]: {k: v for k, v in r.items() if not k.startswith("time_") and k != "tokens_per_s"}
          for r in rows if "reward" in r}  # fmt: skip


def _params(ckpt_dir):
  import jax
  from flax import nnx

  from rl_jax import checkpoint

  m = checkpoint.load_model(ckpt_dir)
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(m))}


def test_resume_after_a_crash_equals_uninterrupted(runs):
  out, res = runs
  assert res["A"] == 0 and res["B"] == 0 and res["B_crashed"] is True
  assert [s for s in res["B_steps_before"] if s.isdigit()] == ["2"]  # B died after its step-2 checkpoint
  a, b = _rows(f"{out}/A"), _rows(f"{out}/B")
  assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [1, 2, 3, 4]
  for step in (3, 4):  # the resumed steps: same prompts, samples, rewards, losses
    assert a[step] == b[step], step
  pa, pb = _params(f"{out}/A/checkpoints"), _params(f"{out}/B/checkpoints")
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_dapo_and_replay_runs(runs):
  out, res = runs
  assert res["dapo"] == 0 and res["replay"] == 0
  dapo = _rows(f"{out}/dapo")
  assert {"rollout_rounds", "all_equal_groups", "reward_overlong"} <= set(dapo[2])
  assert 1 <= dapo[2]["rollout_rounds"] <= 3
  replay = _rows(f"{out}/replay")
  assert replay[2]["kl_ref"] >= 0 and "kl" in replay[2]
