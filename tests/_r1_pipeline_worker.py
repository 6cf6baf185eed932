"""Child process of tests/test_r1_pipeline.py: the shipped R1 pipeline (configs/pipelines/r1_tiny.yaml), every
stage kept and wired as shipped but a few steps / problems each, run through the CLI twice (the second run skips
every finished stage); then the exported student is loaded by transformers and its logits compared with ours.
Usage: python tests/_r1_pipeline_worker.py OUT
"""

import contextlib
import io
import json
import os
import sys

import yaml

OUT = sys.argv[1]
RUN = os.path.join(OUT, "run")
PIPE = os.path.join(OUT, "short.yaml")

from rl_jax import cli  # noqa: E402
from rl_jax.models.config import config_path  # noqa: E402

SHORT = {  # per command: overrides that shrink a stage without changing what it does
  "pretrain": ["train.steps=20", "train.batch_size=8", "train.seq_len=64", "checkpoint.every=0", "train.log_every=10"],
  "extend": ["train.steps=4", "train.batch_size=4", "checkpoint.every=0", "train.log_every=2"],
  "sft": ["train.steps=4", "train.batch_size=4", "train.log_every=2"],
  "distill": ["train.steps=4", "train.batch_size=4", "train.log_every=2"],
  "train-rm": ["train.steps=4", "train.batch_size=4", "train.log_every=2"],
  "grpo": [
    "train.steps=2", "train.log_every=1", "grpo.prompts_per_step=4", "grpo.group_size=2", "grpo.max_new_tokens=24",
    "grpo.eval_problems=4", "grpo.eval_k=2", "grpo.eval_every=0",
  ],
}  # fmt: skip
pipe = yaml.safe_load(open(config_path("pipelines/r1_tiny", "run")))
for st in pipe["stages"]:
  if st["command"] in SHORT:
    st["overrides"] = [*st.get("overrides", []), *SHORT[st["command"]]]
  elif st["command"] == "eval":
    st["eval"] = {**st.get("eval", {}), "num_problems": 4, "k": 2, "max_new_tokens": 24}
  elif st["command"] == "rejection-sample":  # the judge still judges (agreement in stats) but does not filter
    filters = [f for f in st["sample"].get("filters", ["correct", "format", "language", "repetition"]) if f != "judge"]
    st["sample"] = {**st["sample"], "num_problems": 6, "num_samples": 2, "max_new_tokens": 24, "filters": filters}
with open(PIPE, "w") as f:
  yaml.safe_dump(pipe, f)

# A few-step base answers nothing right, so every rejection-sampling stage would keep nothing: the first of each
# prompt's samples is replaced by the worked, tagged solution (what a trained model writes), the others stay the
# real sampler's; the filters, files and every later stage run unchanged on that data.
from rl_jax import rejection  # noqa: E402

_real_sample_batch = rejection.sample_batch


def _sample_batch(model, tok, problems, spec, seed, pool=None):
  samples = _real_sample_batch(model, tok, problems, spec, seed, pool)
  for i, s in enumerate(samples):
    if i % spec.num_samples == 0:
      terms = [int(t) for t in s["question"].removesuffix("=?").split("+")]
      steps = [f"{sum(terms[:k])}+{terms[k]}={sum(terms[: k + 1])}" for k in range(1, len(terms))]
      s.update(text=f" <think>{'; '.join(steps)}</think><answer>{sum(terms)}</answer>", answer=str(sum(terms)))
      s.update(correct=True, format=1.0, language=1.0, repetition=0.0, tokens=24)
  return samples


rejection.sample_batch = _sample_batch

results = {}
for attempt in ("first", "again"):
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    rc = cli.main(["pipeline", PIPE, "--run-dir", RUN])
  results[attempt] = {"rc": rc, "out": buf.getvalue()}

# THE EXPORTED STUDENT in transformers, against our forward of the checkpoint it was exported from
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from rl_jax import checkpoint  # noqa: E402

torch.set_num_threads(1)
ours = checkpoint.load_model(os.path.join(RUN, "student_distilled", "checkpoints"), dtype="float32")
hf = AutoModelForCausalLM.from_pretrained(os.path.join(RUN, "student_hf"), dtype=torch.float32).eval()
ids = np.random.RandomState(0).randint(0, ours.cfg.vocab_size, size=(2, 33))
with torch.no_grad():
  want = hf(torch.as_tensor(ids)).logits.numpy()
got = np.asarray(ours(jnp.asarray(ids, jnp.int32)))
results["export"] = {"arch": type(hf).__name__, "max_abs_diff": float(np.abs(got - want).max()),
                     "logit_scale": float(np.abs(want).max())}  # fmt: skip
with open(os.path.join(OUT, "results.json"), "w") as f:
  json.dump(results, f)
