"""The super-resolution task's resizes as matrices (JAX): LR images and low-frequency consistency.

The ``sr`` task makes its condition as ``cond = clip(U(D(target)))`` (``codi_jax.data.tasks``): ``D``
the task's anti-aliased downscale by ``task.scale`` (``task.downsample``: ``bicubic`` or ``area``; TF's
scale-and-translate kernels, which ``jax.image.resize`` shares), ``U`` bicubic back to the target's
size. Both are separable linear maps, ``D(x) = Dm x Dm^T`` per channel with ``Dm`` an (s, S) matrix,
so they are held here as matrices (``SrOperators``) and applied with one einsum:

* ``downscale``: ``D``. For ``degradation='bicubic'``, ``downscale(target)`` is exactly the
  low-resolution input the condition was upsampled from; for ``'realesrgan'`` (a random chain of
  blur, resizes, noise and JPEG) it is the clean bicubic downscale of the target.
* ``lr_from_condition``: ``U^+ cond`` (``^+``: Moore-Penrose pseudo-inverse), the LR image
  recovered from a condition by least squares; exact where the upsampling did not clip.
* ``lowpass``: ``LP = D^+ D``, the orthogonal projection on what the downscale sees. Unlike
  ``U D`` (whose repeated application keeps blurring) it is a projection: ``LP(LP(x)) = LP(x)``.
* ``consistency_step``: the ILVR-style replacement of the low frequencies of a prediction by the
  input's, ``x <- x - LP(x) + LP(ref)`` with ``ref = D^+ lr_from_condition(cond)`` (the
  minimum-norm target-size image whose downscale is the input's LR image; ``LP(ref) = ref``).
  Equivalently ``x <- x - D^+ (D x - y)`` (DDNM's range-null-space step): afterwards
  ``D x = y`` and the high-pass ``x - LP(x)`` is unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


def resize_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
    """(out, in) matrix of a 1-D anti-aliased resize: ``bicubic`` (``jax.image.resize``, = TF's
    ``antialias=True`` kernels) or ``area`` (mean over each block of an integer factor)."""
    if method == "area":
        factor, rest = divmod(in_size, out_size)
        if rest:
            raise ValueError(f"area resize needs an integer factor, got {in_size} -> {out_size}.")
        return np.kron(np.eye(out_size), np.full((1, factor), 1.0 / factor))
    if method != "bicubic":
        raise ValueError(f"resize method {method!r}; expected 'bicubic' or 'area'.")
    eye = jnp.eye(in_size, dtype=jnp.float32)
    return np.asarray(jax.image.resize(eye, (out_size, in_size), "bicubic", antialias=True), np.float64)


@dataclasses.dataclass(frozen=True)
class SrOperators:
    """The 1-D matrices of an sr task at one image size (float32; applied to both spatial axes)."""

    down: np.ndarray  # (s, S): D
    down_pinv: np.ndarray  # (S, s): D^+
    up_pinv: np.ndarray  # (s, S): U^+


def sr_operators(task_config: ml_collections.ConfigDict, size: int) -> SrOperators:
    """The operators of ``task_config`` (``task.name='sr'``) for S x S targets."""
    if task_config.name != "sr":
        raise ValueError(f"no downscale is defined for task {task_config.name!r} (only for 'sr').")
    scale = int(task_config.scale)
    if size % scale:
        raise ValueError(f"task.scale={scale} does not divide the image size {size}.")
    method = task_config.downsample if task_config.degradation == "bicubic" else "bicubic"
    down = resize_matrix(size, size // scale, method)
    up = resize_matrix(size // scale, size, "bicubic")
    as32 = lambda m: np.asarray(m, np.float32)  # noqa: E731
    return SrOperators(as32(down), as32(np.linalg.pinv(down)), as32(np.linalg.pinv(up)))


def separable(matrix: np.ndarray, images: jax.Array) -> jax.Array:
    """``matrix`` applied to both spatial axes of NHWC ``images``: ``M x M^T`` per channel."""
    m = jnp.asarray(matrix)
    return jnp.einsum("ih,nhwc,jw->nijc", m, images, m, precision=jax.lax.Precision.HIGHEST)


def downscale(ops: SrOperators, images: jax.Array) -> jax.Array:
    """``D``: the task's downscale of NHWC images (S x S -> s x s)."""
    return separable(ops.down, images)


def lr_from_condition(ops: SrOperators, cond: jax.Array) -> jax.Array:
    """``U^+ cond``: the low-resolution image a condition was upsampled from (least squares)."""
    return separable(ops.up_pinv, cond)


def lowpass(ops: SrOperators, images: jax.Array) -> jax.Array:
    """``LP = D^+ D``: the low-frequency content of NHWC images, as target-size images."""
    return separable(ops.down_pinv, downscale(ops, images))


def reference(ops: SrOperators, cond: jax.Array) -> jax.Array:
    """``D^+ lr_from_condition(cond)``: the input as a target-size image with only low frequencies."""
    return separable(ops.down_pinv, lr_from_condition(ops, cond))


def consistency_step(ops: SrOperators, x_hat: jax.Array, cond: jax.Array) -> jax.Array:
    """``x_hat - LP(x_hat) + LP(ref)``: ``x_hat`` with its low frequencies replaced by the input's."""
    return x_hat - lowpass(ops, x_hat) + reference(ops, cond)
