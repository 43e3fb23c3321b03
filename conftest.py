"""Repo-root conftest: puts the repo on sys.path (so `configs` imports) and shares a persistent
XLA compilation cache across the tests of one run (XLA:CPU compiles are the suite's main cost)."""

import os
import tempfile

import jax

_CACHE = os.environ.get("CODI_TEST_XLA_CACHE") or os.path.join(tempfile.gettempdir(), "codi_jax_test_xla_cache")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
