"""Greedy decoding throughput, rl_jax vs transformers `generate`, on the same weights, side by side.

    python benchmarks/sample_vs_hf.py                      # defaults: ~2.5 min on one CPU core
    python benchmarks/sample_vs_hf.py --hidden 256 --layers 8 --batches 1,16,64 --threads 2

Both run fp32, greedy, no EOS (every row decodes exactly --new-tokens), in one process pinned to --threads
CPU cores (default 1: os.sched_setaffinity before torch or jax start a thread, so every thread of both
shares that core; torch.set_num_threads(1); XLA without its multi-threaded Eigen). Each timed region also
reports process CPU time / wall time: ~1.0 means one busy core; above 1.2 more than one core ran (a
warning is printed), below 0.8 other work shared the core. Models: a DeepSeek-V3 (MLA +
DeepSeekMoE, YaRN, router bias) and a Llama-3 (GQA), built with transformers' own classes from random
weights (embed and lm_head scaled so greedy argmaxes are rarely near-ties), saved, and loaded into rl_jax
with `models.load_hf`. Prompts are random tokens of exactly --prompt-len (equal lengths: no padding on
either side). Ours is timed on its second call (the first compiles; compile time is reported separately);
HF after a short warm-up. Prints a markdown table, the KV-cache numbers per token per layer of each
(measured on the caches), and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default="deepseek_v3,llama", help="comma list of deepseek_v3, llama")
  ap.add_argument("--batches", default="1,16")
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=256)
  ap.add_argument("--hidden", type=int, default=512, help="hidden size (heads = hidden / 32)")
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--vocab", type=int, default=4096)
  ap.add_argument("--experts", type=int, default=16, help="DeepSeek-V3 routed experts (top-2, 4 groups)")
  ap.add_argument("--threads", type=int, default=1, help="cores to pin to and torch threads; 1: XLA single-threaded")
  ap.add_argument("--cores", default="", help="comma list of cores to pin to (default: the last --threads allowed)")
  ap.add_argument(
    "--hf-cache",
    default="dynamic",
    choices=["dynamic", "static"],
    help="transformers cache_implementation (static: preallocated, as ours)",
  )
  return ap.parse_args(argv)


def pin_cores(a) -> list[int]:
  """Pins this process to --threads cores; threads started later (torch's, XLA's pools) inherit the mask."""
  allowed = sorted(os.sched_getaffinity(0))
  cores = [int(c) for c in a.cores.split(",")] if a.cores else allowed[-a.threads :]
  if len(cores) != a.threads or not set(cores) <= set(allowed):
    raise SystemExit(f"--cores {cores}: need {a.threads} of the allowed cores {allowed}")
  os.sched_setaffinity(0, cores)
  return cores


ARGS = parse_args()
CORES = pin_cores(ARGS)
if ARGS.threads == 1:  # before jax is imported: XLA reads its flags once
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from rl_jax import models  # noqa: E402
from rl_jax.sampling import generate  # noqa: E402

torch.set_num_threads(ARGS.threads)


# ------------------------------------------------------------------ the models (transformers' classes)
def hf_model(kind: str, a, path: str):
  import transformers as tf

  torch.manual_seed(0)
  heads = max(1, a.hidden // 32)
  orig = max(128, a.prompt_len + a.new_tokens)  # YaRN x4 over this; Llama's window is the same 4x
  common = dict(
    vocab_size=a.vocab,
    hidden_size=a.hidden,
    intermediate_size=4 * a.hidden,
    num_hidden_layers=a.layers,
    num_attention_heads=heads,
    max_position_embeddings=4 * orig,
    tie_word_embeddings=False,
    initializer_range=0.02,
  )
  if kind == "deepseek_v3":
    cfg = tf.DeepseekV3Config(
      **common,
      num_key_value_heads=heads,
      moe_intermediate_size=a.hidden,
      n_shared_experts=1,
      n_routed_experts=a.experts,
      num_experts_per_tok=2,
      n_group=4,
      topk_group=2,
      first_k_dense_replace=1,
      routed_scaling_factor=2.5,
      norm_topk_prob=True,
      q_lora_rank=a.hidden // 2,
      kv_lora_rank=a.hidden // 4,
      qk_rope_head_dim=32,
      qk_nope_head_dim=32,
      v_head_dim=32,
      rope_interleave=True,
      num_nextn_predict_layers=0,
      rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": orig,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
      },
    )
    model = tf.DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():
      for layer in model.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
  elif kind == "llama":
    cfg = tf.LlamaConfig(
      **common,
      num_key_value_heads=max(1, heads // 4),
      head_dim=32,
      rms_norm_eps=1e-5,
      rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    model = tf.LlamaForCausalLM(cfg)
  else:
    raise SystemExit(f"unknown model {kind!r}: deepseek_v3 or llama")
  with torch.no_grad():  # sharper logits: fewer greedy near-ties, so token agreement means something
    model.model.embed_tokens.weight.mul_(20.0)
    model.lm_head.weight.mul_(20.0)
  model = model.eval()
  model.save_pretrained(path)
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  return model


def hf_cache_per_token_layer(model) -> int:
  """Numbers transformers keeps per token per layer, measured on its cache after one 4-token forward."""
  with torch.no_grad():
    out = model(torch.zeros(1, 4, dtype=torch.long), use_cache=True)
  cache = out.cache if "cache" in out else out.past_key_values  # renamed in transformers 5.x
  layer = cache.layers[0]
  return (layer.keys.numel() + layer.values.numel()) // 4


def hf_expanded_per_token_layer(model) -> int:
  """What transformers' DeepSeek-V3 attention re-expands per cached token per layer at every decode step
  (`expand_kv`: per-head K and V from the latent; ours attends to the latent directly). 0: no expansion."""
  c = model.config
  if not hasattr(c, "kv_lora_rank"):
    return 0
  return c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)


def ours_cache_per_token_layer(model) -> int:
  cache = model.init_cache(1, 1)  # {layer group: {name: [L, 1, 1, ...]}}
  return sum(int(x.size) for x in jax.tree.leaves(cache)) // model.cfg.num_hidden_layers


# ------------------------------------------------------------------ timing
class Clock:
  """Wall time and process CPU time (all threads) of a region."""

  def __enter__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc):
    self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

  @property
  def cpu_per_wall(self) -> float:
    return self.cpu / self.wall


def check_threads(side: str, clock: Clock, a) -> None:
  """Says loudly when a timed region used more cores than it was given."""
  if clock.cpu_per_wall > 1.2 * a.threads:
    print(
      f"WARNING: {side} used {clock.cpu_per_wall:.2f} cores on average (cpu/wall) but was given {a.threads}: "
      "the comparison is not thread-for-thread",
      file=sys.stderr,
      flush=True,
    )


def time_hf(model, prompts: np.ndarray, a) -> tuple[Clock, np.ndarray]:
  ids = torch.tensor(prompts, dtype=torch.long)
  kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, cache_implementation=a.hf_cache)
  with torch.no_grad():
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
    with Clock() as clock:
      out = model.generate(ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, **kw)
  check_threads("transformers", clock, a)
  return clock, out[:, prompts.shape[1] :].numpy()


def time_ours(model, prompts: np.ndarray, a) -> tuple[Clock, float, np.ndarray]:
  rows = [list(map(int, p)) for p in prompts]
  with Clock() as first:
    generate(model, rows, max_new_tokens=a.new_tokens, temperature=0.0)  # compile + run: the warm-up
  with Clock() as clock:
    res = generate(model, rows, max_new_tokens=a.new_tokens, temperature=0.0)
  assert (res.lengths == a.new_tokens).all()
  check_threads("rl_jax", clock, a)
  return clock, max(0.0, first.wall - clock.wall), res.tokens


def agreement(ours: np.ndarray, hf: np.ndarray) -> float:
  """Mean fraction of each row generated before the two first disagree (1.0: identical)."""
  same = ours == hf
  first_diff = np.where(same.all(1), same.shape[1], np.argmin(same, axis=1))
  return float(first_diff.mean() / same.shape[1])


def main(a) -> list[dict]:
  rows, caches = [], []
  device = f"{jax.devices()[0].device_kind}, {a.threads} thread(s) pinned to core(s) {CORES}"
  load = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as tmp:
    for kind in a.models.split(","):
      path = os.path.join(tmp, kind)
      hf = hf_model(kind, a, path)
      ours = models.load_hf(path, dtype=jnp.float32)
      n_params = models.count_params(ours)
      caches.append(
        {
          "model": kind,
          "ours": ours_cache_per_token_layer(ours),
          "hf": hf_cache_per_token_layer(hf),
          "hf_expanded_per_step": hf_expanded_per_token_layer(hf),
        }
      )
      for b in (int(x) for x in a.batches.split(",")):
        prompts = np.random.RandomState(b).randint(3, a.vocab, size=(b, a.prompt_len))
        hf_clock, hf_tok = time_hf(hf, prompts, a)
        our_clock, compile_s, our_tok = time_ours(ours, prompts, a)
        hf_s, our_s = hf_clock.wall, our_clock.wall
        n = b * a.new_tokens
        rows.append(
          {
            "bench": "sample_vs_hf",
            "model": kind,
            "params_m": round(n_params / 1e6, 2),
            "batch": b,
            "prompt_len": a.prompt_len,
            "new_tokens": a.new_tokens,
            "hf_tokens_per_s": round(n / hf_s, 1),
            "ours_tokens_per_s": round(n / our_s, 1),
            "speedup": round(hf_s / our_s, 2),
            "hf_cpu_per_wall": round(hf_clock.cpu_per_wall, 2),
            "ours_cpu_per_wall": round(our_clock.cpu_per_wall, 2),
            "ours_compile_s": round(compile_s, 1),
            "greedy_agreement": round(agreement(our_tok, hf_tok), 3),
            "hf_cache": a.hf_cache,
            "device": device,
          }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

  print(
    f"\nGreedy decoding, fp32, prompt {a.prompt_len} + {a.new_tokens} new tokens, {device}; "
    f"transformers {__import__('transformers').__version__} ({a.hf_cache} cache), jax {jax.__version__}; "
    f"1-min load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end\n"
  )
  print(
    "| model | params | batch | HF tokens/s | rl_jax tokens/s | rl_jax / HF | HF cpu/wall | rl_jax cpu/wall "
    "| rl_jax compile s | greedy agreement |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['model']} | {r['params_m']}M | {r['batch']} | {r['hf_tokens_per_s']} | {r['ours_tokens_per_s']} | "
      f"{r['speedup']}x | {r['hf_cpu_per_wall']:.2f} | {r['ours_cpu_per_wall']:.2f} | {r['ours_compile_s']} | "
      f"{r['greedy_agreement']:.3f} |"
    )
  print(
    "\nKV cache, numbers per token per layer (MLA: kv_lora + rope key), measured on each side's cache; "
    "HF's DeepSeek-V3 also expands every cached latent to per-head K and V at each decode step\n"
  )
  print("| model | rl_jax cache | HF cache | HF per-step expanded K+V |")
  print("|---|---|---|---|")
  for c in caches:
    print(f"| {c['model']} | {c['ours']} | {c['hf']} | {c['hf_expanded_per_step'] or '-'} |")
  print("\n" + json.dumps({"bench": "sample_vs_hf", "args": vars(a), "results": rows, "cache_per_token_layer": caches}))
  return rows


if __name__ == "__main__":
  main(ARGS)
