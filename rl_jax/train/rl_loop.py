"""The GRPO stage (`rl-jax grpo`) on the run skeleton of rl_jax/train/runner.py.

Per step: G completions of `prompts_per_step` training problems from the jitted sampler on the live
parameters (no copy of the weights), rule rewards in the verifier pool, dynamic sampling when asked (groups
whose rewards are all equal are dropped and more problems sampled to refill the batch), then the jitted update
of rl_jax/train/grpo.py. Held-out evaluation runs as a hook. The model is the --init checkpoint's (its
model_config.json, with the run's dtypes), routed dropless so that rows never compete for expert capacity.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from flax import nnx

from rl_jax import checkpoint as ckpt
from rl_jax import engine, evaluate, rollout
from rl_jax import rewards as R
from rl_jax.config import RunConfig
from rl_jax.data import tokenizer as toks
from rl_jax.reward_model import RewardModel
from rl_jax.train import grpo as G
from rl_jax.train import runner
from rl_jax.train import state as S

PLOT_KEYS = ("reward", "pass_rate", "eval_pass@1", "response_len_mean", "kl_ref", "entropy", "grad_norm")


def train(run: RunConfig, *, stage: str = "grpo") -> dict:
  """Runs (or resumes) a GRPO stage; returns the last logged metrics."""
  run, tok_dir = _checkpoint_model(run, stage)
  g, t = run.grpo, run.train
  with runner.setup(run, stage) as ctx:
    ctx.model_cfg = ctx.model_cfg.replace(moe_capacity_factor=None)
    runner.write_run_files(ctx, tok_dir)
    tx = S.optimizer(run.optimizer, t.steps * g.epochs * g.minibatches)
    source = rollout.PromptSource(g.task, run.data.seed)
    runner.restore_or_init(ctx, tx, source, ref=G.uses_ref(g))
    lr = S.schedule(run.optimizer, t.steps * g.epochs * g.minibatches)
    n_experts = ctx.model_cfg.n_routed_experts
    jstep = G.build_grpo_step(ctx.graphdef, g, t, tx, ctx.mesh, ctx.shardings, lr, n_experts)
    with R.VerifierPool() as pool:
      rollouts = Rollouts(ctx, toks.load(tok_dir), source, pool)

      def step_fn(state, item):
        arrays, host = item
        t0 = time.perf_counter()
        state, metrics = jstep(state, G.place_rollout(arrays, ctx.mesh))
        jax.block_until_ready(metrics)  # the next rollout needs these parameters anyway
        return state, {**metrics, **host, "time_update_s": time.perf_counter() - t0}

      log = runner.MetricsLog()
      hooks = runner.standard_hooks(ctx, log, PLOT_KEYS) + [runner.Hook(rollouts.evaluate, g.eval_every, state=True)]
      runner.run_loop(ctx, step_fn, rollouts, hooks)
  return log.last


def _checkpoint_model(run: RunConfig, stage: str) -> tuple[RunConfig, str]:
  """The run with the model section of the checkpoint it trains (--init, or its own when resuming), and
  that checkpoint's tokenizer directory."""
  src, tok_dir = runner.trained_checkpoint(run, stage, "prompts")
  model = ckpt.config_to_json(ckpt.read_model_config(src))
  return dataclasses.replace(run, model=model), tok_dir


class Rollouts:
  """The stage's batch source: `next()` samples, scores and assembles one step's rollout on the current
  `ctx.state`; its position in the problem stream is checkpointed through `source`."""

  def __init__(self, ctx: runner.Context, tok, source: rollout.PromptSource, pool: R.VerifierPool):
    g = ctx.run.grpo
    if jax.process_count() > 1 and (g.dynamic_sampling or "rm" in g.rewards):
      raise ValueError("grpo.dynamic_sampling and the 'rm' reward run in one process only (not multi-host yet)")
    self.ctx, self.tok, self.source, self.pool, self.g = ctx, tok, source, pool, g
    self.step = ctx.start
    budget = g.max_new_tokens
    buffer = budget // 4 if g.overlong_buffer < 0 else g.overlong_buffer
    weights = dict(g.rewards)
    if buffer and "overlong" not in weights:
      weights["overlong"] = 1.0
    self.spec = R.RewardSpec(
      weights=weights, think_prefix="<think>" if g.think_prefix else "", max_tokens=budget, overlong_buffer=buffer
    )
    self.seq_len = g.max_prompt_len + g.max_new_tokens
    self.rm = RewardModel.load(g.reward_model) if "rm" in g.rewards else None  # loaded once, kept on the device
    # Each process samples and scores its own block of the step's rows (whole groups), in one collective sampler
    self.total = g.prompts_per_step * g.group_size
    self.sharding = G.row_sharding(ctx.mesh)
    self.rows = rollout.process_rows(self.sharding, self.total, g.group_size)
    self.problems = slice(self.rows.start // g.group_size, self.rows.stop // g.group_size)

  def __iter__(self):
    return self

  def model(self):
    """The policy as a module over the live parameters (no copy)."""
    st = self.ctx.state
    return nnx.merge(self.ctx.graphdef, st.params, st.bias)

  def __next__(self):
    g = self.g
    self.step += 1
    model = self.model()
    rounds, informative, degenerate, first_all_equal = 0, [], [], None
    sample_s = score_s = 0.0
    while len(informative) < g.prompts_per_step and rounds <= (g.max_resample if g.dynamic_sampling else 0):
      need = g.prompts_per_step - len(informative)
      # a full round (always, but under dynamic sampling) splits over the processes; a refill runs whole here
      split = need == g.prompts_per_step
      ro = rollout.rollout(
        model, self.tok, self.source.take(need, self.problems if split else slice(None)), group_size=g.group_size,
        template=g.template, max_prompt_len=g.max_prompt_len, max_new_tokens=g.max_new_tokens,
        temperature=g.temperature, top_p=g.top_p, seed=self.ctx.run.train.seed * 1_000_003 + self.step * 101 + rounds,
        spec=self.spec, pool=self.pool, slots=g.rollout_slots,
        **(dict(rows=self.rows, total=self.total, sharding=self.sharding) if split else {}),
      )  # fmt: skip
      self._add_rm(ro)
      sample_s, score_s = sample_s + ro.sample_s, score_s + ro.score_s
      ok = rollout.informative_groups(ro.rewards, g.group_size)
      if first_all_equal is None:  # over every process's groups
        first_all_equal = (
          1.0 - rollout.informative_groups(rollout.gather_rows(ro.rewards, self.rows), g.group_size).mean()
        )
      groups = [ro.select(np.arange(i * g.group_size, (i + 1) * g.group_size)) for i in range(len(ok))]
      informative += [x for x, keep in zip(groups, ok) if keep or not g.dynamic_sampling]
      degenerate += [x for x, keep in zip(groups, ok) if not keep and g.dynamic_sampling]
      rounds += 1
    chosen = (informative + degenerate)[: g.prompts_per_step]  # short of signal: all-equal groups fill (A = 0)
    ro = rollout.concat(chosen)
    host = self._metrics(ro, first_all_equal, rounds, sample_s, score_s)
    return rollout.assemble(ro, self.seq_len), host

  def _add_rm(self, ro: rollout.Rollout) -> None:
    """The reward model's sigmoid score as component "rm", its weighted value added to the rule rewards."""
    if self.rm is None:
      return
    t0 = time.perf_counter()
    ro.components["rm"] = self.rm.score([p["prompt"] for p in ro.problems], ro.texts)
    ro.rewards = (ro.rewards + self.g.rewards["rm"] * ro.components["rm"]).astype(np.float32)
    ro.score_s += time.perf_counter() - t0

  def _metrics(self, ro: rollout.Rollout, all_equal: float, rounds: int, sample_s: float, score_s: float) -> dict:
    gather = lambda x: rollout.gather_rows(x, self.rows)  # the step's metrics are over every process's rows
    lengths, components = gather(ro.result.lengths), {k: gather(v) for k, v in ro.components.items()}
    m = {f"reward_{k}": float(v.mean()) for k, v in components.items()}
    m.update(
      reward=float(gather(ro.rewards).mean()),
      pass_rate=float(components["accuracy"].mean()) if "accuracy" in components else float("nan"),
      all_equal_groups=float(all_equal),
      rollout_rounds=rounds,
      response_len_mean=float(lengths.mean()),
      response_len_max=int(lengths.max()),
      time_sample_s=sample_s,
      time_score_s=score_s,
      **engine.log_metrics(ro.engine_stats),
    )
    return m

  def evaluate(self, ctx: runner.Context, step: int, metrics: dict) -> None:
    """Eval hook: held-out pass@1 / format rate / length (R1's protocol) on the current parameters."""
    g = self.g
    problems = rollout.load_problems(g.task, "test", g.eval_problems, seed=ctx.run.data.seed)
    out = evaluate.evaluate_model(
      self.model(), self.tok, problems, k=g.eval_k, template=g.template, max_new_tokens=g.max_new_tokens,
      max_prompt_len=g.max_prompt_len, think_prefix=self.spec.think_prefix, pool=self.pool,
    )  # fmt: skip
    keys = ("pass@1", "pass@1_lenient", "cons@k", "format_rate", "mean_response_tokens", "reflection_rate")
    ctx.writer.write(step, {f"eval_{k}": out[k] for k in keys})
