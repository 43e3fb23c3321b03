"""The CPU fast paths (codi_jax.models.conv, layers.GroupNorm) equal the plain XLA ops and their
``jax.grad`` to float tolerance, and keep the parameter tree that checkpoints hold."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from codi_jax.models import conv, layers
from codi_jax.models.unet import UNet

RTOL_F32 = 1e-5


def _plain(x, kernel, stride, padding):
    return lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _value_and_grads(fn, x, kernel, cotangent):
    """Output and (d/dx, d/dkernel) of ``sum(fn(x, kernel) * cotangent)``, jitted."""

    def loss(x_, k_):
        y = fn(x_, k_)
        return jnp.sum(y.astype(jnp.float32) * cotangent), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, kernel)
    return y, grads


def _assert_close(actual, expected, rtol, what):
    """Max abs error relative to the reference's max abs value (exact zeros would make elementwise
    relative error meaningless)."""
    actual = np.asarray(actual, np.float32)
    expected = np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = float(np.max(np.abs(expected)))
    assert scale > 0, f"{what}: reference is all zeros, the comparison would prove nothing"
    err = float(np.max(np.abs(actual - expected))) / scale
    assert err <= rtol, f"{what}: max relative error {err:.2e} > {rtol:.0e}"


def _inputs(n, h, w, cin, cout, k, stride, padding, dtype=jnp.float32, seed=0):
    # numpy draws: eager jax.random would compile a threefry kernel per shape (seconds on CPU).
    rs = np.random.RandomState(seed)
    x = jnp.asarray(rs.standard_normal((n, h, w, cin)), jnp.float32).astype(dtype)
    kernel = jnp.asarray(rs.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32).astype(dtype)
    out_shape = jax.eval_shape(lambda: _plain(x, kernel, stride, padding)).shape
    cotangent = jnp.asarray(rs.standard_normal(out_shape), jnp.float32)
    return x, kernel, cotangent


CASES = {
    # name: (n, h, w, cin, cout, k, stride, padding (None = k // 2), chunk_rows)
    "3x3_s1": (4, 8, 8, 8, 16, 3, 1, None, 512),
    "3x3_s1_odd_shapes": (3, 7, 5, 5, 6, 3, 1, None, 512),
    "3x3_s2": (4, 8, 8, 8, 8, 3, 2, None, 512),
    "3x3_s2_odd_shapes": (3, 9, 7, 5, 6, 3, 2, None, 512),
    # 7 images, chunks of up to 2 images requested: 7 is prime, so chunk size 1 (7 scan steps).
    "batch_not_divisible_prime": (7, 6, 6, 4, 5, 3, 1, None, 2 * 36),
    # 6 images, up to 4 per chunk requested: chunks of 3.
    "batch_not_divisible_6_by_4": (6, 6, 6, 4, 5, 3, 1, None, 4 * 36),
    "one_image": (1, 5, 5, 3, 4, 3, 1, None, 512),
    "asymmetric_padding": (2, 7, 6, 3, 4, 3, 2, ((0, 1), (1, 0)), 512),
    "5x5": (2, 9, 9, 3, 4, 5, 1, None, 512),
    "1x1": (3, 5, 7, 6, 4, 1, 1, None, 512),
    "1x1_s2": (3, 7, 7, 6, 4, 1, 2, None, 512),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_im2col_conv_matches_xla_value_and_grads(name):
    n, h, w, cin, cout, k, stride, padding, chunk_rows = CASES[name]
    pad = padding if padding is not None else ((k // 2, k // 2), (k // 2, k // 2))
    x, kernel, cot = _inputs(n, h, w, cin, cout, k, stride, pad)
    y_ref, (dx_ref, dk_ref) = _value_and_grads(lambda a, b: _plain(a, b, stride, pad), x, kernel, cot)
    y, (dx, dk) = _value_and_grads(
        lambda a, b: conv.conv2d(a, b, stride=stride, padding=padding, impl="im2col", chunk_rows=chunk_rows),
        x,
        kernel,
        cot,
    )
    _assert_close(y, y_ref, RTOL_F32, f"{name} forward")
    _assert_close(dx, dx_ref, RTOL_F32, f"{name} input gradient")
    _assert_close(dk, dk_ref, RTOL_F32, f"{name} weight gradient")


@pytest.mark.parametrize("stride", [1, 2])
def test_im2col_conv_bfloat16(stride):
    pad = ((1, 1), (1, 1))
    x, kernel, cot = _inputs(4, 8, 8, 16, 16, 3, stride, pad, dtype=jnp.bfloat16, seed=1)
    y, (dx, dk) = _value_and_grads(lambda a, b: conv.conv2d(a, b, stride=stride, impl="im2col"), x, kernel, cot)
    assert y.dtype == dx.dtype == dk.dtype == jnp.bfloat16
    # Reference: the same bf16-rounded numbers in float32.
    x32, k32 = x.astype(jnp.float32), kernel.astype(jnp.float32)
    y_ref, (dx_ref, dk_ref) = _value_and_grads(lambda a, b: _plain(a, b, stride, pad), x32, k32, cot)
    for got, ref, what in ((y, y_ref, "forward"), (dx, dx_ref, "input gradient"), (dk, dk_ref, "weight gradient")):
        _assert_close(got, ref, 2e-2, f"bf16 stride {stride} {what}")


def test_weight_grad_detects_a_wrong_kernel_layout():
    """The comparison is sharp enough to catch a kernel gradient with its taps misordered."""
    pad = ((1, 1), (1, 1))
    x, kernel, cot = _inputs(3, 7, 5, 5, 6, 3, 1, pad)
    _, (_, dk_ref) = _value_and_grads(lambda a, b: _plain(a, b, 1, pad), x, kernel, cot)
    y = _plain(x, kernel, 1, pad)
    g = jnp.broadcast_to(cot, y.shape)
    dk = jax.jit(lambda a, b: conv._weight_grad(a, b, kernel.shape, 1, pad, 512))(x, g)
    _assert_close(dk, dk_ref, RTOL_F32, "weight gradient")
    with pytest.raises(AssertionError, match="max relative error"):
        _assert_close(dk[::-1, ::-1], dk_ref, RTOL_F32, "spatially flipped weight gradient")
    with pytest.raises(AssertionError, match="max relative error"):
        _assert_close(dk * (1 + 1e-4), dk_ref, RTOL_F32, "weight gradient off by 1e-4")


def test_resolve_impl():
    assert jax.default_backend() == "cpu"
    assert conv.resolve_impl("auto") == "im2col"
    assert conv.resolve_impl("xla") == "xla"
    assert conv.resolve_impl("im2col") == "im2col"
    with pytest.raises(ValueError, match="Unknown conv impl"):
        conv.resolve_impl("cudnn")
    # auto: the im2col weight gradient only for outputs of at least AUTO_IM2COL_MIN_OUTPUT entries.
    big = (16, 32, 32, 32)
    assert math.prod(big) == conv.AUTO_IM2COL_MIN_OUTPUT
    assert conv.resolve_impl("auto", big) == "im2col"
    assert conv.resolve_impl("auto", (16, 16, 16, 64)) == "xla"
    assert conv.resolve_impl("im2col", (1, 2, 2, 1)) == "im2col"


def _uses_custom_vjp(x_shape, cout, kernel_size=3, impl="auto") -> bool:
    x = jnp.zeros(x_shape)
    kernel = jnp.zeros((kernel_size, kernel_size, x_shape[-1], cout))
    return "custom_vjp" in str(jax.make_jaxpr(lambda a, b: conv.conv2d(a, b, impl=impl))(x, kernel))


def test_auto_picks_the_path_by_conv_size():
    assert _uses_custom_vjp((16, 32, 32, 8), 32)  # 16 * 32 * 32 * 32 = 2^19 outputs: im2col
    assert not _uses_custom_vjp((16, 16, 16, 8), 64)  # 2^18: XLA's own gradient
    assert _uses_custom_vjp((16, 16, 16, 8), 64, impl="im2col")  # explicit im2col: always
    assert not _uses_custom_vjp((16, 32, 32, 8), 32, impl="xla")
    # 1x1 convs are matmuls on CPU at every size (no custom VJP needed for that: all three are dots).
    tiny_pointwise = jax.make_jaxpr(lambda a, b: conv.conv2d(a, b))(jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 1, 4, 4)))
    assert "conv_general_dilated" not in str(tiny_pointwise)


@pytest.mark.parametrize(
    "shape,groups", [((3, 6, 5, 32), 32), ((2, 4, 4, 96), 32), ((2, 5, 3, 64), 8), ((2, 9, 16), 4)]
)
def test_group_norm_matches_flax(shape, groups):
    rs = np.random.RandomState(2)
    x = jnp.asarray(rs.standard_normal(shape) * 3.0 + 1.5, jnp.float32)
    cot = jnp.asarray(rs.standard_normal(shape), jnp.float32)
    ours, theirs = layers.GroupNorm(groups, 1e-5), nn.GroupNorm(groups, epsilon=1e-5, dtype=jnp.float32)
    params = jax.eval_shape(ours.init, jax.random.PRNGKey(0), x)
    assert params == jax.eval_shape(theirs.init, jax.random.PRNGKey(0), x)
    # Non-trivial scale / bias (the inits are ones / zeros).
    params = jax.tree.map(lambda p: jnp.asarray(1.0 + 0.3 * rs.standard_normal(p.shape), jnp.float32), params)

    def grads(module):
        return jax.jit(jax.value_and_grad(lambda p, x_: jnp.sum(module.apply(p, x_) * cot), argnums=(0, 1)))(params, x)

    (_, (dp, dx)), (_, (dp_ref, dx_ref)) = grads(ours), grads(theirs)
    _assert_close(jax.jit(ours.apply)(params, x), jax.jit(theirs.apply)(params, x), RTOL_F32, "group norm forward")
    _assert_close(dx, dx_ref, RTOL_F32, "group norm input gradient")
    for name in ("scale", "bias"):
        _assert_close(dp["params"][name], dp_ref["params"][name], RTOL_F32, f"group norm d{name}")


def test_unet_parameter_tree_is_unchanged(monkeypatch):
    """Checkpoints written with flax's GroupNorm and XLA convs restore into the fast-path model."""

    def unet(conv_impl):
        return UNet(block_out_channels=(32, 64), attention_levels=(False, True), conv_impl=conv_impl)

    x, t = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,))
    ours = jax.eval_shape(unet("im2col").init, jax.random.PRNGKey(0), x, t)
    monkeypatch.setattr(
        layers, "_group_norm", lambda groups, eps, name: nn.GroupNorm(groups, epsilon=eps, dtype=jnp.float32, name=name)
    )
    reference = jax.eval_shape(unet("xla").init, jax.random.PRNGKey(0), x, t)
    as_shapes = lambda tree: {
        jax.tree_util.keystr(k): (v.shape, v.dtype) for k, v in jax.tree_util.tree_leaves_with_path(tree)
    }
    assert as_shapes(ours) == as_shapes(reference)
