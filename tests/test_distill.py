"""Logit distillation: each divergence against a float64 numpy implementation of its formula (values and
gradients), the top-k variant, the chunked loss against the unchunked one, and the `rl-jax distill` stage on
tiny models (child process: tests/_distill_worker.py)."""

import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_jax import losses
from tests._subproc import run_python

B, T, V = 2, 5, 11


# ------------------------------------------------------------------ float64 references (the published formulas)
def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl(p, q):
  """sum_i p_i log(p_i / q_i) with 0 log 0 = 0."""
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(-1)


def _divergence(p, q, divergence, beta):
  if divergence == "forward_kl":
    return _kl(p, q)
  if divergence == "reverse_kl":
    return _kl(q, p)
  m = beta * p + (1 - beta) * q
  return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def ref_loss(s, t, mask, divergence, temperature, beta):
  """The issue's definition on full logits, float64."""
  p, q = np.exp(_log_softmax(t / temperature)), np.exp(_log_softmax(s / temperature))
  return (_divergence(p, q, divergence, beta) * mask).sum() / mask.sum()


def ref_loss_topk(s, values, indices, mask, divergence, temperature, beta):
  """distill_loss_topk's documented definition, float64: P_k scattered into a full-vocab vector (zeros
  outside K), the student's full Q; reverse_kl with Q renormalised over K."""
  q = np.exp(_log_softmax(s / temperature))
  pk = np.exp(_log_softmax(values / temperature))
  p = np.zeros_like(q)
  np.put_along_axis(p, indices, pk, axis=-1)
  if divergence == "reverse_kl":
    qk = np.take_along_axis(q, indices, axis=-1)
    div = _kl(qk / qk.sum(-1, keepdims=True), pk)
  else:
    div = _divergence(p, q, divergence, beta)
  return (div * mask).sum() / mask.sum()


def numeric_grad(f, x, eps=1e-6):
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    d = np.zeros_like(x)
    d[i] = eps
    g[i] = (f(x + d) - f(x - d)) / (2 * eps)
  return g


def _inputs(seed, scale=3.0):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(B, T, V)) * scale
  t = rng.normal(size=(B, T, V)) * scale
  mask = (rng.random((B, T)) < 0.7).astype(np.float64)
  mask[0, 0] = 1.0
  return s, t, mask


CASES = [("forward_kl", 1.0, 0.5), ("reverse_kl", 1.0, 0.5), ("forward_kl", 2.0, 0.5), ("reverse_kl", 0.5, 0.5)] + [
  ("jsd", temp, beta) for temp, beta in itertools.product((1.0, 1.7), (0.1, 0.5, 0.9))
]


@pytest.mark.parametrize("divergence,temperature,beta", CASES)
def test_distill_loss_matches_formula(divergence, temperature, beta):
  s, t, mask = _inputs(hash((divergence, temperature, beta)) % 1000)
  kw = dict(divergence=divergence, temperature=temperature, jsd_beta=beta)
  f = lambda x: losses.distill_loss(x, jnp.asarray(t, jnp.float32), jnp.asarray(mask), **kw)[0]
  loss, g = jax.value_and_grad(f)(jnp.asarray(s, jnp.float32))
  want = ref_loss(s, t, mask, divergence, temperature, beta)
  want_g = numeric_grad(lambda x: ref_loss(x, t, mask, divergence, temperature, beta), s)
  assert want > 1e-3
  np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-4, atol=1e-6)
  assert not np.asarray(g)[mask == 0].any()  # masked tokens get no gradient


def test_distill_loss_metrics_and_edge_betas():
  s, t, mask = _inputs(7)
  _, m = losses.distill_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask))
  p = np.exp(_log_softmax(t))
  np.testing.assert_allclose(float(m["teacher_entropy"]), ((-(p * np.log(p)).sum(-1)) * mask).sum() / mask.sum(), 1e-5)
  agree = (s.argmax(-1) == t.argmax(-1)) * mask
  np.testing.assert_allclose(float(m["agreement"]), agree.sum() / mask.sum(), 1e-6)
  for beta in (0.0, 1.0):  # M = Q or P: the divergence vanishes, finite gradient
    f = lambda x, b=beta: losses.distill_loss(x, jnp.asarray(t), jnp.asarray(mask), divergence="jsd", jsd_beta=b)[0]
    loss, g = jax.value_and_grad(f)(jnp.asarray(s, jnp.float32))
    assert float(loss) == 0.0 and np.isfinite(np.asarray(g)).all()
  with pytest.raises(ValueError, match="divergence"):
    losses.distill_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), divergence="kl")


def _topk(t, k):
  idx = np.argsort(-t, axis=-1)[..., :k]
  return np.take_along_axis(t, idx, axis=-1), idx


@pytest.mark.parametrize("divergence,temperature,beta", [("forward_kl", 1.0, 0.5), ("reverse_kl", 1.5, 0.5),
                                                         ("jsd", 1.0, 0.1), ("jsd", 0.7, 0.9)])  # fmt: skip
def test_topk_matches_formula(divergence, temperature, beta):
  s, t, mask = _inputs(3)
  vals, idx = _topk(t, 4)
  kw = dict(divergence=divergence, temperature=temperature, jsd_beta=beta)
  f = lambda x: losses.distill_loss_topk(x, jnp.asarray(vals, jnp.float32), jnp.asarray(idx), jnp.asarray(mask), **kw)[
    0
  ]
  loss, g = jax.value_and_grad(f)(jnp.asarray(s, jnp.float32))
  ref = lambda x: ref_loss_topk(x, vals, idx, mask, divergence, temperature, beta)
  np.testing.assert_allclose(float(loss), ref(s), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g), numeric_grad(ref, s), rtol=1e-4, atol=1e-6)
  # k = V in a shuffled order is the full-vocabulary loss
  perm = np.random.default_rng(0).permuted(np.broadcast_to(np.arange(V), t.shape), axis=-1)
  full = losses.distill_loss_topk(jnp.asarray(s), jnp.asarray(np.take_along_axis(t, perm, -1)), jnp.asarray(perm),
                                  jnp.asarray(mask), **kw)[0]  # fmt: skip
  np.testing.assert_allclose(float(full), ref_loss(s, t, mask, divergence, temperature, beta), rtol=1e-5)


@pytest.mark.parametrize("divergence,top_k", [("forward_kl", 0), ("jsd", 0), ("reverse_kl", 0), ("jsd", 3),
                                              ("reverse_kl", 3)])  # fmt: skip
def test_chunked_equals_unchunked(divergence, top_k):
  rng = np.random.default_rng(1)
  Tl, D = 7, 6
  h = jnp.asarray(rng.normal(size=(B, Tl, D)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
  t = rng.normal(size=(B, Tl, V)) * 2
  targets = jnp.asarray(rng.integers(0, V, (B, Tl)))
  mask = jnp.asarray((rng.random((B, Tl)) < 0.7).astype(np.float32)).at[0, 0].set(1.0)
  kw = dict(divergence=divergence, temperature=1.3, jsd_beta=0.3)
  if top_k:
    vals, idx = (jnp.asarray(a) for a in _topk(t, top_k))
    teacher = (vals.astype(jnp.float32), idx)
    full = lambda h, w: losses.distill_loss_topk(h @ w, vals, idx, mask, **kw)
  else:
    teacher = jnp.asarray(t, jnp.float32)
    full = lambda h, w: losses.distill_loss(h @ w, teacher, mask, **kw)

  def both(h, w):  # loss + CE, so the CE metric's gradient is checked too
    loss, m = full(h, w)
    return loss + 0.5 * losses.cross_entropy(h @ w, targets, mask), m

  (want, wm), want_g = jax.value_and_grad(both, argnums=(0, 1), has_aux=True)(h, w)
  for chunk in (1, 3, Tl, 64):

    def chunked(h, w, chunk=chunk):
      loss, m = losses.chunked_distill_loss(lambda x: x @ w, h, teacher, mask, targets_BT=targets, chunk=chunk, **kw)
      return loss + 0.5 * m["ce"], m

    (got, gm), got_g = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(h, w)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, err_msg=f"chunk {chunk}")
    for k in ("kd", "teacher_entropy", "agreement"):
      np.testing.assert_allclose(float(gm[k]), float(wm[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    for a, b in zip(got_g, want_g):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=f"chunk {chunk}")


# ------------------------------------------------------------------ the `rl-jax distill` stage
def test_vocabulary_mismatch_names_both(tmp_path):
  from rl_jax.train import distill

  def tok(name, vocab):
    d = tmp_path / name / "tokenizer"
    d.mkdir(parents=True)
    (d / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}, "added_tokens": []}))
    return str(d)

  student = tok("student", {"a": 0, "b": 1})
  tok("teacher", {"a": 0, "c": 1})
  with pytest.raises(ValueError) as e:
    distill.check_shared_tokenizer(str(tmp_path / "teacher"), 2, student, 2)
  msg = str(e.value)
  assert (
    "\n" not in msg and f"{tmp_path}/teacher/tokenizer/tokenizer.json" in msg and f"{student}/tokenizer.json" in msg
  )
  with pytest.raises(ValueError, match="teacher vocabulary 3 ids .* student vocabulary 2 ids"):
    distill.check_shared_tokenizer(str(tmp_path / "student"), 3, student, 2)
  distill.check_shared_tokenizer(str(tmp_path / "student"), 2, student, 2)  # the same tokenizer passes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("distill")
  run_python([__file__, str(out)], timeout=600)
  with open(out / "results.json") as f:
    return str(out), json.load(f)


def _ok(res, name):
  r = res[name]
  assert r["rc"] == 0, f"{name} failed:\n{r['err'][-4000:]}"
  return r


def _metrics(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_distill_run_learns_and_resumes(runs):
  out, res = runs
  _ok(res, "online")
  _ok(res, "online_more")
  rows = _metrics(f"{out}/online")
  assert [r["step"] for r in rows] == list(range(1, STEPS + 3))  # the rerun resumed at STEPS, teacher reloaded
  kd = [r["kd"] for r in rows]
  assert kd[-1] < 0.7 * kd[0], kd  # the student moves towards the teacher
  assert rows[-1]["agreement"] > rows[0]["agreement"]
  for k in ("loss", "kd", "ce", "agreement", "grad_norm", "tokens", "teacher_entropy"):
    assert all(np.isfinite(r[k]) for r in rows), k
  np.testing.assert_allclose(rows[0]["loss"], rows[0]["kd"] + CE_WEIGHT * rows[0]["ce"], rtol=1e-5)
  assert os.path.exists(f"{out}/online/checkpoints/model_config.json")
  assert os.path.exists(f"{out}/online/checkpoints/tokenizer/tokenizer.json")


def test_topk_online_equals_cached(runs):
  out, res = runs
  _ok(res, "topk_online")
  _ok(res, "topk_cached")
  for a, b in zip(_metrics(f"{out}/topk_online"), _metrics(f"{out}/topk_cached"), strict=True):  # steps 1 and 2
    for k in ("loss", "kd", "ce", "agreement", "teacher_entropy", "grad_norm"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=f"step {a['step']} {k}")
  assert sorted(os.listdir(f"{out}/topk_cached/teacher_cache")) == ["step_000001.npz", "step_000002.npz"]


def test_sft_rows_train_on_response_tokens(runs):
  out, res = runs
  _ok(res, "sft")
  rows = _metrics(f"{out}/sft")
  assert len(rows) == 2 and all(0 < r["tokens"] < 4 * 32 for r in rows)  # prompts (and padding) carry no loss
  assert all(np.isfinite(r["kd"]) for r in rows)


def test_cli_vocabulary_mismatch(runs):
  _, res = runs
  r = res["mismatch"]
  assert r["rc"] == 2, r["err"][-4000:]
  (line,) = [x for x in r["err"].splitlines() if x.startswith("error:")]
  assert "teacher vocabulary 384 ids" in line and "student vocabulary 512 ids" in line, line


# ------------------------------------------------------------------ child process: the runs, through the CLI
STEPS, CE_WEIGHT = 12, 0.1
CONFIG = {
  "model": {"preset": "tiny-dense", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1},
  "train": {
    "steps": STEPS,
    "batch_size": 4,
    "grad_accum": 2,
    "seq_len": 32,
    "compute_dtype": "float32",
    "log_every": 1,
  },
  "optimizer": {"lr": 1.0e-2, "schedule": "constant", "warmup_steps": 0},
  "data": {"source": "procedural"},
  "checkpoint": {"every": 6, "keep": 2},
  "distill": {"chunk": 12, "ce_weight": CE_WEIGHT},
}  # a student smaller than the teacher (tiny-dense), sharing its tokenizer


def _worker(out):
  """Tokenizers, a sharp tiny-dense teacher, and the distill runs; OUT/results.json for the tests."""
  import contextlib
  import io
  import itertools
  import traceback

  from rl_jax import checkpoint, data, models
  from rl_jax import cli as rl_cli
  from rl_jax.models.config import from_dict, preset_dict

  results, d = {}, lambda name: os.path.join(out, name)

  def cli(name, *args):
    err = io.StringIO()
    try:
      with contextlib.redirect_stderr(err):
        rc = rl_cli.main([str(a) for a in args])
    except Exception:
      rc, err = "exception", io.StringIO(traceback.format_exc())
    results[name] = {"rc": rc, "err": err.getvalue()}

  def teacher(name, vocab):
    tok = data.train_bpe(itertools.islice(data.documents(0), 500), vocab)
    data.save(tok, d(f"tok{vocab}"))
    cfg = {**preset_dict("tiny-dense"), "vocab_size": vocab, "tie_word_embeddings": False}
    model = models.build(from_dict(cfg), seed=1)
    model.lm_head[...] = model.lm_head[...] * 20.0  # a teacher with sharp, context-dependent logits
    checkpoint.save_model(d(name), model, tokenizer_dir=d(f"tok{vocab}"))

  teacher("teacher", 512)
  teacher("teacher384", 384)
  with open(d("run.yaml"), "w") as f:
    json.dump(CONFIG, f)  # JSON is YAML
  base = ["distill", "--config", d("run.yaml"), "--teacher", d("teacher")]
  cli("online", *base, "--run-dir", d("online"))
  cli("online_more", *base, "--run-dir", d("online"), f"train.steps={STEPS + 2}")
  topk = [*base, "train.steps=2", "distill.top_k=8", "distill.divergence=jsd"]
  cli("topk_online", *topk, "--run-dir", d("topk_online"))
  cli("topk_cached", *topk, "--run-dir", d("topk_cached"), "distill.cache=true")
  cli("mismatch", "distill", "--config", d("run.yaml"), "--teacher", d("teacher384"), "--run-dir", d("mismatch"),
      f"data.tokenizer={d('tok512')}")  # fmt: skip
  with open(d("sft.jsonl"), "w") as f:
    for i in range(16):
      f.write(json.dumps({"prompt": f"What is {i} + {i}?", "response": f"<think>{i} + {i}</think> {2 * i}"}) + "\n")
  cli("sft", *base, "--run-dir", d("sft"), "train.steps=2", f"data.source={d('sft.jsonl')}", "sft.template='{prompt}'")
  with open(d("results.json"), "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  _worker(sys.argv[1])
