"""Attention implementations (``UNet.attention_impl``) and remat policies (``UNet.remat_policy``).

``jax.nn.dot_product_attention`` (the default) against the original einsum attention for the
head layouts of SD 1.x (8 heads at every level: head dims 40 / 80 / 160) and SD 2.x (head dim
64), self- and cross-attention (77 text tokens), float32 and bfloat16, values and gradients;
the choice through a UNet; every remat policy's gradients against no remat; old configs
without the new fields load with the defaults.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.interop import flax_to_torch
from codi_jax.models import layers
from codi_jax.models.unet import REMAT_POLICIES, MidBlock, UNet, unet_from_config
from tests.test_unet import random_params

# name: (query tokens, key tokens, channels, heads)
LAYOUTS = {
    "sd1_self_320": (256, 256, 320, 8),  # head dim 40
    "sd1_cross_640": (64, 77, 640, 8),  # head dim 80
    "sd1_cross_1280": (16, 77, 1280, 8),  # head dim 160
    "sd2_self_320": (256, 256, 320, 5),  # head dim 64
    "sd2_cross_1280": (16, 77, 1280, 20),  # head dim 64
}
# float32: the two paths differ only in how 1/sqrt(head_dim) is applied (measured <= 5e-7 of the
# output scale on CPU). bfloat16: outputs are rounded to bf16, whose spacing is 2^-7 relative; the
# paths agree to one spacing at the output scale (measured <= 5e-4 of it on CPU).
RTOL_OF_SCALE = {jnp.float32: 1e-5, jnp.bfloat16: 2.0**-7}


def _qkv(tq: int, tk: int, c: int, dtype: Any, seed: int = 0) -> tuple[jax.Array, ...]:
    rng = np.random.RandomState(seed)
    # q scaled x3 so the softmax is peaked (logits ~ N(0, 9)), as trained attention is.
    arrays = 3.0 * rng.randn(2, tq, c), rng.randn(2, tk, c), rng.randn(2, tk, c)
    return tuple(jnp.asarray(a, dtype) for a in arrays)


def _attend(impl: str, heads: int):
    return jax.jit(lambda q, k, v: layers.attention(q, k, v, heads, impl).astype(jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_dot_product_attention_equals_einsum(layout: str, dtype: Any) -> None:
    tq, tk, c, heads = LAYOUTS[layout]
    q, k, v = _qkv(tq, tk, c, dtype)
    old, new = _attend("einsum", heads)(q, k, v), _attend("dot_product", heads)(q, k, v)
    assert new.shape == (2, tq, c)
    scale = float(jnp.max(jnp.abs(old)))
    error = float(jnp.max(jnp.abs(new - old)))
    assert error <= RTOL_OF_SCALE[dtype] * scale, (layout, error, scale)
    # Not a near-uniform average over the keys (which any two paths would agree on): outputs
    # vary across queries (measured std >= 0.1 of the scale).
    assert float(jnp.std(old[0, :, 0])) > 0.03 * scale


@pytest.mark.parametrize("layout", ["sd1_cross_640", "sd2_self_320"])
def test_dot_product_attention_gradients_equal_einsum(layout: str) -> None:
    tq, tk, c, heads = LAYOUTS[layout]
    q, k, v = _qkv(tq, tk, c, jnp.float32, seed=1)
    weights = jnp.asarray(np.random.RandomState(2).randn(2, tq, c), jnp.float32)

    def grads(impl):
        loss = lambda q, k, v: jnp.sum(layers.attention(q, k, v, heads, impl) * weights)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for name, old, new in zip("qkv", grads("einsum"), grads("dot_product")):
        scale = float(jnp.max(jnp.abs(old)))
        assert scale > 0
        np.testing.assert_allclose(new, old, rtol=0, atol=1e-5 * scale, err_msg=f"d{name} ({layout})")


def test_attention_choice_errors() -> None:
    q, k, v = _qkv(4, 4, 16, jnp.float32)
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        layers.attention(q, k, v, 2, "flash")
    with pytest.raises(ValueError, match="needs model.dtype bfloat16"):  # before any cuDNN call
        layers.attention(q, k, v, 2, "cudnn")


# A UNet with SD 1.x-style transformers (heads per level, 1x1-conv projections, text context).
SD1_LIKE = dict(
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    attention_levels=(True, True),
    num_attention_heads=(2, 4),
    cross_attention_dim=24,
    use_linear_projection=False,
)
TIMESTEPS = np.array([3.0, 817.0], np.float32)


def _unet_inputs(model: UNet, size: int = 8) -> tuple[Any, jax.Array, jax.Array]:
    x = jnp.asarray(np.random.RandomState(3).randn(2, size, size, 3), jnp.float32)
    context = jnp.asarray(np.random.RandomState(4).randn(2, 5, 24), jnp.float32)
    return {"params": random_params(model, x.shape, context.shape)}, x, context


def test_unet_attention_impls_agree() -> None:
    params, x, context = _unet_inputs(UNet(**SD1_LIKE))
    outs = {
        impl: jax.jit(UNet(**SD1_LIKE, attention_impl=impl).apply)(params, x, TIMESTEPS, context)
        for impl in ("einsum", "dot_product")
    }
    scale = float(jnp.max(jnp.abs(outs["einsum"])))
    np.testing.assert_allclose(outs["dot_product"], outs["einsum"], rtol=0, atol=1e-5 * scale)


def _remat_equations(jaxpr) -> list:
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith(("remat", "checkpoint")):
            found.append(eqn)
        for value in eqn.params.values():
            if isinstance(value, jax.extend.core.ClosedJaxpr):
                found += _remat_equations(value.jaxpr)
            elif isinstance(value, jax.extend.core.Jaxpr):
                found += _remat_equations(value)
    return found


def test_remat_policies_reach_every_block() -> None:
    config = dict(SD1_LIKE, block_out_channels=(16,), attention_levels=(True,), num_attention_heads=(2,))
    params, x, context = _unet_inputs(UNet(**config))
    for policy in REMAT_POLICIES:
        model = UNet(**config, remat=True, remat_policy=policy)
        remats = _remat_equations(jax.make_jaxpr(model.apply)(params, x, TIMESTEPS, context).jaxpr)
        # Res-block + transformer: 1 + 1 (down), 2 + 1 (mid), 2 + 2 (up: layers_per_block + 1).
        assert len(remats) == 9 and all(e.params["policy"] == REMAT_POLICIES[policy] for e in remats), policy


def _mid_block(remat: bool, policy: str) -> MidBlock:
    """A middle block (res-block, SD-style transformer, res-block): the block classes the UNet uses."""
    return MidBlock(
        features=16,
        num_layers=1,
        attention=True,
        groups=8,
        eps=1e-5,
        head_dim=8,
        heads=2,
        linear_projection=False,
        dropout=0.0,
        dtype=jnp.float32,
        conv_impl="auto",
        remat=remat,
        deterministic=True,
        cross_attention=True,
        attention_impl="dot_product",
        remat_policy=policy,
    )


def test_remat_policy_gradients_equal_no_remat() -> None:
    """ "full" (= nothing_saveable) is tests/test_unet.py's remat test; the saving policies here."""
    rng = np.random.RandomState(5)
    x, temb = jnp.asarray(rng.randn(2, 8, 8, 16), jnp.float32), jnp.asarray(rng.randn(2, 32), jnp.float32)
    context, weights = jnp.asarray(rng.randn(2, 5, 24), jnp.float32), jnp.asarray(rng.randn(2, 8, 8, 16), jnp.float32)
    shapes = jax.eval_shape(_mid_block(False, "full").init, jax.random.PRNGKey(0), x, temb, context)
    params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.randn(*a.shape), jnp.float32), shapes)  # no init compile

    def value_and_grads(block):
        loss = lambda p, x: jnp.sum(block.apply(p, x, temb, context) * weights)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    value, grads = value_and_grads(_mid_block(False, "full"))
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))
    for policy in ("dots_saveable", "dots_with_no_batch_dims_saveable"):
        value_remat, grads_remat = value_and_grads(_mid_block(True, policy))
        np.testing.assert_allclose(value_remat, value, rtol=1e-6)
        # Recomputation may sum in another order: tolerance from the gradients' scale.
        for a, b in zip(jax.tree.leaves(grads_remat), jax.tree.leaves(grads)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4 * scale, err_msg=policy)


def test_config_fields_defaults_and_errors() -> None:
    old_config = dict(SD1_LIKE, dtype="float32", remat=True, conv_impl="auto", parametrization="eps")
    model = unet_from_config(old_config)  # saved before the fields existed
    assert (model.attention_impl, model.remat_policy) == ("dot_product", "full")
    chosen = unet_from_config(dict(old_config, attention_impl="einsum", remat_policy="dots_saveable"))
    assert (chosen.attention_impl, chosen.remat_policy) == ("einsum", "dots_saveable")
    with pytest.raises(ValueError, match="model.attention_impl='flash'"):
        unet_from_config(dict(old_config, attention_impl="flash"))
    with pytest.raises(ValueError, match="model.remat_policy='everything'"):
        unet_from_config(dict(old_config, remat_policy="everything"))
    # Compute-only: exported configs are the same whatever the choice.
    assert {"attention_impl", "remat_policy"} <= set(flax_to_torch.RUNTIME_FIELDS)
    assert flax_to_torch.unet_diffusers_config(chosen) == flax_to_torch.unet_diffusers_config(model)
