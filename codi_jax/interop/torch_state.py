"""Reading PyTorch state dicts from local files and mapping them onto flax variables.

The perceptual metrics (FID / KID Inception, LPIPS) run networks whose published weights are
PyTorch state dicts. Nothing here downloads: the user passes local paths. Accepted files:

- ``.safetensors`` (needs the ``safetensors`` package),
- ``.npz`` (numpy only; e.g. ``np.savez(path, **{k: v.numpy() for k, v in sd.items()})``),
- ``.pth`` / ``.pt`` / ``.bin`` (``torch.load(..., weights_only=True)``; needs torch).

Layouts: conv ``weight`` (out, in, kh, kw) -> flax ``kernel`` (kh, kw, in, out); batch norm
``weight`` / ``bias`` / ``running_mean`` / ``running_var`` -> ``scale`` / ``bias`` / ``mean`` /
``var``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax
import jax
import numpy as np

_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
# flax leaf name -> (torch parameter name, layout change)
_LEAF_TO_TORCH: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "kernel": ("weight", lambda w: np.transpose(w, (2, 3, 1, 0))),
    "bias": ("bias", lambda b: b),
    "scale": ("weight", lambda s: s),
    "mean": ("running_mean", lambda m: m),
    "var": ("running_var", lambda v: v),
}


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, np.ndarray]:
    """name -> float32 array from a local weights file; ``what`` names the weights in errors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} weights file not found: {path!r}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as error:
            raise ImportError(f"reading {what} weights from {path!r} needs `pip install safetensors`") from error
        raw: Mapping[str, Any] = load_file(path)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            raw = {name: archive[name] for name in archive.files}
    elif suffix in _TORCH_SUFFIXES:
        try:
            import torch
        except ImportError as error:
            raise ImportError(
                f"reading {what} weights from the PyTorch file {path!r} needs torch; "
                "or save the state dict as .safetensors / .npz"
            ) from error
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
            raw = raw["state_dict"]
        if not isinstance(raw, Mapping):
            raise ValueError(f"{what} weights file {path!r} holds a {type(raw).__name__}, not a state dict")
        raw = {name: value.detach().cpu().numpy() for name, value in raw.items() if hasattr(value, "detach")}
    else:
        raise ValueError(
            f"{what} weights file {path!r}: unknown suffix {suffix!r} (expected .safetensors, .npz, .pth, .pt, .bin)"
        )
    return {name: np.asarray(value) for name, value in raw.items()}


def _preview(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def state_dict_to_variables(
    state_dict: Mapping[str, np.ndarray],
    abstract_variables: Any,
    torch_prefix: Callable[[tuple[str, ...]], str],
    *,
    what: str,
    ignored: Callable[[str], bool] = lambda name: False,
) -> dict[str, Any]:
    """Fills a flax variables tree (shapes from ``jax.eval_shape(model.init, ...)``) from a state dict.

    ``torch_prefix`` maps a flax module path (without collection and leaf name) to the torch
    module name. Raises ``KeyError`` naming missing / unexpected keys (except those ``ignored``)
    and ``ValueError`` naming a key whose shape differs.
    """
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract_variables))
    converted, used, missing = {}, set(), []
    for path, leaf in flat.items():
        torch_leaf, to_flax = _LEAF_TO_TORCH[path[-1]]
        name = f"{torch_prefix(path[1:-1])}.{torch_leaf}"
        if name not in state_dict:
            missing.append(name)
            continue
        value = to_flax(np.asarray(state_dict[name], np.float32))
        if value.shape != tuple(leaf.shape):
            raise ValueError(
                f"{what} weights: {name!r} has shape {tuple(np.shape(state_dict[name]))}, "
                f"expected the PyTorch layout of {tuple(leaf.shape)} (flax {'/'.join(path)})"
            )
        converted[path] = jax.numpy.asarray(value)
        used.add(name)
    unexpected = [name for name in state_dict if name not in used and not ignored(name)]
    if missing:
        raise KeyError(f"{what} weights: {len(missing)} expected keys are missing: {_preview(missing)}")
    if unexpected:
        raise KeyError(f"{what} weights: unexpected keys (wrong file?): {_preview(unexpected)}")
    return flax.traverse_util.unflatten_dict(converted)
