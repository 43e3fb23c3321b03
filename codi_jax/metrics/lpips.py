"""LPIPS (Zhang et al. 2018), AlexNet variant, version 0.1, as the ``lpips`` package computes it.

Per image pair: both images (NHWC in ``[-1, 1]``, LPIPS's own input range) are shifted / scaled
per channel (``ScalingLayer``), passed through AlexNet's five conv+ReLU stages; each stage's
features are unit-normalised over channels, their squared difference is weighted per channel by
the learned 1x1 "linear" head, averaged over space, and the five stages are summed. Lower is
more similar. AlexNet needs images of at least 31x31 (our 32x32 patches just fit).

Weights come from two local files (never downloaded): the ``lpips`` package's linear heads
(``lpips/weights/v0.1/alex.pth``: ``lin<k>.model.1.weight``) and torchvision's AlexNet state
dict (``features.<i>.weight`` / ``.bias``; ``classifier.*`` is ignored); ``.safetensors`` /
``.npz`` copies work too.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.metrics.torch_weights import read_state_dict, state_dict_to_variables

SHIFT = (-0.030, -0.088, -0.188)  # lpips.ScalingLayer
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # lpips.normalize_tensor
MIN_SIZE = 31
_WHAT_LINEAR = "LPIPS linear heads (lpips package's weights/v0.1/alex.pth)"
_WHAT_BACKBONE = "LPIPS AlexNet backbone (torchvision alexnet state dict)"
_HIGHEST = jax.lax.Precision.HIGHEST
# our conv name -> (torchvision features index, out channels, kernel, stride, padding)
_ALEXNET_CONVS = (
    ("conv1", 0, 64, 11, 4, 2),
    ("conv2", 3, 192, 5, 1, 2),
    ("conv3", 6, 384, 3, 1, 1),
    ("conv4", 8, 256, 3, 1, 1),
    ("conv5", 10, 256, 3, 1, 1),
)


class AlexNetStages(nn.Module):
    """torchvision AlexNet ``features`` up to conv5+ReLU; returns the five ReLU outputs."""

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        outputs = []
        for name, _, features, kernel, stride, pad in _ALEXNET_CONVS:
            if name in ("conv2", "conv3"):
                x = nn.max_pool(x, (3, 3), (2, 2), padding="VALID")
            conv = nn.Conv(features, (kernel, kernel), stride, [(pad, pad)] * 2, precision=_HIGHEST, name=name)
            x = nn.relu(conv(x))
            outputs.append(x)
        return outputs


class LPIPS(nn.Module):
    """(pred, target) NHWC in ``[-1, 1]`` -> (N,) LPIPS distances."""

    @nn.compact
    def __call__(self, pred: jax.Array, target: jax.Array) -> jax.Array:
        n = pred.shape[0]
        x = jnp.concatenate([pred, target]).astype(jnp.float32)
        x = (x - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
        distance = jnp.zeros((n,), jnp.float32)
        for k, stage in enumerate(AlexNetStages(name="net")(x)):
            stage = stage / (jnp.sqrt(jnp.sum(stage**2, axis=-1, keepdims=True)) + NORM_EPS)
            squared_difference = (stage[:n] - stage[n:]) ** 2
            weighted = nn.Conv(1, (1, 1), use_bias=False, precision=_HIGHEST, name=f"lin{k}")(squared_difference)
            distance = distance + jnp.mean(weighted, axis=(1, 2, 3))
        return distance


@functools.lru_cache(maxsize=1)
def _abstract_variables() -> Any:
    """Shapes of the flax variables (traced once)."""
    dummy = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return jax.eval_shape(LPIPS().init, jax.random.key(0), dummy, dummy)


def _torch_prefix(path: tuple[str, ...]) -> str:
    """flax module path -> torch module name (linear heads / torchvision alexnet)."""
    if path[0] == "net":
        return f"features.{dict((c[0], c[1]) for c in _ALEXNET_CONVS)[path[1]]}"
    return f"{path[0]}.model.1"


def lpips_variables_from_state_dicts(
    linear_state_dict: dict[str, np.ndarray], backbone_state_dict: dict[str, np.ndarray]
) -> dict[str, Any]:
    """flax variables of ``LPIPS`` from the linear-head and the AlexNet state dicts."""
    overlap = set(linear_state_dict) & set(backbone_state_dict)
    if overlap:
        raise KeyError(f"LPIPS weights: linear and backbone files share keys {sorted(overlap)[:5]} (one file twice?)")
    abstract = _abstract_variables()
    merged = {**linear_state_dict, **backbone_state_dict}
    return state_dict_to_variables(
        merged,
        abstract,
        _torch_prefix,
        what=f"{_WHAT_LINEAR} + {_WHAT_BACKBONE}",
        ignored=lambda name: name.startswith("classifier.") or name.endswith("num_batches_tracked"),
    )


@functools.lru_cache(maxsize=2)
def _load_cached(linear_path: str, backbone_path: str, mtimes: tuple[float, float]) -> dict[str, Any]:
    del mtimes  # part of the cache key only
    return lpips_variables_from_state_dicts(
        read_state_dict(linear_path, _WHAT_LINEAR), read_state_dict(backbone_path, _WHAT_BACKBONE)
    )


def load_lpips(linear_path: str | os.PathLike, backbone_path: str | os.PathLike) -> dict[str, Any]:
    """flax variables of ``LPIPS`` from the two local weight files (see module doc); cached."""
    paths = []
    for path, what in ((linear_path, _WHAT_LINEAR), (backbone_path, _WHAT_BACKBONE)):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} weights file not found: {path!r}")
        paths.append(os.path.abspath(path))
    return _load_cached(paths[0], paths[1], (os.path.getmtime(paths[0]), os.path.getmtime(paths[1])))


@jax.jit
def lpips_distance(variables: dict[str, Any], pred: jax.Array, target: jax.Array) -> jax.Array:
    """(N,) LPIPS distance of each ``pred[i]`` to ``target[i]`` (NHWC, ``[-1, 1]``)."""
    if pred.shape != target.shape or pred.ndim != 4 or pred.shape[-1] != 3:
        raise ValueError(f"lpips needs two NHWC RGB arrays of one shape, got {pred.shape} and {target.shape}")
    if min(pred.shape[1:3]) < MIN_SIZE:
        raise ValueError(f"lpips' AlexNet needs images of at least {MIN_SIZE}x{MIN_SIZE}, got {pred.shape}")
    return LPIPS().apply(variables, pred, target)
