"""Pipelines: a YAML list of stages run in order, each in its own subdirectory of the run dir, each consuming
an earlier stage's checkpoint. A stage whose output already exists is skipped (a training stage that reached
its last step, an eval whose JSON is written), so rerunning a pipeline resumes it.

    stages:
      - {name: base, command: pretrain, config: pretrain_r1zero_tiny}
      - {name: eval_base, command: eval, checkpoint: base}
      - {name: rl, command: grpo, config: grpo_r1zero_tiny, init: base}
      - {name: eval_final, command: eval, checkpoint: rl}
    report: {base: eval_base, final: eval_final}
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from rl_jax.config import ConfigError, from_dict, load_run_config, read_yaml
from rl_jax.models.config import config_path

COMMANDS = ("pretrain", "extend", "grpo", "eval")


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
  command: Literal["pretrain", "extend", "grpo", "eval"]
  config: str | None = None  # training stages: a run config (path or shipped name)
  init: str | None = None  # an earlier stage's name (its checkpoints) or a checkpoint path
  checkpoint: str | None = None  # eval: an earlier stage's name or a checkpoint path
  overrides: list[str] = field(default_factory=list)  # key.path=value for the stage's run config
  eval: EvalSpec = field(default_factory=EvalSpec)

  def validate(self) -> None:
    if self.command != "eval" and not self.config:
      raise ConfigError(f"stage '{self.name}': a {self.command} stage needs a config")
    if self.command == "eval" and not self.checkpoint:
      raise ConfigError(f"stage '{self.name}': an eval stage needs a checkpoint (a stage name or a path)")


@dataclass(frozen=True)
class Pipeline:
  stages: list[Stage]
  report: dict[str, str] = field(default_factory=dict)  # label -> eval stage, for summary.json / report.md

  def validate(self) -> None:
    names = [s.name for s in self.stages]
    if len(set(names)) != len(names):
      raise ConfigError(f"pipeline stage names must be unique, got {names}")
    for s in self.stages:
      for ref in (s.init, s.checkpoint):
        if ref and ref not in names[: names.index(s.name)] and not os.path.isdir(ref):
          raise ConfigError(f"stage '{s.name}': '{ref}' is neither an earlier stage nor a checkpoint directory")
    for label, name in self.report.items():
      if name not in names:
        raise ConfigError(f"pipeline report '{label}': no stage named '{name}'")


def load(path: str) -> Pipeline:
  return from_dict(Pipeline, read_yaml(config_path(path, "run")))


def _checkpoints(run_dir: str, ref: str) -> str:
  """A stage name -> its checkpoints directory; a path stays as it is."""
  stage_dir = os.path.join(run_dir, ref, "checkpoints")
  return stage_dir if os.path.isdir(stage_dir) else os.path.abspath(ref)


def run_stage(stage: Stage, run_dir: str, log=print) -> dict[str, Any] | None:
  """Runs one stage (or skips it when its output exists); an eval stage returns its result."""
  out_dir = os.path.join(run_dir, stage.name)
  if stage.command == "eval":
    out = out_dir + ".json"
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
  overrides = [*stage.overrides, f"run_dir={out_dir}"]
  if stage.init:
    overrides.append(f"init={_checkpoints(run_dir, stage.init)}")
  run = load_run_config(stage.config, overrides)
  if _finished(out_dir, run.train.steps):
    log(f"[{stage.name}] done already: {out_dir}")
    return None
  log(f"[{stage.name}] {stage.command} -> {out_dir}")
  if stage.command == "grpo":
    from rl_jax.train import rl_loop

    rl_loop.train(run, stage=stage.command)
  else:
    from rl_jax.train import loop

    loop.train(run, stage=stage.command)
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
  plots = [_plot_rl(run_dir, s.name, _start_eval(pipe, evals, s)) for s in pipe.stages if s.command == "grpo"]
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
