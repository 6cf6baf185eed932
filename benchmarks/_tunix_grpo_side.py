"""Tunix's side of benchmarks/grpo_vs_tunix.py: GRPO steps with `tunix.GRPOLearner` on a Tunix Llama3.

Runs in Tunix's own virtual environment (the parent script creates it and starts this file there) with one
JSON argument (the parent's settings); prints one line `TUNIX_RESULT {json}` at the end. Driven the way
Tunix's GRPO demo drives it: one mesh for actor, reference and rollout, the vanilla rollout engine, an
`RLCluster`, `GRPOLearner.train(dataset)` with `max_steps` = warm-up + timed steps.

Timing wraps Tunix's own calls without changing them: `RLCluster.generate` (tokenize, prefill + decode,
detokenize), `RLCluster.get_ref_per_token_logps` (the reference forward), `RLCluster.update_actor` (the
policy forward + backward + optimizer step) and the learner's `_run_global_step` (the whole step). Each
wrapper blocks on its outputs (the update: on the actor's parameters) so that an asynchronously dispatched
computation is charged to the phase that launched it; the next phase needs those values anyway.
"""

from __future__ import annotations

import json
import os
import sys
import time

A = json.loads(sys.argv[1])
os.sched_setaffinity(0, A["cores"])  # before jax starts a thread: every thread inherits the mask
if A["threads"] == 1:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import tunix  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.models.llama3 import model as llama  # noqa: E402
from tunix.rl import rl_cluster as rlc  # noqa: E402
from tunix.rl.grpo import grpo_learner  # noqa: E402
from tunix.rl.rollout import base_rollout  # noqa: E402


class IdTokenizer:
  """Text is token ids written as decimal words, so prompts have exactly the parent's ids and lengths.
  bos_id 0 is falsy: Tunix's sampler then prepends no BOS. EOS is outside the vocabulary: never sampled,
  so every completion runs the full budget, as on rl_jax's side."""

  def __init__(self, vocab: int):
    self.vocab = vocab

  def encode(self, text: str, **kw) -> list[int]:
    return [int(t) for t in text.split()]

  def decode(self, ids, **kw) -> str:
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self) -> int:
    return 0

  def pad_id(self) -> int:
    return 0

  def eos_id(self) -> int:
    return self.vocab


def token_match_reward(prompts, completions, **kw) -> list[float]:
  """The same trivial reward as rl_jax's side: the fraction of completion tokens divisible by 7."""
  out = []
  for c in completions:
    ids = [int(t) for t in c.split()]
    out.append(sum(i % 7 == 0 for i in ids) / max(len(ids), 1))
  return out


def build_model(seed: int) -> llama.Llama3:
  """Tunix's Llama3 at the parent's shapes; every matrix redrawn N(0, 0.02) (Tunix zero-inits its MLP)."""
  cfg = llama.ModelConfig(
    num_layers=A["layers"],
    vocab_size=A["vocab"],
    embed_dim=A["hidden"],
    hidden_dim=A["intermediate"],
    num_heads=A["heads"],
    head_dim=A["hidden"] // A["heads"],
    num_kv_heads=A["kv_heads"],
    rope_theta=500_000,
    norm_eps=1e-5,
    weight_tying=False,
  )
  model = llama.Llama3(cfg, rngs=nnx.Rngs(params=seed))
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  redrawn = [0.02 * jax.random.normal(k, x.shape, x.dtype) if x.ndim >= 2 else x for k, x in zip(keys, leaves)]
  nnx.update(model, jax.tree.unflatten(treedef, redrawn))
  return model


def make_learner():
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  steps = A["warmup"] + A["steps"]
  optimizer = optax.chain(
    optax.clip_by_global_norm(1.0), optax.adamw(A["lr"], b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
  )
  cluster_config = rlc.ClusterConfig(
    role_to_mesh={rlc.Role.ACTOR: mesh, rlc.Role.REFERENCE: mesh, rlc.Role.ROLLOUT: mesh},
    rollout_engine="vanilla",
    offload_to_cpu=False,
    training_config=rlc.RLTrainingConfig(
      actor_optimizer=optimizer, eval_every_n_steps=10**9, max_steps=steps, mini_batch_size=A["prompts"]
    ),
    rollout_config=base_rollout.RolloutConfig(
      max_tokens_to_generate=A["new_tokens"],
      max_prompt_length=A["prompt_len"],
      kv_cache_size=A["prompt_len"] + A["new_tokens"],
      temperature=A["temperature"],
      top_p=1.0,
      top_k=None,
      eos_tokens=[A["vocab"]],
    ),
  )
  cluster = rlc.RLCluster(
    actor=build_model(0), reference=build_model(0), tokenizer=IdTokenizer(A["vocab"]), cluster_config=cluster_config
  )
  algo = grpo_learner.GRPOConfig(
    num_generations=A["group"], num_iterations=1, beta=A["beta"], epsilon=0.2, kl_loss_mode="low_var_kl",
    loss_agg_mode="sequence-mean-token-mean",
  )  # fmt: skip
  return grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo, reward_fns=[token_match_reward])


class Timer:
  """Wall and process CPU time (all threads) of each call of the wrapped functions, by phase."""

  def __init__(self):
    self.calls = []  # (phase, wall, cpu)

  def wrap(self, obj, name: str, phase: str, block=lambda out: out) -> None:
    fn = getattr(obj, name)

    def timed(*args, **kw):
      w, c = time.perf_counter(), time.process_time()
      out = fn(*args, **kw)
      jax.block_until_ready(block(out))
      self.calls.append((phase, time.perf_counter() - w, time.process_time() - c))
      return out

    setattr(obj, name, timed)

  def per_step(self) -> list[dict]:
    """Each step's phases: the calls between two `step` entries belong to that step."""
    steps, cur = [], {}
    for phase, wall, cpu in self.calls:
      cur[phase] = cur.get(phase, 0.0) + wall
      if phase == "step":
        cur["cpu"] = cpu
        steps.append(cur)
        cur = {}
    return steps


def main() -> None:
  rs = np.random.RandomState(A["data_seed"])
  total = A["warmup"] + A["steps"]
  batches = [
    {"prompts": np.array([" ".join(map(str, p)) for p in rs.randint(3, A["vocab"], (A["prompts"], A["prompt_len"]))])}
    for _ in range(total)  # an array, as a grain batch: Tunix repeats each prompt G times with np.repeat
  ]
  t0 = time.perf_counter()
  learner = make_learner()
  build_s = time.perf_counter() - t0
  cluster, timer = learner.rl_cluster, Timer()
  timer.wrap(cluster, "generate", "rollout", lambda out: out.tokens)
  timer.wrap(cluster, "get_ref_per_token_logps", "reference")
  timer.wrap(cluster, "update_actor", "update", lambda out: nnx.state(cluster.actor_trainer.model))
  timer.wrap(learner, "_run_global_step", "step", lambda out: nnx.state(cluster.actor_trainer.model))
  learner.train(batches)
  steps = timer.per_step()
  if len(steps) != total:
    raise SystemExit(f"Tunix ran {len(steps)} steps, expected {total}")
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(cluster.actor_trainer.model, nnx.Param)))
  result = {
    "tunix_version": tunix.__version__,
    "jax_version": jax.__version__,
    "device": jax.devices()[0].device_kind,
    "params": int(n_params),
    "build_s": build_s,
    "steps": steps,
  }
  print("TUNIX_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
