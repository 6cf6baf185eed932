"""The main job end to end, shortened: `rl-jax pipeline` over the quickstart's stages (pretrain the R1-Zero
base, evaluate, GRPO, evaluate) with a few steps each, its outputs and report; a rerun skips what is done; the
README's hand-written GRPO loop runs; `rl-jax eval --out` writes R1's metrics."""

import json
import os

import pytest

from tests._subproc import run_python


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("quickstart")
  run_python(["tests/_quickstart_worker.py", str(out)], timeout=900)
  with open(out / "results.json") as f:
    return str(out), json.load(f)


def test_pipeline_outputs(quick):
  out, res = quick
  assert res["first"]["rc"] == 0, res["first"]["out"]
  run = os.path.join(out, "run")
  with open(os.path.join(run, "summary.json")) as f:
    s = json.load(f)
  for label in ("base", "final"):
    e = s[label]
    assert os.path.isabs(s[f"{label}_checkpoint"]) and os.path.isdir(s[f"{label}_checkpoint"])
    assert e["task"] == "chain" and e["k"] == 2 and e["problems"] == 4
    for key in ("pass@1", "cons@k", "format_rate", "pass@1_lenient"):
      assert 0.0 <= e[key] <= 1.0, (label, key, e[key])
    assert e["mean_response_tokens"] > 0
  assert s["final_checkpoint"].endswith(os.path.join("rl", "checkpoints")) and s["task"] == "chain"
  assert os.path.getsize(os.path.join(run, "plots", "rl_rl.png")) > 1000
  report = open(os.path.join(run, "report.md")).read()
  assert "| eval_base |" in report and "| eval_final |" in report


def test_grpo_metrics_rows(quick):
  out, _ = quick
  rows = [json.loads(line) for line in open(os.path.join(out, "run", "rl", "metrics.jsonl"))]
  train = [r for r in rows if "reward" in r]
  assert [r["step"] for r in train] == [1, 2, 3]
  want = {"reward", "reward_accuracy", "reward_format", "pass_rate", "all_equal_groups", "response_len_mean",
          "response_len_max", "clip_frac", "kl_ref", "entropy", "logp_gap", "load_imbalance", "time_sample_s",
          "time_score_s", "time_update_s", "loss", "grad_norm", "lr"}  # fmt: skip
  assert want <= set(train[-1]), want - set(train[-1])
  evals = [r for r in rows if "eval_pass@1" in r]
  assert [r["step"] for r in evals] == [2, 3]  # every grpo.eval_every steps and at the end


def test_rerun_skips_finished_stages(quick):
  _, res = quick
  assert res["again"]["rc"] == 0
  for stage in ("base", "eval_base", "rl", "eval_final"):
    assert f"[{stage}] done already" in res["again"]["out"]


def test_readme_grpo_loop_runs(quick):
  _, res = quick
  lines = [line for line in res["readme"].splitlines() if " reward " in line]
  assert len(lines) == 2 and lines[0].startswith("0 reward")


def test_eval_cli_writes_the_protocol_keys(quick):
  out, res = quick
  assert res["eval"]["rc"] == 0
  e = json.load(open(os.path.join(out, "eval.json")))
  assert {"pass@1", "cons@k", "k", "format_rate", "mean_response_tokens", "task", "pass@1_lenient"} <= set(e)
  assert e["k"] == 2 and e["problems"] == 3 and e["task"] == "chain"
