"""Rejection sampling keeps exactly what its filters accept (table tests of `select`), the judge's verdicts parse,
the R1 corpus holds judge and language-mixed documents and no held-out problem, and `rl-jax rejection-sample`
writes kept.jsonl / pairs.jsonl / stats.json / an ArrayRecord dataset that agree with each other."""

import dataclasses
import itertools
import json
import os
import re

import numpy as np
import pytest

from rl_jax import checkpoint, cli, models, rejection, sampling
from rl_jax import judge as J
from rl_jax import rewards as R
from rl_jax.data import procedural, tasks
from rl_jax.data import tokenizer as toks
from rl_jax.models.config import preset

# ------------------------------------------------------------------------------------ select
GOOD = dict(prompt_id="p", question="1+2=?", text="<think>1+2=3</think><answer>3</answer>", correct=True,
            format=1.0, language=1.0, repetition=0.0, judge=True, tokens=12)  # fmt: skip
BAD = {  # each case fails exactly one filter
  "correct": dict(correct=False, text="<think>1+2=4</think><answer>4</answer>"),
  "format": dict(format=0.0, text="<answer>3</answer>"),
  "language": dict(language=0.5, text="<think>1加2=3</think><answer>3</answer>"),
  "repetition": dict(repetition=-0.5, text="<think>1+2=3 1+2=3 1+2=3 1+2=3</think><answer>3</answer>"),
  "judge": dict(judge=False, text="<think>1+2 = 3</think><answer>3</answer>"),
}
ALL = ("correct", "format", "language", "repetition", "judge")


@pytest.mark.parametrize("name", ALL)
def test_each_filter_alone_rejects_only_its_case(name):
  samples = [GOOD] + [{**GOOD, **case} for case in BAD.values()]
  kept, reasons = rejection.select(samples, rejection.RejectionSpec(filters=(name,), keep_per_prompt=0))
  assert reasons == [None] + [name if k == name else None for k in BAD]
  assert [s["text"] for s in kept] == [s["text"] for s, r in zip(samples, reasons) if r is None]


def test_all_filters_dedupe_and_cap():
  spec = rejection.RejectionSpec(filters=ALL, keep_per_prompt=2)
  other = {**GOOD, "text": "<think>2+1=3</think><answer>3</answer>"}
  third = {**GOOD, "text": "<think>1+1=2; 2+1=3</think><answer>3</answer>"}
  samples = [
    GOOD,
    *({**GOOD, **case} for case in BAD.values()),
    {**GOOD, "text": "  <think>1+2=3</think>\n<answer>3</answer> "},  # GOOD up to whitespace
    other,
    third,  # a third distinct good one: over the cap of 2
    {**third, "prompt_id": "q"},  # another prompt: its own dedupe and cap
    {**GOOD, "judge": None},  # unparseable verdict
    {**GOOD, "prompt_id": "r", "tokens": 99},  # long, but no max_len
  ]
  kept, reasons = rejection.select(samples, spec)
  assert reasons == [None, *BAD, "duplicate", None, "cap", None, "judge", None]
  assert [s["prompt_id"] for s in kept] == ["p", "p", "q", "r"]
  _, reasons = rejection.select(samples, dataclasses.replace(spec, dedupe=False, keep_per_prompt=0, max_len=50))
  assert reasons == [None, *BAD, None, None, None, None, "judge", "length"]


def test_thresholds_and_bad_spec():
  spec = rejection.RejectionSpec(filters=("language", "repetition"), language_min=0.5, repetition_max=0.5)
  samples = [{**GOOD, **BAD["language"]}, {**GOOD, **BAD["repetition"]}, {**GOOD, "repetition": -0.51}]
  assert rejection.select(samples, spec)[1] == [None, None, "repetition"]
  with pytest.raises(ValueError, match="unknown rejection filters"):
    rejection.RejectionSpec(filters=("correct", "vibes"))


def test_preference_pairs_match_kept_with_distinct_wrong_ones():
  wrong = {**GOOD, **BAD["correct"]}
  samples = [
    GOOD,
    wrong,
    dict(wrong),
    {**GOOD, "text": "<think>3</think><answer>3</answer>"},
    {**wrong, "prompt_id": "q"},
  ]
  kept, _ = rejection.select(samples, rejection.RejectionSpec(filters=("correct",)))
  pairs = rejection.preference_pairs(samples, kept)  # one distinct wrong answer for p: one pair; none kept for q
  assert pairs == [{"prompt": "1+2=?", "chosen": GOOD["text"], "rejected": wrong["text"]}]
  kept, _ = rejection.select(samples, rejection.RejectionSpec(filters=()))  # wrong ones kept: never "chosen"
  assert rejection.preference_pairs(samples, kept) == pairs


# ------------------------------------------------------------------------------------- judge
@pytest.mark.parametrize(
  "text,verdict",
  [
    ("<think>1+2=3, so 3</think><answer>yes</answer>", True),
    ("<think>1+2=3, so 3</think><answer> No. </answer>", False),
    ("<answer>YES</answer>", True),
    ("<answer>maybe</answer>", None),
    ("yes", None),
    ("<answer>no</answer><answer>yes</answer>", True),  # the last block counts, as for answers
    ("<answer>yes", None),
  ],
)
def test_judge_verdict_parsing(text, verdict):
  assert J.parse_verdict(text) is verdict


def test_judge_agreement_counts():
  out = J.agreement([True, False, None, True], [True, True, False, True])
  assert out == {"judged": 4, "unparsed": 1, "agreement": 2 / 3, "judge_yes": 2, "verifier_correct": 3}


def test_rubric_is_the_corpus_judge_format():
  p = procedural.problem_at(0, 3, "chain")
  doc = procedural.judge_document(p, "5")
  assert doc.startswith(J.rubric(procedural.question(p), "5") + " ")
  assert J.parse_verdict(doc) is (p["answer"] == "5")


# --------------------------------------------------------------------------------- r1 corpus
def test_r1_corpus_has_judge_and_mixed_docs_and_no_held_out_problem():
  docs = [procedural.document_at(0, i, "r1") for i in range(2000)]
  judge = [d for d in docs if d.startswith("Check: ")]
  mixed = [d for d in docs if procedural.MIXED_PLUS in d]
  assert 0.2 < len(judge) / len(docs) < 0.4 and 0.05 < len(mixed) / len(docs) < 0.15
  verdicts = [J.parse_verdict(d) for d in judge]
  assert 0.35 < sum(verdicts) / len(verdicts) < 0.65  # about half the proposed answers are right
  for d in judge:  # each verdict is the truth about the proposed answer
    q, a = d.removeprefix("Check: ").split(" Proposed: ")
    a = a.split(". Correct?")[0]
    assert J.parse_verdict(d) is (eval(q.removesuffix("=?")) == int(a))
  for d in mixed:
    cot = d[d.rindex("<think>") :]
    assert R.language_reward(cot) < 1.0 and R.format_reward(cot) == 1.0
  questions = [d.split("Check: ")[-1].split(" Proposed")[0] for d in judge]
  questions += [q for d in docs if d.startswith("Q: ") for q in re.findall(r"Q: (.*?) A:", d)]  # worksheets: all
  sheets = [d for d in docs if d.count("Q: ") > 1]
  assert 0.1 < len(sheets) / len(docs) < 0.2
  for d in sheets:  # one form throughout: all tagged, all worked, or all bare answers
    n = d.count("Q: ")
    assert d.count("<answer>") in (0, n) and d.count("so the answer is") in (0, n), d
  questions += [d.removeprefix("User: ").split(" Think in")[0] for d in docs if d.startswith("User: ")]
  assert len(questions) == len(docs) + sum(d.count("Q: ") - 1 for d in sheets) and all(
    tasks.split_of(q) == "train" for q in questions
  )
  assert "r1" in procedural.KINDS and procedural.PROBLEM_KINDS == ("arithmetic", "countdown", "addsub", "chain")
  with pytest.raises(ValueError, match="unknown procedural kind"):
    procedural.problem_at(0, 0, "r1")


def test_fewshot_template_shows_tagged_training_examples():
  text = tasks.render({"prompt": "1+2+3=?"}, "r1_fewshot")
  shots = text.split(" Q: ")
  assert len(shots) == 3 and shots[-1] == "1+2+3=? A:"
  for s in shots[:-1]:
    q, solution = s.removeprefix("Q: ").split(" A: ")
    assert tasks.split_of(q) == "train" and R.format_reward(solution) == 1.0
    assert R.exact_match(solution, str(eval(q.removesuffix("=?")))) == 1.0


# ------------------------------------------------------------------------------- end to end
def _solution(p, plus="+"):
  return f" <think>{'; '.join(s.replace('+', plus) for s in p['steps'])}</think><answer>{p['answer']}</answer>"


def scripted(p):
  """Seven completions of problem p and the reason each is rejected for (keep_per_prompt=2)."""
  wrong = str(int(p["answer"]) + 1)
  return [
    (_solution(p), None),
    ("  " + _solution(p).strip() + " ", "duplicate"),
    (f" <think>{p['steps'][0]}</think><answer>{wrong}</answer>", "correct"),
    (_solution(p, procedural.MIXED_PLUS), "language"),
    (f" <answer>{p['answer']}</answer>", "format"),
    (f" <think>{'; '.join(p['steps'])}; done</think><answer>{p['answer']}</answer>", None),
    (f" <think>{p['steps'][-1]}</think><answer>{p['answer']}</answer>", "cap"),
  ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("rs")
  tok = toks.train_bpe(itertools.islice(procedural.documents(0, "r1"), 300), vocab_size=512)
  toks.save(tok, root / "tok")
  model = models.build(preset("tiny-dense"), seed=0)
  return checkpoint.save_model(str(root / "ckpt"), model, tokenizer_dir=str(root / "tok")), tok, root


def fake_generate(tok, problems, judged):
  """The real sampler on the real model (a short budget), then scripted completions in its place."""
  real, vocab = sampling.generate, toks.Vocab.from_tokenizer(tok)
  by_prompt = {p["prompt"]: p for p in problems}

  def generate(model, prompts, *, max_new_tokens, num_samples=1, **kw):
    res = real(model, prompts, max_new_tokens=4, num_samples=num_samples, **kw)
    texts = []
    for prompt in prompts:
      text = toks.decode(tok, prompt[1:])
      if text.startswith("Check: "):  # the judge: right about the answer, except unparseable on one question
        q, a = text.removeprefix("Check: ").split(" Proposed: ")
        a, gold = a.split(". Correct?")[0], by_prompt[q]["answer"]
        judged.append((q, a))
        texts.append("<think>?</think><answer>?</answer>" if q == problems[0]["prompt"] else
                     f"<think>so {gold}</think><answer>{'yes' if a == gold else 'no'}</answer>")  # fmt: skip
      else:
        q = text.removeprefix("User: ").split(" Think in")[0]
        texts += [t for t, _ in scripted(by_prompt[q])]
    ids = [toks.encode(tok, t) + [vocab.eos_id] for t in texts]
    assert max(map(len, ids)) <= max_new_tokens and len(ids) == len(res.lengths)
    out = np.zeros((len(ids), max_new_tokens), np.int32)
    for i, row in enumerate(ids):
      out[i, : len(row)] = row
    lengths = np.array([len(r) for r in ids], np.int32)
    return sampling.SampleResult(out, np.zeros(out.shape, np.float32), lengths, None, None)

  return generate


@pytest.fixture(scope="module")
def sampled(tiny):
  """`rl-jax rejection-sample` on 3 problems x 7 scripted completions, judged by the same checkpoint."""
  ckpt, tok, root = tiny
  problems = tasks.take("chain", "train", 3, seed=0)
  judged, out = [], str(root / "out")
  argv = ["rejection-sample", "--checkpoint", ckpt, "--num-samples", "7", "--out", out, "--num-problems", "3",
          "--keep-per-prompt", "2", "--judge", ckpt, "--max-new-tokens", "64"]  # fmt: skip
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sampling, "generate", fake_generate(tok, problems, judged))
    printed = []
    mp.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
    assert cli.main(argv) == 0
  return out, problems, judged, printed


def test_rejection_sample_cli_end_to_end(tiny, sampled):
  _, tok, _ = tiny
  out, problems, judged, printed = sampled
  assert "kept 4/21 (2 pairs)" in printed[-1] and printed[0].startswith("rejection-sample: 3/3 prompts")

  # the expected outcome, sample by sample, from the script; on problem 0 the judge's verdicts are unparseable, so
  # it rejects every sample that passes the rule filters before it
  rule = ("correct", "language", "format")
  expect = [(p, t, r if i or r in rule else "judge") for i, p in enumerate(problems) for t, r in scripted(p)]
  kept = [json.loads(line) for line in open(os.path.join(out, "kept.jsonl"))]
  assert [(r["prompt"], r["response"]) for r in kept] == [(p["prompt"], t) for p, t, r in expect if r is None]
  assert all(r["task"] == "chain" for r in kept) and len({r["id"] for r in kept}) == 4
  pairs = [json.loads(line) for line in open(os.path.join(out, "pairs.jsonl"))]
  assert [(x["prompt"], x["rejected"]) for x in pairs] == [(p["prompt"], scripted(p)[2][0]) for p in problems[1:]]
  stats = json.load(open(os.path.join(out, "stats.json")))
  assert stats["generated"] == 21 and stats["kept"] == len(kept) == 4 and stats["pairs"] == len(pairs)
  assert stats["rejected"] == {"duplicate": 2, "correct": 3, "language": 3, "format": 3, "cap": 2, "judge": 4}
  assert stats["per_task"] == {"chain": {"generated": 21, "kept": 4}}
  lengths = [len(toks.encode(tok, r["response"])) for r in kept]
  assert stats["kept_tokens_max"] == max(lengths) and stats["kept_tokens_mean"] == pytest.approx(np.mean(lengths))
  assert stats["judge"]["unparsed"] == 7 and stats["judge"]["agreement"] == 1.0  # every parsed verdict was right
  assert sorted(set(judged)) == sorted(judged)  # each (question, answer) judged once
  rows = tasks.read_array_record(rejection.TFDS_NAME, "train", os.path.join(out, "tfds"))
  assert rows == kept


def test_kept_data_feeds_sft(tiny, sampled):
  """kept.jsonl and the ArrayRecord dataset through `rl-jax sft`'s reader: the same rows, whose loss tokens are
  exactly the kept responses (+ EOS) after the SFT template's prompt."""
  from rl_jax.config import SFTConfig
  from rl_jax.data import sft

  _, tok, _ = tiny
  out = sampled[0]
  kept = [json.loads(line) for line in open(os.path.join(out, "kept.jsonl"))]
  cfg, eos = SFTConfig(pack=False), toks.Vocab.from_tokenizer(tok).eos_id
  batches = []
  for source, data_dir in ((os.path.join(out, "kept.jsonl"), None), (f"tfds:{rejection.TFDS_NAME}", f"{out}/tfds")):
    it = sft.make_iterator(source, tokenizer=tok, sft_cfg=cfg, seq_len=96, batch_size=4, seed=0, num_epochs=1,
                           data_dir=data_dir)  # fmt: skip
    batches.append(next(it))
  for k in batches[0]:
    np.testing.assert_array_equal(batches[0][k], batches[1][k])
  b = batches[0]
  got = set()
  for row_t, row_y, row_m in zip(b["tokens"], b["targets"], b["loss_mask"]):
    got.add(
      (toks.decode(tok, row_t[row_m == 0][1:]).split(" Think in")[0].removeprefix("User: "), tuple(row_y[row_m == 1]))
    )
  assert got == {(r["prompt"], tuple(toks.encode(tok, r["response"]) + [eos])) for r in kept}


def test_fewshot_template_stops_after_the_answer():
  spec = rejection.RejectionSpec(template="r1_fewshot")
  assert rejection.stop_text(spec) == "</answer>" and rejection.stop_text(rejection.RejectionSpec()) == ""
  assert rejection.stop_text(dataclasses.replace(spec, stop="")) == ""
  text = " <think>1+2=3</think><answer>3</answer> Q: 4+4=? A: <think>"
  assert rejection._cut(text, "</answer>") == " <think>1+2=3</think><answer>3</answer>"


def test_run_on_an_untrained_model_writes_consistent_files(tiny, tmp_path):
  """The real sampler end to end (no script): whatever it keeps, the files and stats agree."""
  ckpt, _, _ = tiny
  spec = rejection.RejectionSpec(num_problems=2, num_samples=2, max_new_tokens=8, filters=("format",), seed=1)
  info = rejection.run(ckpt, spec, str(tmp_path), log=lambda line: None)
  kept = open(tmp_path / "kept.jsonl").read().splitlines()
  assert info["generated"] == 4 and info["kept"] == len(kept) and sum(info["rejected"].values()) == 4 - len(kept)
  assert json.load(open(tmp_path / "stats.json"))["kept"] == len(kept)
  assert os.path.isdir(tmp_path / "tfds") == bool(kept)
  with pytest.raises(ValueError, match="judge checkpoint"):
    rejection.run(ckpt, dataclasses.replace(spec, filters=("judge",)), str(tmp_path))
