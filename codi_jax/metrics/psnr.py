"""Peak signal-to-noise ratio per image.

Images are float NHWC in ``[-1, 1]``; PSNR is computed on the ``[0, 1]`` scale with data range 1
(equivalently: on the ``[-1, 1]`` scale with data range 2). Identical images give ``inf``, as in
scikit-image. Nothing is clipped or quantised here; callers that want the usual "clip to the
valid range" evaluation do it before (``codi_jax.metrics.compute_metrics`` does).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from codi_jax.metrics.color import rgb_to_luma, to_unit_range

DATA_RANGE = 1.0  # of the [0, 1] scale the metric is computed on


@functools.partial(jax.jit, static_argnames=("luma",))
def psnr(pred: jax.Array, target: jax.Array, *, luma: bool = False) -> jax.Array:
    """(N,) PSNR in dB of each ``pred[i]`` against ``target[i]`` (NHWC, ``[-1, 1]``).

    With ``luma=True`` the error is measured on the BT.601 Y channel only (as super-resolution
    papers report), see ``codi_jax.metrics.color.rgb_to_luma``.
    """
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"psnr needs two NHWC arrays of one shape, got {pred.shape} and {target.shape}")
    x, y = to_unit_range(pred), to_unit_range(target)
    if luma:
        x, y = rgb_to_luma(x), rgb_to_luma(y)
    mse = jnp.mean(jnp.square(x - y), axis=(1, 2, 3))
    return 10.0 * jnp.log10(DATA_RANGE**2 / mse)
