"""Inception-v3 as used for FID (pytorch-fid's ``InceptionV3``, the TF-ported 2015-12-05 weights).

The network matches pytorch-fid's FID variant of torchvision's Inception3: ``Mixed_5b..5d`` are
``FIDInceptionA`` and ``Mixed_6b..6e`` ``FIDInceptionC`` (their pool branch averages without
counting the zero padding, as TensorFlow did), ``Mixed_7b`` / ``Mixed_7c`` are
``FIDInceptionE_1`` / ``FIDInceptionE_2`` (the latter max-pools in its pool branch). Features
are the 2048-d global average pool after ``Mixed_7c`` (pytorch-fid's ``dims=2048``).

Input: NHWC images in ``[-1, 1]`` (the codebase's convention). They are mapped to ``[0, 1]`` and
then processed exactly as pytorch-fid processes its ``[0, 1]`` input: bilinear resize to 299x299
(``align_corners=False``, no antialiasing) and ``2 x - 1``.

Weights are read from a local file (never downloaded): pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` state dict (torchvision ``Inception3`` names such as
``Mixed_5b.branch1x1.conv.weight``; ``fc.*`` is ignored), the state dict of pytorch-fid's
``InceptionV3`` module (``blocks.2.0.branch1x1.conv.weight``), or either saved as
``.safetensors`` / ``.npz``.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.interop.torch_state import read_state_dict, state_dict_to_variables
from codi_jax.metrics.color import to_unit_range

INPUT_SIZE = 299
FEATURE_DIM = 2048
_WHAT = "FID Inception (pytorch-fid pt_inception-2015-12-05 state dict)"
_HIGHEST = jax.lax.Precision.HIGHEST

# pytorch-fid's InceptionV3 wraps the torchvision modules in ``blocks.<i>.<j>``.
_BLOCK_MODULES = (
    ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
    ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
    ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
    ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> batch norm (running statistics, eps 1e-3) -> ReLU, as torchvision's."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = [(self.padding[0], self.padding[0]), (self.padding[1], self.padding[1])]
        x = nn.Conv(
            self.features, self.kernel_size, self.strides, padding=pad, use_bias=False, precision=_HIGHEST, name="conv"
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    """TF's 3x3 stride-1 average pool: padded zeros are not counted (the FID blocks' patch)."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride_2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class FIDInceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        branch5x5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        branch5x5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
        branch3x3dbl = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(branch3x3dbl)
        branch_pool = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = BasicConv2d(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        branch3x3dbl = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv2d(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(branch3x3dbl)
        return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3_stride_2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        branch1x1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        branch7x7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
        branch7x7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7)
        branch7x7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7)
        branch7x7dbl = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
        branch7x7dbl = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(branch7x7dbl)
        branch7x7dbl = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(branch7x7dbl)
        branch7x7dbl = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(branch7x7dbl)
        branch7x7dbl = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(branch7x7dbl)
        branch_pool = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        branch3x3 = BasicConv2d(320, (3, 3), strides=(2, 2), name="branch3x3_2")(branch3x3)
        branch7x7x3 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        branch7x7x3 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
        branch7x7x3 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
        branch7x7x3 = BasicConv2d(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3_stride_2(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """``FIDInceptionE_1`` (average pool branch) or, with ``max_pool``, ``FIDInceptionE_2``."""

    max_pool: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        branch3x3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        branch3x3 = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
                BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3),
            ],
            axis=-1,
        )
        branch3x3dbl = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(branch3x3dbl),
                BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(branch3x3dbl),
            ],
            axis=-1,
        )
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3_same(x)
        branch_pool = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class FIDInceptionV3(nn.Module):
    """NHWC images in ``[-1, 1]`` (any size) -> (N, 2048) pool features, as pytorch-fid's."""

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = to_unit_range(images)
        n, _, _, c = x.shape
        x = jax.image.resize(x, (n, INPUT_SIZE, INPUT_SIZE, c), method="bilinear", antialias=False)
        x = 2.0 * x - 1.0
        x = BasicConv2d(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride_2(x)
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_stride_2(x)
        x = FIDInceptionA(32, name="Mixed_5b")(x)
        x = FIDInceptionA(64, name="Mixed_5c")(x)
        x = FIDInceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = FIDInceptionC(128, name="Mixed_6b")(x)
        x = FIDInceptionC(160, name="Mixed_6c")(x)
        x = FIDInceptionC(160, name="Mixed_6d")(x)
        x = FIDInceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = FIDInceptionE(max_pool=False, name="Mixed_7b")(x)
        x = FIDInceptionE(max_pool=True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


@functools.lru_cache(maxsize=1)
def _abstract_variables() -> Any:
    """Shapes of the flax variables (traced once: tracing the init takes seconds)."""
    dummy = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), dummy)


def _canonical_key(name: str) -> str:
    """pytorch-fid ``InceptionV3`` names (``blocks.2.0.x``) -> torchvision ``Inception3`` names."""
    match = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(.*)", name)
    if match:
        block, index, rest = int(match[1]), int(match[2]), match[3]
        if block < len(_BLOCK_MODULES) and index < len(_BLOCK_MODULES[block]):
            return f"{_BLOCK_MODULES[block][index]}.{rest}"
    return name


def _ignored(name: str) -> bool:
    return name.startswith(("fc.", "AuxLogits.")) or name.endswith("num_batches_tracked")


def inception_variables_from_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, Any]:
    """flax variables (``params`` + ``batch_stats``) of ``FIDInceptionV3`` from a state dict."""
    canonical = {_canonical_key(name): value for name, value in state_dict.items()}
    return state_dict_to_variables(
        canonical, _abstract_variables(), lambda path: ".".join(path), what=_WHAT, ignored=_ignored
    )


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, mtime: float) -> dict[str, Any]:
    del mtime  # part of the cache key only: a rewritten file is read again
    return inception_variables_from_state_dict(read_state_dict(path, _WHAT))


def load_inception(path: str | os.PathLike) -> dict[str, Any]:
    """flax variables of ``FIDInceptionV3`` from a local weights file (see module doc); cached."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{_WHAT} weights file not found: {path!r}")
    return _load_cached(os.path.abspath(path), os.path.getmtime(path))


@jax.jit
def _features(variables: dict[str, Any], images: jax.Array) -> jax.Array:
    return FIDInceptionV3().apply(variables, images)


def inception_features(
    variables: dict[str, Any], images: np.ndarray | jax.Array | Sequence[np.ndarray], batch_size: int = 50
) -> np.ndarray:
    """(N, 2048) float32 pool features of NHWC ``[-1, 1]`` images, in fixed-size (padded) batches."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"inception_features needs NHWC RGB images, got shape {images.shape}")
    n = images.shape[0]
    batch_size = max(1, min(batch_size, n))
    out = []
    for start in range(0, n, batch_size):
        chunk = images[start : start + batch_size]
        count = chunk.shape[0]
        if count < batch_size:  # one compiled shape; the padded rows are dropped
            chunk = np.concatenate([chunk, np.zeros((batch_size - count,) + chunk.shape[1:], np.float32)])
        out.append(np.asarray(_features(variables, jnp.asarray(chunk)))[:count])
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)
