"""Child process of tests/test_grpo_run.py: GRPO runs through the CLI on a tiny base. An uninterrupted run (A);
the same command stopped by a crash after its step-2 checkpoint and rerun (B); DAPO (dynamic sampling, overlong
shaping, token-mean) and GRPO with routing replay + KL in the reward, two steps each. Writes OUT/results.json.
Usage: python tests/_grpo_worker.py OUT
"""

import json
import os
import sys
import traceback

OUT = sys.argv[1]

from rl_jax import cli  # noqa: E402
from rl_jax.train import rl_loop  # noqa: E402

results = {}
assert cli.main(["pretrain", "--config", "pretrain_r1zero_tiny", "--run-dir", f"{OUT}/base", "train.steps=20",
                 "train.batch_size=8", "train.seq_len=64", "checkpoint.every=0", "train.log_every=10"]) == 0  # fmt: skip
GRPO = ["grpo", "--config", "grpo_r1zero_tiny", "--init", f"{OUT}/base/checkpoints", "train.steps=4",
        "train.log_every=1", "checkpoint.every=2", "grpo.prompts_per_step=4", "grpo.group_size=2",
        "grpo.max_new_tokens=24", "grpo.eval_problems=2", "grpo.eval_k=2"]  # fmt: skip

results["A"] = cli.main([*GRPO, "--run-dir", f"{OUT}/A"])

# B: dies when asked for step 3's rollout (after the step-2 checkpoint), then the same command again
real_next = rl_loop.Rollouts.__next__


def dying_next(self):
  if self.step == 2:
    raise RuntimeError("simulated preemption")
  return real_next(self)


rl_loop.Rollouts.__next__ = dying_next
try:
  cli.main([*GRPO, "--run-dir", f"{OUT}/B"])
  results["B_crashed"] = False
except RuntimeError:
  results["B_crashed"] = "simulated preemption" in traceback.format_exc()
rl_loop.Rollouts.__next__ = real_next
results["B_steps_before"] = sorted(os.listdir(f"{OUT}/B/checkpoints"))
results["B"] = cli.main([*GRPO, "--run-dir", f"{OUT}/B"])

results["dapo"] = cli.main([*GRPO, "--run-dir", f"{OUT}/dapo", "train.steps=2", "grpo.algorithm=dapo",
                            "grpo.max_resample=2"])  # fmt: skip
results["replay"] = cli.main([*GRPO, "--run-dir", f"{OUT}/replay", "train.steps=2", "grpo.routing_replay=true",
                              "grpo.kl_in_reward=true", "grpo.beta=0.05", "grpo.minibatches=2", "grpo.epochs=2"])  # fmt: skip
with open(os.path.join(OUT, "results.json"), "w") as f:
  json.dump(results, f)
