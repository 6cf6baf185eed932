"""One of the two processes of tests/test_train_two_process.py: two pretrain steps on a mesh over both
processes' devices, one checkpoint at the end. Prints `RESULT {json}`.
Usage: python tests/_two_process_worker.py RUN_DIR TOKENIZER_DIR PORT PROCESS_ID
"""

import json
import sys

run_dir, tokenizer, port, process_id = sys.argv[1:5]

from rl_jax.config import load_run_config  # noqa: E402  (no jax device is touched before initialize)
from rl_jax.train import loop  # noqa: E402

run = load_run_config(
  "configs/pretrain_tiny.yaml",
  [
    "model.num_hidden_layers=2",
    "train.batch_size=8",
    "train.seq_len=16",
    "train.steps=2",
    "train.log_every=1",
    "checkpoint.every=0",
    f"data.tokenizer={tokenizer}",
    f"run_dir={run_dir}",
    "mesh.data=2",
    "mesh.fsdp=2",
    "mesh.expert=2",
    "mesh.tensor=1",
    "mesh.distributed=true",
    f"mesh.coordinator_address=127.0.0.1:{port}",
    "mesh.num_processes=2",
    f"mesh.process_id={process_id}",
  ],
)
last = loop.train(run)

import jax  # noqa: E402

print(
  "RESULT "
  + json.dumps(
    {
      "process": jax.process_index(),
      "processes": jax.process_count(),
      "devices": jax.device_count(),
      "local_devices": jax.local_device_count(),
      **last,
    }
  ),
  flush=True,
)
