"""One process of tests/test_train_two_process.py: two pretrain steps on a (data 2, fsdp 2, expert 2) mesh,
one checkpoint at the end. Prints `RESULT {json}`.
Usage: python tests/_two_process_worker.py RUN_DIR TOKENIZER_DIR PORT PROCESS_ID
PROCESS_ID 0 or 1: one of two jax.distributed processes (4 devices each). PROCESS_ID "single": the same run
in one plain process over 8 devices, fed the same global batch: the concatenation of the two processes'
data shards (process p's rows are global rows [p*B/2, (p+1)*B/2), the test checks the mesh puts them there).
"""

import json
import sys

import numpy as np

run_dir, tokenizer, port, process_id = sys.argv[1:5]
SINGLE = process_id == "single"
N_PROC = 2

OVERRIDES = [
  "model.num_hidden_layers=2",
  "train.batch_size=8",
  "train.seq_len=16",
  "train.steps=2",
  "train.log_every=1",
  "optimizer.warmup_steps=0",  # full-size updates from step 1, so the parameter comparison means something
  "checkpoint.every=0",
  f"data.tokenizer={tokenizer}",
  f"run_dir={run_dir}",
  "mesh.data=2",
  "mesh.fsdp=2",
  "mesh.expert=2",
  "mesh.tensor=1",
]
DISTRIBUTED = [
  "mesh.distributed=true",
  f"mesh.coordinator_address=127.0.0.1:{port}",
  f"mesh.num_processes={N_PROC}",
  f"mesh.process_id={process_id}",
]


class ConcatShards:
  """The global batch of an N_PROC-process run, read in one process: shard p's rows follow shard p-1's."""

  def __init__(self, its):
    self.its = its

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(it) for it in self.its]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return [it.get_state() for it in self.its]

  def set_state(self, states):
    for it, s in zip(self.its, states):
      it.set_state(s)


def emulate_process_shards(make_iterator):
  def make(source, *, batch_size, shard_index, shard_count, **kw):
    assert (shard_index, shard_count) == (0, 1), (shard_index, shard_count)
    return ConcatShards(
      [
        make_iterator(source, batch_size=batch_size // N_PROC, shard_index=p, shard_count=N_PROC, **kw)
        for p in range(N_PROC)
      ]
    )

  return make


if SINGLE:  # patched before the loop is imported, however it imports make_iterator
  from rl_jax.data import pipeline

  pipeline.make_iterator = emulate_process_shards(pipeline.make_iterator)

from rl_jax.config import load_run_config  # noqa: E402  (no jax device is touched before initialize)
from rl_jax.train import loop  # noqa: E402

run = load_run_config("configs/pretrain_tiny.yaml", OVERRIDES + ([] if SINGLE else DISTRIBUTED))
last = loop.train(run)

import jax  # noqa: E402

from rl_jax.sharding import mesh as smesh  # noqa: E402

mesh = smesh.mesh_from_config(run.mesh)
print(
  "RESULT "
  + json.dumps(
    {
      "process": jax.process_index(),
      "processes": jax.process_count(),
      "devices": jax.device_count(),
      "local_devices": jax.local_device_count(),
      "mesh_shape": dict(mesh.shape),
      "mesh_processes": [d.process_index for d in mesh.devices.flat],  # batch rows follow this device order
      **last,
    }
  ),
  flush=True,
)
