"""Run directories anywhere: a pretraining run into gs://bucket/... (an in-memory fake bucket, offline) writes
metrics.jsonl, model_config.json, the tokenizer, data_state/, plots and TensorBoard events through etils.epath,
dies, and its rerun resumes (truncating metrics.jsonl, reading the data position back from the bucket) to the
same metrics and parameters as an uninterrupted local run.

The fake bucket is fsspec's memory filesystem registered for gs:// (epath's fsspec backend, the one it uses
for gs:// without TensorFlow), refusing appends as GCS does. Orbax writes arrays with TensorStore's own GCS
driver, which no offline fake reaches: here Orbax's manager is pointed at a local mirror of the bucket path
(ORBAX/), so everything but the Orbax step directories goes through the fake bucket; the test checks that the
mirror holds only those.

Run as a script (python tests/test_epath.py OUT), this file is the child process the test starts.
"""

import json
import os
import sys

import numpy as np
import pytest

N, DIE_AT = 6, 4  # steps; the first run dies asking for batch DIE_AT (checkpoint at 2, rows 1..3 logged)
TINY = [
  "model.num_hidden_layers=2",
  "train.batch_size=4",
  "train.seq_len=32",
  "train.log_every=1",
  f"train.steps={N}",
  "optimizer.warmup_steps=2",
  "checkpoint.every=2",
]
BUCKET = "gs://bucket"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def res(tmp_path_factory):
  from tests._subproc import run_python

  out = tmp_path_factory.mktemp("epath")
  run_python([os.path.abspath(__file__), str(out)], timeout=300)
  with open(out / "results.json") as f:
    return str(out), json.load(f)


def _ok(r):
  assert r["rc"] == 0, r["err"][-4000:]


def test_run_files_go_to_the_bucket(res):
  out, r = res
  files = r["bucket_files"]
  for f in ("model_config.json", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"):
    assert f"/bucket/A/checkpoints/{f}" in files, sorted(files)
  assert "/bucket/A/plots/metrics.png" in files
  assert any(f.startswith("/bucket/A/tb/events.out.tfevents") for f in files), sorted(files)
  # checkpoint.keep=2: the data positions of steps 4 and 6 remain; 2's was dropped with its checkpoint
  assert sorted(f for f in files if "/data_state/" in f) == [
    f"/bucket/A/data_state/step_{s}_proc_0.json" for s in (4, 6)
  ]
  assert r["png_magic"] and r["tb_bytes"] > 0
  # Orbax's mirror holds its step directories and nothing of ours; nothing landed in the working dir
  assert not [f for f in r["orbax_files"] if not f.split("/")[0].isdigit()], r["orbax_files"]
  assert r["cwd_files"] == []


def test_rerun_from_the_bucket_equals_an_uninterrupted_local_run(res):
  out, r = res
  _ok(r["a1"]), _ok(r["a2"]), _ok(r["b"])
  assert r["a1"]["died"]
  assert r["a1_steps"] == [1, 2, 3]  # step 3 was logged, then the process died
  a, b = r["a_metrics"], r["b_metrics"]
  assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, N + 1))  # row 3 truncated, logged again
  for key in ("loss", "ce", "grad_norm", "param_norm", "lr"):
    assert [m[key] for m in a] == [m[key] for m in b], key
  pa, pb = np.load(f"{out}/A.npz"), np.load(f"{out}/B.npz")
  assert sorted(pa.files) == sorted(pb.files) and len(pa.files) > 20
  for k in pa.files:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_run_path_leaves_urls_alone(tmp_path, monkeypatch):
  from rl_jax.report import run_path

  monkeypatch.chdir(tmp_path)
  assert os.fspath(run_path("gs://bucket/run")) == "gs://bucket/run"
  assert os.fspath(run_path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
  assert os.fspath(run_path("runs/x")) == os.path.join(str(tmp_path), "runs", "x")


# ------------------------------------------------------------------------------------------ child process
def _fake_gcs():
  """gs:// -> an in-memory fsspec filesystem that, like GCS, has no append."""
  import fsspec
  from fsspec.implementations.memory import MemoryFileSystem

  class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store, pseudo_dirs = {}, [""]

    @classmethod
    def _strip_protocol(cls, path):
      path = fsspec.utils.stringify_path(path)
      return super()._strip_protocol(path.removeprefix("gs://").removeprefix("gcs://"))

    def _open(self, path, mode="rb", **kw):
      if "a" in mode or "+" in mode:
        raise NotImplementedError(f"{path}: mode {mode}: GCS objects cannot be appended to")
      return super()._open(path, mode, **kw)

  for p in FakeGCS.protocol:
    fsspec.register_implementation(p, FakeGCS, clobber=True)
  return FakeGCS


def _orbax_to_local(root: str) -> None:
  """Orbax managers of gs://X get <root>/X instead (TensorStore's GCS driver needs a real bucket)."""
  import orbax.checkpoint as ocp

  real = ocp.CheckpointManager

  def manager(directory, *a, **kw):
    d = os.fspath(directory)
    return real(os.path.join(root, d.removeprefix("gs://")) if d.startswith("gs://") else directory, *a, **kw)

  ocp.CheckpointManager = manager


class _Died(Exception):
  pass


def _dying(make, k):
  """pipeline.make_iterator whose iterator 'dies' when asked for batch k (steps 1..k-1 were dispatched)."""

  class Dying:
    def __init__(self, it):
      self.it, self.left = it, k - 1

    def __iter__(self):
      return self

    def __next__(self):
      if self.left == 0:
        raise _Died
      self.left -= 1
      return next(self.it)

    def get_state(self):
      return self.it.get_state()

    def set_state(self, state):
      self.it.set_state(state)

  return lambda *a, **kw: Dying(make(*a, **kw))


def _cli(*args):
  import contextlib
  import io

  from rl_jax import cli

  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    try:
      return {"rc": cli.main([str(a) for a in args]), "err": err.getvalue()}
    except _Died:
      return {"rc": 0, "died": True, "err": err.getvalue()}


def _params(run_dir: str, dst: str) -> None:
  import jax
  from flax import nnx

  from rl_jax import checkpoint

  m = checkpoint.load_model(f"{run_dir}/checkpoints")
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(m).to_pure_dict())
  np.savez(dst, **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})


def _child(out: str) -> None:
  import itertools

  from etils import epath

  fs = _fake_gcs()
  _orbax_to_local(f"{out}/orbax")
  os.makedirs(f"{out}/cwd")
  os.chdir(f"{out}/cwd")  # a gs:// path mangled into a local one would land here

  from rl_jax import data, report
  from rl_jax.data import pipeline

  data.save(data.train_bpe(itertools.islice(data.documents(0), 2000), 512), f"{BUCKET}/tok")  # read back from there
  cmd = ["pretrain", "--config", f"{REPO}/configs/pretrain_tiny.yaml", *TINY, f"data.tokenizer={BUCKET}/tok"]
  r = {}
  make, pipeline.make_iterator = pipeline.make_iterator, _dying(pipeline.make_iterator, DIE_AT)
  r["a1"] = _cli(*cmd, "--run-dir", f"{BUCKET}/A")
  pipeline.make_iterator = make
  r["a1_steps"] = [m["step"] for m in report.read_metrics(f"{BUCKET}/A")]
  r["a2"] = _cli(*cmd, "--run-dir", f"{BUCKET}/A")
  r["b"] = _cli(*cmd, "--run-dir", f"{out}/B")
  r["a_metrics"], r["b_metrics"] = report.read_metrics(f"{BUCKET}/A"), report.read_metrics(f"{out}/B")
  if r["a2"]["rc"] == 0:  # else the test reports a2's error
    _params(f"{BUCKET}/A", f"{out}/A.npz")
    _params(f"{out}/B", f"{out}/B.npz")
  r["bucket_files"] = sorted(fs.store)
  png = epath.Path(f"{BUCKET}/A/plots/metrics.png")
  r["png_magic"] = png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  tb = [f for f in fs.store if f.startswith("/bucket/A/tb/")]
  r["tb_bytes"] = sum(len(epath.Path("gs:/" + f).read_bytes()) for f in tb)
  orbax = f"{out}/orbax/bucket/A/checkpoints"
  r["orbax_files"] = sorted(os.path.relpath(os.path.join(d, f), orbax) for d, _, fs_ in os.walk(orbax) for f in fs_)
  r["cwd_files"] = sorted(os.listdir("."))
  with open(f"{out}/results.json", "w") as f:
    json.dump(r, f)


if __name__ == "__main__":
  sys.path.insert(0, REPO)
  _child(sys.argv[1])
