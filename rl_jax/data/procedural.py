"""Deterministic procedural tasks (arithmetic, Countdown) with worked solutions: no downloads.

Every problem is a pure function of (seed, index, kind), so a stream of them is a random-access,
checkpointable source. A document is `prompt + " " + solution`, e.g.
  Q: 47+38=? A: <think>7+8=15, write 5 carry 1; 4+3+1=8, write 8</think><answer>85</answer>
Each reasoning step is an equation `lhs=rhs` that holds (tests evaluate them all).
"""

from __future__ import annotations

import ast
import collections
import fractions
import hashlib
import itertools
import operator
import random
import string
from collections.abc import Iterator
from typing import Any

KINDS = ("arithmetic", "countdown", "mixed", "addsub", "chain", "r1zero", "r1", "longkey", "longkey4x")
PROBLEM_KINDS = ("arithmetic", "countdown", "addsub", "chain")  # kinds with a gold answer (RL and eval tasks)
CORPUS_KINDS = ("r1zero", "r1", "longkey", "longkey4x")  # corpora of framed documents, not problem streams
TEST_SHARE = 10  # one problem text in TEST_SHARE is held out of every corpus and RL split (see split_of)


def _digits(n: int) -> list[int]:
  """Least significant digit first."""
  return [int(c) for c in reversed(str(n))]


# ---------------------------------------------------------------- arithmetic


def _add_steps(a: int, b: int) -> list[str]:
  da, db = _digits(a), _digits(b)
  steps, carry, width = [], 0, max(len(da), len(db))
  for i in range(width):
    terms = [d[i] for d in (da, db) if i < len(d)] + ([carry] if carry else [])
    s = sum(terms)
    if len(terms) == 1:
      steps.append(f"bring down {s}")
    elif i == width - 1:
      steps.append(f"{'+'.join(map(str, terms))}={s}, write {s}")
    else:
      carry, digit = divmod(s, 10)
      steps.append(f"{'+'.join(map(str, terms))}={s}, write {digit}" + (f" carry {carry}" if carry else ""))
  return steps


def _sub_steps(a: int, b: int) -> list[str]:  # a >= b
  da, db = _digits(a), _digits(b)
  steps, borrow = [], 0
  for i, top in enumerate(da):
    lhs, v = str(top), top
    if borrow:
      lhs, v = f"{lhs}-1", v - 1
    if i < len(db):
      lhs, v = f"{lhs}-{db[i]}", v - db[i]
    if lhs == str(top):
      steps.append(f"bring down {top}")
      continue
    borrow = int(v < 0)
    if borrow:
      lhs, v = f"10+{lhs}", v + 10
    steps.append(f"{lhs}={v}, write {v}" + (" borrow 1" if borrow else ""))
  return steps


def _mul_steps(a: int, b: int) -> list[str]:
  if b < 10:  # column multiplication with carries
    da, steps, carry = _digits(a), [], 0
    for i, d in enumerate(da):
      lhs = f"{d}*{b}" + (f"+{carry}" if carry else "")
      s = d * b + carry
      if i == len(da) - 1:
        steps.append(f"{lhs}={s}, write {s}")
      else:
        carry = s // 10
        steps.append(f"{lhs}={s}, write {s % 10}" + (f" carry {carry}" if carry else ""))
    return steps
  parts = [(a, d * 10**i) for i, d in enumerate(_digits(b)) if d]  # partial products
  steps = [f"{x}*{y}={x * y}" for x, y in parts]
  total = parts[0][0] * parts[0][1]
  for x, y in parts[1:]:
    steps.append(f"{total}+{x * y}={total + x * y}")
    total += x * y
  return steps


def _expr_steps(nums: list[int], ops: list[str]) -> tuple[list[str], int]:
  """Evaluates with precedence: products left to right, then sums left to right."""
  nums, ops, steps = list(nums), list(ops), []
  for phase in ("*", "+-"):
    i = 0
    while i < len(ops):
      if ops[i] in phase:
        x, y = nums[i], nums[i + 1]
        r = x * y if ops[i] == "*" else x + y if ops[i] == "+" else x - y
        steps.append(f"{x}{ops[i]}{y}={r}")
        nums[i : i + 2], ops[i : i + 1] = [r], []
      else:
        i += 1
  return steps, nums[0]


def _arithmetic(rng: random.Random) -> dict[str, Any]:
  op = rng.choice(("+", "-", "*", "expr"))
  if op == "expr":
    nums = [rng.randint(1, 30) for _ in range(3)]
    ops = [rng.choice("+-*") for _ in range(2)]
    expression = f"{nums[0]}{ops[0]}{nums[1]}{ops[1]}{nums[2]}"
    steps, value = _expr_steps(nums, ops)
  else:
    a, b = rng.randint(1, 10 ** rng.randint(1, 4) - 1), rng.randint(1, 10 ** rng.randint(1, 3) - 1)
    if op == "-":
      a, b = max(a, b), min(a, b)
    if op == "*":
      a, b = rng.randint(2, 999), rng.randint(2, 99)
    expression = f"{a}{op}{b}"
    steps = {"+": _add_steps, "-": _sub_steps, "*": _mul_steps}[op](a, b)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
  return dict(
    kind="arithmetic",
    prompt=f"Q: {expression}=? A:",
    steps=steps,
    answer=str(value),
    target=value,
    expression=expression,
  )


def _addsub(rng: random.Random) -> dict[str, Any]:
  """Two- and three-digit addition or subtraction, worked column by column (the quickstart's task)."""
  a, b = rng.randint(10, 999), rng.randint(10, 999)
  op = rng.choice("+-")
  if op == "-":
    a, b = max(a, b), min(a, b)
  steps = (_add_steps if op == "+" else _sub_steps)(a, b)
  value = a + b if op == "+" else a - b
  return dict(
    kind="addsub", prompt=f"Q: {a}{op}{b}=? A:", steps=steps, answer=str(value), target=value, expression=f"{a}{op}{b}"
  )


def _chain(rng: random.Random) -> dict[str, Any]:
  """A chain of 3-6 single-digit terms, summed left to right as running totals (the quickstart's task): each
  step is an easy fact (total + digit), while the answer in one shot needs all the terms at once."""
  terms = [rng.randint(1, 9) for _ in range(rng.randint(3, 6))]
  total, steps = terms[0], []
  for t in terms[1:]:
    steps.append(f"{total}+{t}={total + t}")
    total += t
  expression = "+".join(map(str, terms))
  return dict(
    kind="chain", prompt=f"Q: {expression}=? A:", steps=steps, answer=str(total), target=total, expression=expression
  )


# ----------------------------------------------------------------- countdown


def _countdown(rng: random.Random) -> dict[str, Any]:
  while True:  # rejection-sample a combination order whose result is a sensible target
    numbers = [rng.randint(1, 99) for _ in range(rng.choice((3, 4)))]
    pool = [(n, str(n)) for n in numbers]  # (value, expression as an operand)
    steps, raw = [], ""
    while len(pool) > 1:
      (x, ex), (y, ey) = [pool.pop(rng.randrange(len(pool))) for _ in range(2)]
      if x < y:
        (x, ex), (y, ey) = (y, ey), (x, ex)
      ops = ["+"] + (["-"] if x > y else []) + (["*"] if x * y <= 2000 else [])
      ops += ["/"] if y > 1 and x % y == 0 else []
      op = rng.choice(ops)
      r = {"+": x + y, "-": x - y, "*": x * y, "/": x // max(y, 1)}[op]
      steps.append(f"{x}{op}{y}={r}")
      raw = f"{ex}{op}{ey}"
      pool.append((r, f"({raw})"))
    target = pool[0][0]
    if 10 <= target <= 999 and target not in numbers:
      break
  shown = sorted(numbers, key=lambda _: rng.random())
  prompt = f"Q: Using the numbers {shown}, make {target}. Use +, -, *, / and each number exactly once. A:"
  return dict(kind="countdown", prompt=prompt, steps=steps, answer=raw, target=target, numbers=shown)


# -------------------------------------------------------------------- public


_MAKERS = {"arithmetic": _arithmetic, "countdown": _countdown, "addsub": _addsub, "chain": _chain}


def problem_at(seed: int, index: int, kind: str = "mixed") -> dict[str, Any]:
  """Problem `index` of the stream `seed`: prompt, solution, answer, target (ground truth), text."""
  if kind not in KINDS or kind in CORPUS_KINDS:
    raise ValueError(f"unknown procedural kind {kind!r}; expected one of {[k for k in KINDS if k not in CORPUS_KINDS]}")
  rng = random.Random(f"rl_jax.procedural/{seed}/{index}")  # str seeds hash stably (sha512)
  if kind == "mixed":
    kind = rng.choice(("arithmetic", "countdown"))
  p = _MAKERS[kind](rng)
  p["steps"] = list(p["steps"])
  p["solution"] = f"<think>{'; '.join(p['steps'])}</think><answer>{p['answer']}</answer>"
  p["text"] = f"{p['prompt']} {p['solution']}"
  return p


def split_of(text: str) -> str:
  """'test' for one problem text in TEST_SHARE (by a stable hash of the text), else 'train'."""
  h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
  return "test" if h % TEST_SHARE == 0 else "train"


# R1-Zero base corpus: the quickstart's task in several surface forms; the <think>/<answer> tags appear in a
# minority of documents only, so RL has to discover that format (and that thinking pays) from the reward.
R1ZERO_FRAME = "User: {q} Think in <think> </think>, answer in <answer> </answer>. Assistant:"
R1ZERO_FORMS = (("tagged", 0.15), ("worked", 0.45), ("direct", 0.40))


def question(p: dict[str, Any]) -> str:
  """The bare question of a problem (its prompt without the corpus' "Q: " / " A:" cues)."""
  return p["prompt"].removeprefix("Q: ").removesuffix(" A:")


def _train_problem(seed: int, index: int, task: str) -> dict[str, Any]:
  """Problem `index` of a corpus: the first training-split problem of a few tried (never a held-out one)."""
  for attempt in itertools.count():
    p = problem_at(seed, index * 1009 + attempt, task)
    if split_of(question(p)) == "train":
      return p
  raise AssertionError("unreachable")


def r1zero_document(seed: int, index: int, task: str = "chain") -> str:
  """Document `index`: a training-split `task` problem, framed as Q/A or as the R1-Zero conversation, solved in
  one of R1ZERO_FORMS (tags + worked steps; worked steps then "so the answer is"; the answer alone)."""
  p = _train_problem(seed, index, task)
  rng = random.Random(f"rl_jax.r1zero/{seed}/{index}")
  q = question(p)
  frame = p["prompt"] if rng.random() < 0.5 else R1ZERO_FRAME.format(q=q)
  form = rng.choices([f for f, _ in R1ZERO_FORMS], [w for _, w in R1ZERO_FORMS])[0]
  steps = "; ".join(p["steps"])
  body = {"tagged": p["solution"], "worked": f"{steps}, so the answer is {p['answer']}.", "direct": p["answer"]}[form]
  return f"{frame} {body}"


# R1 corpus: the R1-Zero forms, plus documents of a generative judge in exactly the rubric rl_jax.judge prompts
# with (correct and incorrect proposed answers, about half each), plus tagged solutions whose reasoning steps are
# written in another script ("3加4=7"), the language mixing that R1's language-consistency reward corrects.
JUDGE_FRAME = "Check: {q} Proposed: {a}. Correct? Assistant:"
# "worksheet": 2-3 problems in one document, all solved in the same R1ZERO_FORMS form: documents whose style
# persists teach a model to continue a few-shot prompt in the shots' form (R1's few-shot cold start needs that,
# and packed rows never let one document attend to another).
R1_FORMS = (("r1zero", 0.5), ("judge", 0.25), ("worksheet", 0.15), ("mixed", 0.1))
MIXED_PLUS = "加"  # "plus" in Chinese: a CJK word inside the CoT


def judge_document(p: dict[str, Any], proposed: str) -> str:
  """The judge's worked verdict on `proposed` for problem `p`: re-solve, then yes / no."""
  verdict = "yes" if proposed == p["answer"] else "no"
  steps = "; ".join(p["steps"])
  return f"{JUDGE_FRAME.format(q=question(p), a=proposed)} <think>{steps}, so {p['answer']}</think><answer>{verdict}</answer>"


def worksheet_document(seed: int, index: int, task: str, rng: random.Random) -> str:
  """2-3 training-split problems as "Q: ... A: ..." in a row, every one solved in the same R1ZERO_FORMS form."""
  form = rng.choices([f for f, _ in R1ZERO_FORMS], [w for _, w in R1ZERO_FORMS])[0]
  parts = []
  for j in range(rng.choice((2, 3))):
    p = _train_problem(seed, index * 7 + j + 1_000_003, task)
    steps = "; ".join(p["steps"])
    body = {"tagged": p["solution"], "worked": f"{steps}, so the answer is {p['answer']}.", "direct": p["answer"]}[form]
    parts.append(f"{p['prompt']} {body}")
  return " ".join(parts)


def r1_document(seed: int, index: int, task: str = "chain") -> str:
  """Document `index` of the R1 corpus: one of R1_FORMS on a training-split `task` problem."""
  rng = random.Random(f"rl_jax.r1/{seed}/{index}")
  form = rng.choices([f for f, _ in R1_FORMS], [w for _, w in R1_FORMS])[0]
  if form == "r1zero":
    return r1zero_document(seed, index, task)
  if form == "worksheet":
    return worksheet_document(seed, index, task, rng)
  p = _train_problem(seed, index, task)
  if form == "judge":
    wrong = max(0, int(p["answer"]) + rng.choice((-3, -2, -1, 1, 2, 3)))
    proposed = p["answer"] if rng.random() < 0.5 or str(wrong) == p["answer"] else str(wrong)
    return judge_document(p, proposed)
  frame = p["prompt"] if rng.random() < 0.5 else R1ZERO_FRAME.format(q=question(p))
  steps = "; ".join(s.replace("+", MIXED_PLUS) for s in p["steps"])
  return f"{frame} <think>{steps}</think><answer>{p['answer']}</answer>"


def document_at(seed: int, index: int, kind: str = "mixed") -> str:
  if kind in LONGKEY_SENTENCES:
    return longkey_document(seed, index, kind)
  if kind == "r1zero":
    return r1zero_document(seed, index)
  if kind == "r1":
    return r1_document(seed, index)
  return problem_at(seed, index, kind)["text"]


def documents(seed: int, kind: str = "mixed") -> Iterator[str]:
  """Infinite deterministic stream of documents."""
  for i in itertools.count():
    yield document_at(seed, i, kind)


def problems(seed: int, n: int, kind: str = "mixed") -> list[dict[str, Any]]:
  """The first n problems of stream `seed` (for RL prompts and evaluation)."""
  return [problem_at(seed, i, kind) for i in range(n)]


# Long-context corpus: a pass key stated somewhere in filler text and asked for at the end, in exactly the format
# of the passkey eval (rl_jax/longctx.py builds its prompts with passkey_text), so that answering needs attention
# reaching back as far as the document is long. "longkey" documents fit a 128-token row of the corpus' own BPE
# tokenizer; "longkey4x" ones run up to 4x longer (for `rl-jax extend` to 512).
PASSKEY_STATEMENT = "The pass key is {key}. Remember it."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
FILLER = (
  "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
  "The river runs to the sea.", "Birds sing in the morning.", "The night is calm.",
)  # fmt: skip
LONGKEY_SENTENCES = {"longkey": (0, 18), "longkey4x": (0, 90)}  # filler sentences per document: (min, max)


def random_key(rng: random.Random) -> str:
  """A pass key: an upper-case letter, a dash, a lower-case letter ("K-m"; 676 keys). Each letter is a token of a
  kind found nowhere else in the document, so a tiny model learns to fetch it by content, with no induction
  circuit (which 2-4 layer models did not form on 5-digit keys in a few thousand steps; a digit in the middle, as
  in "K7m", was never learned either, while both letters were). The dash keeps the letters apart for byte-level
  BPE, whose pre-tokenizer would otherwise hand it "Km" to merge into one token."""
  return f"{rng.choice(string.ascii_uppercase)}-{rng.choice(string.ascii_lowercase)}"


def passkey_text(key: str, filler: list[str], depth: float) -> str:
  """The prompt (ending in PASSKEY_QUESTION, answer not included): the key statement after round(depth * n)
  of the n filler sentences."""
  at = round(depth * len(filler))
  parts = filler[:at] + [PASSKEY_STATEMENT.format(key=key)] + filler[at:]
  return f"{' '.join(parts)} {PASSKEY_QUESTION}"


def longkey_document(seed: int, index: int, kind: str = "longkey") -> str:
  """Document `index`: a random_key at a uniform depth of lo..hi random filler sentences, then asked for and
  answered."""
  rng = random.Random(f"rl_jax.{kind}/{seed}/{index}")
  lo, hi = LONGKEY_SENTENCES[kind]
  n = lo + int((hi - lo + 1) * rng.random() ** 3)  # short documents are the most common: more keys per row
  filler = [rng.choice(FILLER) for _ in range(min(n, hi))]
  key = random_key(rng)
  return f"{passkey_text(key, filler, rng.random())} {key}."


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _eval(node: ast.AST, leaves: list[int]) -> fractions.Fraction:
  """Exact evaluation of + - * / over integer literals; collects the literals used."""
  if isinstance(node, ast.Constant) and type(node.value) is int:
    leaves.append(node.value)
    return fractions.Fraction(node.value)
  if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
    return _OPS[type(node.op)](_eval(node.left, leaves), _eval(node.right, leaves))
  raise ValueError(f"not allowed in an answer: {ast.dump(node)[:40]}")


def verify(problem: dict[str, Any], answer: str) -> bool:
  """Whether `answer` (the text inside <answer>) solves `problem`."""
  answer = answer.strip()
  if problem["kind"] == "arithmetic":
    try:
      return int(answer) == problem["target"]
    except ValueError:
      return False
  leaves: list[int] = []
  try:
    value = _eval(ast.parse(answer, mode="eval").body, leaves)
  except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
    return False
  return value == problem["target"] and collections.Counter(leaves) == collections.Counter(problem["numbers"])
