"""rl_jax: a JAX/Flax reimplementation of the DeepSeek-R1 stack."""
