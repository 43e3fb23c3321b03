"""Faithfulness to the input, per image: LR-consistency PSNR and mean-colour error.

Images are float NHWC in ``[-1, 1]``; nothing is clipped here (``compute_metrics`` clips the
predictions first, as for every other metric).

* ``lr_psnr``: PSNR (dB, on the ``[0, 1]`` scale with data range 1, as ``psnr``) between
  ``downscale(pred)`` and ``downscale(target)``, where ``downscale`` is the task's own degradation
  to the low-resolution grid (super-resolution: ``codi_jax.lowpass.downscale``; then
  ``downscale(target)`` is the low-resolution input itself). A sample that reproduces the input's
  LR image exactly scores ``inf``.
* ``mean_color_error``: the Euclidean distance between the mean RGB colours (over all pixels) of
  ``pred`` and ``target``, in ``[0, 255]`` units (``sqrt(3) * 255`` at most). For super-resolution
  the target's mean colour is the low-resolution input's (exactly for area downscaling, up to the
  bicubic kernel's border effect otherwise).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from codi_jax.metrics.color import to_unit_range
from codi_jax.metrics.psnr import psnr

COLOR_SCALE = 255.0  # mean-colour error units: 8-bit levels


def lr_psnr(pred: jax.Array, target: jax.Array, downscale: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """(N,) PSNR in dB of ``downscale(pred[i])`` against ``downscale(target[i])``."""
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"lr_psnr needs two NHWC arrays of one shape, got {pred.shape} and {target.shape}")
    return psnr(downscale(pred), downscale(target))


def mean_color(images: jax.Array) -> jax.Array:
    """(N, C) mean colour of each image in ``[0, 255]`` units."""
    return COLOR_SCALE * jnp.mean(to_unit_range(images), axis=(1, 2))


def mean_color_error(pred: jax.Array, target: jax.Array) -> jax.Array:
    """(N,) Euclidean distance between the mean RGB colours of ``pred[i]`` and ``target[i]`` (0-255)."""
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"mean_color_error needs two NHWC arrays of one shape, got {pred.shape} and {target.shape}")
    return jnp.linalg.norm(mean_color(pred) - mean_color(target), axis=-1)
