"""2-D convolution with a fast weight gradient on XLA:CPU.

XLA:CPU computes the weight gradient of a 3x3 convolution an order of magnitude slower than
the forward pass (and worse at small batch). Here the forward pass and the input gradient stay
XLA's own convolutions, and the weight gradient is an im2col matmul run as a ``lax.scan`` over
batch chunks of ~``chunk_rows`` output pixels, which keeps the im2col copy in cache. The result
equals ``jax.grad`` of the plain convolution to float tolerance (tests/test_conv.py).

``impl="auto"`` picks the custom path only on the CPU backend, where it is faster; GPU and TPU
keep their native convolution gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "xla", "im2col")
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _plain_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple) -> jax.Array:
  return lax.conv_general_dilated(
      x, kernel, (stride, stride), padding, dimension_numbers=_DIMENSION_NUMBERS
  )


def _im2col(x_padded: jax.Array, kh: int, kw: int, stride: int, out_h: int, out_w: int) -> jax.Array:
  """Patches ``(n, out_h, out_w, kh*kw*c)`` ordered (i, j, c) like an HWIO kernel's reshape."""
  n, _, _, c = x_padded.shape
  cols = []
  for i in range(kh):
    for j in range(kw):
      limit = (n, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c)
      cols.append(lax.slice(x_padded, (0, i, j, 0), limit, (1, stride, stride, 1)))
  return jnp.concatenate(cols, axis=-1)


def _largest_divisor_at_most(n: int, limit: int) -> int:
  limit = max(1, min(n, limit))
  while n % limit:
    limit -= 1
  return limit


def _weight_grad(
    x: jax.Array, g: jax.Array, kernel_shape: Sequence[int], stride: int, padding: tuple, chunk_rows: int
) -> jax.Array:
  """``d loss / d kernel`` as ``sum over chunks of g_chunk^T @ im2col(x_chunk)``, accumulated in float32.

  The output gradient is the dot's left operand (``(cout, kh*kw*cin)`` result, transposed once at
  the end): with the narrow operand first XLA:CPU's dot runs ~1.5x faster than ``cols^T @ g``.
  Chunks are whole images (as many as fit in ``chunk_rows`` output pixels, at least one).
  """
  kh, kw, cin, cout = kernel_shape
  n, out_h, out_w, _ = g.shape
  x_padded = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  chunk = _largest_divisor_at_most(n, chunk_rows // (out_h * out_w))
  xs = x_padded.reshape((n // chunk, chunk) + x_padded.shape[1:])
  gs = g.reshape((n // chunk, chunk) + g.shape[1:])

  def accumulate(acc, chunk_xg):
    x_chunk, g_chunk = chunk_xg
    cols = _im2col(x_chunk, kh, kw, stride, out_h, out_w).reshape(-1, kh * kw * cin)
    update = lax.dot_general(g_chunk.reshape(-1, cout), cols, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return acc + update, None

  acc0 = jnp.zeros((cout, kh * kw * cin), jnp.float32)
  if n // chunk == 1:
    acc, _ = accumulate(acc0, (xs[0], gs[0]))
  else:
    acc, _ = lax.scan(accumulate, acc0, (xs, gs))
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
def conv_im2col_grad(
    x: jax.Array, kernel: jax.Array, stride: int, padding: tuple, chunk_rows: int
) -> jax.Array:
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


def resolve_impl(impl: str) -> str:
  if impl not in CONV_IMPLS:
    raise ValueError(f"Unknown conv impl {impl!r}; expected one of {CONV_IMPLS}.")
  if impl == "auto":
    return "im2col" if jax.default_backend() == "cpu" else "xla"
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
  if resolve_impl(impl) == "im2col":
    if (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0)):
      return _pointwise_conv(x, kernel, stride)
    return conv_im2col_grad(x, kernel, stride, padding, chunk_rows)
  return _plain_conv(x, kernel, stride, padding)
