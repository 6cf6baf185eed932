"""rl_jax.data: tokenizer, procedural tasks, packing, grain pipelines (CPU, small and fast)."""

import collections
import itertools
import json
import re

import numpy as np
import pytest

from rl_jax import data

SPECIALS = ["<pad>", "<bos>", "<eos>", "<think>", "</think>", "<answer>", "</answer>"]
STEP = re.compile(r"(-?\d+(?:[+\-*/]\d+)+)=(-?\d+)")  # every `lhs=rhs` step of a worked solution


@pytest.fixture(scope="module")
def tok():
  return data.train_bpe(itertools.islice(data.documents(0), 1000), 320)


# ----------------------------------------------------------------- tokenizer


def test_bpe_vocab_size_and_specials(tok):
  assert tok.get_vocab_size() == 320
  assert not any(t.startswith("<reserved_") for t in tok.get_vocab())  # real merges only
  assert [tok.token_to_id(s) for s in SPECIALS] == list(range(7))
  for i, s in enumerate(SPECIALS):
    assert data.encode(tok, s) == [i]
    assert data.encode(tok, f"x {s}y")[-2] == i  # still one token inside text
  assert data.Vocab.from_tokenizer(tok) == data.Vocab(pad_id=0, bos_id=1, eos_id=2, size=320)
  # A corpus with too few merges is topped up with reserved tokens to the requested size.
  small = data.train_bpe(["ab ab abc"] * 3, 300)
  assert small.get_vocab_size() == 300 and small.token_to_id("<eos>") == 2


def test_bpe_round_trip(tok):
  texts = [data.document_at(5, i) for i in range(20)] + [
    "",
    " ",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n",
    "héllo wörld — naïve café",
    "中文，日本語、한국어",
    "emoji 🙂🚀 and ZWJ 👩‍👩‍👧",
    "<think> a </think>\n<answer>-3/4</answer>",
    "<bos>x<eos><pad>",
    "digits 0123456789 1,234.5e-6",
  ]
  for text in texts:
    assert data.decode(tok, data.encode(tok, text)) == text
  ids = [1] + data.encode(tok, "<think>ok</think><answer>7</answer>") + [2, 0, 0]
  assert data.decode(tok, ids, skip_special_tokens=True) == "<think>ok</think><answer>7</answer>"


def test_save_load(tok, tmp_path):
  directory = data.save(tok, tmp_path / "tok")
  config = json.loads((directory / "tokenizer_config.json").read_text())
  assert [config["pad_token"], config["bos_token"], config["eos_token"]] == SPECIALS[:3]
  text = data.document_at(1, 3) + " ünïcode"
  for path in (directory, directory / "tokenizer.json"):
    loaded = data.load(path)
    assert data.encode(loaded, text) == data.encode(tok, text)
    assert data.decode(loaded, data.encode(loaded, text)) == text
  missing = tmp_path / "nowhere"
  if (transformers := _maybe_import("transformers")) is not None:  # ~8 s import, when installed
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert hf.encode(text) == data.encode(tok, text) and hf.decode(hf.encode(text)) == text
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    data.load(missing)
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match=re.escape(str(bad))):
    data.load(bad)


def _maybe_import(name):
  try:
    return __import__(name)
  except ImportError:
    return None


# ---------------------------------------------------------------- procedural


@pytest.mark.parametrize("kind", ["arithmetic", "countdown", "mixed"])
def test_procedural_solutions_are_correct(kind):
  problems = data.problems(3, 300, kind)
  kinds = collections.Counter(p["kind"] for p in problems)
  assert set(kinds) == ({"arithmetic", "countdown"} if kind == "mixed" else {kind})
  for p in problems:
    assert p["text"] == f"{p['prompt']} {p['solution']}"
    think, answer = re.fullmatch(r"<think>(.*)</think><answer>(.*)</answer>", p["solution"]).groups()
    assert answer == p["answer"] and data.verify(p, answer)
    steps = STEP.findall(think)
    assert steps, p["text"]
    for lhs, rhs in steps:
      assert eval(lhs) == int(rhs), (lhs, rhs, p["text"])
    if p["kind"] == "arithmetic":
      assert eval(p["expression"]) == p["target"] == int(answer)
      written = re.findall(r"(?:write|bring down) (\d+)", think)  # column methods
      result = int("".join(reversed(written))) if written else int(steps[-1][1])
      assert result == p["target"], p["text"]
    else:
      assert sorted(map(int, re.findall(r"\d+", answer))) == sorted(p["numbers"])
      assert eval(answer) == p["target"] and int(steps[-1][1]) == p["target"]
      assert str(p["numbers"]) in p["prompt"] and str(p["target"]) in p["prompt"]


def test_verify_rejects_wrong_answers():
  cd = {"kind": "countdown", "numbers": [3, 5, 7], "target": 22}
  assert data.verify(cd, "3*5+7") and data.verify(cd, " 7+(5*3) ")
  for wrong in [
    "3*5+8",
    "3*5+7+0",
    "3*5",
    "5*5-3",
    "3*5+7*1",
    "(3*5+7",
    "",
    "__import__('os')",
    "3**5",
    "22",
    "7/(5-5)+3",
  ]:
    assert not data.verify(cd, wrong), wrong
  ar = {"kind": "arithmetic", "target": -16}
  assert data.verify(ar, "-16") and not data.verify(ar, "16") and not data.verify(ar, "x")


def test_procedural_deterministic_per_seed():
  a = list(itertools.islice(data.documents(7), 50))
  assert a == list(itertools.islice(data.documents(7), 50))
  assert a == [data.problem_at(7, i)["text"] for i in range(50)]
  b = list(itertools.islice(data.documents(8), 50))
  assert len(set(a) & set(b)) < 5
  assert len(set(a)) > 45


# ------------------------------------------------------------------- packing


def test_pack_hand_example():
  docs = [[1, 10, 11], [1, 20], [1, 30, 31, 32]]
  rows = list(data.pack(docs, seq_len=8, eos_id=2))
  assert len(rows) == 2  # doc 3 does not fit the 3 slots left in row 0, so it starts row 1
  expected = [
    dict(
      tokens=[1, 10, 11, 1, 20, 0, 0, 0],
      targets=[10, 11, 2, 20, 2, 0, 0, 0],
      segment_ids=[1, 1, 1, 2, 2, 0, 0, 0],
      positions=[0, 1, 2, 0, 1, 0, 0, 0],
      loss_mask=[1, 1, 1, 1, 1, 0, 0, 0],
    ),
    dict(
      tokens=[1, 30, 31, 32, 0, 0, 0, 0],
      targets=[30, 31, 32, 2, 0, 0, 0, 0],
      segment_ids=[1, 1, 1, 1, 0, 0, 0, 0],
      positions=[0, 1, 2, 3, 0, 0, 0, 0],
      loss_mask=[1, 1, 1, 1, 0, 0, 0, 0],
    ),
  ]
  for row, want in zip(rows, expected):
    assert set(row) == set(data.FIELDS)
    for k in data.FIELDS:
      assert row[k].dtype == np.int32 and row[k].tolist() == want[k], k


def test_pack_long_document_splits():
  docs = [[1, 5], [1] + list(range(100, 109)), [1, 7]]
  rows = [{k: r[k].tolist() for k in r} for r in data.pack(docs, seq_len=4, eos_id=2)]
  assert [r["tokens"] for r in rows] == [[1, 5, 1, 100], [101, 102, 103, 104], [105, 106, 107, 108], [1, 7, 0, 0]]
  assert [r["targets"] for r in rows] == [[5, 2, 100, 101], [102, 103, 104, 105], [106, 107, 108, 2], [7, 2, 0, 0]]
  assert [r["segment_ids"] for r in rows] == [[1, 1, 2, 2], [1] * 4, [1] * 4, [1, 1, 0, 0]]
  assert [r["positions"] for r in rows] == [[0, 1, 0, 1], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 0]]


def test_pack_targets_never_cross_documents():
  rng = np.random.default_rng(0)
  docs = [list(rng.integers(3, 50, rng.integers(1, 40))) for _ in range(200)]
  rows = list(data.pack(docs, seq_len=16, eos_id=2))
  owner = [i for i, d in enumerate(docs) for _ in d]  # document of each token, in stream order
  want_targets = [t for d in docs for t in d[1:] + [2]]
  pos, tokens, targets = 0, [], []
  for row in rows:
    for s in range(1, row["segment_ids"].max() + 1):
      seg = row["segment_ids"] == s
      n = int(seg.sum())
      assert row["positions"][seg].tolist() == list(range(n))
      assert len(set(owner[pos : pos + n])) == 1  # a segment lies inside one document
      tokens += row["tokens"][seg].tolist()
      targets += row["targets"][seg].tolist()
      pos += n
    pad = row["segment_ids"] == 0
    assert (row["loss_mask"] == ~pad).all() and (row["targets"][pad] == 0).all()
    assert (row["tokens"][pad] == 0).all() and (pad[np.argmax(pad) :].all() or not pad.any())
  assert tokens == [t for d in docs for t in d] and targets == want_targets


# ------------------------------------------------------------------ pipeline


def _texts_of(batch, tok):
  """The document texts (bos .. last token) fully contained in a batch's segments."""
  out = []
  for row_tokens, row_targets, row_seg in zip(batch["tokens"], batch["targets"], batch["segment_ids"]):
    for s in range(1, row_seg.max() + 1):
      seg = row_seg == s
      toks = row_tokens[seg]
      if toks[0] == 1 and row_targets[seg][-1] == 2:
        out.append(data.decode(tok, toks[1:]))
  return out


@pytest.fixture
def jsonl_files(tmp_path):
  texts = [f"document {i}: " + "wörds " * (i % 7) + "🙂" * (i % 2) for i in range(13)]
  for name, part in [("a.jsonl", texts[:6]), ("b.jsonl", texts[6:])]:
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(part)]
    (tmp_path / name).write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")
  return tmp_path, texts


def test_pipeline_jsonl_and_txt(tok, jsonl_files):
  root, texts = jsonl_files
  it = data.make_iterator(str(root / "*.jsonl"), tokenizer=tok, seq_len=80, batch_size=3, seed=1)
  seen = []
  for batch in itertools.islice(it, 5):
    assert set(batch) == set(data.FIELDS)
    assert all(v.shape == (3, 80) and v.dtype == np.int32 for v in batch.values())
    seen += _texts_of(batch, tok)
  assert set(seen) == set(texts)  # 15 rows of >= 1 document: at least one epoch
  for i, t in enumerate(texts[:4]):
    (root / f"{i}.txt").write_text(t)
  it = data.make_iterator(str(root / "*.txt"), tokenizer=tok, seq_len=80, batch_size=2, seed=0)
  assert set(_texts_of(next(it), tok)) <= set(texts[:4])


def test_pipeline_procedural(tok):
  it = data.make_iterator("procedural", tokenizer=tok, seq_len=128, batch_size=2, seed=4)
  batch = next(it)
  assert all(v.shape == (2, 128) and v.dtype == np.int32 for v in batch.values())
  got = _texts_of(batch, tok)
  assert got and set(got) <= {data.document_at(4, i) for i in range(20)}


def test_sharding_is_disjoint_and_complete(jsonl_files):
  root, texts = jsonl_files
  for source in [str(root / "*.jsonl"), "procedural:countdown"]:
    kw = dict(seed=3, num_epochs=1)
    full = list(itertools.islice(data.document_dataset(source, **kw), 26))
    shards = [
      list(itertools.islice(data.document_dataset(source, shard_index=k, shard_count=2, **kw), 13)) for k in range(2)
    ]
    assert [d for pair in itertools.zip_longest(*shards) for d in pair if d is not None] == full
    if source.endswith("jsonl"):
      assert sorted(full) == sorted(texts) and not set(shards[0]) & set(shards[1])


@pytest.mark.parametrize("source", ["procedural", "jsonl"])
def test_checkpoint_resumes_exactly(tok, jsonl_files, tmp_path, source):
  root, _ = jsonl_files
  src = str(root / "*.jsonl") if source == "jsonl" else source
  make = lambda: data.make_iterator(src, tokenizer=tok, seq_len=24, batch_size=2, seed=5)
  it = make()
  for _ in range(3):
    next(it)
  data.save_state(it, tmp_path / "state.json")
  state = json.loads((tmp_path / "state.json").read_text())
  a = [next(it) for _ in range(2)]
  it2 = data.restore_state(make(), tmp_path / "state.json")  # a fresh iterator
  b = [next(it2) for _ in range(2)]
  _assert_same(a, b)
  assert state["offset"] > 0 or source == "jsonl"  # seq_len 24 < documents: resumed mid-document
  # Every batch boundary (document pending or not, any offset, across epochs) restores exactly.
  it, states, stream = make(), [], []
  for _ in range(8):
    states.append(json.loads(json.dumps(it.get_state())))
    stream.append(next(it))
  for i in range(0, 8, 2 if source == "procedural" else 1):
    restored = make()
    restored.set_state(states[i])
    _assert_same([next(restored)], stream[i : i + 1])


def _assert_same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    for k in data.FIELDS:
      np.testing.assert_array_equal(x[k], y[k])


def test_tfds_array_record(tok, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  texts = [f"tfds doc {i} ✓" for i in range(6)]

  class RlJaxTinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    # tfds 4.9.10 imports the (undeclared on py>=3.9) importlib_resources for builders defined
    # in a package module; a top-level module name takes its inspect.getfile path instead.
    __module__ = "rl_jax_tiny_text"

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(texts), "test": self._generate_examples(["t"])}

    def _generate_examples(self, items):
      for i, t in enumerate(items):
        yield i, {"text": t}

  RlJaxTinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  it = data.make_iterator(
    "tfds:rl_jax_tiny_text:train", tokenizer=tok, seq_len=64, batch_size=2, seed=0, data_dir=str(tmp_path)
  )
  seen = [t for batch in itertools.islice(it, 3) for t in _texts_of(batch, tok)]
  assert set(seen) == set(texts)


def test_malformed_jsonl_names_file_and_line(tmp_path):
  from rl_jax.data.pipeline import JsonlSource

  p = tmp_path / "bad.jsonl"
  p.write_text('{"text": "ok"}\n\n{"text": broken\n{"body": "x"}\n')
  src = JsonlSource([str(p)])
  assert len(src) == 3 and src[0] == "ok"
  with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
    src[1]
  with pytest.raises(ValueError, match=r"bad\.jsonl:4: no string field 'text'"):
    src[2]
