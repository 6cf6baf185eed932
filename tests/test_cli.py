"""`rl-jax` commands end to end: streaming generate from a tiny checkpoint, convert/export round trip through
the CLI, and the one-line error with exit code 2."""

import itertools
import json

import numpy as np
import pytest

from rl_jax import checkpoint, cli, models, sampling
from rl_jax.data import procedural
from rl_jax.data import tokenizer as toks
from rl_jax.models.config import preset
from tests import hf_models

PROMPT = "Q: 12+7=? A:"


class Recorder:
  """A stdout that keeps every write separately (capsys would merge them)."""

  def __init__(self):
    self.writes = []

  def write(self, s):
    self.writes.append(s)
    return len(s)

  def flush(self):
    pass

  def text(self):
    return "".join(self.writes)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  tok = toks.train_bpe(itertools.islice(procedural.documents(0), 200), vocab_size=512)
  toks.save(tok, root / "tok")
  # Saved with capacity dispatch: `generate` must load it dropless.
  model = models.build(preset("tiny-moe", moe_capacity_factor=1.0), seed=0)
  return checkpoint.save_model(str(root / "ckpt"), model, tokenizer_dir=str(root / "tok")), tok


def test_generate_streams_sample_0(tiny_checkpoint, monkeypatch):
  ckpt, tok = tiny_checkpoint
  out, seen = Recorder(), {}
  real_generate = sampling.generate

  def spy(model, prompts, **kw):
    seen["capacity"], seen["prompt"] = model.cfg.moe_capacity_factor, prompts[0]
    seen["res"] = real_generate(model, prompts, **kw)
    seen["writes_before_return"] = len(out.writes)
    return seen["res"]

  monkeypatch.setattr(sampling, "generate", spy)
  monkeypatch.setattr("sys.stdout", out)
  prompt = PROMPT
  rc = cli.main(
    [
      "generate",
      "--checkpoint",
      ckpt,
      "--prompt",
      prompt,
      "--max-new-tokens",
      "12",
      "--num-samples",
      "2",
      "--temperature",
      "1.0",
      "--seed",
      "0",
    ]
  )
  assert rc == 0
  res = seen["res"]
  assert seen["capacity"] is None
  assert seen["prompt"] == [toks.Vocab.from_tokenizer(tok).bos_id] + toks.encode(tok, prompt)
  texts = [toks.decode(tok, res.tokens[i, : res.lengths[i]]) for i in range(2)]
  assert out.text() == (
    f"--- sample 0\n{prompt}{texts[0]}\n"
    f"[{res.lengths[0]} tokens, mean logprob {res.logprobs[0, : res.lengths[0]].mean():.3f}]\n"
    f"--- sample 1\n{prompt}{texts[1]}\n"
    f"[{res.lengths[1]} tokens, mean logprob {res.logprobs[1, : res.lengths[1]].mean():.3f}]\n"
  )
  # Streamed: sample 0's text arrived in several pieces, all before generate returned.
  streamed = out.writes[1 : seen["writes_before_return"]]
  assert len(streamed) >= 3 and "".join(streamed) == texts[0]


def test_stream_reports_every_step_in_order(tiny_checkpoint):
  """The callback `generate(stream=...)` gets: one call per step, every row's token, inactive rows flagged."""
  ckpt, tok = tiny_checkpoint
  model = checkpoint.load_model(ckpt, moe_capacity_factor=None)  # the CLI's compiled sampler is reused
  prompt = [toks.Vocab.from_tokenizer(tok).bos_id] + toks.encode(tok, PROMPT)
  kw = dict(max_new_tokens=12, temperature=1.0, seed=0, num_samples=2)

  def run(**more):
    steps = []
    res = sampling.generate(model, [prompt], stream=lambda t, a: steps.append((t.copy(), a.copy())), **kw, **more)
    return res, np.stack([t for t, _ in steps], 1), np.stack([a for _, a in steps], 1)

  free, tokens, active = run()
  assert active.all() and tokens.shape == (2, 12)
  np.testing.assert_array_equal(tokens, free.tokens)
  eos = int(free.tokens[0, 4])  # row 0 now stops by step 4, row 1 when (if) it meets it
  res, tokens, active = run(eos_id=eos)
  assert res.lengths[0] <= 5 and tokens.shape[1] == res.lengths.max()
  for i in range(2):
    n = res.lengths[i]
    assert active[i, :n].all() and not active[i, n:].any()
    np.testing.assert_array_equal(tokens[i, :n], res.tokens[i, :n])


def test_convert_export_round_trip(tmp_path, capsys):
  torch = hf_models._torch()
  from transformers import AutoModelForCausalLM

  hf = hf_models.qwen2(str(tmp_path / "hf"))
  ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
  assert cli.main(["convert", "--hf", str(tmp_path / "hf"), "--out", ckpt, "--dtype", "float32"]) == 0
  assert cli.main(["export", "--checkpoint", ckpt, "--hf-out", back]) == 0
  assert cli.main(["info", "--checkpoint", ckpt]) == 0
  printed = capsys.readouterr().out
  assert "converted" in printed and "exported" in printed and '"arch": "qwen2"' in printed
  ids = np.random.RandomState(0).randint(0, 256, size=(1, 19))
  again = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)
  np.testing.assert_allclose(hf_models.logits(again, ids), hf_models.logits(hf, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("argv", [["generate", "--prompt", "hi"], ["export", "--hf-out", "unused"], ["info"]])
def test_missing_checkpoint_is_one_line_error(argv, tmp_path, capsys):
  missing = str(tmp_path / "nope")
  assert cli.main(argv[:1] + ["--checkpoint", missing] + argv[1:]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and missing in err and err.count("\n") == 1, err


def test_extend_requires_yarn_and_an_init(tmp_path, capsys):
  from rl_jax import cli

  assert cli.main(["extend", "--run-dir", str(tmp_path / "e"), "train.steps=1"]) == 2
  assert "model.rope.type=yarn" in capsys.readouterr().err
  assert cli.main(["extend", "--config", "configs/extend_tiny.yaml", "--run-dir", str(tmp_path / "e")]) == 2
  err = capsys.readouterr().err
  assert "--init" in err and err.count("\n") == 1


@pytest.mark.parametrize(
  "setting, message",
  [
    ("nonsense", "override 'nonsense' must look like key.path=value"),
    ("dtype=bf16", "config key 'dtype' must be one of ['float32', 'bfloat16', 'float16'], got 'bf16'"),
    ("rope.factr=4", "unknown config key 'rope.factr' (did you mean 'rope.factor'?)"),
  ],
)
def test_init_bad_setting_is_one_line_error(setting, message, tmp_path, capsys):
  assert cli.main(["init", "--model", "tiny-moe", "--set", setting, "--out", str(tmp_path / "x")]) == 2
  assert capsys.readouterr().err == f"error: {message}\n"


def test_info_on_a_bad_model_config_names_the_file(tmp_path, capsys):
  import json

  good = checkpoint.config_to_json(preset("tiny-moe"))
  (tmp_path / "model_config.json").write_text(json.dumps({**good, "hidden_szie": 64}))
  assert cli.main(["info", "--checkpoint", str(tmp_path)]) == 2
  path = tmp_path / "model_config.json"
  want = f"error: {path}: unknown config key 'hidden_szie' (did you mean 'hidden_size'?)\n"
  assert capsys.readouterr().err == want


def test_bench_spec_checks_speculative_against_greedy(tiny_checkpoint, tmp_path, capsys):
  """`rl-jax bench spec` runs both decoders on corpus prompts, asserts speculative == greedy tokens, and prints
  one JSON row per draft length; a missing checkpoint is a one-line error."""
  ckpt, _ = tiny_checkpoint
  argv = ["bench", "spec", "--checkpoint", ckpt, "--draft-lens", "2", "--prompts", "1", "--new-tokens", "8"]
  assert cli.main(argv + ["--repeats", "1"]) == 0
  row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert row["bench"] == "spec" and row["draft_len"] == 2 and row["mtp_modules"] == 1
  assert 0 <= row["acceptance_rate"] <= 1 and row["speedup"] > 0 and 1 <= row["tokens_per_verify"] <= 3
  missing = str(tmp_path / "nope")
  assert cli.main(["bench", "spec", "--checkpoint", missing]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and missing in err and err.count("\n") == 1, err
