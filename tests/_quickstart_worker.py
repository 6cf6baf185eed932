"""Child process of tests/test_quickstart.py: the quickstart pipeline, shortened (same configs and stages,
a few steps each), run through the CLI twice (the second run skips every finished stage), then the README's
hand-written GRPO loop on its base checkpoint, and `rl-jax eval --out`. Usage: python tests/_quickstart_worker.py OUT
"""

import contextlib
import io
import json
import os
import re
import sys

OUT = sys.argv[1]
RUN = os.path.join(OUT, "run")
PIPE = os.path.join(OUT, "short.yaml")
with open(PIPE, "w") as f:
  f.write("""
stages:
  - {name: base, command: pretrain, config: pretrain_r1zero_tiny,
     overrides: [train.steps=30, train.log_every=10, checkpoint.every=0, train.batch_size=8, train.seq_len=64]}
  - {name: eval_base, command: eval, checkpoint: base, eval: {num_problems: 4, k: 2, max_new_tokens: 24}}
  - {name: rl, command: grpo, config: grpo_r1zero_tiny, init: base,
     overrides: [train.steps=3, train.log_every=1, checkpoint.every=0, grpo.prompts_per_step=4, grpo.group_size=2,
                 grpo.max_new_tokens=24, grpo.eval_problems=4, grpo.eval_k=2, grpo.eval_every=2]}
  - {name: eval_final, command: eval, checkpoint: rl, eval: {num_problems: 4, k: 2, max_new_tokens: 24}}
report: {base: eval_base, final: eval_final}
""")

from rl_jax import cli  # noqa: E402

results = {}
for attempt in ("first", "again"):
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    rc = cli.main(["pipeline", PIPE, "--run-dir", RUN])
  results[attempt] = {"rc": rc, "out": buf.getvalue()}

# THE README'S GRPO LOOP, on the base checkpoint, two steps
readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
code = re.search(r"### GRPO by hand.*?```python\n(.*?)```", readme, re.S).group(1)
code = code.replace('"runs/r1_zero_tiny/base/checkpoints"', repr(os.path.join(RUN, "base", "checkpoints")))
code = code.replace(", 8, 20\n", ", 2, 2\n").replace("max_new_tokens=64", "max_new_tokens=24")  # G, STEPS
code = code.replace("seq_len=112", "seq_len=72")
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
  exec(compile(code, "README.md", "exec"), {})
results["readme"] = buf.getvalue()

buf = io.StringIO()
with contextlib.redirect_stdout(buf):
  rc = cli.main(["eval", "--checkpoint", os.path.join(RUN, "rl", "checkpoints"), "--num-problems", "3", "--k", "2",
                 "--max-new-tokens", "24", "--out", os.path.join(OUT, "eval.json")])  # fmt: skip
results["eval"] = {"rc": rc, "out": buf.getvalue()}
with open(os.path.join(OUT, "results.json"), "w") as f:
  json.dump(results, f)
