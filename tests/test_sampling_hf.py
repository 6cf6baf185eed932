"""Greedy sampling parity with transformers' own `generate`: the same weights (tiny random DeepSeek-V3 with
YaRN and a nonzero router bias; Qwen2 with GQA and q/k/v bias) continue each prompt token for token."""

import jax.numpy as jnp
import numpy as np
import pytest

from rl_jax import models
from rl_jax.sampling import generate
from tests import hf_models

pytest.importorskip("transformers")
PROMPTS = [[5, 17, 33], [200, 3, 9, 41, 77, 12, 150], [99] + list(range(1, 23)), [42]]
N = 16


def _sharpened(kind, path):
  """The HF model with embed and lm_head x15 (random init gives near-flat logits, so greedy argmaxes would
  sit on near-ties), saved again so ours loads exactly these weights."""
  torch = hf_models._torch()
  model = hf_models.BUILDERS[kind](path)
  with torch.no_grad():
    model.model.embed_tokens.weight.mul_(15.0)
    if not model.config.tie_word_embeddings:
      model.lm_head.weight.mul_(15.0)
  model.save_pretrained(path)
  # No EOS: HF must produce exactly N tokens, as ours does with eos_id=None.
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  return model


@pytest.mark.parametrize("kind", ["deepseek_v3", "qwen2"])
def test_greedy_matches_transformers_generate(kind, tmp_path):
  torch = hf_models._torch()
  hf = _sharpened(kind, str(tmp_path / kind))
  ours = models.load_hf(str(tmp_path / kind), dtype=jnp.float32)
  res = generate(ours, PROMPTS, max_new_tokens=N, temperature=0.0)
  np.testing.assert_array_equal(res.lengths, [N] * len(PROMPTS))
  for i, p in enumerate(PROMPTS):
    # One prompt per call, unpadded: no HF padding semantics involved.
    with torch.no_grad():
      out = hf.generate(
        torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False, max_new_tokens=N
      )
    want = out[0, len(p) :].tolist()
    assert len(want) == N
    assert res.tokens[i].tolist() == want, (i, res.tokens[i].tolist(), want)
    # The comparison means something: HF's own top-2 margin at every generated position is not a near-tie.
    logits = hf_models.logits(hf, np.array([p + want]))[0, len(p) - 1 : -1]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-3, (i, (top2[:, 1] - top2[:, 0]).min())
    # And ours scores the chosen tokens as HF does.
    want_lp = torch.log_softmax(torch.tensor(logits), -1).numpy()[np.arange(N), want]
    np.testing.assert_allclose(res.logprobs[i], want_lp, atol=1e-4, rtol=0)
  assert len({tuple(r) for r in res.tokens.tolist()}) == len(PROMPTS)
