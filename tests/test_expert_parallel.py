"""models.moe expert parallelism: experts split over a mesh axis, tokens all-to-all, specs from the ambient rules."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from rl_jax.models.config import preset
from rl_jax.models.moe import MoE, ep_capacity, ep_specs
from rl_jax.sharding import AXES, use_rules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FLAG = "--xla_force_host_platform_device_count=8"
# 12 routed experts: a size no other dim of this layer has, so the HLO check can spot the expert dim by size.
LAYER = dict(hidden_size=32, moe_intermediate_size=20, n_routed_experts=12, n_shared_experts=0, n_group=1, topk_group=1)


def _mesh(data, fsdp, expert, tensor):
  return AbstractMesh((data, fsdp, expert, tensor), AXES, axis_types=(AxisType.Auto,) * 4)


def test_specs_and_capacity():
  ep = _mesh(2, 1, 4, 1)
  assert ep_specs(ep, "expert", 128, (8, 64, 32)) == (("data", "expert"), ())
  assert ep_specs(ep, "expert", 4, (8, 64, 32)) == (("data",), ())  # 4 tokens: copies over "expert"
  assert ep_specs(_mesh(1, 2, 2, 2), "expert", 128, (8, 64, 32)) == (("fsdp", "expert"), ("tensor",))
  assert ep_capacity(16, 2, 4, None) == 32 and ep_capacity(16, 2, 4, 1.0) == 8 and ep_capacity(16, 2, 4, 100.0) == 32
  with pytest.raises(ValueError, match="6 routed experts do not divide"):
    ep_specs(ep, "expert", 128, (6, 64, 32))
  with use_rules({"moe_mlp": "data"}), pytest.raises(ValueError, match="shares mesh axes with the tokens"):
    ep_specs(_mesh(2, 1, 2, 2), "expert", 128, (8, 64, 32))


def _shard_map_of_layer(mesh, rules):
  """The shard_map equation of a MoE layer traced under `mesh` and `use_rules(rules)`; None if none."""
  moe = MoE(preset("tiny-moe", **LAYER), nnx.Rngs(params=0))
  with jax.sharding.use_abstract_mesh(mesh), use_rules(rules):
    jaxpr = jax.make_jaxpr(lambda x: moe(x)[0])(jnp.ones((8, 8, 32)))
  return next((e for e in jaxpr.eqns if e.primitive.name == "shard_map"), None)


def test_custom_rules_reach_the_expert_parallel_shard_map():
  """A run's `mesh.rules` set with `use_rules` decide the MoE shard_map's layout: token split, the mesh axis
  holding the experts, and the expert-width split (in_specs x, ..., gate, up, down)."""
  mesh = _mesh(2, 1, 2, 2)
  cases = [
    (None, P(("data", "expert"), None), P("expert", None, "tensor")),
    ({"act_batch": "data", "moe_mlp": None}, P("data", None), P("expert", None, None)),
    ({"expert": "data"}, P(("data", "expert"), None), P("data", None, "tensor")),  # experts over "data"
  ]
  for rules, x_spec, gate_spec in cases:
    in_specs = _shard_map_of_layer(mesh, rules).params["in_specs"]
    assert (in_specs[0], in_specs[4]) == (x_spec, gate_spec), (rules, in_specs)
  assert _shard_map_of_layer(mesh, {"expert": None}) is None  # experts replicated: a single-device dispatch
  with pytest.raises(ValueError, match="shares mesh axes with the tokens"):
    _shard_map_of_layer(mesh, {"moe_mlp": "data"})


# 8 DEVICES: a fresh process, so the device-count flag holds whatever imported jax first.
SCRIPT = r"""
import functools, math, re, time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from rl_jax.models import Transformer, build
from rl_jax.models.config import preset
from rl_jax.models.moe import MoE, dispatch_dropless, dispatch_expert_parallel, route
from rl_jax.sharding import create_sharded, make_mesh, param_shardings, use_rules
from tests.test_expert_parallel import LAYER

assert jax.device_count() == 8
t0 = time.perf_counter()
max_err = lambda a, b: max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, 256)
probe = jax.random.normal(jax.random.key(2), (8, 16, 256))
loss = lambda gd: (lambda s, t: jnp.sum(nnx.merge(gd, s)(t) * probe))
MESHES = {"ep": dict(data=2, expert=4), "ep_tp": dict(fsdp=2, expert=2, tensor=2)}

# WHOLE MODEL: cf = 4 = E/K = the expert-axis size: neither the single-device nor the EP capacity can overflow.
for name, cfg in [("dropless", preset("tiny-moe", vocab_size=256)),
                  ("cf4", preset("tiny-moe", vocab_size=256, moe_capacity_factor=4.0))]:
  gd, ref_state = nnx.split(build(cfg, seed=3))
  ref = np.asarray(jax.jit(lambda s, t: nnx.merge(gd, s)(t))(ref_state, tokens))
  ref_grad = jax.jit(jax.grad(loss(gd)))(ref_state, tokens) if name == "dropless" else None
  for mname, sizes in MESHES.items():
    mesh = make_mesh(**sizes)
    state = nnx.split(create_sharded(lambda: Transformer(cfg, nnx.Rngs(params=3)), mesh))[1]
    with jax.set_mesh(mesh):
      compiled = jax.jit(lambda s, t: nnx.merge(gd, s)(t)).lower(state, tokens).compile()
      err = float(np.abs(np.asarray(compiled(state, tokens)) - ref).max())
    assert " all-to-all(" in compiled.as_text(), mname     # the expert-parallel path ran
    print(f"LOGITS {name} {mname} t={time.perf_counter() - t0:.0f}s err={err:.2e}")
    assert err < 1e-5, (name, mname, err)
    if ref_grad is not None:     # GRADIENTS through the all-to-alls, psums and ragged_dots
      with jax.set_mesh(mesh):
        grad = jax.jit(jax.grad(loss(gd)))(state, tokens)
      flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_grad))
      errs = {jax.tree_util.keystr(p): float(np.abs(np.asarray(g) - np.asarray(flat_ref[p])).max())
              for p, g in jax.tree_util.tree_leaves_with_path(grad)}
      # routed weights: [L, E, ., .] stacked over the 2 MoE layers, and the MTP block's [E, ., .]
      experts = {jax.tree_util.keystr(p): errs[jax.tree_util.keystr(p)]
                 for p, g in jax.tree_util.tree_leaves_with_path(grad) if g.ndim >= 3 and g.shape[-3] == 8}
      assert len(experts) == 6 and max(experts.values()) < 1e-5, experts      # gate / up / down, twice
      # the rest (attention, embeddings: sums over all 128 tokens, |g| up to ~10): relative to each leaf
      rel = {k: v / max(1.0, float(np.abs(np.asarray(flat_ref[p])).max()))
             for (p, _), (k, v) in zip(jax.tree_util.tree_leaves_with_path(grad), errs.items())}
      assert max(rel.values()) < 1e-5, sorted(rel.items(), key=lambda kv: -kv[1])[:3]
      print(f"GRAD {mname} expert_err={max(experts.values()):.2e} all_rel_err={max(rel.values()):.2e}")

# ONE LAYER, FORWARD AND BACKWARD HLO: E = 12 experts, a size no other dim of the layer has.
E = LAYER["n_routed_experts"]
COLL = re.compile(r"= (.*?) (all-gather|all-to-all|all-reduce|reduce-scatter|collective-permute)(?:-start)?\(")
SHAPE = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")


def collectives(hlo):
  # (op, [(dtype, dims) of its result], line) for every collective of a compiled HLO module
  out = []
  for line in hlo.splitlines():
    if m := COLL.search(line):
      shapes = [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in SHAPE.findall(m.group(1))]
      out.append((m.group(2), shapes, line))
  return out


def expert_gathers(colls):
  # data-moving collectives with the full expert dim anywhere (an expert weight or the scores of all tokens
  # gathered), and all-reduces of rank >= 3 arrays with it (a whole expert weight's gradient summed)
  return [line for op, shapes, line in colls for _, dims in shapes
          if E in dims and (op != "all-reduce" or len(dims) >= 3)]


cfg = preset("tiny-moe", **LAYER)
gd, ref_state = nnx.split(MoE(cfg, nnx.Rngs(params=0)))
x = jax.random.normal(jax.random.key(5), (8, 8, 32))
lprobe = jax.random.normal(jax.random.key(6), (8, 8, 32))
is_expert = lambda path, _: path[-1] in ("gate", "up", "down")


def layer_loss(experts, x, rest):
  return jnp.sum(nnx.merge(gd, nnx.merge_state(rest, experts))(x)[0] * lprobe)


ref_e, ref_rest = nnx.split_state(ref_state, is_expert, ...)
ref_g = jax.grad(layer_loss, argnums=(0, 1))(ref_e, x, ref_rest)
CASES = [("ep", None), ("ep_tp", None), ("ep", {"expert": "data"})]   # the last: experts over "data" (n=2)
for mname, rules in CASES:
  mesh = make_mesh(**MESHES[mname])
  with jax.set_mesh(mesh), use_rules(rules):
    experts, rest = nnx.split_state(jax.device_put(ref_state, param_shardings(ref_state, mesh)), is_expert, ...)
    rest = jax.device_put(rest, NamedSharding(mesh, P()))   # router replicated: its [D, E] gather is not at issue
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp", "expert"))))
    # fresh closures: jit caches traces per function, and the rules are read while tracing
    fwd = jax.jit(lambda *a: layer_loss(*a)).lower(experts, xs, rest).compile()
    bwd = jax.jit(jax.grad(lambda *a: layer_loss(*a), argnums=(0, 1))).lower(experts, xs, rest).compile()
    err = max_err(bwd(experts, xs, rest), ref_g)
  fwd_c, bwd_c = collectives(fwd.as_text()), collectives(bwd.as_text())
  a2a = lambda cs, back: [l for op, sh, l in cs if op == "all-to-all" and sh[0][0] == "f32" and ("transpose(" in l) == back]
  n_local = E // math.prod(mesh.shape[a] for a in (["data"] if rules else ["expert"]))
  local = [l for op, sh, l in bwd_c for _, dims in sh if dims[:1] == (n_local,) and len(dims) == 3]
  print(f"HLO {mname} rules={rules} grad_err={err:.2e} a2a fwd={len(a2a(fwd_c, False))} "
        f"bwd={len(a2a(bwd_c, False))}+{len(a2a(bwd_c, True))} local_expert_collectives={len(local)}")
  assert not expert_gathers(fwd_c) and not expert_gathers(bwd_c), expert_gathers(fwd_c) + expert_gathers(bwd_c)
  assert local, "the local experts' gradient reduction / fsdp gather should show [E/n, ., .] shapes"
  # tokens go and come back in the forward pass; their cotangents make the reverse trips in the backward
  assert len(a2a(fwd_c, False)) >= 2 and not a2a(fwd_c, True) and len(a2a(bwd_c, True)) >= 2, (fwd_c, bwd_c)
  assert err < 1e-5, (mname, rules, err)

# CAPACITY DROPS: per (source device, destination shard) pair, in token order, against numpy
mesh = make_mesh(data=2, expert=4)
T, D, I, E, K, cf = 64, 16, 8, 8, 2, 0.5
ks = jax.random.split(jax.random.key(4), 5)
x = jax.random.normal(ks[0], (T, D))
logits = 3 * jax.random.normal(ks[1], (T, E))
bias = jnp.zeros(E)
gate, up = (0.3 * jax.random.normal(k, (E, D, I)) for k in jax.random.split(ks[3]))
down = 0.3 * jax.random.normal(ks[4], (E, I, D))
route_k = functools.partial(route, k=K, n_group=1, topk_group=1, norm_topk_prob=False, scaling=1.0)
route_fn = lambda l, b, replay: route_k(l, b)
ep = lambda x, l, g, u, d, cf: dispatch_expert_parallel(x, l, bias, None, route_fn, g, u, d, k=K, capacity_factor=cf)
with jax.set_mesh(mesh):
  y, r = jax.jit(functools.partial(ep, cf=cf))(x, logits, gate, up, down)
r1 = route_k(logits, bias)                 # one device
np.testing.assert_array_equal(np.asarray(r.experts_TK), np.asarray(r1.experts_TK))
X, W, EX, G, U, DN = (np.asarray(a, np.float64) for a in (x, r1.weights_TK, r1.experts_TK, gate, up, down))
silu = lambda v: v / (1 + np.exp(-v))
Tl, n = T // 8, 4
C = math.ceil(cf * Tl * K / n)
want, dropped = np.zeros((T, D)), 0
for dev in range(8):                       # token chunks in (data, expert) order
  used = np.zeros(n, int)
  for t in range(dev * Tl, (dev + 1) * Tl):
    for k in range(K):
      e = int(EX[t, k]); s = e // (E // n)
      if used[s] < C:
        used[s] += 1
        want[t] += W[t, k] * (silu(X[t] @ G[e]) * (X[t] @ U[e])) @ DN[e]
      else:
        dropped += 1
err = float(np.abs(np.asarray(y) - want).max())
print(f"DROPS C={C} dropped={dropped}/{T * K} err={err:.2e}")
assert dropped > 0 and err < 1e-5, (dropped, err)

# FEW TOKENS (decode): 4 do not split over data x expert, so expert shards get copies; value and grads exact
x4, l4, probe4 = x[:4], logits[:4], jax.random.normal(ks[0], (4, D))
few = lambda *a: jnp.sum(ep(a[0], l4, *a[1:], cf=None)[0] * probe4)
one = lambda *a: jnp.sum(dispatch_dropless(a[0], route_k(l4, bias), *a[1:]) * probe4)
with jax.set_mesh(mesh):
  got = jax.jit(jax.value_and_grad(few, argnums=(0, 1, 2, 3)))(x4, gate, up, down)
err = max_err(got, jax.value_and_grad(one, argnums=(0, 1, 2, 3))(x4, gate, up, down))
print(f"FEW_TOKENS err={err:.2e}")
assert err < 1e-5, err
print(f"DONE {time.perf_counter() - t0:.1f}s")
"""


@pytest.fixture(scope="module")
def run8():
  env = {
    **os.environ,
    "XLA_FLAGS": _FLAG,
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
  }
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  print(proc.stdout)  # shown with pytest -s: errors, collectives seen, timings
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  return proc.stdout


def test_logits_match_single_device(run8):
  """Dropless and cf=4 (nothing drops) on data=2 x expert=4 and fsdp=2 x expert=2 x tensor=2: logits
  within 1e-5 of one device, through the all-to-all path."""
  assert len(re.findall(r"^LOGITS .*$", run8, re.M)) == 4, run8


def test_gradients_match_single_device(run8):
  assert len(re.findall(r"^GRAD .*$", run8, re.M)) == 2, run8


def test_hlo_keeps_experts_on_their_shard_forward_and_backward(run8):
  """One MoE layer, value and grad w.r.t. the expert weights and the input, on both meshes and with experts
  moved to "data" by the rules: no collective carries the full expert dim (E = 12, whatever the other dims),
  all-to-alls both ways in the forward and back again in the backward, gradients within 1e-5 of one device."""
  assert len(re.findall(r"^HLO .*$", run8, re.M)) == 3, run8


def test_capacity_drops_per_pair_in_token_order(run8):
  assert re.search(r"^DROPS .*$", run8, re.M), run8


def test_few_tokens_are_copied_over_expert_shards(run8):
  assert re.search(r"^FEW_TOKENS .*$", run8, re.M), run8
