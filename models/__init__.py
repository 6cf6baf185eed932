"""rl_jax model zoo: DeepSeek-V3/R1 (MLA, DeepSeekMoE, MTP, YaRN) and dense Qwen2 / Llama 3, in Flax NNX."""

from .config import ModelConfig, RopeConfig
from .transformer import Output, Transformer, abstract, build, count_params

__all__ = [
  "ModelConfig",
  "RopeConfig",
  "Transformer",
  "Output",
  "build",
  "abstract",
  "count_params",
  "load_hf",
  "save_hf",
]


def __getattr__(name):
  if name in ("load_hf", "save_hf"):
    from . import hf

    return getattr(hf, name)
  raise AttributeError(name)
