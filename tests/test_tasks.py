"""RL tasks: held-out problems never share text with training problems, gold answers verify, JSONL errors."""

import json
import pickle
import sys

import numpy as np
import pytest

from rl_jax import rewards as R
from rl_jax import rollout
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
  assert tasks.render(p, "chatml") == "<|im_start|>user\n2+2=?<|im_end|>\n<|im_start|>assistant\n"
  assert tasks.render(p, "deepseek_r1").endswith("<｜User｜>2+2=?<｜Assistant｜><think>\n")
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


def test_procedural_test_split_never_reaches_the_training_stream():
  # Splits hash the question the model sees: load_problems' test set and PromptSource's training stream agree.
  test = rollout.load_problems("chain", "test", 100, seed=0)
  assert all(tasks.split_of(p["prompt"]) == "test" for p in test)
  train = {p["prompt"] for p in rollout.PromptSource("chain", seed=0).take(3000)}
  assert not train & {p["prompt"] for p in test}


# ------------------------------------------------------------- reasoning-gym


def test_reasoning_gym_task_names_and_missing_extra(monkeypatch):
  assert tasks.parse_rg_task('rg:chain_sum:{"max_terms": 3, "tag": "a:b"}') == (
    "chain_sum",
    {"size": tasks.RG_SIZE, "max_terms": 3, "tag": "a:b"},
  )
  assert tasks.parse_rg_task("rg:chain_sum:max_terms=3,size=50,allow_negation=true,name=x") == (
    "chain_sum",
    {"size": 50, "max_terms": 3, "allow_negation": True, "name": "x"},
  )
  for bad, why in [("rg:", "expected rg:NAME"), ("rg:a:x", "'x' is not k=v"), ("rg:a:seed=1", "without 'seed'")]:
    with pytest.raises(ValueError, match=why):
      tasks.parse_rg_task(bad)
  tasks._rg_dataset.cache_clear()
  monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # as if not installed
  with pytest.raises(ImportError, match=r"pip install 'rl-jax\[reasoning\]'"):
    rollout.load_problems("rg:chain_sum", "train", 1)


def test_reasoning_gym_problems_splits_and_scorer():
  rg = pytest.importorskip("reasoning_gym")
  task = "rg:chain_sum:max_terms=3"
  train, test = (rollout.load_problems(task, split, n, seed=1) for split, n in (("train", 60), ("test", 15)))
  assert len(train) == 60 and len(test) == 15 and not {p["prompt"] for p in train} & {p["prompt"] for p in test}
  assert all(tasks.split_of(p["prompt"]) == "test" for p in test)
  rg_task = tasks.ReasoningGymTask(task, seed=1)
  assert [rg_task.problem("train", j)["prompt"] for j in range(5)] != [
    rg_task.problem("test", j)["prompt"] for j in range(5)
  ]
  for p in test:  # the gold is the expression's value (independent of reasoning-gym), the prompt its question
    assert int(p["answer"]) == eval(p["entry"]["metadata"]["expression"]) and p["prompt"] == p["entry"]["question"]
  stream = rollout.PromptSource(task, seed=1).take(40)
  assert all(tasks.split_of(p["prompt"]) == "train" for p in stream) and stream == [
    rg_task.at("train", i) for i in range(40)
  ]
  assert pickle.loads(pickle.dumps(test)) == test and rollout.load_problems(task, "test", 15, seed=1) == test
  # accuracy is reasoning-gym's own scorer (partial credit for a padded answer), computed in the verifier pool
  scorer = rg.create_dataset("chain_sum", max_terms=3, seed=5)
  answers = [a for p in test[:4] for a in (p["answer"], f"x {p['answer']}", "7.5", "")]
  rows = [p for p in test[:4] for _ in range(4)]
  want = [scorer.score_answer(a.strip(), p["entry"]) if a else 0.0 for a, p in zip(answers, rows)]
  completions = [f"<think>t</think><answer>{a}</answer>" if a else "no answer" for a in answers]
  with R.VerifierPool(1) as pool:
    _, parts = R.score_batch(completions, rows, R.RewardSpec(weights={"accuracy": 1.0}), pool=pool)
  assert 0.0 in want and 1.0 in want and any(0 < w < 1 for w in want)  # wrong, right and partial answers
  np.testing.assert_allclose(parts["accuracy"], want)


# ------------------------------------------------------------ TFDS ArrayRecord


def test_prepared_tasks_as_tfds_array_record(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  train, test = tasks.take("countdown", "train", 20, seed=3), tasks.take("countdown", "test", 6, seed=3)
  tasks.write_array_record(train, str(tmp_path), "countdown_prep", "train")
  tasks.write_array_record(test, str(tmp_path), "countdown_prep", "test")  # a second split keeps the first
  assert tasks.read_array_record("countdown_prep", "train", str(tmp_path)) == train
  assert tasks.read_array_record("countdown_prep", "test", str(tmp_path)) == test
  by_id = lambda ps: sorted(ps, key=lambda p: p["id"])
  got = rollout.load_problems("tfds:countdown_prep", "train", 100, seed=0, data_dir=str(tmp_path))
  assert by_id(got) == by_id(train)
  assert rollout.load_problems("tfds:countdown_prep", "test", 4, data_dir=str(tmp_path))[0] in test
  # a named TFDS split is one pool divided by the text hash: nothing of "train" is held out
  assert rollout.load_problems("tfds:countdown_prep:1.0.0:train", "test", 100, data_dir=str(tmp_path)) == []
  assert rollout.PromptSource("tfds:countdown_prep", data_dir=str(tmp_path)).take(20)[0] in train
  with pytest.raises(ValueError, match="must be snake_case"):
    tasks.write_array_record(train, str(tmp_path), "Countdown-Prep", "train")
