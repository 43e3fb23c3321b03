"""Repo-root conftest: puts the repo on sys.path (so `configs` imports), shares a persistent
XLA compilation cache across the tests of one run (XLA:CPU compiles are the suite's main cost),
and hides triton from torch (see below)."""

import os
import sys
import tempfile

import jax

# The test-only torch (2.14.1, PyPI's CUDA build on x86_64) brings triton, its GPU kernel compiler,
# which torch._dynamo (imported by diffusers) imports when present; importing triton into a process
# that has loaded TensorFlow (the input pipeline) crashes it (segmentation fault). The tests run
# torch on the CPU only, so triton is hidden: `import triton` raises ImportError and torch runs
# without it.
sys.modules.setdefault("triton", None)

_CACHE = os.environ.get("CODI_TEST_XLA_CACHE") or os.path.join(tempfile.gettempdir(), "codi_jax_test_xla_cache")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
