"""Pipelines: a YAML list of stages run in order, each in its own subdirectory of the run dir, each consuming
an earlier stage's output by name (its checkpoints, its dataset, its reward model). A stage whose output
already exists is skipped (a training stage that reached its last step, an eval whose JSON is written, a
rejection-sampling stage whose stats.json is written, an export whose config.json is), so rerunning a
pipeline resumes it.

    stages:
      - {name: base, command: pretrain, config: pretrain_r1zero_tiny}
      - {name: eval_base, command: eval, checkpoint: base}
      - {name: rl, command: grpo, config: grpo_r1zero_tiny, init: base}
      - {name: eval_final, command: eval, checkpoint: rl}
    report: {base: eval_base, final: eval_final}

Commands: the training stages pretrain, extend, sft, distill, train-rm and grpo (a run config plus `init`;
sft / distill read `data`, a rejection-sample stage's kept.jsonl, train-rm its pairs.jsonl; distill may name a
`teacher`, grpo a `reward_model`), eval (`checkpoint`, `eval:` options), rejection-sample (`checkpoint`,
`sample:` options, an optional `judge`) and export (`checkpoint` -> a Hugging Face directory).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from rl_jax.config import ConfigError, from_dict, load_run_config, read_yaml
from rl_jax.models.config import config_path

TRAINING = ("pretrain", "extend", "sft", "distill", "train-rm", "grpo")
COMMANDS = (*TRAINING, "eval", "rejection-sample", "export")


@dataclass(frozen=True)
class EvalSpec:
  task: str | None = None  # default: the task the checkpoint was trained on
  num_problems: int = 100
  k: int = 4
  seed: int = 0
  temperature: float = 0.6
  top_p: float = 0.95
  max_new_tokens: int | None = None  # default: the checkpoint's grpo.max_new_tokens


@dataclass(frozen=True)
class Stage:
  name: str
  command: Literal["pretrain", "extend", "sft", "distill", "train-rm", "grpo", "eval", "rejection-sample", "export"]
  config: str | None = None  # training stages: a run config (path or shipped name)
  init: str | None = None  # an earlier stage's name (its checkpoints) or a checkpoint path
  checkpoint: str | None = None  # eval / rejection-sample / export: an earlier stage's name or a checkpoint path
  data: str | None = None  # sft / distill / train-rm: a rejection-sample stage's name, or a dataset path
  teacher: str | None = None  # distill: the teacher (a stage name or a checkpoint path) for logit distillation
  reward_model: str | None = None  # grpo: a train-rm stage (or checkpoint) scoring the "rm" reward component
  judge: str | None = None  # rejection-sample: a checkpoint prompted as a generative judge (filters samples)
  tokenizer: str | None = None  # pretrain: use this stage's (or checkpoint's) tokenizer, e.g. a student's teacher's
  overrides: list[str] = field(default_factory=list)  # key.path=value for the stage's run config
  eval: EvalSpec = field(default_factory=EvalSpec)
  sample: dict[str, Any] = field(default_factory=dict)  # rejection-sample: rl_jax.rejection.RejectionSpec fields

  def validate(self) -> None:
    if self.command in TRAINING and not self.config:
      raise ConfigError(f"stage '{self.name}': a {self.command} stage needs a config")
    if self.command not in TRAINING and not self.checkpoint:
      raise ConfigError(f"stage '{self.name}': a {self.command} stage needs a checkpoint (a stage name or a path)")
    if self.command in ("sft", "train-rm") and not self.data:
      raise ConfigError(f"stage '{self.name}': a {self.command} stage needs data (a rejection-sample stage or a path)")

  def refs(self) -> list[str]:
    """What the stage reads: earlier stages' names or paths."""
    refs = (self.init, self.checkpoint, self.data, self.teacher, self.reward_model, self.judge, self.tokenizer)
    return [r for r in refs if r]


@dataclass(frozen=True)
class Pipeline:
  stages: list[Stage]
  report: dict[str, str] = field(default_factory=dict)  # label -> eval stage, for summary.json / report.md

  def validate(self) -> None:
    names = [s.name for s in self.stages]
    if len(set(names)) != len(names):
      raise ConfigError(f"pipeline stage names must be unique, got {names}")
    for s in self.stages:
      for ref in s.refs():
        if ref not in names[: names.index(s.name)] and not os.path.exists(ref):
          raise ConfigError(f"stage '{s.name}': '{ref}' is neither an earlier stage nor an existing path")
    for label, name in self.report.items():
      if name not in names:
        raise ConfigError(f"pipeline report '{label}': no stage named '{name}'")


def load(path: str) -> Pipeline:
  return from_dict(Pipeline, read_yaml(config_path(path, "run")))


def _checkpoints(run_dir: str, ref: str) -> str:
  """A stage name -> its checkpoints directory; a path stays as it is."""
  stage_dir = os.path.join(run_dir, ref, "checkpoints")
  return stage_dir if os.path.isdir(stage_dir) else os.path.abspath(ref)


def _dataset(run_dir: str, ref: str, file: str) -> str:
  """A rejection-sample stage's name -> its `file` (kept.jsonl, pairs.jsonl); a path stays as it is."""
  path = os.path.join(run_dir, ref, file)
  return path if os.path.exists(path) else os.path.abspath(ref)


def run_stage(stage: Stage, run_dir: str, log=print) -> dict[str, Any] | None:
  """Runs one stage (or skips it when its output exists); an eval stage returns its result."""
  if stage.command == "eval":
    return _eval(stage, run_dir, log)
  if stage.command == "rejection-sample":
    return _rejection_sample(stage, run_dir, log)
  if stage.command == "export":
    return _export(stage, run_dir, log)
  out_dir = os.path.join(run_dir, stage.name)
  run = load_run_config(stage.config, [*_wiring(stage, run_dir), *stage.overrides, f"run_dir={out_dir}"])
  if _finished(out_dir, run.train.steps):
    log(f"[{stage.name}] done already: {out_dir}")
    return None
  log(f"[{stage.name}] {stage.command} -> {out_dir}")
  _trainer(stage.command)(run, stage=stage.command)
  return None


def _wiring(stage: Stage, run_dir: str) -> list[str]:
  """The run-config overrides that connect a training stage to the stages it reads."""
  out = []
  if stage.init:
    out.append(f"init={_checkpoints(run_dir, stage.init)}")
  if stage.data:
    out.append(
      f"data.source={_dataset(run_dir, stage.data, 'pairs.jsonl' if stage.command == 'train-rm' else 'kept.jsonl')}"
    )
  if stage.teacher:
    out.append(f"distill.teacher={_checkpoints(run_dir, stage.teacher)}")
  if stage.reward_model:
    out.append(f"grpo.reward_model={_checkpoints(run_dir, stage.reward_model)}")
  if stage.tokenizer:
    out.append(f"data.tokenizer={os.path.join(_checkpoints(run_dir, stage.tokenizer), 'tokenizer')}")
  return out


def _trainer(command: str):
  """The `train(run, stage=...)` function of a training command."""
  if command == "grpo":
    from rl_jax.train import rl_loop as mod
  elif command == "sft":
    from rl_jax.train import sft as mod
  elif command == "distill":
    from rl_jax.train import distill as mod
  elif command == "train-rm":
    from rl_jax.train import rm as mod
  else:
    from rl_jax.train import loop as mod
  return mod.train


def _eval(stage: Stage, run_dir: str, log) -> dict[str, Any]:
  out = os.path.join(run_dir, stage.name + ".json")
  if os.path.exists(out):
    log(f"[{stage.name}] done already: {out}")
    with open(out) as f:
      return json.load(f)
  from rl_jax import evaluate

  res = evaluate.run_eval(_checkpoints(run_dir, stage.checkpoint), **vars(stage.eval))
  with open(out, "w") as f:
    json.dump(res, f, indent=2)
  log(
    f"[{stage.name}] pass@1 {res['pass@1']:.3f} (lenient {res['pass@1_lenient']:.3f}), format {res['format_rate']:.3f}"
  )
  return res


def _rejection_sample(stage: Stage, run_dir: str, log) -> None:
  out_dir = os.path.join(run_dir, stage.name)
  if os.path.exists(os.path.join(out_dir, "stats.json")):
    log(f"[{stage.name}] done already: {out_dir}")
    return None
  from rl_jax import rejection

  spec = from_dict(rejection.RejectionSpec, stage.sample)
  judge = _checkpoints(run_dir, stage.judge) if stage.judge else None
  log(f"[{stage.name}] rejection-sample -> {out_dir}")
  rejection.run(_checkpoints(run_dir, stage.checkpoint), spec, out_dir, judge_checkpoint=judge, log=log)
  return None


def _export(stage: Stage, run_dir: str, log) -> None:
  out_dir = os.path.join(run_dir, stage.name)
  if os.path.exists(os.path.join(out_dir, "config.json")):
    log(f"[{stage.name}] done already: {out_dir}")
    return None
  from rl_jax import checkpoint as ckpt
  from rl_jax import models

  src = _checkpoints(run_dir, stage.checkpoint)
  models.save_hf(ckpt.load_model(src), out_dir, tokenizer_dir=ckpt.tokenizer_dir(src))
  log(f"[{stage.name}] exported {src} -> {out_dir}")
  return None


def _finished(out_dir: str, steps: int) -> bool:
  from rl_jax import checkpoint as ckpt

  d = os.path.join(out_dir, "checkpoints")
  if not os.path.exists(os.path.join(d, "model_config.json")):
    return False
  try:
    return ckpt.latest_step(d) >= steps
  except ckpt.CheckpointNotFound:
    return False


def run(path: str, run_dir: str, log=print) -> dict[str, Any]:
  """Runs every stage of the pipeline at `path`; returns {"evals": {stage: result}, "seconds": {stage: s}}."""
  pipe = load(path)
  run_dir = os.path.abspath(run_dir)
  os.makedirs(run_dir, exist_ok=True)
  evals, seconds = {}, {}
  for stage in pipe.stages:
    t0 = time.perf_counter()
    res = run_stage(stage, run_dir, log)
    seconds[stage.name] = round(time.perf_counter() - t0, 1)
    if res is not None:
      evals[stage.name] = res
  return {"pipeline": pipe, "evals": evals, "seconds": seconds, "run_dir": run_dir}


# ------------------------------------------------------------------ report
def write_report(result: dict[str, Any]) -> dict[str, Any]:
  """<run_dir>/summary.json (each report label's eval and its checkpoint), report.md (a row per eval stage)
  and plots/<stage>_rl.png for each GRPO stage (reward, held-out pass@1, response length against RL step:
  R1's figures 2 and 3)."""
  pipe, evals, run_dir = result["pipeline"], result["evals"], result["run_dir"]
  summary: dict[str, Any] = {"run_dir": run_dir, "seconds": result["seconds"]}
  for label, name in pipe.report.items():
    summary[label], summary[f"{label}_checkpoint"] = evals[name], evals[name]["checkpoint"]
    summary.setdefault("task", evals[name]["task"])
  with open(os.path.join(run_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  plots = [_plot_evals(run_dir, evals)]
  plots += [_plot_rl(run_dir, s.name, _start_eval(pipe, evals, s)) for s in pipe.stages if s.command == "grpo"]
  lines = ["# Pipeline report", "", f"Run directory: `{run_dir}`", ""]
  lines += ["| stage | checkpoint step | pass@1 | pass@1 (lenient) | cons@k | format rate | response tokens |"]
  lines += ["|---|---|---|---|---|---|---|"]
  for name, e in evals.items():
    lines.append(
      f"| {name} | {e.get('step')} | {e['pass@1']:.3f} | {e['pass@1_lenient']:.3f} | {e['cons@k']:.3f} | "
      f"{e['format_rate']:.3f} | {e['mean_response_tokens']:.1f} |"
    )
  lines += ["", "Stage wall time (s): " + ", ".join(f"{k} {v}" for k, v in result["seconds"].items()), ""]
  lines += [f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in plots if p]
  for name, e in evals.items():
    lines += ["", f"## {name}: sample completions", ""]
    lines += [f"- `{x['prompt']}` -> `{x['completion']}`" for x in e.get("examples", [])]
  with open(os.path.join(run_dir, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return summary


def _plot_evals(run_dir: str, evals: dict[str, dict]) -> str | None:
  """Held-out pass@1, lenient pass@1 and format rate of every eval stage, side by side."""
  if len(evals) < 2:
    return None
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  keys = (("pass@1", "pass@1"), ("pass@1_lenient", "pass@1 (lenient)"), ("format_rate", "format rate"))
  x = np.arange(len(evals))
  fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(evals) + 2), 3.4))
  for i, (k, label) in enumerate(keys):
    ax.bar(x + (i - 1) * 0.27, [e[k] for e in evals.values()], 0.27, label=label)
  ax.set_xticks(x, list(evals), rotation=30, ha="right", fontsize=8)
  ax.set(ylim=(0, 1.05), title="held-out evaluation by stage")
  ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.join(run_dir, "plots"), exist_ok=True)
  out = os.path.join(run_dir, "plots", "stages.png")
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def _start_eval(pipe: Pipeline, evals: dict, stage: Stage) -> dict | None:
  """The eval of the checkpoint a GRPO stage started from (its step-0 point), if the pipeline has one."""
  for s in pipe.stages:
    if s.command == "eval" and s.checkpoint == stage.init and s.name in evals:
      return evals[s.name]
  return None


def _plot_rl(run_dir: str, stage: str, start: dict | None = None) -> str | None:
  from rl_jax import report

  rows = report.read_metrics(os.path.join(run_dir, stage))
  held_out = ("pass@1", "pass@1_lenient", "format_rate")
  if start is not None:  # the starting checkpoint's held-out eval, at RL step 0
    rows = [{"step": 0, **{f"eval_{k}": start[k] for k in held_out}}, *rows]
  panels = [
    ("reward", "reward (train)"),
    ("eval_pass@1", "held-out (temperature 0.6)"),
    ("response_len_mean", "response tokens"),
  ]
  panels = [(k, t) for k, t in panels if any(k in r for r in rows)]
  if not panels:
    return None
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
  for ax, (k, title) in zip(axes[0], panels):
    for key in [f"eval_{h}" for h in held_out] if k.startswith("eval") else [k]:
      pts = [(r["step"], r[key]) for r in rows if key in r]
      ax.plot(
        [p[0] for p in pts], [p[1] for p in pts], marker="o" if k.startswith("eval") else None, ms=3, label=key[5:]
      )
    if k.startswith("eval"):
      ax.legend(fontsize=8)
    ax.set(title=title, xlabel="RL step")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.join(run_dir, "plots"), exist_ok=True)
  out = os.path.join(run_dir, "plots", f"{stage}_rl.png")
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out
