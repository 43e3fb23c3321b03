"""Stable Diffusion 1.5 / 2.1 teachers converted with ``python -m codi_jax.convert``."""
