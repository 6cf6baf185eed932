"""Two processes (jax.distributed on CPU, 4 fake devices each) train on one 8-device mesh and write one
Orbax checkpoint together; a plain single process then loads it."""

import itertools
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

from tests._subproc import REPO, child_env

TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_and_save_one_checkpoint(tmp_path):
  import jax
  from flax import nnx

  from rl_jax import checkpoint, data, models
  from rl_jax.models.layers import RouterBias

  tok = str(tmp_path / "tokenizer")
  data.save(data.train_bpe(itertools.islice(data.documents(0), 4000), 512), tok)
  run_dir, port = str(tmp_path / "run"), _free_port()
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
  res = [json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]) for out, _ in outs]

  # ONE MESH OVER BOTH PROCESSES, ONE GLOBAL LOSS
  assert [(r["process"], r["processes"], r["devices"], r["local_devices"]) for r in res] == [(0, 2, 8, 4), (1, 2, 8, 4)]
  assert res[0]["step"] == res[1]["step"] == 2
  assert res[0]["loss"] == res[1]["loss"] and np.isfinite(res[0]["loss"]), res
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:  # process 0 writes the run's records
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2] and rows[-1]["loss"] == res[0]["loss"]
  assert rows[-1]["tokens"] == 8 * 16 and rows[-1]["load_imbalance"] >= 1  # the global batch, both halves
  # each process saved its own data-iterator state; they read disjoint shards, so the states differ
  states = [json.load(open(os.path.join(run_dir, "data_state", f"step_2_proc_{i}.json"))) for i in range(2)]
  assert states[0] != states[1]

  # A PLAIN PROCESS READS THE CHECKPOINT (this one: no jax.distributed, its own devices)
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  assert checkpoint.latest_step(ckpt_dir) == 2
  model = checkpoint.load_model(ckpt_dir)
  want = nnx.eval_shape(lambda: models.Transformer(model.cfg, nnx.Rngs(params=0)))
  shapes = lambda m: jax.tree.map(lambda x: x.shape, nnx.state(m).to_pure_dict())
  assert shapes(model) == shapes(want)
  leaves = jax.tree.leaves(nnx.state(model).to_pure_dict())
  assert len(leaves) > 20 and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
  bias = jax.tree.leaves(nnx.state(model, RouterBias).to_pure_dict())
  assert len(bias) == 2 and any(np.abs(np.asarray(b)).max() > 0 for b in bias)  # two updates moved it
