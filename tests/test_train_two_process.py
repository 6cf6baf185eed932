"""Two processes (jax.distributed on CPU, 4 fake devices each) train on one 8-device mesh and write one
Orbax checkpoint together; the same run in ONE process (8 devices, same mesh, same global batch) is the
reference: losses, gradient norms and the saved parameters must agree. A plain process loads the checkpoint."""

import itertools
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

from tests._subproc import REPO, child_env, run_python

TIMEOUT_S = 240
COMPARED = ("loss", "ce", "mtp", "balance", "grad_norm", "param_norm", "load_imbalance")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _result(out: str) -> dict:
  return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def _metrics(run_dir: str) -> list[dict]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:  # process 0 writes the run's records
    return [json.loads(line) for line in f]


def _run_two_processes(tmp_path, tok: str, run_dir: str) -> list[dict]:
  port = _free_port()
  # Output to files, not pipes: a worker blocked on a full pipe would stall the other one in a collective.
  logs = [(open(tmp_path / f"worker{i}.out", "w+"), open(tmp_path / f"worker{i}.err", "w+")) for i in range(2)]
  procs = [
    subprocess.Popen(
      [sys.executable, "tests/_two_process_worker.py", run_dir, tok, str(port), str(i)],
      cwd=REPO,
      env=child_env(4),
      stdout=o,
      stderr=e,
      text=True,
    )
    for i, (o, e) in enumerate(logs)
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
  for o, e in logs:
    o.seek(0), e.seek(0)
    outs.append((o.read(), e.read()))
    o.close(), e.close()
  for i, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"worker {i} failed or timed out ({p.returncode}):\n{out[-2000:]}\n{err[-6000:]}"
  return [_result(out) for out, _ in outs]


def _params(ckpt_dir: str) -> dict:
  import jax
  from flax import nnx

  from rl_jax import checkpoint

  model = checkpoint.load_model(ckpt_dir)
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(model).to_pure_dict())[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def test_two_processes_match_one_process_and_save_one_checkpoint(tmp_path):
  import jax
  from flax import nnx

  from rl_jax import checkpoint, data, models
  from rl_jax.models.layers import RouterBias

  tok = str(tmp_path / "tokenizer")
  data.save(data.train_bpe(itertools.islice(data.documents(0), 4000), 512), tok)
  run_dir, one_dir = str(tmp_path / "run"), str(tmp_path / "one")
  res = _run_two_processes(tmp_path, tok, run_dir)
  one = _result(run_python(["tests/_two_process_worker.py", one_dir, tok, "0", "single"], n_devices=8).stdout)

  # ONE MESH OVER BOTH PROCESSES; PROCESS p's DATA SHARD IS GLOBAL ROWS [4p, 4p+4), AS IN THE REFERENCE
  assert [(r["process"], r["processes"], r["devices"], r["local_devices"]) for r in res] == [(0, 2, 8, 4), (1, 2, 8, 4)]
  assert (one["processes"], one["devices"]) == (1, 8) and one["mesh_shape"] == res[0]["mesh_shape"]
  assert res[0]["mesh_processes"] == [0, 0, 0, 0, 1, 1, 1, 1], res[0]["mesh_processes"]
  assert res[0]["step"] == res[1]["step"] == one["step"] == 2
  # each process saved its own data-iterator state; they read disjoint shards, so the states differ, and the
  # reference read the same two shards
  states = [json.load(open(os.path.join(run_dir, "data_state", f"step_2_proc_{i}.json"))) for i in range(2)]
  assert states[0] != states[1]
  assert json.load(open(os.path.join(one_dir, "data_state", "step_2_proc_0.json"))) == states

  # THE SAME RUN IN ONE PROCESS: every step's metrics, then every saved parameter and router bias
  rows, want = _metrics(run_dir), _metrics(one_dir)
  assert [r["step"] for r in rows] == [r["step"] for r in want] == [1, 2] and rows[-1]["loss"] == res[0]["loss"]
  assert rows[-1]["tokens"] == want[-1]["tokens"] == 8 * 16  # the global batch, both halves
  for got_row, want_row in zip(rows, want):
    for k in COMPARED:
      np.testing.assert_allclose(got_row[k], want_row[k], rtol=1e-5, err_msg=f"step {want_row['step']} {k}")
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  assert checkpoint.latest_step(ckpt_dir) == 2
  got_p, want_p = _params(ckpt_dir), _params(os.path.join(one_dir, "checkpoints"))
  assert got_p.keys() == want_p.keys() and len(got_p) > 20
  # An Adam step moves every parameter by ~lr = 3e-3 whatever its gradient's size, so a gradient near zero
  # turns reduction-order rounding into a visible difference: a handful of the 250k numbers differ by up to
  # ~1e-5 (seen: 3 over 1e-6); a wrong batch or gradient moves nearly all of them by ~1e-3.
  for k in want_p:
    np.testing.assert_allclose(got_p[k], want_p[k], rtol=0, atol=1e-4, err_msg=k)
  off = sum(int((np.abs(got_p[k] - want_p[k]) > 1e-6).sum()) for k in want_p)
  assert off <= 1e-4 * sum(v.size for v in want_p.values()), f"{off} parameters differ by more than 1e-6"

  # A PLAIN PROCESS READS THE CHECKPOINT (this one: no jax.distributed, its own devices)
  model = checkpoint.load_model(ckpt_dir)
  shape_of = nnx.eval_shape(lambda: models.Transformer(model.cfg, nnx.Rngs(params=0)))
  shapes = lambda m: jax.tree.map(lambda x: x.shape, nnx.state(m).to_pure_dict())
  assert shapes(model) == shapes(shape_of)
  bias = jax.tree.leaves(nnx.state(model, RouterBias).to_pure_dict())
  assert len(bias) == 2 and any(np.abs(np.asarray(b)).max() > 0 for b in bias)  # two updates moved it
