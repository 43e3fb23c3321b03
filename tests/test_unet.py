"""The UNet: shapes, cross-attention (heads per level, conv / linear projections), adapter hooks
(features / residuals), input checks, remat, bf16.

Parameters are drawn with numpy from ``jax.eval_shape`` shapes (flax's initialisers would
compile one XLA program per parameter shape, which is slow on XLA:CPU), and each model is
jitted once per input signature.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.models.unet import UNet, unet_from_config

TINY = dict(
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    attention_levels=(False, True),
    attention_head_dim=16,
)
BATCH, SIZE = 2, 16
TIMESTEPS = np.array([3.0, 817.0], np.float32)
# The skip tensors diffusers' ControlNet emits for TINY at 16x16: conv_in, then per level its
# res-blocks and (except the last level) its downsampler.
EXPECTED_SKIPS = [(BATCH, 16, 16, 16), (BATCH, 16, 16, 16), (BATCH, 8, 8, 16), (BATCH, 8, 8, 32)]
EXPECTED_MID = (BATCH, 8, 8, 32)


def random_params(
    model: UNet, sample_shape: tuple[int, ...], context_shape: tuple[int, ...] | None = None, seed: int = 0
) -> Any:
    """float32 params of ``model`` drawn with numpy (kernels ~ 1/sqrt(fan_in), norms near identity)."""
    context = None if context_shape is None else jnp.zeros(context_shape)
    shapes = jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jnp.zeros(sample_shape), jnp.zeros(sample_shape[:1]), context
    )["params"]
    rng = np.random.RandomState(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return (rng.randn(*leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(np.float32)
        if name == "scale":
            return (1.0 + 0.1 * rng.randn(*leaf.shape)).astype(np.float32)
        return (0.1 * rng.randn(*leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _image(seed: int, shape: tuple[int, ...] = (BATCH, SIZE, SIZE, 3)) -> jax.Array:
    return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32))


@pytest.fixture(scope="module")
def tiny() -> dict[str, Any]:
    model = UNet(**TINY)
    x = _image(1)
    params = random_params(model, x.shape)
    plain = jax.jit(functools.partial(model.apply, return_features=True))
    with_residuals = jax.jit(lambda p, x, t, down, mid: model.apply(p, x, t, down_residuals=down, mid_residual=mid))
    out, features = plain({"params": params}, x, TIMESTEPS)
    return dict(model=model, params=params, x=x, out=out, features=features, with_residuals=with_residuals)


def test_output_shape_and_params_dtype(tiny: dict[str, Any]) -> None:
    assert tiny["out"].shape == tiny["x"].shape and tiny["out"].dtype == jnp.float32
    assert np.all(np.isfinite(tiny["out"]))
    # Params are float32 whatever the compute dtype.
    shapes = jax.eval_shape(UNet(**TINY, dtype=jnp.bfloat16).init, jax.random.PRNGKey(0), tiny["x"], TIMESTEPS)
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}


def test_features_have_controlnet_layout(tiny: dict[str, Any]) -> None:
    features = tiny["features"]
    assert [f.shape for f in features["down"]] == EXPECTED_SKIPS
    assert features["mid"].shape == EXPECTED_MID


def test_features_match_diffusers_controlnet() -> None:
    torch = pytest.importorskip("torch")
    controlnets = pytest.importorskip("diffusers.models.controlnets.controlnet")
    controlnet = controlnets.ControlNetModel(
        in_channels=3,
        block_out_channels=TINY["block_out_channels"],
        layers_per_block=TINY["layers_per_block"],
        norm_num_groups=TINY["norm_num_groups"],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=2,
        conditioning_embedding_out_channels=(8,),
    ).eval()
    with torch.no_grad():
        down, mid = controlnet(
            torch.zeros(BATCH, 3, SIZE, SIZE),
            torch.tensor(TIMESTEPS),
            torch.zeros(BATCH, 5, 24),
            torch.zeros(BATCH, 3, SIZE, SIZE),
            return_dict=False,
        )
    nhwc = [(b, h, w, c) for b, c, h, w in (tuple(d.shape) for d in down)]
    assert nhwc == EXPECTED_SKIPS
    b, c, h, w = mid.shape
    assert (b, h, w, c) == EXPECTED_MID


def test_residuals(tiny: dict[str, Any]) -> None:
    params, x, run = {"params": tiny["params"]}, tiny["x"], tiny["with_residuals"]
    zeros = [jnp.zeros(s) for s in EXPECTED_SKIPS]
    zero_mid = jnp.zeros(EXPECTED_MID)
    np.testing.assert_array_equal(run(params, x, TIMESTEPS, zeros, zero_mid), tiny["out"])
    # Every skip residual and the mid residual reaches the output.
    for i, shape in enumerate(EXPECTED_SKIPS):
        down = list(zeros)
        down[i] = _image(10 + i, shape)
        assert float(jnp.max(jnp.abs(run(params, x, TIMESTEPS, down, zero_mid) - tiny["out"]))) > 1e-3, i
    changed = run(params, x, TIMESTEPS, zeros, _image(20, EXPECTED_MID))
    assert float(jnp.max(jnp.abs(changed - tiny["out"]))) > 1e-3


def test_bad_inputs_raise() -> None:
    model = UNet(**TINY)
    x = jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, TIMESTEPS)

    def check(match: str, sample=x, **kwargs) -> None:
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(functools.partial(model.apply, **kwargs), params, sample, TIMESTEPS)

    skips = [jax.ShapeDtypeStruct(s, jnp.float32) for s in EXPECTED_SKIPS]
    check("Expected 4 tensors in down_residuals, got 3", down_residuals=skips[:3])
    wrong_channels = list(skips)
    wrong_channels[2] = jax.ShapeDtypeStruct((BATCH, 8, 8, 32), jnp.float32)
    check(r"down_residuals\[2\] has shape \(2, 8, 8, 32\); expected \(2, 8, 8, 16\)", down_residuals=wrong_channels)
    broadcastable = list(skips)
    broadcastable[0] = jax.ShapeDtypeStruct((BATCH, 16, 16, 1), jnp.float32)
    check(r"down_residuals\[0\]", down_residuals=broadcastable)
    check(r"mid_residual\[0\] has shape", mid_residual=jax.ShapeDtypeStruct((BATCH, 8, 8, 16), jnp.float32))
    check("3 channels", sample=jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 4), jnp.float32))
    check("NHWC", sample=jax.ShapeDtypeStruct((SIZE, SIZE, 3), jnp.float32))
    check("divisible by 2", sample=jax.ShapeDtypeStruct((BATCH, 15, 16, 3), jnp.float32))
    for heads, match in [((2,), "num_attention_heads has 1 entries"), ((1, 3), r"num_attention_heads\[1\]=3")]:
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(UNet(**TINY, num_attention_heads=heads).init, jax.random.PRNGKey(0), x, TIMESTEPS)
    with pytest.raises(ValueError, match="attention_levels has 3 entries"):
        jax.eval_shape(
            UNet(**{**TINY, "attention_levels": (False, True, True)}).init, jax.random.PRNGKey(0), x, TIMESTEPS
        )


def test_cross_attention_uses_context() -> None:
    model = UNet(**TINY, cross_attention_dim=24)
    x = _image(2)
    params = {"params": random_params(model, x.shape, (BATCH, 5, 24))}
    assert "attn2" in params["params"]["mid_block"]["attentions_0"]["transformer_blocks_0"]
    apply = jax.jit(model.apply)
    out_a = apply(params, x, TIMESTEPS, _image(3, (BATCH, 5, 24)))
    out_b = apply(params, x, TIMESTEPS, _image(4, (BATCH, 5, 24)))
    assert out_a.shape == x.shape
    assert float(jnp.max(jnp.abs(out_a - out_b))) > 1e-3


def test_heads_per_level_and_conv_projections() -> None:
    """``num_attention_heads`` (heads per level, diffusers' UNet2DConditionModel meaning) sets the heads
    and leaves the parameter tree alone; ``use_linear_projection=False`` (SD 1.x) stores proj_in /
    proj_out as 1x1 convs. (Outputs equal diffusers' for both layouts: tests/test_convert_diffusers.py.)"""
    x, context = _image(2), _image(3, (BATCH, 5, 24))

    def shapes(model: UNet) -> Any:
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, TIMESTEPS, context)["params"]
        return params, jax.tree.map(lambda a: a.shape, params)

    linear = UNet(**TINY, cross_attention_dim=24)  # 16 channels per head: 2 heads on 32 channels
    params, linear_shapes = shapes(linear)
    more_heads = UNet(**TINY, cross_attention_dim=24, num_attention_heads=(1, 4))
    assert shapes(more_heads)[1] == linear_shapes
    attention = linear_shapes["mid_block"]["attentions_0"]
    assert attention["proj_in"]["kernel"] == (32, 32) and attention["proj_out"]["kernel"] == (32, 32)

    def as_conv(path, shape):
        keys = [k.key for k in path]
        return (1, 1) + shape if keys[-2] in ("proj_in", "proj_out") and keys[-1] == "kernel" else shape

    conv = UNet(**TINY, cross_attention_dim=24, num_attention_heads=(1, 2), use_linear_projection=False)
    expected = jax.tree_util.tree_map_with_path(as_conv, linear_shapes, is_leaf=lambda a: isinstance(a, tuple))
    conv_params, conv_shapes = shapes(conv)
    assert conv_shapes == expected
    # The heads show in the attention logits' shapes (batch, heads, queries, keys): the middle block
    # (8x8 = 64 queries, 5 context tokens) has 2 heads with attention_head_dim=16, 4 with (1, 4).
    assert (BATCH, 2, 64, 5) in _logit_shapes(linear, params, x, context)
    assert (BATCH, 2, 64, 5) in _logit_shapes(conv, conv_params, x, context)
    more_heads_logits = _logit_shapes(more_heads, params, x, context)
    assert (BATCH, 4, 64, 5) in more_heads_logits and (BATCH, 2, 64, 5) not in more_heads_logits


def _equations(jaxpr: Any):
    """Every equation of ``jaxpr`` and of the jaxprs nested in it (pjit, custom_jvp, remat, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _equations(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _equations(sub)


def _attention_dot_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """An attention product's shape as (batch, heads, queries, keys): the einsum path's 4-D as it is;
    ``jax.nn.dot_product_attention``'s (batch, heads, queries, groups=1, keys) without its group axis."""
    return shape[:3] + shape[4:] if len(shape) == 5 and shape[3] == 1 else shape


def _logit_shapes(model: UNet, params: Any, x: jax.Array, context: jax.Array) -> set[tuple[int, ...]]:
    """Shapes of the 4-D (5-D grouped) products in ``model``'s forward pass (the attention logits among them)."""
    jaxpr = jax.make_jaxpr(model.apply)({"params": params}, x, TIMESTEPS, context).jaxpr
    return {
        _attention_dot_shape(tuple(e.outvars[0].aval.shape))
        for e in _equations(jaxpr)
        if e.primitive.name == "dot_general" and e.outvars[0].aval.ndim in (4, 5)
    }


def test_bfloat16_attention_scores_and_softmax_are_float32() -> None:
    """diffusers' ``upcast_attention``, always on: with bf16 compute the q.k logits and the softmax
    run in float32 (SD 2.x overflows otherwise); the projections stay bf16."""
    model = UNet(**TINY, cross_attention_dim=24, dtype=jnp.bfloat16)
    x, context = _image(2), _image(3, (BATCH, 5, 24))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, TIMESTEPS, context)
    jaxpr = jax.make_jaxpr(model.apply)(params, x, TIMESTEPS, context).jaxpr
    equations = list(_equations(jaxpr))
    exps = [e for e in equations if e.primitive.name == "exp"]
    dots = [e for e in equations if e.primitive.name == "dot_general"]
    assert exps and all(e.outvars[0].aval.dtype == jnp.float32 for e in exps)
    # 4 transformers (down, mid, 2 up) x 2 attentions: q.k -> float32 logits, weights.v -> bf16.
    attention_dots = [e for e in dots if e.outvars[0].aval.ndim in (4, 5)]
    assert all(v.aval.dtype == jnp.bfloat16 for e in attention_dots for v in e.invars)
    out_dtypes = sorted(str(e.outvars[0].aval.dtype) for e in attention_dots)
    assert out_dtypes == ["bfloat16"] * 8 + ["float32"] * 8, out_dtypes


def test_remat_same_output_and_gradients() -> None:
    config = dict(
        block_out_channels=(16,), layers_per_block=1, norm_num_groups=8, attention_levels=(True,), attention_head_dim=8
    )
    x = _image(5, (BATCH, 8, 8, 3))
    weights = _image(6, (BATCH, 8, 8, 3))
    params = random_params(UNet(**config), x.shape)
    results = []
    for remat in (False, True):
        model = UNet(**config, remat=remat)

        def loss(p, model=model):
            return jnp.sum(model.apply({"params": p}, x, TIMESTEPS) * weights)

        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (value, grads), (value_remat, grads_remat) = results
    # The loss is a sum with cancellation: its rounding follows the sum of its terms' sizes
    # (measured 1.0e-5 apart on a value of 0.81 with LLVM optimisation off, AMD EPYC).
    terms = float(jnp.sum(jnp.abs(UNet(**config).apply({"params": params}, x, TIMESTEPS) * weights)))
    np.testing.assert_allclose(value_remat, value, rtol=0, atol=1e-6 * terms)
    # Remat recomputes the forward pass, so sums may run in another order (CPU-dependent): the
    # tolerance follows the gradients' scale; a wrong recomputation is off by O(scale).
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4 * scale), grads_remat, grads)
    assert jax.tree.structure(grads) == jax.tree.structure(params)


def test_bfloat16_close_to_float32(tiny: dict[str, Any]) -> None:
    model = UNet(**TINY, dtype=jnp.bfloat16)
    out = jax.jit(model.apply)({"params": tiny["params"]}, tiny["x"], TIMESTEPS)
    assert out.dtype == jnp.float32 and out.shape == tiny["out"].shape
    error = float(jnp.max(jnp.abs(out - tiny["out"])))
    scale = float(jnp.max(jnp.abs(tiny["out"])))
    assert error < 0.02 * scale, (error, scale)  # measured 0.032 on a max |output| of 3.9


def test_unet_from_config() -> None:
    model = unet_from_config({**TINY, "dtype": "bfloat16", "parametrization": "v", "block_out_channels": [16, 32]})
    assert model.dtype == jnp.bfloat16 and model.block_out_channels == (16, 32)
    assert unet_from_config({**TINY, "num_attention_heads": [1, 2]}).num_attention_heads == (1, 2)
    with pytest.raises(ValueError, match="num_heads"):
        unet_from_config({**TINY, "num_heads": 4})
