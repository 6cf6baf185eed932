"""Run outputs: metrics.jsonl, TensorBoard events, a progress bar, and plots."""

from __future__ import annotations

import json
import math
import os

from tqdm import tqdm


class MetricsWriter:
  """Writes one JSON object per logged step (process 0 only) and mirrors scalars to TensorBoard."""

  def __init__(self, run_dir: str, *, total_steps: int, start_step: int = 0, enabled: bool = True, desc: str = "train"):
    self.enabled = enabled
    self.path = os.path.join(run_dir, "metrics.jsonl")
    self.tb = None
    if enabled:
      os.makedirs(run_dir, exist_ok=True)
      _truncate_after(self.path, start_step)
      try:
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(run_dir, "tb"), flush_secs=10)
      except ImportError:  # TensorBoard is optional for a run; metrics.jsonl is the record
        self.tb = None
    self.bar = tqdm(
      total=total_steps, initial=start_step, desc=desc, disable=not enabled, dynamic_ncols=True, mininterval=1.0
    )

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _num(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
          self.tb.add_scalar(k, v, step)
    shown = {k: f"{row[k]:.4g}" for k in ("loss", "tokens_per_s", "lr") if k in row}
    self.bar.set_postfix(shown, refresh=False)

  def advance(self, n: int = 1) -> None:
    self.bar.update(n)

  def close(self) -> None:
    self.bar.close()
    if self.tb is not None:
      self.tb.close()


def _truncate_after(path: str, step: int) -> None:
  """A run (re)starting at `step` drops the rows logged past it (after its newest checkpoint, before a crash):
  the resumed run logs those steps again, so metrics.jsonl never holds a step twice."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
  if len(keep) != len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)


def _num(v):
  try:
    f = float(v)
  except (TypeError, ValueError):
    return v
  return int(f) if f.is_integer() and abs(f) < 2**53 and not isinstance(v, float) else f


def read_metrics(run_dir: str) -> list[dict]:
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_metrics(run_dir: str, keys=("loss", "ce", "mtp", "load_imbalance", "lr", "tokens_per_s")) -> str | None:
  """plots/metrics.png: one panel per metric against step."""
  rows = read_metrics(run_dir)
  keys = [k for k in keys if any(k in r for r in rows)]
  if not rows or not keys:
    return None
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
  for ax, k in zip(axes[0], keys):
    pts = [(r["step"], r[k]) for r in rows if k in r]
    ax.plot([p[0] for p in pts], [p[1] for p in pts])
    ax.set_title(k)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.join(run_dir, "plots"), exist_ok=True)
  out = os.path.join(run_dir, "plots", "metrics.png")
  fig.savefig(out, dpi=90)
  plt.close(fig)
  return out
