"""Long-context evaluation (rl_jax/longctx.py), the longkey corpus, and continued pretraining of a checkpoint
whose model section is taken from --init (issue 12, items 1, 2 and 4)."""

from __future__ import annotations

import json
import os
import random
import re
import string

import numpy as np
import pytest

from rl_jax import longctx
from rl_jax.data import procedural as P
from rl_jax.data import tokenizer as T

_SENT = "|".join(re.escape(s) for s in P.FILLER)
# The one textual format both the corpus and the eval must share, written out independently of passkey_text.
_FORMAT = re.compile(
  rf"^((?:(?:{_SENT}) )*)The pass key is ([A-Z]-[a-z])\. Remember it\.((?: (?:{_SENT}))*) "
  rf"What is the pass key\? The pass key is ([A-Z]-[a-z])\.$"
)


@pytest.fixture(scope="module")
def tok():
  return T.train_bpe((P.document_at(0, i, "longkey") for i in range(300)), vocab_size=300)


def _induction_stats(window: int | None, k: int = 3):
  """A 'model' that predicts the token that followed the latest earlier occurrence of the last k tokens, looking
  back at most `window` tokens (None: the whole row); its loss is 0 where it is right and 1 elsewhere."""

  def stats(tokens, targets):
    greedy = np.zeros_like(tokens)
    for b, row in enumerate(tokens.tolist()):
      seen = {}  # k-gram -> index of the token that followed its latest occurrence
      for t in range(len(row)):
        ctx = tuple(row[max(0, t - k + 1) : t + 1])
        nxt = seen.get(ctx)
        if nxt is not None and (window is None or t - nxt < window):
          greedy[b, t] = row[nxt]
        if t >= k - 1:
          seen[tuple(row[t - k + 1 : t + 1])] = t + 1
    return greedy, (greedy != targets).astype(np.float32)

  return stats


def test_longkey_documents_have_the_passkey_format():
  for kind in ("longkey", "longkey4x"):
    for i in range(50):
      m = _FORMAT.match(P.document_at(3, i, kind))
      assert m, P.document_at(3, i, kind)
      assert m.group(2) == m.group(4)  # the answer is the stated key


def test_passkey_prompts_are_the_corpus_format(tok):
  for length, depth in ((64, 0.0), (128, 0.5), (256, 1.0)):
    ids, n_prompt, key = longctx.passkey_case(tok, length, depth, random.Random(length))
    assert len(ids) <= length and ids[0] == tok.token_to_id(T.BOS)
    text = T.decode(tok, ids[1:])
    m = _FORMAT.match(text + ".")
    assert m and m.group(2) == m.group(4) == key, text
    assert T.decode(tok, ids[n_prompt:]).strip() == key  # the scored tokens are the key's
    before, after = m.group(1).split(". "), m.group(3).split(". ")
    n = len([s for s in before if s]) + len([s for s in after if s])
    assert round(depth * n) == len([s for s in before if s])  # the key sits at the asked depth
    assert length - len(ids) <= max(len(T.encode(tok, f" {s}")) for s in P.FILLER)  # filled up to a sentence


def test_passkey_fails_past_the_window_and_an_oracle_succeeds(tok):
  grid = dict(lengths=[64, 256], depths=[0.0, 0.5, 1.0], samples=3, batch_size=4)
  oracle = longctx.passkey(_induction_stats(None), tok, **grid)
  assert oracle["accuracy"] == [[1.0, 1.0]] * 3
  near = longctx.passkey(_induction_stats(64), tok, **grid)
  # sees 64 tokens back: retrieves in 64-token prompts and from depth 1 (the key just before the question),
  # never from the start or the middle of 256 tokens
  assert [row[0] for row in near["accuracy"]] == [1.0, 1.0, 1.0]
  assert [row[1] for row in near["accuracy"]] == [0.0, 0.0, 1.0]
  assert near["accuracy_by_length"] == {"64": 1.0, "256": pytest.approx(1 / 3)}


def test_passkey_rejects_a_bad_grid(tok):
  with pytest.raises(ValueError, match="--depths"):
    longctx.passkey(_induction_stats(None), tok, lengths=[64], depths=[1.5])
  with pytest.raises(ValueError, match="--lengths 8"):
    longctx.passkey(_induction_stats(None), tok, lengths=[8], depths=[0.0])


def test_perplexity_buckets_match_a_hand_computation():
  rows = [list(range(1, 11)), list(range(1, 5)), list(range(1, 8))]  # 10, 4 and 7 tokens

  def stats(tokens, targets):  # the loss at (row, t) is a known function of both
    b = np.arange(tokens.shape[0])[:, None]
    return np.zeros_like(tokens), (tokens * 0.5 + b * 10).astype(np.float32)

  res = longctx.perplexity(stats, rows, length=10, bucket=4, batch_size=2)
  want = []
  for start in (0, 4, 8):
    losses = []
    for chunk, r in ((0, rows[0]), (1, rows[1]), (0, rows[2])):  # batch_size 2: the third row is row 0 of a batch
      losses += [r[t] * 0.5 + chunk * 10 for t in range(start, min(start + 4, len(r) - 1))]
    want.append(sum(losses) / len(losses))
  assert [b["loss"] for b in res["buckets"]] == pytest.approx(want)
  assert [b["tokens"] for b in res["buckets"]] == [4 + 3 + 4, 4 + 0 + 2, 1]
  assert [(b["start"], b["end"]) for b in res["buckets"]] == [(0, 4), (4, 8), (8, 9)]


# ------------------------------------------------------------------ continued pretraining from --init
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """kind -> a tiny HF model of that kind, converted, with a tokenizer of its own saved in the checkpoint."""
  root = tmp_path_factory.mktemp("converted")
  return {kind: _converted(kind, root) for kind in ("qwen2", "deepseek_v3")}


def _converted(kind: str, tmp_path) -> str:
  from rl_jax import cli

  from . import hf_models

  _, hf = hf_models.build(kind, str(tmp_path))
  out = str(tmp_path / f"{kind}-ckpt")
  assert cli.main(["convert", "--hf", hf, "--out", out]) == 0
  T.save(_char_tokenizer(), os.path.join(out, "tokenizer"))
  return out


def _char_tokenizer():
  """One token per character of the longkey corpus: fits the tiny HF models' 256-token vocabulary (a byte-level
  BPE needs more than 256 tokens)."""
  import tokenizers

  chars = sorted(
    set("".join(P.document_at(5, i, "longkey") for i in range(50))) | set(string.ascii_letters + string.digits)
  )
  tok = tokenizers.Tokenizer(tokenizers.models.BPE({t: i for i, t in enumerate([*T.DEFAULT_SPECIALS, *chars])}, []))
  tok.add_special_tokens(list(T.DEFAULT_SPECIALS))
  tok.decoder = tokenizers.decoders.Fuse()
  return tok


def _jsonl(tmp_path) -> str:
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": P.document_at(7, i, "longkey")}) + "\n" for i in range(64)))
  return str(path)


@pytest.mark.parametrize("kind", ["qwen2", "deepseek_v3"])
def test_continued_pretraining_takes_the_model_from_init(kind, converted, tmp_path, capsys):
  from rl_jax import checkpoint as ckpt
  from rl_jax import cli

  init = converted[kind]
  cfg = tmp_path / "cont.yaml"  # no model section: the checkpoint's own
  cfg.write_text(
    f"train: {{batch_size: 8, seq_len: 32, compute_dtype: float32, log_every: 1}}\ndata: {{source: {_jsonl(tmp_path)}}}\n"
  )
  run = str(tmp_path / "run")
  args = ["pretrain", "--config", str(cfg), "--init", init, "--run-dir", run, "checkpoint.every=2"]
  assert cli.main([*args, "train.steps=2", "model.max_position_embeddings=1024"]) == 0, capsys.readouterr().err
  got, want = ckpt.read_model_config(os.path.join(run, "checkpoints")), ckpt.read_model_config(init)
  assert got.arch == want.arch and got.hidden_size == want.hidden_size and got.vocab_size == want.vocab_size
  assert got.max_position_embeddings == 1024  # a model.* override on top of the checkpoint's config
  tok_json = os.path.join(run, "checkpoints", "tokenizer", "tokenizer.json")
  assert open(tok_json).read() == open(os.path.join(init, "tokenizer", "tokenizer.json")).read()
  steps = 2
  if kind == "qwen2":  # resuming is the same code for both; the MoE's second compile would only add time
    assert cli.main([*args, "train.steps=3", "model.max_position_embeddings=1024"]) == 0  # resumes at 2
    steps = 3
  rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == list(range(1, steps + 1)) and all(np.isfinite(r["loss"]) for r in rows)
  assert ckpt.latest_step(os.path.join(run, "checkpoints")) == steps


def test_a_given_model_section_must_still_match_init(converted, tmp_path, capsys):
  from rl_jax import cli

  init = converted["qwen2"]
  args = ["pretrain", "--init", init, "--run-dir", str(tmp_path / "run"), "model=tiny-moe", "train.steps=1"]
  args += [f"data.source={_jsonl(tmp_path)}", "train.batch_size=8", "train.seq_len=32"]
  assert cli.main(args) == 2
  assert "parameters do not match the run's model" in capsys.readouterr().err


def test_from_init_needs_init(tmp_path):
  from rl_jax.config import ConfigError, load_run_config

  with pytest.raises(ConfigError, match="model.from_init"):
    load_run_config(None, ["model.from_init=true"])


def test_passkey_and_perplexity_cli_on_a_checkpoint(converted, tmp_path, capsys):
  """End to end through `rl-jax eval`: JSON plus figure, on a converted checkpoint with its own tokenizer."""
  from rl_jax import cli

  init = converted["qwen2"]
  out = tmp_path / "pk.json"
  base = ["eval", "--checkpoint", init, "--num-problems", "2"]
  assert cli.main([*base, "--task", "passkey", "--lengths", "128,192", "--depths", "0,1", "--out", str(out)]) == 0
  res = json.loads(out.read_text())
  assert np.asarray(res["accuracy"]).shape == (2, 2) and (tmp_path / "pk.png").stat().st_size > 0
  out = tmp_path / "ppl.json"
  args = ["--task", "perplexity", "--lengths", "96", "--bucket", "32", "--data", "procedural:longkey"]
  assert cli.main([*base, *args, "--out", str(out)]) == 0
  res = json.loads(out.read_text())
  assert [b["start"] for b in res["buckets"]] == [0, 32, 64] and np.isfinite(res["mean_loss"])
  assert (tmp_path / "ppl.png").stat().st_size > 0
  assert cli.main([*base, "--task", "passkey", "--lengths", "64,x"]) == 2
  assert "--lengths expects comma-separated integers" in capsys.readouterr().err
