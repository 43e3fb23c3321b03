"""Repo-root conftest: compiles faster (no LLVM optimisation; jaxlib 0.10's older fusion emitters)
and shares a persistent XLA compilation cache across the tests of one run and their subprocesses
(XLA:CPU compiles are the suite's main cost), and hides triton from torch (see below)."""

import importlib.metadata
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

# The suite's programs are small and compiled far more often than they run long: LLVM's
# optimisation passes off (``--xla_backend_optimization_level=0``) save ~10% of the suite's time
# (tests/test_codi_run.py: 179 -> 162 s). Set before JAX starts a backend; subprocesses inherit it.
FAST_COMPILE_FLAGS = ["--xla_backend_optimization_level=0"]
# jaxlib 0.10's XLA:CPU emits fusions through its new MLIR emitters by default; the older LLVM IR
# emitters compile the suite's CoDi train steps about 30% faster (tests/test_configs.py sd15_sr4:
# 28 -> 19.5 s of compile, 67 -> 50 s in all). jaxlib 0.11+ no longer knows the flag, and XLA aborts
# on an unknown flag, so it is set for 0.10 only.
if importlib.metadata.version("jaxlib").startswith("0.10."):
    FAST_COMPILE_FLAGS.append("--xla_cpu_use_fusion_emitters=false")
for _flag in FAST_COMPILE_FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

_CACHE = os.environ.get("CODI_TEST_XLA_CACHE") or os.path.join(tempfile.gettempdir(), "codi_jax_test_xla_cache")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# The same cache for every subprocess a test starts (the CLIs compile the programs the in-process
# tests compiled before them).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
