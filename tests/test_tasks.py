"""RL tasks: held-out problems never share text with training problems, gold answers verify, JSONL errors."""

import json

import pytest

from rl_jax.data import procedural, tasks


@pytest.mark.parametrize("kind", ["arithmetic", "countdown"])
def test_splits_are_disjoint_by_text_across_seeds(kind):
  train = {p["prompt"] for seed in (0, 1) for p in tasks.take(kind, "train", 1500, seed)}
  test = tasks.take(kind, "test", 150, seed=7)
  assert len(test) == 150 and len({p["prompt"] for p in test}) == 150
  assert not train & {p["prompt"] for p in test}
  for p in test[:50]:  # the gold answer really solves the problem (procedural's own exact verifier)
    assert procedural.verify(p, p["answer"]) and p["kind"] == kind
    assert "<think>" not in p["prompt"] and "A:" not in p["prompt"]
  assert tasks.take(kind, "test", 5, seed=7) == test[:5]  # deterministic


def test_render_templates():
  p = {"prompt": "2+2=?"}
  assert tasks.render(p, "r1_zero").endswith("User: 2+2=?. Assistant:")
  assert tasks.render(p, "Q: {prompt} A:") == "Q: 2+2=? A:"
  with pytest.raises(ValueError, match="unknown template"):
    tasks.render(p, "r1-zero")


def test_jsonl_loader(tmp_path):
  f = tmp_path / "gsm.jsonl"
  f.write_text(json.dumps({"question": "Tom has 3 apples...", "answer": "3 + 4 = 7\n#### 7"}) + "\n\n")
  (p,) = tasks.load_jsonl(str(f))
  assert p["kind"] == "math" and p["answer"] == "7" and p["id"] == "gsm.jsonl:1"
  f.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n" + '{"question": "q"}\n')
  with pytest.raises(ValueError, match=r"gsm.jsonl:2: malformed task line \(missing field 'answer'\)"):
    tasks.load_jsonl(str(f))
  with pytest.raises(FileNotFoundError):
    tasks.load_jsonl(str(tmp_path / "nope.jsonl"))
