"""Device mesh, sharding rules (as data) and moving arrays onto / off the mesh.

The mesh has two axes: ``data`` (pure data parallelism) and ``fsdp`` (data parallelism whose
devices also split the weights, their EMA and optimizer state). Batches are split over both.
Rules are ``(regex over the leaf path, spec)``; the first match wins, unmatched leaves are
replicated. A spec is a tuple (a ``PartitionSpec``: one mesh axis or None per dimension) or the
string ``"fsdp"``: split the leaf along ``fsdp`` on its largest dimension that the axis size
divides, when the leaf has at least ``min_size`` entries (small leaves stay replicated).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from codi_jax import xla_flags

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
AUTO_FSDP = "fsdp"
# Shard every parameter (and its EMA / Adam moments, whose paths end the same way) with 2^14 or
# more entries along fsdp; biases, norms and small kernels stay replicated.
DEFAULT_RULES = ((".*", AUTO_FSDP),)
DEFAULT_MIN_SIZE = 2**14


def default_sharding_config() -> ml_collections.ConfigDict:
    """The ``sharding`` config section: fsdp axis size (data = devices / fsdp) and the rules."""
    config = ml_collections.ConfigDict()
    config.fsdp = 1  # devices per fsdp group; the data axis takes the rest
    config.rules = DEFAULT_RULES
    config.min_size = DEFAULT_MIN_SIZE  # the "fsdp" rule leaves smaller leaves replicated
    return config


HOST_DEVICES_FLAG = xla_flags.HOST_DEVICES_FLAG


def cpu_devices_for(batch_size: int) -> int:
    """The CPU devices a batch is best split over: one per usable core, at most, and a divisor of
    ``batch_size`` (XLA:CPU keeps two cores busier running two half-batch programs than one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(d for d in range(1, min(cores, batch_size) + 1) if batch_size % d == 0)


def use_cpu_devices(count: int) -> bool:
    """Gives the CPU backend ``count`` devices (``XLA_FLAGS`` ``--xla_force_host_platform_device_count``)
    if JAX has started no backend yet and the flag is not already set; True if it did. GPUs and TPUs
    are unaffected (they stay the default devices)."""
    from jax._src import xla_bridge

    flags = os.environ.get("XLA_FLAGS", "")
    if count < 2 or HOST_DEVICES_FLAG in flags or xla_bridge.backends_are_initialized():
        return False
    os.environ["XLA_FLAGS"] = xla_flags.simulated_devices(count, flags)  # with a collective timeout
    return True


def make_mesh(num_devices: int | None = None, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all, or the first ``num_devices``)."""
    devices = list(jax.devices() if devices is None else devices)
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"Asked for {num_devices} devices but only {len(devices)} are visible.")
        devices = devices[:num_devices]
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"sharding.fsdp={fsdp} must be >= 1 and divide the {len(devices)} devices.")
    # Auto axes: shardings are given at the jit boundary and XLA propagates them inside, so
    # model code needs no per-op sharding annotations.
    shape = (len(devices) // fsdp, fsdp)
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh(shape, BATCH_AXES, axis_types=(auto, auto), devices=devices)


def mesh_from_config(config: ml_collections.ConfigDict) -> Mesh:
    return make_mesh(config.num_devices or None, int(config.sharding.fsdp))


def rules_from_config(config: ml_collections.ConfigDict) -> tuple[tuple, int]:
    """``(rules, min_size)`` of a config's ``sharding`` section."""
    return tuple(config.sharding.rules), int(config.sharding.min_size)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch split along its leading axis over the ``data`` and ``fsdp`` axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def auto_fsdp_spec(shape: Sequence[int], fsdp: int, min_size: int) -> PartitionSpec:
    """``fsdp`` on the largest dimension it divides (the last of equals), or replicated."""
    if fsdp == 1 or int(np.prod(shape)) < min_size:
        return PartitionSpec()
    candidates = [i for i, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return PartitionSpec()
    dim = max(candidates, key=lambda i: (shape[i], i))
    return PartitionSpec(*[FSDP_AXIS if i == dim else None for i in range(len(shape))])


def _checked_spec(name: str, shape: Sequence[int], spec: Sequence[Any], mesh: Mesh) -> PartitionSpec:
    if len(spec) > len(shape):
        raise ValueError(f"Sharding rule spec {tuple(spec)} has more entries than {name}'s shape {tuple(shape)}.")
    for size, axes in zip(shape, spec):
        parts = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())]))
        if size % parts:
            raise ValueError(f"Sharding rule spec {tuple(spec)} does not divide {name}'s shape {tuple(shape)}.")
    return PartitionSpec(*spec)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = (), min_size: int = 0) -> Any:
    """Per-leaf ``NamedSharding`` from ``rules`` (see the module docstring); scalars are replicated."""
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]
    fsdp = mesh.shape.get(FSDP_AXIS, 1)

    def leaf_sharding(path, leaf):
        name, shape = _path_str(path), tuple(np.shape(leaf))
        for pattern, spec in compiled if shape else ():
            if pattern.search(name):
                if spec == AUTO_FSDP:
                    return NamedSharding(mesh, auto_fsdp_spec(shape, fsdp, min_size))
                return NamedSharding(mesh, _checked_spec(name, shape, spec, mesh))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
    if global_batch_size % mesh.size:
        raise ValueError(
            f"Global batch size {global_batch_size} is not divisible by the {mesh.size} devices of the mesh."
        )


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Host arrays, equal on every process, as arrays replicated over the (possibly multi-host) mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def to_host(tree: Any) -> Any:
    """NumPy copies of (possibly multi-host) arrays: replicated ones from a local shard, others gathered."""

    def fetch(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(fetch, tree)
