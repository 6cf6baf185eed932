"""Per-device bytes of every state leaf on 8 simulated devices equal its analytic share: the training state
(parameters, router bias, AdamW moments with the masked weight decay, GRPO's reference model, also on a mesh with
a sequence axis), the distillation teacher, the reward model and the sampler's cache.

Equality of 1 and 8 devices (tests/test_train_mesh.py) cannot see a replicated optimizer state: the values
agree either way. Here each leaf's shard is compared with nbytes / (the product of the mesh axes its logical
names map to), computed from a rules table written out below, independently of sharding/rules.py."""

from tests._subproc import run_python

SCRIPT = r"""
import math, tempfile
import jax, numpy as np
from flax import nnx
from rl_jax import checkpoint as ckpt, engine
from rl_jax.config import load_run_config, model_config
from rl_jax.data import tokenizer as toks
from rl_jax.models import Transformer
from rl_jax.reward_model import RewardModel
from rl_jax.sharding import create_sharded, make_mesh
from rl_jax.train import distill, state as S

assert jax.device_count() == 8, jax.devices()
MESH = dict(data=1, fsdp=2, expert=2, tensor=2)
# The default rules, written out (sharding/rules.py DEFAULT_RULES), for shapes where every split divides.
RULES = {"embed": ("fsdp", "expert"), "vocab": ("tensor",), "heads": ("tensor",), "kv_heads": ("tensor",),
         "mlp": ("tensor",), "moe_mlp": ("tensor",), "expert": ("expert",), "q_lora": ("fsdp", "expert"),
         "kv_lora": ("fsdp", "expert"), "head_dim": (), "norm": (), "layers": (), None: ()}


def ways(axes):
  # How many ways the rules split a leaf with these logical axes (a mesh axis is used once, first dim first).
  used, n = set(), 1
  for name in axes:
    for a in RULES[name]:
      if a not in used:
        used.add(a)
        n *= MESH[a]
  return n


def keystr(path):
  return jax.tree_util.keystr(tuple(k for k in path if getattr(k, "name", None) != "value"))


def logical_axes(model_state):
  # {param path: its logical axes}, from the parameters' metadata
  out = {}
  for path, v in jax.tree_util.tree_leaves_with_path(model_state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    out[keystr(path)] = tuple(v.get_metadata()["axes"])
  return out


def check(tree, axes_of, what, min_leaves=1):
  # Every array leaf whose path ends with a parameter's path holds exactly nbytes / ways(axes) on each device.
  checked = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    key = keystr(path)
    match = [p for p in axes_of if key.endswith(p)]
    if not match:
      assert leaf.size <= 1, (what, key, leaf.shape)  # step counters and the like
      continue
    want = leaf.nbytes // ways(axes_of[max(match, key=len)])
    for shard in leaf.addressable_shards:
      assert shard.data.nbytes == want, (what, key, leaf.shape, shard.data.nbytes, want, leaf.sharding.spec)
    checked += 1
  assert checked >= min_leaves, (what, checked)
  return checked


run = load_run_config("configs/pretrain_tiny.yaml", ["model.moe_capacity_factor=null", "train.batch_size=8"])
mcfg = S.train_model_config(model_config(run), run.train)
mesh = make_mesh(**MESH)
with jax.set_mesh(mesh):
  tx = S.optimizer(run.optimizer, run.train.steps)  # AdamW, weight decay masked to matrices, clipping
  graphdef, state, shardings = S.init_state(mcfg, tx, mesh, ref=True)
axes_of = logical_axes(nnx.merge_state(state.params, state.bias))
n_params = len(axes_of)
assert max(ways(a) for a in axes_of.values()) == 8  # some leaves split every way (e.g. [E, D, I] experts)
check(state.params, axes_of, "params", n_params - len(jax.tree.leaves(state.bias)))
check(state.bias, axes_of, "router bias")
# Two moments (mu, nu) per parameter: the masked AdamW's state must shard like the parameters.
n_moments = check(state.opt_state, axes_of, "optimizer state", 2 * len(jax.tree.leaves(state.params)))
check(state.ref, axes_of, "GRPO reference model", len(jax.tree.leaves(state.params)))
print("train state:", n_moments, "moment leaves")

with tempfile.TemporaryDirectory() as d:
  toks.save(toks.train_bpe(["1 + 2 = 3", "<think> a </think>"], vocab_size=mcfg.vocab_size), d + "/tok")
  ckpt.save_model(d + "/m", Transformer(mcfg, nnx.Rngs(params=0)))
  rm_cfg = mcfg.replace(score_head=True)
  ckpt.save_model(d + "/rm", Transformer(rm_cfg, nnx.Rngs(params=0)), tokenizer_dir=d + "/tok")
  with jax.set_mesh(mesh):
    _, t_params, t_bias = distill.load_teacher(d + "/m", run.train)
    check(t_params, axes_of, "distillation teacher", len(jax.tree.leaves(state.params)))
    rm = RewardModel.load(d + "/rm")
    rm_axes = {**axes_of, **logical_axes(nnx.state(rm.model))}
    check(nnx.state(rm.model), rm_axes, "reward model", len(rm_axes) - 1)

# THE SAMPLER'S CACHE: rows split over the batch axes (fsdp x expert = 4); MLA's latent is whole per row.
with jax.set_mesh(mesh):
  model = create_sharded(lambda: Transformer(mcfg, nnx.Rngs(params=0)), mesh)
  eng = engine.Engine(model, slots=8, max_prompt_len=8, max_new_tokens=8)
  slots = eng._empty(eng.state)
cache = jax.tree.leaves(slots.cache)
assert cache
for leaf in cache:
  for shard in leaf.addressable_shards:
    assert shard.data.nbytes == leaf.nbytes // 4, (leaf.shape, shard.data.nbytes, leaf.sharding.spec)

# A SEQUENCE AXIS is more FSDP for the state (else the whole state is held `sequence` times over)
MESH = dict(data=1, fsdp=2, expert=2, tensor=1, sequence=2)
RULES.update({k: (*RULES[k], "sequence") for k in ("embed", "q_lora", "kv_lora")})
seq_mesh = make_mesh(**MESH)
with jax.set_mesh(seq_mesh):
  _, state, _ = S.init_state(mcfg, tx, seq_mesh, ref=True)
assert max(ways(a) for a in axes_of.values()) == 8
check(state.params, axes_of, "params (sequence mesh)", n_params - len(jax.tree.leaves(state.bias)))
check(state.opt_state, axes_of, "optimizer state (sequence mesh)", 2 * len(jax.tree.leaves(state.params)))
check(state.ref, axes_of, "GRPO reference model (sequence mesh)", len(jax.tree.leaves(state.params)))
print("OK")
"""


def test_every_state_leaf_holds_its_analytic_share_on_8_devices():
  proc = run_python(["-c", SCRIPT], n_devices=8, timeout=600)
  assert proc.stdout.strip().endswith("OK"), proc.stdout
