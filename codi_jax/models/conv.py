"""2-D convolution with a fast weight gradient on XLA:CPU.

XLA:CPU (YNNPACK convolutions in jax 0.10) computes the weight gradient of a 3x3 convolution
2-25x slower than the forward pass, with cliffs that depend on the shape (e.g. 64->64 at 32x32:
~1.7 s against a 70 ms forward at batch 64), and a 1x1 convolution's weight gradient ~5x slower
than the equivalent matmul. Here, for ``impl="im2col"``:

* kxk convolutions: the forward pass and the input gradient stay XLA's own convolutions (they
  run near the core's peak); the weight gradient is ``sum over chunks of g^T @ im2col(x)``, a
  ``lax.scan`` over chunks of whole images (~``chunk_rows`` output pixels), each chunk's patches
  one gather straight from the unpadded input (see ``_weight_grad``);
* 1x1 unpadded convolutions are a reshape and one matmul, so all three products are matmuls.

The result equals ``jax.grad`` of the plain convolution to float tolerance (tests/test_conv.py).
``impl="auto"`` picks this path only on the CPU backend, where it is faster; GPU and TPU keep
their native convolutions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CONV_IMPLS = ("auto", "xla", "im2col")
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _plain_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=_DIMENSION_NUMBERS)


def _largest_divisor_at_most(n: int, limit: int) -> int:
    limit = max(1, min(n, limit))
    while n % limit:
        limit -= 1
    return limit


def _patch_rows(
    n: int, h: int, w: int, kh: int, kw: int, stride: int, padding: tuple, out_h: int, out_w: int
) -> np.ndarray:
    """For ``n`` images, the flat row ``image * h * w + y * w + x`` of ``x.reshape(-1, c)`` that each
    (image, out_y, out_x, i, j) patch entry reads, or ``-1`` where it falls in the zero padding."""
    ys = (np.arange(out_h) * stride)[:, None, None, None] + np.arange(kh)[None, None, :, None] - padding[0][0]
    xs = (np.arange(out_w) * stride)[None, :, None, None] + np.arange(kw)[None, None, None, :] - padding[1][0]
    ys, xs = np.broadcast_arrays(ys, xs)
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    rows = np.where(inside, ys * w + xs, -1).reshape(1, -1)
    rows = np.where(rows >= 0, rows + (np.arange(n) * h * w)[:, None], -1)
    return rows.reshape(-1).astype(np.int32)


def _weight_grad(
    x: jax.Array, g: jax.Array, kernel_shape: Sequence[int], stride: int, padding: tuple, chunk_rows: int
) -> jax.Array:
    """``d loss / d kernel = sum over chunks of g_chunk^T @ im2col(x_chunk)``, accumulated in float32.

    Chunks are whole images, as many as fit in ``chunk_rows`` output pixels (at least one). Each
    chunk's im2col matrix is one gather of channel rows straight from the unpadded input (padding
    positions read as zeros), so neither a padded copy nor per-chunk slices of ``x`` are made. The
    output gradient is the dot's left operand: with the narrow operand first XLA:CPU's dot runs
    ~1.5x faster than ``cols^T @ g``; the ``(cout, kh*kw*cin)`` result is transposed once.
    """
    kh, kw, cin, cout = kernel_shape
    n, h, w, _ = x.shape
    _, out_h, out_w, _ = g.shape
    chunk = _largest_divisor_at_most(n, chunk_rows // (out_h * out_w))
    rows = _patch_rows(chunk, h, w, kh, kw, stride, padding, out_h, out_w)
    x_rows = x.reshape(n * h * w, cin)
    g_rows = g.reshape(n * out_h * out_w, cout)
    pixels, out_pixels = chunk * h * w, chunk * out_h * out_w

    def accumulate(acc, k):
        index = jnp.where(rows >= 0, rows + k * pixels, n * h * w)  # out of bounds -> filled with 0
        cols = jnp.take(x_rows, index, axis=0, mode="fill", fill_value=0).reshape(out_pixels, kh * kw * cin)
        g_chunk = lax.dynamic_slice_in_dim(g_rows, k * out_pixels, out_pixels)
        update = lax.dot_general(g_chunk, cols, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return acc + update, None

    acc, _ = lax.scan(accumulate, jnp.zeros((cout, kh * kw * cin), jnp.float32), jnp.arange(n // chunk))
    return acc.T.reshape(kernel_shape)


def _pointwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """1x1 unpadded convolution as one matmul; autodiff gives matmuls for both gradients too
    (XLA:CPU's own 1x1 weight gradient is a convolution ~5x slower than the matmul)."""
    if stride != 1:
        x = x[:, ::stride, ::stride, :]
    n, h, w, cin = x.shape
    y = jnp.dot(x.reshape(n * h * w, cin), kernel.reshape(cin, -1))
    return y.reshape(n, h, w, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_im2col_grad(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple, chunk_rows: int) -> jax.Array:
    """Convolution whose weight gradient is a chunked im2col matmul (see module docstring)."""
    return _plain_conv(x, kernel, stride, padding)


def _fwd(x, kernel, stride, padding, chunk_rows):
    return _plain_conv(x, kernel, stride, padding), (x, kernel)


def _bwd(stride, padding, chunk_rows, residuals, g):
    x, kernel = residuals
    # Input gradient: XLA's transposed convolution is already fast on CPU.
    _, input_vjp = jax.vjp(lambda x_: _plain_conv(x_, kernel, stride, padding), x)
    (dx,) = input_vjp(g)
    dkernel = _weight_grad(x, g, kernel.shape, stride, padding, chunk_rows).astype(kernel.dtype)
    return dx, dkernel


conv_im2col_grad.defvjp(_fwd, _bwd)


# ``auto`` on CPU: the im2col weight gradient for a kxk conv whose output holds at least this many
# (pixel, output channel) entries, XLA's below. Measured here (3x3 convs, value_and_grad, one core):
# at batch 16-32 and 32x32 im2col takes 0.54-0.86x XLA's time; at 8x8 1.0-1.7x; at 16x16 it wins
# from 64 output channels at batch 32 (0.74-0.89x) and loses below (1.1-1.6x). 2^19 splits those.
# Those timings are an Intel host's. On a 2-core AMD EPYC host (2026-12-03) the demo's whole full-CoDi
# step at batch 16 (``benchmarks/train_throughput.py --config=demo --method=full --batch=16
# --conv_impl=...``, median of 8) took 985 ms with auto, 939 with xla and 997 with im2col: within the
# run-to-run spread (+-15%).
AUTO_IM2COL_MIN_OUTPUT = 2**19


def resolve_impl(impl: str, output_shape: Sequence[int] | None = None) -> str:
    """The conv path for ``impl``; ``auto`` picks ``im2col`` on the CPU backend, for a kxk conv only
    when ``output_shape`` (NHWC, if given) is large enough that it is the faster one there."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"Unknown conv impl {impl!r}; expected one of {CONV_IMPLS}.")
    if impl == "auto":
        if jax.default_backend() != "cpu":
            return "xla"
        if output_shape is not None and math.prod(output_shape) < AUTO_IM2COL_MIN_OUTPUT:
            return "xla"
        return "im2col"
    return impl


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    stride: int = 1,
    padding: tuple | None = None,
    impl: str = "auto",
    chunk_rows: int = 512,
) -> jax.Array:
    """NHWC x HWIO convolution; ``padding`` defaults to PyTorch-style ``k // 2`` on each side."""
    kh, kw = kernel.shape[:2]
    if padding is None:
        padding = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    padding = tuple(tuple(p) for p in padding)
    pointwise = (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0))
    if pointwise and resolve_impl(impl) == "im2col":
        return _pointwise_conv(x, kernel, stride)  # a matmul in all three products, at every size
    output_shape = jax.eval_shape(lambda: _plain_conv(x, kernel, stride, padding)).shape
    if resolve_impl(impl, output_shape) == "im2col":
        return conv_im2col_grad(x, kernel, stride, padding, chunk_rows)
    return _plain_conv(x, kernel, stride, padding)
