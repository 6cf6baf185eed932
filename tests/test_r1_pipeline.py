"""The R1 pipeline end to end, shortened: `rl-jax pipeline` over every stage of configs/pipelines/r1_tiny.yaml
(pretrain, YaRN extension, cold-start data and SFT, reasoning RL, rejection sampling with a judge, reward model,
SFT from the base, final RL with the reward model, traces, the student distilled and trained by GRPO, export) with
a few steps each; a rerun skips what is done; the exported student loads in transformers with our logits."""

import json
import os

import pytest

from tests._subproc import run_python

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def r1(tmp_path_factory):
  out = tmp_path_factory.mktemp("r1")
  run_python(["tests/_r1_pipeline_worker.py", str(out)], timeout=1200)
  with open(out / "results.json") as f:
    return str(out), json.load(f)


def test_every_stage_ran_and_reported(r1):
  out, res = r1
  assert res["first"]["rc"] == 0, res["first"]["out"][-3000:]
  run = os.path.join(out, "run")
  s = json.load(open(os.path.join(run, "summary.json")))
  labels = ("base", "cold_start", "reasoning_rl", "sft_from_base", "final", "student_base", "student_distilled",
            "student_rl")  # fmt: skip
  for label in labels:
    assert 0.0 <= s[label]["pass@1"] <= 1.0 and s[label]["k"] == 2 and s[label]["problems"] == 4, label
  assert s["student_distilled_checkpoint"].endswith(os.path.join("student_distilled", "checkpoints"))
  report = open(os.path.join(run, "report.md")).read()
  for stage in ("eval_base", "eval_cold_start", "eval_final", "eval_student_distilled", "eval_student_rl"):
    assert f"| {stage} |" in report, stage
  assert os.path.getsize(os.path.join(run, "plots", "stages.png")) > 1000
  for name in ("cold_start_data", "rejection", "traces"):
    stats = json.load(open(os.path.join(run, name, "stats.json")))
    kept = [json.loads(line) for line in open(os.path.join(run, name, "kept.jsonl"))]
    assert stats["kept"] == len(kept) <= stats["generated"], name


def test_stages_read_what_they_are_wired_to(r1):
  out, _ = r1
  run = os.path.join(out, "run")

  def run_config(stage):  # what the stage ran with, from its newest checkpoint's meta
    from rl_jax import checkpoint

    return checkpoint.read_meta(os.path.join(run, stage, "checkpoints"))["run_config"]

  assert run_config("cold_start")["data"]["source"] == os.path.join(run, "cold_start_data", "kept.jsonl")
  assert run_config("sft_from_base")["init"] == os.path.join(run, "extended", "checkpoints")
  assert run_config("reward_model")["data"]["source"] == os.path.join(run, "rejection", "pairs.jsonl")
  assert run_config("final_rl")["grpo"]["reward_model"] == os.path.join(run, "reward_model", "checkpoints")
  assert run_config("student_base")["data"]["tokenizer"] == os.path.join(run, "base", "checkpoints", "tokenizer")
  rows = [json.loads(line) for line in open(os.path.join(run, "final_rl", "metrics.jsonl"))]
  assert any("reward_rm" in r for r in rows)


def test_rerun_skips_every_finished_stage(r1):
  _, res = r1
  assert res["again"]["rc"] == 0
  for stage in ("base", "cold_start_data", "cold_start", "reward_model", "final_rl", "student_hf", "eval_final"):
    assert f"[{stage}] done already" in res["again"]["out"], stage


def test_exported_student_matches_ours_in_transformers(r1):
  _, res = r1
  e = res["export"]
  assert e["arch"] == "Qwen2ForCausalLM"
  assert e["logit_scale"] > 0.1 and e["max_abs_diff"] < 1e-4, e
