"""The Bradley-Terry reward model: the loss and its gradient against the formula, the score read at the last real
token, `rl-jax train-rm` learning a preference on held-out pairs, and its score mixed into GRPO rewards."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rl_jax import checkpoint as ckpt
from rl_jax import cli, models
from rl_jax.data import procedural, tasks
from rl_jax.data import tokenizer as toks
from rl_jax.reward_model import RewardModel, pad_rows, sequence_scores
from rl_jax.train import rm


def test_bt_loss_and_gradient_match_the_formula():
  rng = np.random.default_rng(0)
  r_c, r_r = rng.normal(size=7) * 3, rng.normal(size=7) * 3
  d = r_c - r_r
  want = np.mean(np.log1p(np.exp(-d)))  # -log sigmoid(d), float64
  want_grad_c = -(1.0 / (1.0 + np.exp(d))) / len(d)  # d/dr_c of the mean: -sigmoid(-d) / N
  got, (g_c, g_r) = jax.value_and_grad(rm.bt_loss, argnums=(0, 1))(jnp.asarray(r_c), jnp.asarray(r_r))
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g_c), want_grad_c, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g_r), -want_grad_c, rtol=1e-5)


def _tiny_cfg(vocab: int, **kw):
  return models.ModelConfig(
    arch="llama", vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256, **kw,
  )  # fmt: skip


def test_score_is_the_head_at_the_last_real_token_and_padding_is_inert():
  model = models.build(_tiny_cfg(64, score_head=True), seed=1)
  model.score[...] = jax.random.normal(jax.random.key(0), model.score[...].shape)  # a non-zero head
  scores = nnx.jit(lambda m, t, n: sequence_scores(m, t, n))
  hidden = nnx.jit(lambda m, t: m.forward(t).hidden_BTD)
  rows = [[1, 5, 9, 11, 2], [1, 7, 2]]
  t, n = pad_rows(rows, 8)
  got = np.asarray(scores(model, jnp.asarray(t), jnp.asarray(n)))
  for i, r in enumerate(rows):  # each row alone, unpadded: hidden state at its last token @ the head
    h = np.asarray(hidden(model, jnp.asarray([r]))[0, -1], np.float64)
    want = h @ np.asarray(model.score[...][:, 0], np.float64)
    np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)
  t2, n2 = pad_rows(rows, 16)
  t2[:, 10:] = 33  # garbage after the padding too
  np.testing.assert_allclose(np.asarray(scores(model, jnp.asarray(t2), jnp.asarray(n2))), got, rtol=1e-5)


def test_save_hf_refuses_a_score_head(tmp_path):
  with pytest.raises(ValueError, match="score_head"):
    models.save_hf(models.build(_tiny_cfg(64, score_head=True)), str(tmp_path / "hf"))


# ---------------------------------------------------------------------------------------- train-rm, GRPO
def _pair(p: dict, rng) -> dict:
  """chosen: the worked answer, well formatted; rejected: a wrong answer without the answer tags."""
  steps = " ".join(p["steps"])
  wrong = int(p["answer"]) + int(rng.integers(1, 9))
  return {
    "prompt": tasks.bare(p)["prompt"],
    "chosen": f"<think>{steps}</think> <answer>{p['answer']}</answer>",
    "rejected": f"<think>{steps}</think> {wrong}",
  }


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A tiny random dense checkpoint with a BPE tokenizer, and train / held-out pair files."""
  out = tmp_path_factory.mktemp("rm")
  tok = toks.train_bpe((procedural.r1zero_document(0, i, "chain") for i in range(300)), 320)
  toks.save(tok, out / "tok")
  ckpt.save_model(str(out / "base"), models.build(_tiny_cfg(320)), tokenizer_dir=str(out / "tok"))
  rng = np.random.default_rng(0)
  for split, n in (("train", 256), ("test", 64)):
    with open(out / f"{split}.jsonl", "w") as f:
      for p in tasks.take("chain", split, n, seed=0):
        f.write(json.dumps(_pair(p, rng)) + "\n")
  return out


@pytest.fixture(scope="module")
def rm_run(base):
  rc = cli.main([
    "train-rm", "--init", str(base / "base"), "--run-dir", str(base / "rm"),
    f"data.source={base / 'train.jsonl'}", "sft.template=plain", "train.steps=40", "train.batch_size=16",
    "train.seq_len=64", "train.compute_dtype=float32", "train.log_every=10", "checkpoint.every=0",
    "optimizer.lr=3e-3", "optimizer.warmup_steps=5", "optimizer.schedule=constant",
  ])  # fmt: skip
  assert rc == 0
  return base / "rm" / "checkpoints"


def test_train_rm_learns_held_out_preferences(base, rm_run):
  rows = [json.loads(line) for line in open(base / "rm" / "metrics.jsonl")]
  assert {"loss", "accuracy", "margin", "grad_norm"} <= set(rows[-1])
  model = RewardModel.load(str(rm_run))
  assert model.template == "plain" and model.model.cfg.score_head
  test = [json.loads(line) for line in open(base / "test.jsonl")]
  prompts = [r["prompt"] for r in test]
  r_c = model.score(prompts, [r["chosen"] for r in test], raw=True)
  r_r = model.score(prompts, [r["rejected"] for r in test], raw=True)
  assert np.mean(r_c > r_r) >= 0.9, np.mean(r_c > r_r)  # chance: 0.5
  s = model.score(prompts[:3], [r["chosen"] for r in test[:3]])
  np.testing.assert_allclose(s, 1 / (1 + np.exp(-r_c[:3])), rtol=1e-5)


def test_bad_pair_line_names_file_and_line(base, tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" + '{"prompt": "a"}\n')
  tok = toks.load(str(base / "tok"))
  with pytest.raises(ValueError, match=rf"{bad}:2: expected an object"):
    rm.encode_pairs(str(bad), tok, "plain", 64)


def test_grpo_with_the_reward_model(base, rm_run):
  rc = cli.main([
    "grpo", "--config", "grpo_r1zero_tiny", "--init", str(base / "base"), "--run-dir", str(base / "grpo"),
    "train.steps=2", "train.log_every=1", "checkpoint.every=0", "grpo.prompts_per_step=4", "grpo.group_size=2",
    "grpo.max_new_tokens=8", "grpo.template=plain", "grpo.eval_problems=1", "grpo.eval_k=1",
    "grpo.rewards={accuracy: 1.0, format: 1.0, rm: 0.5}", f"grpo.reward_model={rm_run}",
  ])  # fmt: skip
  assert rc == 0
  rows = [json.loads(line) for line in open(os.path.join(base, "grpo", "metrics.jsonl"))]
  rows = [r for r in rows if "reward" in r]
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert 0 < r["reward_rm"] < 1
    want = r["reward_accuracy"] + r["reward_format"] + 0.5 * r["reward_rm"]
    assert r["reward"] == pytest.approx(want, abs=1e-5)


def test_pair_source_resumes_its_order():
  pairs = [([1, i + 3, 2], [1, i + 4, 2]) for i in range(10)]
  a = rm.PairSource(pairs, 4, 8, seed=3)
  for _ in range(4):  # past an epoch boundary (10 pairs): a new order
    next(a)
  b = rm.PairSource(pairs, 4, 8, seed=3)
  b.set_state(a.get_state())
  for _ in range(3):
    x, y = next(a), next(b)
    assert all(np.array_equal(x[k], y[k]) for k in rm.PAIR_KEYS)
  epoch0 = [tuple(next(rm.PairSource(pairs, 10, 8, seed=3))["chosen"][:, 1])]
  assert sorted(epoch0[0]) == list(range(3, 13))  # each pair once per epoch


def test_rm_reward_needs_a_reward_model_checkpoint():
  from rl_jax.config import ConfigError, load_run_config

  with pytest.raises(ConfigError, match="grpo.reward_model"):
    load_run_config("grpo_r1zero_tiny", ["grpo.rewards={accuracy: 1.0, rm: 0.5}"])
  assert load_run_config("grpo_r1zero_tiny", ["grpo.rewards={rm: 1.0}", "grpo.reward_model=x"]).grpo.reward_model
