"""What a compiled XLA program does per device, read from its optimized HLO text with every loop counted as many
times as it runs: matmul FLOPs, HBM bytes accessed, and the collectives with their bytes.

XLA's `compiled.cost_analysis()` counts a while loop's body once, so a scanned layer stack (or gradient
accumulation over micro-batches) looks L times cheaper than it is. Here each computation's costs are summed from
its instructions and multiplied along the call graph: a while body by its trip count (XLA's `known_trip_count`,
else the constant its condition compares the counter with; a loop whose count depends on data, such as a decode
loop, counts once and is counted in `unknown_loops`), a conditional by its costliest branch.

  * FLOPs: 2 x output elements x contracted elements of every `dot` and `convolution` (the matmuls; the rest of a
    transformer's arithmetic is a rounding error next to them);
  * bytes: per top-level instruction (a fusion is one), its operands read and its output written, the way XLA's
    cost model counts them: a fused parameter that is only sliced reads its slices, a dynamic-update-slice
    writes its update (in place, the buffer is not read), and bookkeeping (tuples, bitcasts, parameters,
    constants, control flow) moves nothing;
  * collectives: all-gather, all-reduce, reduce-scatter, all-to-all and collective-permute (synchronous, or the
    start of an async pair), with the bytes of their result.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import NamedTuple

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4}
DTYPE_BYTES.update({"s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5, "token": 0})
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "partition-id", "replica-id"}
FREE |= {"while", "call", "conditional", "iota", "opt-barrier", "optimization-barrier", "copy-start", "slice-start"}
FREE |= {"async-done"} | {f"{c}-done" for c in COLLECTIVES}
SLICING = {"dynamic-slice", "slice", "gather"}

_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMP = re.compile(r"^(ENTRY )?%(\S+) \(")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


class Instr(NamedTuple):
  name: str
  shape: str  # the result type as printed: an array or a tuple of them
  op: str
  operands: tuple[str, ...]  # names of the instructions it reads
  args: str  # the text inside its parentheses
  attrs: str  # the text after them


class Costs(NamedTuple):
  flops: float
  bytes: float
  collectives: dict  # kind -> {"count": n, "bytes": b}
  unknown_loops: int
  grouped_flops: float = 0.0  # the part from grouped-matmul kernels, counted over their whole row buffers


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO type: an array like bf16[10,16,1024]{...} or a tuple of arrays."""
  return sum(
    DTYPE_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _ARRAY.findall(shape)
  )


def _dims(shape: str) -> list[int]:
  m = _ARRAY.search(shape)
  return [int(d) for d in m[2].split(",") if d] if m else []


def _close(s: str, i: int) -> int:
  """Index of the bracket closing the one opened at s[i]."""
  depth = 0
  for j in range(i, len(s)):
    if s[j] in "([{":
      depth += 1
    elif s[j] in ")]}":
      depth -= 1
      if depth == 0:
        return j
  return len(s)


def _instr(line: str) -> Instr | None:
  line = line.strip().removeprefix("ROOT ")
  if not line.startswith("%") or " = " not in line:
    return None
  name, rest = line[1:].split(" = ", 1)
  if rest.startswith("("):
    end = _close(rest, 0)
    shape, rest = rest[: end + 1], rest[end + 1 :].lstrip()
  else:
    shape, _, rest = rest.partition(" ")
  op, paren, _ = rest.partition("(")
  if not paren:
    return None
  end = _close(rest, len(op))
  args = rest[len(op) + 1 : end]
  return Instr(name, shape, op, tuple(re.findall(r"%([\w.\-]+)", args)), args, rest[end + 1 :])


def parse(text: str) -> tuple[dict[str, list[Instr]], str]:
  """({computation name: its instructions}, the entry computation's name) of an HLO module's text."""
  comps, entry, cur = {}, "", None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m and line.rstrip().endswith("{"):
      cur, comps[m[2]] = m[2], []
      entry = m[2] if m[1] else entry
    elif cur is not None and line.strip() == "}":
      cur = None
    elif cur is not None and (ins := _instr(line)) is not None:
      comps[cur].append(ins)
  return comps, entry


def _valid_taps(n_in: int, n_out: int, size: int, stride: int, pad_lo: int, lhs_dilate: int, rhs_dilate: int) -> int:
  """(output position, window tap) pairs of one spatial dim that land on a real input element (not padding, not a
  dilation hole): XLA:TPU writes batched matmuls as convolutions whose windows are mostly holes."""
  extent = (n_in - 1) * lhs_dilate + 1
  count = 0
  for o in range(n_out):
    for k in range(size):
      i = o * stride + k * rhs_dilate - pad_lo
      count += 0 <= i < extent and i % lhs_dilate == 0
  return count


def _convolution_flops(ins: Instr, shapes: dict[str, str]) -> float:
  m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
  lhs, rhs, out = (_dims(shapes.get(o, "")) for o in (*ins.operands[:2], ins.name))
  out = _dims(ins.shape)
  if not m or not lhs or not rhs:
    return 0.0
  lab_l, lab_r, lab_o = m[1], m[2], m[3]
  flops = 2.0 * lhs[lab_l.index("b")] * rhs[lab_r.index("o")] * rhs[lab_r.index("i")]
  fields = {k: v.split("x") for k, v in re.findall(r"(size|stride|pad|lhs_dilate|rhs_dilate)=([\d_x\-]+)", ins.attrs)}
  for d, ch in enumerate(c for c in lab_l if c.isdigit()):
    get = lambda key, default, d=d: fields[key][d] if key in fields and d < len(fields[key]) else default
    flops *= _valid_taps(lhs[lab_l.index(ch)], out[lab_o.index(ch)], int(get("size", 1)), int(get("stride", 1)),
                         int(str(get("pad", "0_0")).split("_")[0]), int(get("lhs_dilate", 1)), int(get("rhs_dilate", 1)))  # fmt: skip
  return flops


def _grouped_flops(ins: Instr) -> float:
  """A grouped matmul custom call (XLA's ragged dot, the megablox gmm / tgmm kernels): 2 x rows x in x out, the
  rows being every row of its buffer (kernels that skip rows past the groups do less)."""
  floats = [d for t, d in _ARRAY.findall(ins.attrs.split("operand_layout_constraints=", 1)[-1].split("}}", 1)[0])
            if t.startswith(("bf", "f"))]  # fmt: skip
  mats = [[int(x) for x in d.split(",")] for d in floats if d.count(",") == 1]
  out = _dims(ins.shape)
  if len(out) == 2:  # [m, n] = lhs [m, k] @ its group's [k, n]
    k = next((a[1] for a in mats if a[0] == out[0]), 0)
    return 2.0 * out[0] * out[1] * k
  if len(out) == 3:  # [groups, k, n] = lhs [m, k]^T @ [m, n], group by group (the weight gradient)
    m = next((a[0] for a in mats if a[1] == out[1]), 0)
    return 2.0 * out[1] * out[2] * m
  return 0.0


def matmul_flops(ins: Instr, shapes: dict[str, str]) -> float:
  """2 x output elements x contracted elements of a dot, convolution or grouped-matmul kernel (0 for the rest)."""
  if ins.op == "custom-call":
    grouped = re.search(r'op_name="[^"]*(ragged_dot|/gmm|/tgmm|jit\(gmm\)|jit\(tgmm\))', ins.attrs)
    return _grouped_flops(ins) if grouped and "metadata" not in ins.name else 0.0
  if ins.op == "dot" and len(ins.operands) >= 2:
    lhs = _dims(shapes.get(ins.operands[0], ""))
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
    out = math.prod(_dims(ins.shape))
    return 2.0 * out * math.prod(lhs[int(d)] for d in m[1].split(",") if d) if m and lhs else 0.0
  if ins.op == "convolution" and len(ins.operands) >= 2:
    return _convolution_flops(ins, shapes)
  return 0.0


def _reads(body: list[Instr], param: str) -> float | None:
  """Bytes a fusion reads of one of its parameters when it only slices it (through bitcasts), else None; 0 when it
  only serves as the buffer of an in-place dynamic-update-slice."""
  users = [i for i in body if param in i.operands]
  total = 0.0
  for u in users:
    if u.op in SLICING and u.operands[0] == param:
      total += shape_bytes(u.shape)
    elif u.op == "dynamic-update-slice" and u.operands[0] == param:
      continue
    elif u.op == "bitcast":
      inner = _reads(body, u.name)
      if inner is None:
        return None
      total += inner
    else:
      return None
  return total if users else 0.0


def _fusion_bytes(ins: Instr, body: list[Instr], shapes: dict[str, str]) -> float:
  params = {int(i.args): i for i in body if i.op == "parameter"}
  total = 0.0
  for k, operand in enumerate(ins.operands):
    p = params.get(k)
    read = None if p is None else _reads(body, p.name)
    total += shape_bytes(shapes.get(operand, "")) if read is None else read
  by_name = {i.name: i for i in body}
  root = body[-1] if body else None
  outs = [by_name.get(o) for o in root.operands] if root is not None and root.op == "tuple" else [root]
  for o in outs:
    if o is not None and o.op == "dynamic-update-slice":
      total += shape_bytes(by_name[o.operands[1]].shape) if o.operands[1] in by_name else 0.0
    elif o is not None:
      total += shape_bytes(o.shape)
  return total


def _trip_count(ins: Instr, comps: dict[str, list[Instr]]) -> int | None:
  m = _TRIP.search(ins.attrs)
  if m:
    return int(m[1])
  cond = re.search(r"condition=%([\w.\-]+)", ins.attrs)
  body = comps.get(cond[1], []) if cond else []
  if not body or body[-1].op != "compare" or "direction=LT" not in body[-1].attrs:
    return None
  consts = {i.name: i.args for i in body if i.op == "constant"}
  bound = next((consts[o] for o in body[-1].operands if o in consts), None)
  return int(bound) if bound is not None and bound.lstrip("-").isdigit() else None


class _Acc:
  """Costs of one computation, accumulated (FLOPs, the grouped-kernel share of them, bytes, collectives)."""

  def __init__(self):
    self.flops, self.grouped, self.bytes = 0.0, 0.0, 0.0
    self.coll: dict = defaultdict(lambda: [0.0, 0.0])

  def add(self, other: _Acc, times: float = 1.0, with_bytes: bool = True) -> None:
    self.flops += times * other.flops
    self.grouped += times * other.grouped
    self.bytes += times * other.bytes if with_bytes else 0.0
    for kind, (n, b) in other.coll.items():
      self.coll[kind][0] += times * n
      self.coll[kind][1] += times * b


def analyse(text: str) -> Costs:
  """Per-device FLOPs, bytes accessed and collectives of a compiled program's HLO text (see the module doc)."""
  comps, entry = parse(text)
  fused = {m[2] for instrs in comps.values() for i in instrs if i.op == "fusion" for m in _CALLED.finditer(i.attrs)}
  memo: dict[str, _Acc] = {}
  unknown = [0]

  def cost(name: str) -> _Acc:
    if name in memo:
      return memo[name]
    acc = memo[name] = _Acc()  # (also the recursion guard)
    body = comps.get(name, [])
    shapes = {i.name: i.shape for i in body}
    for ins in body:
      f = matmul_flops(ins, shapes)
      acc.flops += f
      acc.grouped += f if ins.op == "custom-call" else 0.0
      kind = next((c for c in COLLECTIVES if ins.op in (c, f"{c}-start")), None)
      if kind:
        acc.coll[kind][0] += 1
        arrays = [shape_bytes(a.group(0)) for a in _ARRAY.finditer(ins.shape)]  # an async start: (operands, result)
        acc.coll[kind][1] += max(arrays, default=0.0)
      if ins.op == "while":
        trips = _trip_count(ins, comps)
        unknown[0] += trips is None
        acc.add(cost(re.search(r"body=%([\w.\-]+)", ins.attrs)[1]), trips or 1)
      elif ins.op == "conditional":
        m = _BRANCHES.search(ins.attrs)
        branches = [cost(b.strip().lstrip("%")) for b in m[1].split(",")] if m else []
        if branches:
          acc.add(max(branches, key=lambda c: (c.flops, c.bytes)))
      else:  # fusions (their bytes are the fusion's own, below), async starts, calls, reducers
        for m in _CALLED.finditer(ins.attrs):
          acc.add(cost(m[2]), with_bytes=ins.op != "fusion")
      if name in fused or ins.op in FREE:
        continue
      if ins.op == "fusion":
        called = re.search(r"calls=%([\w.\-]+)", ins.attrs)
        acc.bytes += _fusion_bytes(ins, comps.get(called[1], []) if called else [], shapes)
      elif ins.op == "dynamic-update-slice":
        acc.bytes += 2 * shape_bytes(shapes.get(ins.operands[1], ""))
      elif ins.op in ("copy-done", "slice-done"):  # an async copy: read and write its result once
        acc.bytes += 2 * max((shape_bytes(a.group(0)) for a in _ARRAY.finditer(ins.shape)), default=0.0)
      else:
        acc.bytes += shape_bytes(ins.shape) + sum(shape_bytes(shapes.get(o, "")) for o in ins.operands)
    return acc

  total = cost(entry)
  collectives = {k: {"count": int(round(n)), "bytes": float(b)} for k, (n, b) in sorted(total.coll.items())}
  return Costs(total.flops, total.bytes, collectives, unknown[0], total.grouped)
