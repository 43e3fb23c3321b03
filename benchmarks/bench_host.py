"""What the benchmark scripts report about the machine they ran on (and one import guard)."""

from __future__ import annotations

import os
import platform
import sys

# The test extra's torch (PyPI's CUDA build) brings triton; torch._dynamo (imported by diffusers)
# imports it when present, and that crashes a process that has loaded TensorFlow. The benchmarks run
# torch on the CPU only, so triton is hidden (as in the repository's conftest.py).
sys.modules.setdefault("triton", None)


def usable_cores() -> list[int]:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
