"""SFT (`rl-jax sft`): only response tokens carry loss, packed == unpacked, the input formats, and a short CLI
run from a checkpoint that learns and resumes (CPU, tiny models)."""

import itertools
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from rl_jax import checkpoint, models, rollout
from rl_jax.config import SFTConfig, TrainConfig
from rl_jax.data import packing, procedural, tasks
from rl_jax.data import sft as sft_data
from rl_jax.data import tokenizer as toks
from rl_jax.models.config import preset
from tests._subproc import run_python

T = 48


@pytest.fixture(scope="module")
def tok():
  return toks.train_bpe(itertools.islice(procedural.documents(0), 300), vocab_size=512)


def _examples(n: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    a, b = (int(x) for x in rng.integers(0, 50, 2))
    out.append({"prompt": f"{a}+{b}=?", "response": f"<answer>{a + b}</answer>"})
  return out


def _write_jsonl(path, rows) -> str:
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def _rows(tok, docs, *, pack: bool) -> dict:
  vocab = toks.Vocab.from_tokenizer(tok)
  rows = list(packing.pack(docs, T, vocab.eos_id, vocab.pad_id, pack=pack))
  return {k: np.stack([r[k] for r in rows]) for k in packing.FIELDS}


def _docs(tok, rows, cfg: SFTConfig) -> list[packing.Doc]:
  enc = sft_data._Encode(tok, cfg)
  return [enc(("test", r)) for r in rows]


# ------------------------------------------------------------------------------------------ masks
def test_prompt_response_mask_by_hand(tok):
  cfg = SFTConfig(template="plain")
  vocab = toks.Vocab.from_tokenizer(tok)
  ids, mask = sft_data.encode_example(tok, {"prompt": "12+7=?", "response": "<answer>19</answer>"}, cfg)
  p, r = toks.encode(tok, "12+7=?"), toks.encode(tok, "<answer>19</answer>")
  assert ids == [vocab.bos_id, *p, *r, vocab.eos_id]  # as rollout.encode_prompts + the sampler see it
  assert mask == [0] * (1 + len(p)) + [1] * (len(r) + 1)
  row = _rows(tok, _docs(tok, [{"prompt": "12+7=?", "response": "<answer>19</answer>"}], cfg), pack=True)
  n = len(ids) - 1
  want = np.zeros(T, np.int32)
  want[len(p) : n] = 1  # targets j predict ids[j + 1]: the first response token is target len(p)
  np.testing.assert_array_equal(row["loss_mask"][0], want)
  np.testing.assert_array_equal(row["targets"][0, :n], ids[1:])
  on = row["loss_mask"][0] == 1
  assert toks.decode(tok, row["targets"][0][on]) == "<answer>19</answer><eos>"
  # the default template's prompt ids are exactly the ones GRPO's rollouts feed the sampler
  ids, mask = sft_data.encode_example(tok, {"prompt": "12+7=?", "response": "19"}, SFTConfig())
  rollout_ids = rollout.encode_prompts(tok, [{"prompt": "12+7=?"}], SFTConfig().template, 1000)[0]
  assert ids[: len(rollout_ids)] == rollout_ids and mask.index(1) == len(rollout_ids)


def test_messages_chatml_loss_on_assistant_turns_only(tok):
  msgs = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "1+1?"},
    {"role": "assistant", "content": "2"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
  ]
  ids, mask = sft_data.encode_example(tok, {"messages": msgs}, SFTConfig(chat_format="chatml"))
  ids, mask = np.asarray(ids), np.asarray(mask)
  assert toks.decode(tok, ids[mask == 1]) == "2<|im_end|>4<|im_end|><eos>"
  prompt = (
    "<bos><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    "\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
  )
  assert toks.decode(tok, ids[mask == 0]) == prompt
  ids_r1, mask_r1 = sft_data.encode_example(tok, {"messages": msgs[1:3]}, SFTConfig(chat_format="deepseek_r1"))
  on = np.asarray(mask_r1) == 1
  assert toks.decode(tok, np.asarray(ids_r1)[on]) == "2<｜end▁of▁sentence｜><eos>"
  ids_p, mask_p = sft_data.encode_example(tok, {"messages": msgs[1:3]}, SFTConfig(chat_format="plain"))
  assert toks.decode(tok, np.asarray(ids_p)[np.asarray(mask_p) == 0]) == "<bos>1+1?"


@pytest.fixture(scope="module")
def tiny():
  """(graphdef, params, bias, jitted loss_fn) of a 2-layer tiny MoE (dropless, fp32) with MTP."""
  from rl_jax.train import state as S
  from rl_jax.train import step as ST

  cfg = preset("tiny-moe", moe_capacity_factor=None, num_hidden_layers=2, max_position_embeddings=2 * T)
  cfg = cfg.replace(dtype="float32")
  train = TrainConfig(mtp_lambda=0.3, balance_alpha=0.0, compute_dtype="float32", seq_len=T)
  graphdef, params, bias = S.split_model(models.build(cfg, seed=1))
  return graphdef, params, bias, jax.jit(ST.make_loss_fn(graphdef, cfg, train))


def test_only_response_tokens_carry_gradient(tok, tiny):
  from rl_jax import losses

  cfg = SFTConfig(template="plain")
  batch = _rows(tok, _docs(tok, _examples(4), cfg), pack=True)
  graphdef, params, bias, loss_fn = tiny
  loss = float(loss_fn(params, bias, batch)[0])
  prompt = (batch["loss_mask"] == 0) & (batch["segment_ids"] > 0)
  bad = {**batch, "targets": np.where(prompt, (batch["targets"] + 7) % 512, batch["targets"])}
  assert (bad["targets"] != batch["targets"]).sum() > 10
  assert float(loss_fn(params, bias, bad)[0]) == loss  # prompt targets: no effect on the loss (CE + MTP)

  @jax.jit
  def logits_grad(params, bias, batch):
    model = nnx.merge(graphdef, params, bias)
    out = model.forward(batch["tokens"], positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"])
    return jax.grad(losses.cross_entropy)(out.logits_BTV, batch["targets"], batch["loss_mask"])

  g = logits_grad(params, bias, batch)
  g_norm = np.abs(np.asarray(g)).sum(-1)
  assert (g_norm[batch["loss_mask"] == 0] == 0).all()
  assert (g_norm[batch["loss_mask"] == 1] > 0).all()


def test_packed_equals_unpacked_loss(tok, tiny):
  cfg = SFTConfig(template="plain")
  docs = _docs(tok, _examples(6, seed=3), cfg)
  packed, unpacked = _rows(tok, docs, pack=True), _rows(tok, docs, pack=False)
  assert len(packed["tokens"]) < len(unpacked["tokens"]) == 6
  assert packed["loss_mask"].sum() == unpacked["loss_mask"].sum()
  _, params, bias, loss_fn = tiny
  (lp, (mp, _)), (lu, (mu, _)) = loss_fn(params, bias, packed), loss_fn(params, bias, unpacked)
  for k in ("ce", "mtp"):
    assert abs(float(mp[k]) - float(mu[k])) < 1e-6, k
  assert abs(float(lp) - float(lu)) < 1e-6


# ------------------------------------------------------------------------------------------ sources
def test_jsonl_formats_epochs_and_resume(tok, tmp_path):
  rows = _examples(5) + [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
  path = _write_jsonl(tmp_path / "a.jsonl", rows)
  kw = dict(tokenizer=tok, sft_cfg=SFTConfig(template="plain", pack=False), seq_len=2 * T, batch_size=2, seed=0)
  it = sft_data.make_iterator(path, **kw)
  epoch = [next(it) for _ in range(3)]  # 6 examples, one per row
  on = lambda b: [toks.decode(tok, t[m == 1]) for t, m in zip(b["targets"], b["loss_mask"])]
  seen = sorted(s for b in epoch for s in on(b))
  assert seen == sorted([r["response"] + "<eos>" for r in rows[:5]] + ["yo<|im_end|><eos>"])
  second = [next(it) for _ in range(3)]
  assert sorted(s for b in second for s in on(b)) == seen
  assert [on(b) for b in second] != [on(b) for b in epoch]  # a new shuffle per epoch
  state = it.get_state()
  after = [next(it) for _ in range(2)]
  it2 = sft_data.make_iterator(path, **kw)
  it2.set_state(state)
  for a, b in zip(after, [next(it2) for _ in range(2)]):
    for k in packing.FIELDS:
      np.testing.assert_array_equal(a[k], b[k])


def test_malformed_line_names_file_and_line(tok, tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps(_examples(1)[0]) + "\n\n{not json\n")
  with pytest.raises(ValueError, match=rf"^{path}:3: malformed JSON"):
    sft_data.make_iterator(str(path), tokenizer=tok, sft_cfg=SFTConfig(), seq_len=T, batch_size=1, seed=0)
  path.write_text(json.dumps({"prompt": "x"}) + "\n")
  with pytest.raises(ValueError, match=rf"^{path}:1: needs string fields 'prompt' and 'response'"):
    sft_data.make_iterator(str(path), tokenizer=tok, sft_cfg=SFTConfig(), seq_len=T, batch_size=1, seed=0)


def test_too_long_dropped_or_error(tok, tmp_path, capsys):
  rows = _examples(3) + [{"prompt": "long", "response": "1 2 3 4 5 6 7 8 9 " * 20}]
  path = _write_jsonl(tmp_path / "a.jsonl", rows)
  kw = dict(tokenizer=tok, seq_len=T, batch_size=1, seed=0)
  it = sft_data.make_iterator(path, sft_cfg=SFTConfig(template="plain"), **kw)
  assert "dropped 1 of 4 examples" in capsys.readouterr().err
  assert not any("1 2 3" in toks.decode(tok, next(it)["targets"][0]) for _ in range(6))
  with pytest.raises(ValueError, match=rf"^{path}:4: example has \d+ tokens .*> train.seq_len={T}"):
    sft_data.make_iterator(path, sft_cfg=SFTConfig(template="plain", too_long="error"), **kw)


def test_array_record_input(tok, tmp_path):
  rows = _examples(4)
  tasks.write_array_record(rows, str(tmp_path), "sft_tiny", "train")
  cfg = SFTConfig(template="plain", pack=False)
  it = sft_data.make_iterator(
    "tfds:sft_tiny:train", tokenizer=tok, sft_cfg=cfg, seq_len=T, batch_size=4, seed=0, data_dir=str(tmp_path)
  )
  b = next(it)
  got = sorted(toks.decode(tok, t[m == 1]) for t, m in zip(b["targets"], b["loss_mask"]))
  assert got == sorted(r["response"] + "<eos>" for r in rows)


# ------------------------------------------------------------------------------------------ the stage
def test_hf_init_is_converted_once(tmp_path):
  from rl_jax.config import RunConfig
  from rl_jax.train import sft

  model = models.build(preset("tiny-moe", num_nextn_predict_layers=0), seed=2)
  models.save_hf(model, str(tmp_path / "hf"))
  run = RunConfig(run_dir=str(tmp_path / "run"), init=str(tmp_path / "hf"), train=TrainConfig(param_dtype="float32"))
  got = sft._as_checkpoint(run.init, run, "sft")
  assert got == str(tmp_path / "run" / "init_hf")
  back = checkpoint.load_model(got)
  leaves = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param).to_pure_dict())
  for x, y in zip(leaves(model), leaves(back), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_cli_sft_learns_and_resumes(tok, tmp_path):
  toks.save(tok, tmp_path / "tok")
  init = checkpoint.save_model(
    str(tmp_path / "init"), models.build(preset("tiny-moe"), seed=0), tokenizer_dir=str(tmp_path / "tok")
  )
  data = _write_jsonl(tmp_path / "sft.jsonl", _examples(32))
  run_dir = str(tmp_path / "run")
  args = ["-m", "rl_jax.cli", "sft", "--init", init, "--run-dir", run_dir, f"data.source={data}"]
  args += ["sft.template=plain", "train.seq_len=64", "train.batch_size=8", "train.compute_dtype=float32"]
  args += ["train.log_every=1", "checkpoint.every=10", "checkpoint.async_save=false", "optimizer.lr=3e-3"]
  out = run_python([*args, "train.steps=20"]).stdout
  assert "sft done: step 20" in out
  rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == list(range(1, 21))
  assert np.mean([r["ce"] for r in rows[-3:]]) < 0.7 * np.mean([r["ce"] for r in rows[:3]])
  assert all(r["tokens"] < 8 * 64 / 2 for r in rows)  # response tokens only
  again = run_python([*args, "train.steps=20"]).stdout
  assert "already at train.steps=20" in again
  assert len(open(os.path.join(run_dir, "metrics.jsonl")).readlines()) == 20
  more = run_python([*args, "train.steps=24"]).stdout
  assert "sft done: step 24" in more
  rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == list(range(1, 25))
  assert checkpoint.latest_step(os.path.join(run_dir, "checkpoints")) == 24
