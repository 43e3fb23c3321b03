"""Value-range and colour conversions shared by the image-quality metrics.

The codebase stores images as float NHWC in ``[-1, 1]``. Fidelity metrics are computed on the
``[0, 1]`` scale (data range 1), which is the same number as on the ``[-1, 1]`` scale with data
range 2 and what image libraries (scikit-image, MATLAB) default to for float images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# ITU-R BT.601 luma as MATLAB's ``rgb2ycbcr`` (and scikit-image's ``rgb2ycbcr``) computes it:
# Y = 16 + 65.481 R + 128.553 G + 24.966 B for R, G, B in [0, 1] and Y in [16, 235] (of 255).
# Super-resolution papers report PSNR / SSIM on this Y channel.
LUMA_WEIGHTS = (65.481, 128.553, 24.966)
LUMA_OFFSET = 16.0


def to_unit_range(images: jax.Array) -> jax.Array:
    """``[-1, 1]`` -> ``[0, 1]`` (no clipping: metrics see exactly what they are given)."""
    return (jnp.asarray(images, jnp.float32) + 1.0) * 0.5


def rgb_to_luma(images_unit: jax.Array) -> jax.Array:
    """Y of YCbCr (BT.601, MATLAB convention) on the ``[0, 1]`` scale: (N, H, W, 3) -> (N, H, W, 1).

    Input is RGB in ``[0, 1]``; the output is Y / 255, i.e. in ``[16/255, 235/255]``, so a metric
    with data range 1 on it equals the papers' metric with data range 255 on Y in ``[16, 235]``.
    """
    if images_unit.shape[-1] != 3:
        raise ValueError(f"luma needs RGB images (last axis 3), got shape {images_unit.shape}")
    weights = jnp.asarray(LUMA_WEIGHTS, jnp.float32)
    luma = LUMA_OFFSET + jnp.tensordot(images_unit, weights, axes=([-1], [0]), precision=jax.lax.Precision.HIGHEST)
    return (luma / 255.0)[..., None]
