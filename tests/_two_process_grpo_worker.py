"""One process of tests/test_grpo_two_process.py: 3 GRPO steps on a tiny base, a checkpoint at step 2.
Prints `RESULT {json}`.
Usage: python tests/_two_process_grpo_worker.py OUT PORT PROCESS_ID
PROCESS_ID "single": pretrains the tiny base into OUT/base, then the uninterrupted GRPO run OUT/one in one
process (4 devices). PROCESS_ID 0 or 1: one of two jax.distributed processes (1 device each) running the
same GRPO command into OUT/two, which dies before step 3's rollout (after the step-2 checkpoint) and is run
again in the same process, as tests/_grpo_worker.py does for one process.
"""

import json
import os
import sys

OUT, port, process_id = sys.argv[1:4]
SINGLE = process_id == "single"

from rl_jax import cli  # noqa: E402  (no jax device is touched before jax.distributed.initialize)
from rl_jax.train import rl_loop  # noqa: E402

GRPO = ["grpo", "--config", "grpo_r1zero_tiny", "--init", f"{OUT}/base/checkpoints", "train.steps=3",
        "train.log_every=1", "checkpoint.every=2", "optimizer.warmup_steps=0", "grpo.prompts_per_step=4",
        "grpo.group_size=2", "grpo.max_new_tokens=16", "grpo.eval_every=0", "grpo.eval_problems=2",
        "grpo.eval_k=1", "grpo.overlong_buffer=12"]  # fmt: skip
DISTRIBUTED = ["mesh.distributed=true", f"mesh.coordinator_address=127.0.0.1:{port}", "mesh.num_processes=2",
               f"mesh.process_id={process_id}"]  # fmt: skip

calls = []  # the steps whose rollout each run sampled
real_next = rl_loop.Rollouts.__next__


def counting_next(self):
  calls.append(self.step + 1)
  return real_next(self)


rl_loop.Rollouts.__next__ = counting_next
prompts = []  # the problems each training rollout of this process sampled and scored
real_rollout = rl_loop.rollout.rollout


def recording_rollout(model, tok, problems, **kw):
  if "sharding" in kw:  # a training round (the held-out eval samples every row on every process)
    prompts.append([p["prompt"] for p in problems])
  return real_rollout(model, tok, problems, **kw)


rl_loop.rollout.rollout = recording_rollout
res = {}
if SINGLE:
  assert cli.main(["pretrain", "--config", "pretrain_r1zero_tiny", "--run-dir", f"{OUT}/base", "train.steps=2",
                   "train.batch_size=4", "train.seq_len=64", "checkpoint.every=0"]) == 0  # fmt: skip
  res["rc"] = cli.main([*GRPO, "--run-dir", f"{OUT}/one"])
else:

  def dying_next(self):
    if self.step == 2:
      raise RuntimeError("simulated preemption")
    return counting_next(self)

  rl_loop.Rollouts.__next__ = dying_next
  try:
    cli.main([*GRPO, *DISTRIBUTED, "--run-dir", f"{OUT}/two"])
    res["crashed"] = False
  except RuntimeError as e:
    res["crashed"] = str(e) == "simulated preemption"
  res["first_calls"], calls[:] = list(calls), []
  res["steps_before"] = sorted(s for s in os.listdir(f"{OUT}/two/checkpoints") if s.isdigit())
  rl_loop.Rollouts.__next__ = counting_next
  res["rc"] = cli.main([*GRPO, *DISTRIBUTED, "--run-dir", f"{OUT}/two"])

import jax  # noqa: E402

res.update(
  prompts=prompts, calls=calls, process=jax.process_index(), processes=jax.process_count(), devices=jax.device_count()
)
print("RESULT " + json.dumps(res), flush=True)
