"""Errors people can act on: each bad input to the real `rl-jax` CLI ends with one `error:` line on stderr that
names the culprit, a non-zero exit and no traceback; `--debug` (or RL_JAX_DEBUG=1) shows the traceback.

Cases that fail before jax sets up devices run in-process; mesh and batch errors (a device count) and corrupt
checkpoints (TensorStore threads that outlive the failed restore print to the real stderr) run in a child."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys

import pytest

from rl_jax import cli
from rl_jax.data import procedural
from rl_jax.data import tokenizer as toks
from tests._subproc import REPO, child_env

SMALL = ["train.steps=2", "train.batch_size=8", "train.seq_len=32", "checkpoint.async_save=false"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A 512-token tokenizer, a tiny checkpoint with it, a teacher of another vocabulary, a copy of the checkpoint
  with its newest step truncated, and malformed JSONL files."""
  root = tmp_path_factory.mktemp("errors")
  tok = toks.train_bpe(itertools.islice(procedural.documents(0), 200), vocab_size=512)
  toks.save(tok, str(root / "tok"))
  f = {"root": root, "tok": str(root / "tok"), "ckpt": str(root / "ckpt"), "teacher": str(root / "teacher")}
  assert cli.main(["init", "--model", "tiny-moe", "--out", f["ckpt"], "--tokenizer", f["tok"]]) == 0
  teacher = ["init", "--model", "tiny-moe", "--set", "vocab_size=640", "--out", f["teacher"], "--tokenizer", f["tok"]]
  assert cli.main(teacher) == 0
  f["corrupt"] = str(root / "corrupt")
  shutil.copytree(f["ckpt"], f["corrupt"])
  for dirpath, _, names in os.walk(os.path.join(f["corrupt"], "0", "params")):
    for name in names:
      if name == "manifest.ocdbt":  # truncated: the step directory exists, its arrays cannot be read
        open(os.path.join(dirpath, name), "w").close()
  f["bad_text"] = str(root / "bad_text.jsonl")
  with open(f["bad_text"], "w") as fh:
    fh.write('{"text": "12+7=19"}\n{"text": "3*4=12"}\n{"text": broken\n')
  f["bad_sft"] = str(root / "bad_sft.jsonl")
  with open(f["bad_sft"], "w") as fh:
    fh.write('{"prompt": "1+1", "response": "2"}\n{"prompt": "2+2", "response": "4"\n')
  f["good_sft"] = str(root / "good_sft.jsonl")
  with open(f["good_sft"], "w") as fh:
    fh.write('{"prompt": "1+1", "response": "2"}\n{"prompt": "2+2", "response": "4"}\n')
  return f


def _run_dir(f, name):
  return ["--run-dir", str(f["root"] / "runs" / name)]


# (id, argv(files) -> list, what the error line must name(files) -> list)
IN_PROCESS = [
  ("bad-key", lambda f: ["pretrain", *SMALL, "train.stesp=5"], lambda f: ["'train.stesp'", "'train.steps'"]),
  ("bad-type", lambda f: ["pretrain", *SMALL, "train.steps=abc"], lambda f: ["'train.steps'", "'abc'"]),
  ("out-of-range", lambda f: ["pretrain", *SMALL, "train.seq_len=0"], lambda f: ["'train.seq_len'", "> 0"]),
  ("grad-accum", lambda f: ["pretrain", *SMALL, "train.grad_accum=3"], lambda f: ["'train.grad_accum'", "(8)"]),
  ("unknown-preset", lambda f: ["pretrain", *SMALL, "model=tiny-mo"], lambda f: ["'tiny-mo'", "tiny-moe"]),
  (
    "missing-config",
    lambda f: ["pretrain", "--config", f"{f['root']}/nope.yaml"],
    lambda f: [f"{f['root']}/nope.yaml"],
  ),
  (
    "missing-init",
    lambda f: ["pretrain", *_run_dir(f, "init"), "--init", f"{f['root']}/no_ckpt", *SMALL],
    lambda f: [f"{f['root']}/no_ckpt"],
  ),
  ("eval-missing", lambda f: ["eval", "--checkpoint", f"{f['root']}/no_ckpt"], lambda f: [f"{f['root']}/no_ckpt"]),
  (
    "export-missing",
    lambda f: ["export", "--checkpoint", f"{f['root']}/no_ckpt", "--hf-out", f"{f['root']}/hf"],
    lambda f: [f"{f['root']}/no_ckpt"],
  ),
  (
    "pretrain-jsonl",
    lambda f: ["pretrain", *_run_dir(f, "pretrain_jsonl"), *SMALL, f"data.source={f['bad_text']}"],
    lambda f: [f"{f['bad_text']}:3:"],
  ),
  (
    "sft-jsonl",
    lambda f: ["sft", *_run_dir(f, "sft_jsonl"), "--init", f["ckpt"], *SMALL, f"data.source={f['bad_sft']}"],
    lambda f: [f"{f['bad_sft']}:2:"],
  ),
  (
    "vocab-mismatch",
    lambda f: ["pretrain", *_run_dir(f, "vocab"), *SMALL, f"data.tokenizer={f['tok']}", "model.vocab_size=300"],
    lambda f: [f["tok"], "512", "300"],
  ),
  (
    "distill-vocab",
    lambda f: [
      "distill",
      *_run_dir(f, "distill"),
      "--init",
      f["ckpt"],
      "--teacher",
      f["teacher"],
      *SMALL,
      f"data.source={f['good_sft']}",
    ],  # fmt: skip
    lambda f: ["teacher vocabulary 640", "student vocabulary 512"],
  ),
]

# (id, devices, argv(files), names(files)): a fresh process with its own device count and its own stderr
SUBPROCESS = [
  ("mesh-not-dividing", 8, lambda f: ["pretrain", *_run_dir(f, "mesh"), *SMALL, "mesh.data=2", "mesh.fsdp=3"],
   lambda f: ["'fsdp'=3", "8 devices"]),
  ("batch-not-dividing", 8, lambda f: ["pretrain", *_run_dir(f, "batch"), *SMALL, "train.batch_size=6", "mesh.data=8"],
   lambda f: ["train.batch_size", "= 6", "8 batch shards"]),
  ("eval-corrupt", 1, lambda f: ["eval", "--checkpoint", f["corrupt"], "--task", "chain"],
   lambda f: [os.path.join(f["corrupt"], "0"), "unreadable"]),
  ("export-corrupt", 1, lambda f: ["export", "--checkpoint", f["corrupt"], "--hf-out", f"{f['root']}/hf_corrupt"],
   lambda f: [os.path.join(f["corrupt"], "0"), "unreadable"]),
]  # fmt: skip


def assert_one_line_error(rc, err, names):
  assert rc != 0, err
  assert "Traceback" not in err, err
  lines = err.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  for name in names:
    assert name in lines[0], f"{name!r} not named in: {lines[0]}"


@pytest.mark.parametrize("case", IN_PROCESS, ids=[c[0] for c in IN_PROCESS])
def test_one_line_error(case, files, capsys, monkeypatch):
  monkeypatch.delenv("RL_JAX_DEBUG", raising=False)
  _, argv, names = case
  rc = cli.main(argv(files))
  assert_one_line_error(rc, capsys.readouterr().err, names(files))
  assert not os.path.exists(files["root"] / "no_ckpt")  # looking for a checkpoint creates nothing


def _cli_child(argv, n_devices, extra_env=None):
  env = {k: v for k, v in child_env(n_devices).items() if k != "RL_JAX_DEBUG"}
  cmd = [sys.executable, "-m", "rl_jax.cli", *argv]
  return subprocess.run(cmd, cwd=REPO, env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", SUBPROCESS, ids=[c[0] for c in SUBPROCESS])
def test_one_line_error_in_a_child(case, files):
  _, n_devices, argv, names = case
  proc = _cli_child(argv(files), n_devices)
  assert_one_line_error(proc.returncode, proc.stderr, names(files))


def test_debug_shows_the_traceback(files, capsys, monkeypatch):
  monkeypatch.delenv("RL_JAX_DEBUG", raising=False)
  missing = f"{files['root']}/no_ckpt"
  for argv in (
    ["--debug", "export", "--checkpoint", missing, "--hf-out", "x"],
    ["pretrain", "train.stesp=5", "--debug"],
  ):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "error: " not in err, err
  monkeypatch.setenv("RL_JAX_DEBUG", "1")
  assert cli.main(["pretrain", "train.steps=abc"]) == 2
  err = capsys.readouterr().err
  assert "Traceback" in err and "'train.steps'" in err.splitlines()[-1], err


def test_debug_env_var_in_a_child(files):
  """The traceback of a corrupt checkpoint, then nothing but it: the real process's whole stderr."""
  proc = _cli_child(["export", "--checkpoint", files["corrupt"], "--hf-out", "unused"], 1, {"RL_JAX_DEBUG": "1"})
  assert proc.returncode == 2 and proc.stderr.startswith("Traceback"), proc.stderr
  assert "CheckpointUnreadable" in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr


def test_orphaned_tensorstore_callbacks_are_quiet(tmp_path, monkeypatch):
  """Reads a failed restore leaves in flight call back into orbax's closed event loop (an unraisable
  'Event loop is closed' each, racing with the error line): dropped once orbax is in use; others still shown."""
  from rl_jax import checkpoint

  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))

  class Raises:
    def __init__(self, message):
      self.message = message

    def __del__(self):
      raise RuntimeError(self.message)

  checkpoint.manager(str(tmp_path / "ckpt")).close()
  Raises("Event loop is closed")
  Raises("something else")
  assert seen == ["something else"]
