"""Run outputs: metrics.jsonl, TensorBoard events, a progress bar, and plots.

Run directories may be local or URLs (gs://bucket/run on Cloud TPU VMs, no FUSE mount needed): every file
in them is read and written through etils.epath, the path layer Orbax uses for the checkpoints."""

from __future__ import annotations

import io
import json
import math
import os

from etils import epath
from tqdm import tqdm


def is_url(path: str | os.PathLike) -> bool:
  """gs://, s3://, ...: a path no local file call (open, os.path.abspath) may touch."""
  return "://" in os.fspath(path)


def run_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath.Path: a URL as it is (os.path.abspath would turn gs://b/r into <cwd>/gs:/b/r), a local
  path made absolute."""
  s = os.fspath(path)
  return epath.Path(s if is_url(s) else os.path.abspath(s))


class MetricsWriter:
  """Writes one JSON object per logged step (process 0 only) and mirrors scalars to TensorBoard."""

  def __init__(self, run_dir: str, *, total_steps: int, start_step: int = 0, enabled: bool = True, desc: str = "train"):
    self.enabled = enabled
    self.path = run_path(run_dir) / "metrics.jsonl"
    self.tb = None
    self.text = None  # a URL's metrics.jsonl as written so far: object stores cannot append, so each write rewrites it
    if enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      _truncate_after(self.path, start_step)
      if is_url(self.path):
        self.text = self.path.read_text() if self.path.exists() else ""
      self.tb = _tensorboard(self.path.parent / "tb")
    self.bar = tqdm(
      total=total_steps, initial=start_step, desc=desc, disable=not enabled, dynamic_ncols=True, mininterval=1.0
    )

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _num(v) for k, v in metrics.items()}}
    line = json.dumps(row) + "\n"
    if self.text is None:
      with self.path.open("a") as f:
        f.write(line)
    else:
      self.text += line
      self.path.write_text(self.text)
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


def _tensorboard(directory: epath.Path):
  """A tensorboardX SummaryWriter on `directory`, None without tensorboardX (optional: metrics.jsonl is the
  record). A URL's event files go through epath too (tensorboardX alone knows only s3 and, with
  google-cloud-storage and its credentials, gs)."""
  try:
    from tensorboardX import SummaryWriter, record_writer
  except ImportError:
    return None
  if is_url(directory):
    record_writer.register_writer_factory(os.fspath(directory).split("://")[0], _EpathEventsFactory())
  return SummaryWriter(os.fspath(directory), flush_secs=10 if not is_url(directory) else 60)


class _EpathEventsFactory:
  """tensorboardX writer factory for URL directories: an event file is buffered in memory and rewritten whole
  at each flush (objects cannot be appended to), as tensorboardX's own GCS writer does."""

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)

  def open(self, path: str):
    return _EpathEventsFile(path)


class _EpathEventsFile:
  def __init__(self, path: str):
    self.path, self.buffer = epath.Path(path), io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    self.path.write_bytes(self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


def _truncate_after(path: epath.Path, step: int) -> None:
  """A run (re)starting at `step` drops the rows logged past it (after its newest checkpoint, before a crash):
  the resumed run logs those steps again, so metrics.jsonl never holds a step twice."""
  if not path.exists():
    return
  lines = path.read_text().splitlines(keepends=True)
  keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
  if len(keep) != len(lines):
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text("".join(keep))
    tmp.replace(path)


def _num(v):
  try:
    f = float(v)
  except (TypeError, ValueError):
    return v
  return int(f) if f.is_integer() and abs(f) < 2**53 and not isinstance(v, float) else f


def read_metrics(run_dir: str) -> list[dict]:
  path = run_path(run_dir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
  out = run_path(run_dir) / "plots" / "metrics.png"
  out.parent.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()  # matplotlib writes local files only: render here, then write through epath
  fig.savefig(buf, format="png", dpi=90)
  plt.close(fig)
  out.write_bytes(buf.getvalue())
  return os.fspath(out)
