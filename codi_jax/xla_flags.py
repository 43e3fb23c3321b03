"""``XLA_FLAGS`` for simulated CPU devices (no JAX import: read before a backend starts).

Simulated devices are threads of one process; a collective (the all-reduce of a data-parallel or
FSDP step) waits for all of them. On a loaded 2-core host XLA:CPU's default rendezvous timeout
(40 s) can pass and abort the process (exit 134, ``Termination timeout for 'all reduce' ... of 40
seconds exceeded``). Wherever the device count is simulated, the timeout is raised too.
"""

from __future__ import annotations

HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"
COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_timeout_seconds"
COLLECTIVE_TIMEOUT_S = 900  # holds for 8 simulated devices on 2 cores busy with other work


def with_collective_timeout(flags: str) -> str:
    """``flags`` plus the collective timeout where they simulate CPU devices and set no timeout."""
    if HOST_DEVICES_FLAG in flags and COLLECTIVE_TIMEOUT_FLAG not in flags:
        return f"{flags} {COLLECTIVE_TIMEOUT_FLAG}={COLLECTIVE_TIMEOUT_S}".strip()
    return flags


def simulated_devices(count: int, flags: str = "") -> str:
    """``flags`` plus ``count`` simulated CPU devices and the collective timeout."""
    return with_collective_timeout(f"{flags} {HOST_DEVICES_FLAG}={count}".strip())
