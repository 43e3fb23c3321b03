"""Device mesh and sharding rules. Rules are data: ``(regex over the param path, spec)``."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D ``data`` mesh over all (or the first ``num_devices``) devices."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"Asked for {num_devices} devices but only {len(devices)} are visible.")
        devices = devices[:num_devices]
    # Auto axes: shardings are given at the jit boundary and XLA propagates them inside, so
    # model code needs no per-op sharding annotations.
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch split along its leading axis over the ``data`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Sequence[str | None]]] = ()) -> Any:
    """Per-leaf ``NamedSharding``: the first rule whose regex matches the leaf's path, else replicated.

    A rule's spec must divide the leaf's shape; scalars are always replicated.
    """
    compiled = [(re.compile(pattern), PartitionSpec(*spec)) for pattern, spec in rules]

    def leaf_sharding(path, leaf):
        name = _path_str(path)
        if np.ndim(leaf) > 0:
            for pattern, spec in compiled:
                if pattern.search(name):
                    return NamedSharding(mesh, spec)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
    if global_batch_size % mesh.size:
        raise ValueError(
            f"Global batch size {global_batch_size} is not divisible by the {mesh.size} devices of the mesh."
        )
