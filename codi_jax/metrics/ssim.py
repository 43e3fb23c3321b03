"""Structural similarity (Wang et al. 2004) per image.

Conventions (those of the paper and of scikit-image's ``structural_similarity(...,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``):

- images are float NHWC in ``[-1, 1]``, compared on the ``[0, 1]`` scale with data range 1;
- local statistics use an 11x11 Gaussian window, sigma 1.5 (a separable kernel truncated at
  3.5 sigma: radius ``int(3.5 * 1.5 + 0.5) = 5``), population (not sample) covariances;
- ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` with ``L = 1``;
- border: only the "valid" positions, where the window lies wholly inside the image, are
  averaged (an (H - 10) x (W - 10) map). scikit-image filters the whole image with reflected
  borders but then also averages only that interior, so the numbers are the same;
- colour images: SSIM per channel, averaged over channels; ``luma=True`` instead measures the
  BT.601 Y channel (as super-resolution papers report).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from codi_jax.metrics.color import rgb_to_luma, to_unit_range

DATA_RANGE = 1.0  # of the [0, 1] scale the metric is computed on
SIGMA = 1.5
TRUNCATE = 3.5  # scikit-image's (and scipy.ndimage's) Gaussian truncation, in sigmas
K1 = 0.01
K2 = 0.03


def gaussian_window_1d(sigma: float = SIGMA, truncate: float = TRUNCATE) -> np.ndarray:
    """Normalised 1-D Gaussian taps as ``scipy.ndimage.gaussian_filter`` builds them."""
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def _valid_filter(planes: jax.Array, taps: np.ndarray) -> jax.Array:
    """Separable valid-mode Gaussian filter of (B, H, W) planes -> (B, H - 2r, W - 2r)."""
    kernel = jnp.asarray(taps)
    x = planes[..., None]  # (B, H, W, 1): each plane filtered on its own
    dims = ("NHWC", "HWIO", "NHWC")
    x = lax.conv_general_dilated(
        x, kernel.reshape(-1, 1, 1, 1), (1, 1), "VALID", dimension_numbers=dims, precision=lax.Precision.HIGHEST
    )
    x = lax.conv_general_dilated(
        x, kernel.reshape(1, -1, 1, 1), (1, 1), "VALID", dimension_numbers=dims, precision=lax.Precision.HIGHEST
    )
    return x[..., 0]


@functools.partial(jax.jit, static_argnames=("luma", "sigma"))
def ssim(pred: jax.Array, target: jax.Array, *, luma: bool = False, sigma: float = SIGMA) -> jax.Array:
    """(N,) mean SSIM of each ``pred[i]`` against ``target[i]`` (NHWC, ``[-1, 1]``); see module doc."""
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"ssim needs two NHWC arrays of one shape, got {pred.shape} and {target.shape}")
    taps = gaussian_window_1d(sigma)
    if min(pred.shape[1:3]) < taps.size:
        raise ValueError(f"ssim's {taps.size}x{taps.size} window needs images at least that large, got {pred.shape}")
    x, y = to_unit_range(pred), to_unit_range(target)
    if luma:
        x, y = rgb_to_luma(x), rgb_to_luma(y)
    n, h, w, c = x.shape
    # Second moments from data centred on each plane's global mean: variances and covariances
    # do not depend on that shift, and float32 E[x^2] - E[x]^2 then cancels far less.
    x_centred = x - jnp.mean(x, axis=(1, 2), keepdims=True)
    y_centred = y - jnp.mean(y, axis=(1, 2), keepdims=True)
    moments = jnp.stack([x, y, x_centred**2, y_centred**2, x_centred * y_centred, x_centred, y_centred], axis=1)
    planes = jnp.moveaxis(moments, -1, 2).reshape(n * 7 * c, h, w)  # (N, 7, C, H, W) flattened
    filtered = _valid_filter(planes, taps).reshape(n, 7, c, h - taps.size + 1, w - taps.size + 1)
    mu_x, mu_y, e_xx, e_yy, e_xy, mu_xc, mu_yc = (filtered[:, i] for i in range(7))
    var_x = e_xx - mu_xc**2
    var_y = e_yy - mu_yc**2
    cov_xy = e_xy - mu_xc * mu_yc
    c1 = (K1 * DATA_RANGE) ** 2
    c2 = (K2 * DATA_RANGE) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return jnp.mean(ssim_map, axis=(1, 2, 3))
