"""rl_jax: a JAX/Flax reimplementation of the DeepSeek-R1 stack.

The top-level folders models/, sharding/ and configs/ are installed as rl_jax.models, rl_jax.sharding and
rl_jax.configs (pyproject's package-dir), so a user's own `models` package never collides with ours.
"""

import os as _os

# A source checkout used without installing (PYTHONPATH=.): find those folders beside rl_jax/.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "models")) and _os.path.isfile(_os.path.join(_root, "pyproject.toml")):
  __path__.append(_root)
