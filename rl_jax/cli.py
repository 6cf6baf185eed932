"""`rl-jax <command>`: thin entry points over the library.

Training-style commands share one schema:
    rl-jax <command> --config FILE [--run-dir DIR] [--init CHECKPOINT] [key.path=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback


def _add_run_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", help="run config: a YAML path or a shipped name (pretrain_tiny, extend_tiny)")
  p.add_argument("--run-dir", help="where checkpoints, metrics and plots go")
  p.add_argument("--init", help="checkpoint to initialise the weights from")
  p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.steps=100")


def _run_config(args):
  from rl_jax.config import load_run_config

  overrides = list(args.overrides)
  if args.run_dir:
    overrides.append(f"run_dir={args.run_dir}")
  if args.init:
    overrides.append(f"init={args.init}")
  return load_run_config(args.config, overrides)


# ------------------------------------------------------------------------------------------ commands
def cmd_convert(args) -> None:
  import jax.numpy as jnp

  from rl_jax import checkpoint, models

  t0 = time.time()
  model = models.load_hf(args.hf, dtype=jnp.dtype(args.dtype))
  tok = args.hf if os.path.exists(os.path.join(args.hf, "tokenizer.json")) else None
  checkpoint.save_model(args.out, model, tokenizer_dir=tok, meta={"source": os.path.abspath(args.hf)})
  n = models.count_params(model)
  print(
    f"converted {args.hf} -> {args.out}: {model.cfg.arch}, {n / 1e6:.2f}M params, {args.dtype}"
    f"{', tokenizer' if tok else ''} ({time.time() - t0:.1f}s)"
  )


def cmd_export(args) -> None:
  from rl_jax import checkpoint, models

  model = checkpoint.load_model(args.checkpoint)
  models.save_hf(model, args.hf_out, dtype=args.dtype, tokenizer_dir=checkpoint.tokenizer_dir(args.checkpoint))
  print(f"exported {args.checkpoint} -> {args.hf_out} (config.json + safetensors)")


def cmd_init(args) -> None:
  """A randomly initialised model from a preset, as an rl-jax checkpoint and/or a HF directory."""
  from rl_jax import checkpoint, models
  from rl_jax.models.config import from_dict, preset_dict
  from rl_jax.models.configlib import apply_overrides

  # `--set key.path=value` edits the preset's mapping, so nested keys (rope.factor=4) work as in run configs.
  cfg = from_dict(apply_overrides(preset_dict(args.model), args.set or []))
  model = models.build(cfg, seed=args.seed)
  tok_dir = args.tokenizer
  if args.out:
    checkpoint.save_model(args.out, model, tokenizer_dir=tok_dir)
    print(f"wrote checkpoint {args.out}")
  if args.hf_out:
    models.save_hf(model, args.hf_out, tokenizer_dir=tok_dir)
    print(f"wrote Hugging Face directory {args.hf_out}")
  print(f"{args.model}: {models.count_params(model) / 1e6:.3f}M params")


def cmd_info(args) -> None:
  import json

  from rl_jax import checkpoint

  cfg = checkpoint.read_model_config(args.checkpoint)
  counts = cfg.param_counts()
  print(
    json.dumps(
      {
        "model": checkpoint.config_to_json(cfg),
        "latest_step": checkpoint.latest_step(args.checkpoint),
        "params_total": counts["total"] + counts["mtp"],
        "params_active": counts["active"],
        "tokenizer": checkpoint.tokenizer_dir(args.checkpoint),
      },
      indent=2,
    )
  )


class _TextStream:
  """Prints a growing token sequence as text: the decoded suffix after each token, holding back while the
  text ends inside a multi-byte character (byte-level BPE splits them across tokens)."""

  def __init__(self, tok, out):
    self.tok, self.out, self.ids, self.shown = tok, out, [], 0

  def add(self, token_id: int) -> None:
    from rl_jax.data import tokenizer as toks

    self.ids.append(int(token_id))
    text = toks.decode(self.tok, self.ids)
    if not text.endswith("\ufffd"):
      self._show(text)

  def close(self) -> None:
    from rl_jax.data import tokenizer as toks

    self._show(toks.decode(self.tok, self.ids))
    self.out.write("\n")
    self.out.flush()

  def _show(self, text: str) -> None:
    if len(text) > self.shown:
      self.out.write(text[self.shown :])
      self.out.flush()
      self.shown = len(text)


def cmd_generate(args) -> None:
  """Streams sample 0 as it is decoded; further samples (--num-samples) print when all are done."""
  from rl_jax import checkpoint, sampling
  from rl_jax.data import tokenizer as toks

  checkpoint.read_model_config(args.checkpoint)  # "not a checkpoint" before "no tokenizer"
  tdir = checkpoint.tokenizer_dir(args.checkpoint)
  if tdir is None:
    raise ValueError(f"{args.checkpoint} has no tokenizer/ to encode --prompt with")
  # Dropless MoE: capacity dispatch would let the rows of a batch (samples, padding) change each other.
  model = checkpoint.load_model(args.checkpoint, moe_capacity_factor=None)
  tok = toks.load(tdir)
  vocab = toks.Vocab.from_tokenizer(tok)
  prompt = [vocab.bos_id] + toks.encode(tok, args.prompt)  # as the data pipeline encodes documents
  out = sys.stdout
  out.write(f"--- sample 0\n{args.prompt}")
  out.flush()
  text0 = _TextStream(tok, out)
  res = sampling.generate(
    model,
    [prompt],
    max_new_tokens=args.max_new_tokens,
    temperature=args.temperature,
    top_p=args.top_p,
    top_k=args.top_k,
    eos_id=vocab.eos_id,
    seed=args.seed,
    num_samples=args.num_samples,
    stream=lambda tokens, active: text0.add(tokens[0]) if active[0] else None,
  )
  text0.close()
  for i in range(len(res.lengths)):
    n = int(res.lengths[i])
    if i:
      out.write(f"--- sample {i}\n{args.prompt}{toks.decode(tok, res.tokens[i, :n])}\n")
    out.write(f"[{n} tokens, mean logprob {res.logprobs[i, :n].mean():.3f}]\n")
  out.flush()


def cmd_pretrain(args) -> None:
  from rl_jax import report
  from rl_jax.config import model_config
  from rl_jax.train import loop

  run = _run_config(args)
  if args.command == "extend":
    rope = model_config(run).rope
    if rope.type != "yarn" or rope.factor <= 1:
      raise ValueError(
        f"rl-jax extend needs model.rope.type=yarn with model.rope.factor > 1 "
        f"(got type={rope.type}, factor={rope.factor}); see configs/extend_tiny.yaml"
      )
    resuming = (report.run_path(run.run_dir or os.path.join("runs", "extend")) / "checkpoints").is_dir()
    if not run.init and not resuming:
      raise ValueError(
        "rl-jax extend continues a trained model: pass --init CHECKPOINT (the pretrain run's checkpoints)"
      )
  last = loop.train(run, stage=args.command)
  if last:
    print(
      f"{args.command} done: step {last['step']}, loss {last['loss']:.4f} -> {run.run_dir or 'runs/' + args.command}"
    )


def cmd_sft(args) -> None:
  from rl_jax.train import runner, sft

  run = _run_config(args)
  last = sft.train(run)
  where = runner.run_dir_of(run, "sft")
  if last:
    print(f"sft done: step {last['step']}, loss {last['loss']:.4f} -> {where}")
  else:
    print(f"sft done: {where} is already at train.steps={run.train.steps}")


def cmd_distill(args) -> None:
  import dataclasses

  from rl_jax.train import distill

  run = _run_config(args)
  if args.teacher:
    run = dataclasses.replace(run, distill=dataclasses.replace(run.distill, teacher=args.teacher))
  last = distill.train(run)
  where = run.run_dir or "runs/distill"
  if last:
    kd = f"kd {last['kd']:.4f}, " if "kd" in last else ""
    print(f"distill done: step {last['step']}, {kd}loss {last['loss']:.4f} -> {where}")
  else:
    print(f"distill done: {where} is already at train.steps={run.train.steps}")


def cmd_grpo(args) -> None:
  from rl_jax.train import rl_loop

  run = _run_config(args)
  last = rl_loop.train(run, stage="grpo")
  if last:
    print(
      f"grpo done: step {last['step']}, reward {last.get('reward', float('nan')):.3f} -> {run.run_dir or 'runs/grpo'}"
    )


def cmd_train_rm(args) -> None:
  from rl_jax.train import rm

  run = _run_config(args)
  last = rm.train(run, stage="train-rm")
  if last:
    print(
      f"train-rm done: step {last['step']}, loss {last['loss']:.4f}, pair accuracy {last['accuracy']:.3f} "
      f"-> {run.run_dir or 'runs/train-rm'}"
    )


def cmd_eval(args) -> None:
  import json

  from rl_jax import evaluate

  res = evaluate.run_eval(
    args.checkpoint, task=args.task, num_problems=args.num_problems, k=args.k, seed=args.seed,
    temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, template=args.template,
    lengths=_ints(args.lengths, "--lengths"), depths=_floats(args.depths, "--depths"), data=args.data,
    bucket=args.bucket,
  )  # fmt: skip
  text = json.dumps(res, indent=2)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text + "\n")
  if res["task"] in ("passkey", "perplexity"):
    from rl_jax import longctx

    png = longctx.figure(res, os.path.splitext(args.out)[0] + ".png") if args.out else None
    keys = ("accuracy_by_length", "accuracy_mean") if res["task"] == "passkey" else ("buckets", "mean_loss")
    print(json.dumps({"task": res["task"], **{k: res[k] for k in keys}, "figure": png}) if args.out else text)
    return
  keys = ("task", "k", "pass@1", "cons@k", "pass@1_lenient", "format_rate", "mean_response_tokens")
  print(json.dumps({k: res[k] for k in keys}) if args.out else text)


def _ints(text: str | None, flag: str) -> list[int] | None:
  try:
    return None if text is None else [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"{flag} expects comma-separated integers, got {text!r}") from None


def _floats(text: str | None, flag: str) -> list[float] | None:
  try:
    return None if text is None else [float(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"{flag} expects comma-separated numbers, got {text!r}") from None


def cmd_rejection_sample(args) -> None:
  from rl_jax import rejection

  filters = tuple(f for f in args.filters.split(",") if f) + (("judge",) if args.judge else ())
  spec = rejection.RejectionSpec(
    task=args.task, split=args.split, num_problems=args.num_problems, num_samples=args.num_samples,
    template=args.template, max_prompt_len=args.max_prompt_len, max_new_tokens=args.max_new_tokens,
    temperature=args.temperature, top_p=args.top_p, seed=args.seed, keep_per_prompt=args.keep_per_prompt,
    filters=tuple(dict.fromkeys(filters)), dedupe=not args.no_dedupe, think_prefix=args.think_prefix,
    stop=args.stop, max_len=args.max_len,
  )  # fmt: skip
  info = rejection.run(args.checkpoint, spec, args.out, judge_checkpoint=args.judge)
  print(f"rejection-sample -> {args.out}: {rejection.summary_line(info)}")


def cmd_pipeline(args) -> None:
  from rl_jax import pipeline

  path = getattr(args, "file", None) or PIPELINES["quickstart"]
  run_dir = args.run_dir or os.path.join("runs", os.path.splitext(os.path.basename(path))[0])
  t0 = time.time()
  summary = pipeline.write_report(pipeline.run(path, run_dir))
  print(f"pipeline done in {time.time() - t0:.0f} s: {os.path.join(summary['run_dir'], 'report.md')}")
  for label in pipeline.load(path).report:
    e = summary[label]
    print(f"  {label}: pass@1 {e['pass@1']:.3f}, lenient {e['pass@1_lenient']:.3f}, format {e['format_rate']:.3f}")


PIPELINES = {"quickstart": "pipelines/r1_zero_tiny"}


def cmd_bench(args) -> None:
  import json

  from rl_jax import bench

  if args.what == "train":
    print(json.dumps(bench.bench_train(_run_config(args), steps=args.steps), indent=2))
  elif args.what == "rollout":
    bench.bench_rollout(
      args.preset, n_prompts=args.prompts, group=args.group, slots=args.slots, max_new=args.max_new_tokens,
      repeats=args.repeats,
    )  # fmt: skip
  elif args.what == "spec":
    if not os.path.isdir(args.checkpoint):
      raise ValueError(f"{args.checkpoint}: no checkpoint (train one: rl-jax pretrain --config pretrain_spec_deep)")
    bench.bench_spec(
      args.checkpoint, kind=args.corpus, draft_lens=tuple(args.draft_lens), n_prompts=args.prompts,
      new_tokens=args.new_tokens, repeats=args.repeats,
    )  # fmt: skip
  else:
    bench.bench_sample(
      presets=tuple(args.presets.split(",")),
      batches=tuple(int(b) for b in args.batches.split(",")),
      new_tokens=args.new_tokens,
    )


def cmd_plan(args) -> None:
  """AOT-compiles a stage for a TPU target on this host (libtpu) and prints what each chip needs."""
  from rl_jax.sharding.topology import aot_environment

  aot_environment()  # before jax starts a backend: the CPU one, whatever libtpu would try on this host
  import json

  from rl_jax import plan, plan_report, plan_search
  from rl_jax.sharding import topology

  if args.stage not in plan.STAGES:
    raise ValueError(f"unknown stage {args.stage!r}: one of {', '.join(plan.STAGES)}")
  run = _run_config(args)
  target = topology.target(args.topology, args.slices)  # a one-line error for a name libtpu cannot build
  log = lambda line: print(line, file=sys.stderr, flush=True)
  if args.search:
    result = plan_search.search(run, args.stage, target, top=args.top, log=log)
    print(plan_report.format_search(result))
  else:
    plan.target_mesh(run, target)  # a one-line error for a mesh that cannot map onto the torus, before any work
    log(f"rl-jax plan: {args.stage} on {target.topology}" + (f" x {target.slices} slices" if target.slices > 1 else ""))
    result = plan.plan(run, args.stage, target=target, log=log)
    print(plan_report.format_plan(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2, default=float)


# ------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="rl-jax", description=__doc__.splitlines()[0])
  ap.add_argument(
    "--debug", action="store_true", help="full traceback instead of the one-line error (or RL_JAX_DEBUG=1)"
  )
  sub = ap.add_subparsers(dest="command", required=True)

  p = sub.add_parser("convert", help="Hugging Face directory -> rl-jax checkpoint")
  p.add_argument("--hf", required=True, help="local HF directory (config.json + safetensors)")
  p.add_argument("--out", required=True, help="checkpoint directory to write")
  p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  p.set_defaults(fn=cmd_convert)

  p = sub.add_parser("export", help="rl-jax checkpoint -> Hugging Face directory")
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--hf-out", required=True)
  p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: as stored")
  p.set_defaults(fn=cmd_export)

  p = sub.add_parser("init", help="random init from a preset (demos, tests, benchmarks)")
  p.add_argument("--model", required=True, help="preset name (tiny-moe, small-moe, ...) or YAML path")
  p.add_argument("--out", help="rl-jax checkpoint directory to write")
  p.add_argument("--hf-out", help="Hugging Face directory to write")
  p.add_argument("--tokenizer", help="directory with tokenizer.json to bundle")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--set", action="append", metavar="KEY=VALUE", help="model config override, e.g. dtype=bfloat16")
  p.set_defaults(fn=cmd_init)

  p = sub.add_parser("info", help="describe a checkpoint")
  p.add_argument("--checkpoint", required=True)
  p.set_defaults(fn=cmd_info)

  p = sub.add_parser("generate", help="sample from a checkpoint")
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--prompt", required=True)
  p.add_argument("--num-samples", type=int, default=1)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(fn=cmd_generate)

  for name, text in (
    ("pretrain", "pretrain (next-token + MTP, aux-loss-free balancing); resumes"),
    ("extend", "YaRN context extension: a pretrain stage with model.rope.type=yarn"),
  ):
    p = sub.add_parser(name, help=text)
    _add_run_args(p)
    p.set_defaults(fn=cmd_pretrain)

  p = sub.add_parser("sft", help="supervised fine-tuning on prompt/response or chat data (response loss only); resumes")
  _add_run_args(p)
  p.set_defaults(fn=cmd_sft)

  p = sub.add_parser(
    "distill", help="distil into the run's model (or --init): SFT on teacher traces, or logits of --teacher; resumes"
  )
  _add_run_args(p)
  p.add_argument("--teacher", help="teacher checkpoint sharing the student's tokenizer (sets distill.teacher)")
  p.set_defaults(fn=cmd_distill)

  p = sub.add_parser("grpo", help="GRPO / DAPO / Dr. GRPO / GSPO reasoning RL from --init; resumes")
  _add_run_args(p)
  p.set_defaults(fn=cmd_grpo)

  p = sub.add_parser("train-rm", help="Bradley-Terry reward model from --init on preference pairs; resumes")
  _add_run_args(p)
  p.set_defaults(fn=cmd_train_rm)

  p = sub.add_parser("eval", help="R1's evaluation protocol on held-out problems: pass@1, cons@k, format rate")
  p.add_argument("--checkpoint", required=True)
  p.add_argument(
    "--task", help="procedural kind, .jsonl file, rg:NAME, tfds:NAME, passkey or perplexity (default: the checkpoint's)"
  )
  p.add_argument("--num-problems", type=int, default=100)
  p.add_argument("--k", type=int, default=4, help="samples per problem")
  p.add_argument("--seed", type=int, default=0, help="picks the held-out problems and the samples")
  p.add_argument("--temperature", type=float, default=0.6)
  p.add_argument("--top-p", type=float, default=0.95)
  p.add_argument("--max-new-tokens", type=int, help="default: the checkpoint's grpo.max_new_tokens")
  p.add_argument("--template", help="prompt template (default: the checkpoint's grpo.template)")
  p.add_argument("--out", help="write the full JSON here (passkey / perplexity: and the figure beside it, .png)")
  p.add_argument("--lengths", help="passkey / perplexity: context lengths in tokens, e.g. 128,256,512")
  p.add_argument("--depths", help="passkey: key depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
  p.add_argument("--data", help="perplexity: held-out documents, e.g. procedural:longkey4x or FILE.jsonl")
  p.add_argument("--bucket", type=int, help="perplexity: positions per bucket (default: length / 16)")
  p.set_defaults(fn=cmd_eval)

  p = sub.add_parser("rejection-sample", help="N samples per prompt, filtered, deduplicated, capped: an SFT dataset")
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--num-samples", type=int, required=True, help="samples per prompt")
  p.add_argument("--out", required=True, help="directory for kept.jsonl, tfds/, pairs.jsonl, stats.json")
  p.add_argument("--task", default="chain", help="procedural kind, .jsonl file, rg:NAME or tfds:NAME")
  p.add_argument("--split", default="train")
  p.add_argument("--num-problems", type=int, default=64)
  p.add_argument("--keep-per-prompt", type=int, default=4, help="cap after dedupe; 0 = none")
  p.add_argument("--judge", help="generative judge checkpoint (adds the judge filter)")
  p.add_argument("--filters", default="correct,format,language,repetition", help="comma list")
  p.add_argument("--template", default="r1_zero_short", help="prompt template (r1_fewshot: cold start)")
  p.add_argument("--max-prompt-len", type=int, default=128)
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--stop", help="cut completions after this text (default: </answer> for r1_fewshot, else none)")
  p.add_argument("--think-prefix", default="", help="what the template pre-fills, e.g. <think>")
  p.add_argument("--max-len", type=int, default=0, help="most response tokens kept; 0 = no limit")
  p.add_argument("--no-dedupe", action="store_true")
  p.set_defaults(fn=cmd_rejection_sample)

  p = sub.add_parser("pipeline", help="run a pipeline of stages (configs/pipelines/), skipping finished ones")
  p.add_argument("file", help="pipeline YAML (path or shipped name, e.g. pipelines/r1_zero_tiny)")
  p.add_argument("--run-dir", help="default: runs/<pipeline name>")
  p.set_defaults(fn=cmd_pipeline)

  p = sub.add_parser("quickstart", help="the tiny R1-Zero: pretrain, eval, GRPO, eval on the CPU in minutes")
  p.add_argument("--run-dir", help="default: runs/r1_zero_tiny")
  p.set_defaults(fn=cmd_pipeline)

  p = sub.add_parser(
    "plan", help="what a stage needs on a TPU slice, by ahead-of-time compilation here (libtpu): bytes, FLOPs, bound"
  )
  p.add_argument("--config", help="run config: a YAML path or a shipped name (its model, mesh, batch shapes)")
  p.add_argument("--stage", default="pretrain", help="pretrain, extend, sft, distill, grpo, train-rm or sample")
  p.add_argument("--topology", required=True, help="TPU target: v5e:2x2, v5p:4x4x4, v6e:4x4, tpu7x:2x2x1, v5p-128, ...")
  p.add_argument("--slices", type=int, default=1, help="multi-slice: copies of the topology over DCN (on mesh.data)")
  p.add_argument("--search", action="store_true", help="try the mesh shapes, remat and grad_accum that map; rank them")
  p.add_argument("--top", type=int, default=4, help="--search: candidates compiled (each can take minutes)")
  p.add_argument("--json", help="also write the result as one JSON object to this file")
  p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. mesh.fsdp=16 mesh.expert=4")
  p.set_defaults(fn=cmd_plan, run_dir=None, init=None)

  p = sub.add_parser(
    "bench", help="benchmarks: train (MFU), sample (tokens/s), rollout (engine vs static), spec (MTP speculative)"
  )
  what = p.add_subparsers(dest="what", required=True)  # each its own options, in any order with overrides
  q = what.add_parser("train", help="train-step time, tokens/s and MFU of a run config")
  _add_run_args(q)
  q.add_argument("--steps", type=int, default=5, help="timed train steps")
  q = what.add_parser("sample", help="sampler tokens/s by preset and batch size")
  q.add_argument("--presets", default="tiny-moe,small-moe", help="model presets")
  q.add_argument("--batches", default="1,16,64", help="batch sizes")
  q.add_argument("--new-tokens", type=int, default=256)
  q = what.add_parser("rollout", help="rollout engine vs static sampler, useful tokens/s on a long-tailed G workload")
  q.add_argument("--preset", default="tiny-moe", help="model preset (random init)")
  q.add_argument("--prompts", type=int, default=64, help="distinct prompts")
  q.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
  q.add_argument("--slots", type=int, default=64, help="engine decode slots (the static sampler: 8 prompts x G a call)")
  q.add_argument("--max-new-tokens", type=int, default=256, help="longest response of the long tail")
  q.add_argument("--repeats", type=int, default=3, help="timed runs each side (best), after a warm-up")
  q = what.add_parser("spec", help="MTP speculative vs plain greedy decoding at batch 1 (a checkpoint with MTP)")
  q.add_argument("--checkpoint", required=True, help="a V3-shaped checkpoint whose MTP module(s) were trained")
  q.add_argument("--corpus", default="r1", help="procedural kind the checkpoint was trained on (prompts)")
  q.add_argument("--draft-lens", type=int, nargs="+", default=[1, 2, 3], help="draft lengths K")
  q.add_argument("--prompts", type=int, default=4, help="prompts, decoded one at a time")
  q.add_argument("--new-tokens", type=int, default=128)
  q.add_argument("--repeats", type=int, default=3, help="timed runs each side (best), after a warm-up")
  p.set_defaults(fn=cmd_bench)
  return ap


def main(argv=None) -> int:
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  # --debug may also follow the command (the subparsers do not know it)
  debug = args.debug or "--debug" in extra or os.environ.get("RL_JAX_DEBUG", "") not in ("", "0")
  extra = [a for a in extra if a != "--debug"]
  # key=value overrides may come in several runs between options (argparse takes only the first run)
  stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
  if stray:
    parser.error(f"unrecognized arguments: {' '.join(stray)}")
  if extra:
    args.overrides = [*args.overrides, *extra]
  try:
    args.fn(args)
  except (ValueError, FileNotFoundError, ImportError) as e:  # config / checkpoint / data / extra: one line
    if debug:
      traceback.print_exc()
      return 2
    print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
