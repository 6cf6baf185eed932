"""Child process of tests/test_seq_parallel.py (8 fake CPU devices): forward logits (main + MTP) and gradients
of the tiny V3 MoE and the dense GQA student on sequence-parallel meshes against one device (dense attention),
and greedy `sampling.generate`, whose prompt prefill runs sequence-parallel there."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rl_jax import sampling
from rl_jax.models import build
from rl_jax.models.config import preset
from rl_jax.sharding import create_sharded, make_mesh

B, T = 4, 32
MESHES = (dict(fsdp=2, sequence=4), dict(fsdp=1, expert=2, tensor=2, sequence=2))
PROMPT_LENS, NEW = (5, 13, 27), 6  # prompt bucket 32: zig-zag chunks of 4 on sequence=4, of 8 on sequence=2


def batch(cfg):
  """Two packed documents a row (a boundary inside a shard), positions restarting per document."""
  rng = np.random.default_rng(0)
  cut = 13
  seg = np.tile(np.r_[[1] * cut, [2] * (T - cut)], (B, 1))
  pos = np.tile(np.r_[np.arange(cut), np.arange(T - cut)], (B, 1))
  return jnp.asarray(rng.integers(3, cfg.vocab_size, (B, T))), jnp.asarray(seg), jnp.asarray(pos)


def run(cfg, mesh):
  """((logits, MTP logits, MoE routing), gradients of a loss on the logits) on `mesh`, as host numpy: the
  routing (expert ids, weights, scores) must come back in the original token order too."""
  tokens, seg, pos = batch(cfg)
  mtp = cfg.num_nextn_predict_layers > 0
  with jax.set_mesh(mesh):
    graphdef, state = nnx.split(create_sharded(lambda: build(cfg, seed=0), mesh))

    def loss(state):
      out = nnx.merge(graphdef, state).forward(tokens, positions_BT=pos, segment_ids_BT=seg, mtp=mtp)
      w = jnp.sin(jnp.arange(out.logits_BTV.shape[-1]))  # a loss whose gradient differs per vocab entry
      total = (jax.nn.log_softmax(out.logits_BTV) * w).mean() + sum((m * w).mean() for m in out.mtp_logits)
      return total, (out.logits_BTV, out.mtp_logits, out.routing)

    lowered = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(state)
    # the sequence-parallel attention really ran: latent / K/V all-gathered inside the attention shard_map
    assert ("all_gather" in lowered.as_text()) == ("sequence" in mesh.axis_names), mesh
    (_, aux), grads = lowered.compile()(state)
  return jax.device_get((aux, grads))


def sample(cfg, mesh):
  """Greedy generate on `mesh`: (tokens, log-probs, lengths, experts, prompt experts) as host numpy. Checks
  that the prefill's attention ran sequence-parallel (the shard_map's all-gather) exactly where T splits."""
  rng = np.random.default_rng(1)
  prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in PROMPT_LENS]
  with jax.set_mesh(mesh):
    model = create_sharded(lambda: build(cfg, seed=0), mesh)
    res = sampling.generate(model, prompts, max_new_tokens=NEW, temperature=0.0)
    (B, P, N), args = sampling.device_inputs(prompts, max_new_tokens=NEW)
    assert P == 32, P
    graphdef, state = nnx.split(model)
    text = sampling.compiled(graphdef, B, P, N, 0.0, 0, 1.0).lower(state, *args).as_text()
    assert ("all_gather" in text) == ("sequence" in mesh.axis_names), mesh
  return tuple(res)


def compare(name, what, ref, got, sizes):
  worst = 0.0
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(ref)]
  assert jax.tree.structure(got) == jax.tree.structure(ref)
  for path, r, g in zip(paths, jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=0, err_msg=f"{name} {what} {sizes} {path}")
    worst = max(worst, float(np.abs(np.asarray(g, np.float64) - np.asarray(r, np.float64)).max()))
  print(name, what, sizes, "max |diff| vs 1 device:", worst, flush=True)


def main(name):
  cfg = preset(name, num_hidden_layers=2)  # MoE: one dense layer, one MoE layer (+ the MTP block)
  one = make_mesh(devices=jax.devices()[:1])
  ref, ref_sample = run(cfg, one), sample(cfg, one)
  for sizes in MESHES:
    mesh = make_mesh(**sizes)
    compare(name, "train", ref, run(cfg, mesh), sizes)
    compare(name, "generate", ref_sample, sample(cfg, mesh), sizes)
  print("OK", name, flush=True)


if __name__ == "__main__":
  for name in sys.argv[1:]:
    main(name)
