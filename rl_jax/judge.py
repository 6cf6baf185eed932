"""A generative judge: any checkpoint prompted with a grading rubric (the question and a candidate answer) and
its verdict parsed from its greedy completion, as R1 used a model to grade what rules cannot verify.

The rubric is the one the R1 corpus' judge documents are written in (`procedural.JUDGE_FRAME`), so a tiny
base pretrained on it verifies chain sums: it re-solves the problem in <think> and answers <answer>yes</answer>
or <answer>no</answer>. A completion without a parseable verdict is None (counted, never guessed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rl_jax.data import procedural

RUBRIC = procedural.JUDGE_FRAME  # "{q}": the bare question, "{a}": the candidate answer
VERDICTS = {"yes": True, "no": False}


def rubric(question: str, answer: str) -> str:
  """The judge's prompt for one candidate answer."""
  return RUBRIC.format(q=question.strip(), a=" ".join(str(answer).split()))


def parse_verdict(completion: str) -> bool | None:
  """True / False for a last <answer> block of yes / no (case and spaces ignored); None otherwise."""
  from rl_jax.rewards import extract_answer

  answer = extract_answer(completion)
  return None if answer is None else VERDICTS.get(answer.strip().lower().rstrip("."))


def judge(model, tok, items: Sequence[tuple[str, str]], *, max_new_tokens: int = 80, batch_size: int = 128,
          max_prompt_len: int = 256) -> list[bool | None]:  # fmt: skip
  """The verdict on each (question, candidate answer), greedy, `batch_size` prompts per sampler call."""
  from rl_jax import sampling
  from rl_jax.data import tokenizer as toks
  from rl_jax.rollout import completion_texts

  vocab = toks.Vocab.from_tokenizer(tok)
  prompts = [[vocab.bos_id] + toks.encode(tok, rubric(q, a)) for q, a in items]
  if prompts and (longest := max(map(len, prompts))) > max_prompt_len:
    raise ValueError(f"a judge prompt has {longest} tokens > max_prompt_len={max_prompt_len}")
  out: list[bool | None] = []
  for i in range(0, len(prompts), batch_size):
    res = sampling.generate(
      model, prompts[i : i + batch_size], max_new_tokens=max_new_tokens, temperature=0.0, eos_id=vocab.eos_id
    )
    out += [parse_verdict(t) for t in completion_texts(tok, res, vocab.eos_id)]
  return out


def agreement(verdicts: Sequence[bool | None], correct: Sequence[bool]) -> dict[str, Any]:
  """How the judge compares with the rule verifier: judged, unparseable, agreement over the parsed verdicts."""
  parsed = [(v, bool(c)) for v, c in zip(verdicts, correct, strict=True) if v is not None]
  return {
    "judged": len(verdicts),
    "unparsed": len(verdicts) - len(parsed),
    "agreement": sum(v == c for v, c in parsed) / len(parsed) if parsed else None,
    "judge_yes": sum(v for v, _ in parsed),
    "verifier_correct": sum(c for _, c in parsed),
  }
