"""Hugging Face interop: stream a local HF checkpoint (safetensors, sharded, FP8 block-quantized, MTP
layers) into an NNX model, and write one back that transformers loads.

    model = models.load_hf("path/to/DeepSeek-V3", dtype=jnp.bfloat16, mesh=mesh)
    models.save_hf(model, "out/")

Loading reads one tensor at a time from memory-mapped files and places each parameter straight onto
its devices (`jax.make_array_from_callback`): with a mesh, a device reads only its own slice (for the
stacked experts only its own experts), so host memory never holds the model twice.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import safetensors_io as st
from .config import ModelConfig
from .transformer import Transformer

TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "vocab.json",
  "merges.txt",
  "tokenizer.model",
  "generation_config.json",
  "chat_template.jinja",
)


class CheckpointError(ValueError):
  pass


class Spec(NamedTuple):
  path: tuple  # our parameter's path in nnx.state(model)
  hf: tuple[str, ...]  # the HF tensors it holds, row-major over `stack`
  n_in: int  # 0: as is; -1: flattened (biases); k: a linear layer, first k dims input
  stack: tuple[int, ...] = ()  # our leading dims that index HF tensors: (layers,), (experts,) or (layers, experts)

  def tensor(self, index: tuple[int, ...]) -> str:
    """The HF name of the tensor at `index` of the stacked dims."""
    return self.hf[int(np.ravel_multi_index(index, self.stack))] if self.stack else self.hf[0]


def _lin_to_ours(w: np.ndarray, shape, n_in: int) -> np.ndarray:
  return w.T.reshape(shape) if n_in > 0 else w.reshape(shape)


def _ours_to_hf(x: np.ndarray, n_in: int) -> np.ndarray:
  if n_in <= 0:
    return x.reshape(-1) if n_in else x
  n = math.prod(x.shape[:n_in])
  return x.reshape(n, -1).T


def _hf_shape(shape, n_in: int) -> tuple[int, ...]:
  if n_in <= 0:
    return (math.prod(shape),) if n_in else tuple(shape)
  n = math.prod(shape[:n_in])
  return (math.prod(shape) // n, n)


def _layer_specs(cfg: ModelConfig, ours: tuple, hf: str, moe: bool) -> list[Spec]:
  s = [
    Spec(ours + ("attn_norm", "scale"), (hf + "input_layernorm.weight",), 0),
    Spec(ours + ("mlp_norm", "scale"), (hf + "post_attention_layernorm.weight",), 0),
  ]
  a, ha = ours + ("attn",), hf + "self_attn."
  if cfg.is_mla:
    if cfg.q_lora_rank:
      s += [
        Spec(a + ("q_a",), (ha + "q_a_proj.weight",), 1),
        Spec(a + ("q_norm", "scale"), (ha + "q_a_layernorm.weight",), 0),
        Spec(a + ("q_b",), (ha + "q_b_proj.weight",), 1),
      ]
    else:
      s += [Spec(a + ("q",), (ha + "q_proj.weight",), 1)]
    s += [
      Spec(a + ("kv_a",), (ha + "kv_a_proj_with_mqa.weight",), 1),
      Spec(a + ("kv_norm", "scale"), (ha + "kv_a_layernorm.weight",), 0),
      Spec(a + ("kv_b",), (ha + "kv_b_proj.weight",), 1),
      Spec(a + ("o",), (ha + "o_proj.weight",), 2),
    ]
  else:
    s += [Spec(a + (n,), (ha + f"{n}_proj.weight",), 1) for n in ("q", "k", "v")]
    s += [Spec(a + ("o",), (ha + "o_proj.weight",), 2)]
    if cfg.attention_bias:
      s += [Spec(a + (f"{n}_bias",), (ha + f"{n}_proj.bias",), -1) for n in ("q", "k", "v")]
  m, hm = ours + ("mlp",), hf + "mlp."
  if moe:
    s += [
      Spec(m + ("router",), (hm + "gate.weight",), 1),
      Spec(m + ("bias",), (hm + "gate.e_score_correction_bias",), 0),
    ]
    E = cfg.n_routed_experts
    for n in ("gate", "up", "down"):
      s.append(Spec(m + (n,), tuple(f"{hm}experts.{e}.{n}_proj.weight" for e in range(E)), 1, (E,)))
    if cfg.n_shared_experts:
      s += [Spec(m + ("shared", n), (f"{hm}shared_experts.{n}_proj.weight",), 1) for n in ("gate", "up", "down")]
  else:
    s += [Spec(m + (n,), (f"{hm}{n}_proj.weight",), 1) for n in ("gate", "up", "down")]
  return s


def param_specs(cfg: ModelConfig) -> list[Spec]:
  """The full name map, ours <-> HF, derived from the config."""
  specs = [Spec(("embed",), ("model.embed_tokens.weight",), 0), Spec(("norm", "scale"), ("model.norm.weight",), 0)]
  if not cfg.tie_word_embeddings:
    specs.append(Spec(("lm_head",), ("lm_head.weight",), 1))
  for group, idx in cfg.layer_groups():  # parameters stacked over the group's layers: one spec each
    per_layer = [_layer_specs(cfg, (group,), f"model.layers.{i}.", cfg.is_moe_layer(i)) for i in idx]
    for parts in zip(*per_layer):
      p = parts[0]
      specs.append(Spec(p.path, tuple(n for q in parts for n in q.hf), p.n_in, (len(idx), *p.stack)))
  for k in range(cfg.num_nextn_predict_layers):
    hf = f"model.layers.{cfg.num_hidden_layers + k}."
    specs += [
      Spec(("mtp", k, "enorm", "scale"), (hf + "enorm.weight",), 0),
      Spec(("mtp", k, "hnorm", "scale"), (hf + "hnorm.weight",), 0),
      Spec(("mtp", k, "eh_proj"), (hf + "eh_proj.weight",), 1),
      Spec(("mtp", k, "head_norm", "scale"), (hf + "shared_head.norm.weight",), 0),
    ]
    specs += _layer_specs(cfg, ("mtp", k, "block"), hf, cfg.n_routed_experts > 0)
  return specs


def _mtp_copies(cfg: ModelConfig) -> dict[str, tuple]:
  """MTP layers carry copies of the shared embedding and head; we write them and skip them on load."""
  out = {}
  for k in range(cfg.num_nextn_predict_layers):
    hf = f"model.layers.{cfg.num_hidden_layers + k}."
    out[hf + "embed_tokens.weight"] = (("embed",), 0)
    out[hf + "shared_head.head.weight"] = (("embed",), 0) if cfg.tie_word_embeddings else (("lm_head",), 1)
  return out


# ----------------------------------------------------------------------------------------------- load
def _dequantizer(ckpt: st.Checkpoint, block: tuple[int, int]) -> Callable[[str], np.ndarray]:
  def read(name: str) -> np.ndarray:
    w = ckpt.get(name)
    if w.dtype in (st.DTYPES["F8_E4M3"], st.DTYPES["F8_E5M2"]):
      scale_name = name + "_scale_inv"
      if scale_name not in ckpt:
        raise CheckpointError(f"FP8 tensor '{name}' has no '{scale_name}'")
      return dequantize_fp8(w, ckpt.get(scale_name), block)
    return w

  return read


def dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128)) -> np.ndarray:
  """W[i, j] * scale_inv[i // bo, j // bi] in float32 (multiply, despite the name)."""
  bo, bi = block
  out, inp = w.shape
  want = (-(-out // bo), -(-inp // bi))
  if tuple(scale_inv.shape) != want:
    raise CheckpointError(
      f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {w.shape} with blocks {block} (expected {want})"
    )
  s = np.repeat(np.repeat(np.asarray(scale_inv, np.float32), bo, axis=0), bi, axis=1)[:out, :inp]
  return np.asarray(w).astype(np.float32) * s


def load_hf(path: str, dtype=jnp.bfloat16, *, mesh=None, rules=None, compute_dtype=None) -> Transformer:
  """Reads a local HF directory into a `Transformer` whose params are `dtype` (router kept fp32), placed
  by the logical rules (`rules` overrides, default: the ambient ones of `use_rules`) on `mesh` (default: the
  mesh set with `jax.set_mesh`, else one device)."""
  if mesh is None:
    from ..sharding.mesh import active_mesh

    mesh = active_mesh()
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
  with open(cfg_path) as f:
    hf_cfg = json.load(f)
  name = jnp.dtype(dtype).name
  cfg = ModelConfig.from_hf(hf_cfg, param_dtype=name, dtype=jnp.dtype(compute_dtype or dtype).name)
  ckpt = st.Checkpoint(path)
  if cfg.num_nextn_predict_layers and not any(
    k.startswith(f"model.layers.{cfg.num_hidden_layers}.") for k in ckpt.keys()
  ):
    warnings.warn(
      f"{path}: config has {cfg.num_nextn_predict_layers} MTP layer(s) but the checkpoint holds none "
      "(transformers does not save them); loading without MTP"
    )
    cfg = cfg.replace(num_nextn_predict_layers=0)
  quant = hf_cfg.get("quantization_config") or {}
  block = tuple(quant.get("weight_block_size") or (128, 128))
  read = _dequantizer(ckpt, block)

  abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0)))
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  specs = param_specs(cfg)
  _check_names(specs, flat, ckpt, cfg, path)
  shardings = _shardings(state, mesh, rules)

  for spec in specs:
    var = flat[spec.path]
    shape, target = var.get_value().shape, var.get_value().dtype
    k = len(spec.stack)
    per = shape[k:]
    for name in spec.hf:
      if ckpt.shape(name) != _hf_shape(per, spec.n_in):
        raise CheckpointError(
          f"shape mismatch for '{name}': checkpoint has {ckpt.shape(name)}, config expects {_hf_shape(per, spec.n_in)}"
        )

    def build(index, spec=spec, per=per, target=target, k=k):
      # A device's block: the HF tensors its stacked dims (layers, experts) select, each sliced to its rest.
      picks = [range(n)[i] for n, i in zip(spec.stack, index[:k])]
      parts = [
        np.asarray(_lin_to_ours(read(spec.tensor(at)), per, spec.n_in)[index[k:]]).astype(target)
        for at in itertools.product(*picks)
      ]
      return parts[0] if not k else np.stack(parts).reshape(*map(len, picks), *parts[0].shape)

    sharding = shardings[spec.path] if shardings else jax.sharding.SingleDeviceSharding(jax.devices()[0])
    var.set_value(jax.make_array_from_callback(shape, sharding, build))
  # Non-parameter state that has no HF tensor (none today) would stay abstract: refuse rather than guess.
  leftover = [p for p, v in flat.items() if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
  if leftover:
    raise CheckpointError(f"internal: no HF tensor maps to {'.'.join(map(str, leftover[0]))}")
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _check_names(specs, flat, ckpt, cfg, path):
  ours = {p for p, v in flat.items() if isinstance(v, (nnx.Param, nnx.Variable))}
  mapped = {s.path for s in specs}
  assert ours == mapped, f"internal: unmapped params {sorted(ours ^ mapped)[:3]}"
  expected = {n for s in specs for n in s.hf}
  have = set(ckpt.keys())
  missing = sorted(expected - have)
  if missing:
    raise CheckpointError(
      f"{path}: missing tensor '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    )
  ignorable = set(_mtp_copies(cfg)) | {n + "_scale_inv" for n in expected}
  if cfg.tie_word_embeddings:
    ignorable.add("lm_head.weight")
  unexpected = sorted(n for n in have - expected - ignorable if not n.endswith("rotary_emb.inv_freq"))
  if unexpected:
    raise CheckpointError(
      f"{path}: unexpected tensor '{unexpected[0]}'"
      + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
      + f" for a {cfg.arch} model with {cfg.num_hidden_layers} layers"
    )


def _shardings(state, mesh, rules):
  if mesh is None:
    return None
  from ..sharding.rules import param_shardings

  return dict(nnx.to_flat_state(param_shardings(state, mesh, rules)))


# ----------------------------------------------------------------------------------------------- save
def save_hf(
  model: Transformer, path: str, *, dtype=None, max_shard_bytes: int = 4 * 2**30, tokenizer_dir: str | None = None
) -> None:
  """Writes config.json + safetensors (sharded with an index past `max_shard_bytes`), HF layout."""
  cfg: ModelConfig = model.cfg
  if cfg.score_head:
    raise ValueError("save_hf: a reward model (score_head=true) has no HF causal-LM equivalent; not exported")
  os.makedirs(path, exist_ok=True)
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  tensors = []  # (name, shape, dtype, produce)

  def fetch(p, sel=...):
    """One tensor's slice of our (possibly stacked) parameter, cut on the device before the copy to the host."""
    return np.asarray(jax.device_get(flat[p].get_value()[sel]))

  for spec in param_specs(cfg):
    arr = flat[spec.path].get_value()
    out_dt = np.dtype(dtype) if dtype is not None and spec.path[-1] not in ("router", "bias") else np.dtype(arr.dtype)
    per = arr.shape[len(spec.stack) :]
    for e, name in enumerate(spec.hf):
      sel = np.unravel_index(e, spec.stack) if spec.stack else ...
      tensors.append(
        (
          name,
          _hf_shape(per, spec.n_in),
          out_dt,
          lambda p=spec.path, sel=sel, n=spec.n_in: _ours_to_hf(fetch(p, sel), n),
        )
      )
  for name, (p, n_in) in _mtp_copies(cfg).items():
    arr = flat[p].get_value()
    out_dt = np.dtype(dtype) if dtype is not None else np.dtype(arr.dtype)
    tensors.append((name, _hf_shape(arr.shape, n_in), out_dt, lambda p=p, n=n_in: _ours_to_hf(fetch(p), n)))

  shards, cur, size = [], [], 0
  for t in tensors:
    nbytes = math.prod(t[1]) * t[2].itemsize
    if cur and size + nbytes > max_shard_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(t)
    size += nbytes
  shards.append(cur)
  if len(shards) == 1:
    st.write(os.path.join(path, "model.safetensors"), shards[0], {"format": "pt"})
  else:
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      st.write(os.path.join(path, fname), shard, {"format": "pt"})
      for t in shard:
        weight_map[t[0]] = fname
        total += math.prod(t[1]) * t[2].itemsize
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  hf_cfg = cfg.to_hf()
  if dtype is not None:
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = np.dtype(dtype).name
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2)
  if tokenizer_dir:
    copy_tokenizer_files(tokenizer_dir, path)


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(src, name)):
      shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
      copied.append(name)
  return copied
