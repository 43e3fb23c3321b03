"""The DiT's ControlNet adapter (``SD3ControlNetModel`` layout): the adapted model is the teacher at
initialisation, the copy is the backbone's, and on random weights the whole adapted model equals a
NumPy forward (adapter blocks -> zero-init linears -> the backbone's residual seam)."""

from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from codi_jax.models import adapters, dit, student
from tests.test_dit import TINY, _dense, numpy_block, numpy_dit

SIZE = 8


def _adapter_config(**overrides) -> ml_collections.ConfigDict:
    config = adapters.default_adapter_config()
    config.update(overrides)
    return config


def _adapted(blocks: int = 2, **overrides):
    backbone = dit.DiT(**TINY)
    model = student.build_adapted_model(backbone, _adapter_config(dit_blocks=blocks, **overrides), cond_channels=3)
    x = jnp.zeros((1, SIZE, SIZE, 3))
    backbone_params = backbone.init(jax.random.PRNGKey(1), x, jnp.zeros((1,)))["params"]
    leaves, tree = jax.tree.flatten(backbone_params)
    rng = np.random.RandomState(0)  # a trained-looking backbone: no zero gates
    backbone_params = jax.tree.unflatten(tree, [rng.normal(0, 0.2, a.shape).astype(np.float32) for a in leaves])
    params = model.init(jax.random.PRNGKey(2), backbone_params, x, None)
    return model, params


def _inputs(seed: int = 5):
    rng = np.random.RandomState(seed)
    x, cond = (rng.randn(2, SIZE, SIZE, 3).astype(np.float32) for _ in range(2))
    return x, cond, np.array([40.0, 810.0], np.float32)


def test_adapted_dit_is_the_teacher_at_init_and_copies_its_first_blocks() -> None:
    model, params = _adapted(blocks=2)
    adapter, backbone = params["adapter"], params["backbone"]
    assert set(adapter) == {"pos_embed", "pos_embed_input", "time_text_embed"} | {
        f"transformer_blocks_{i}" for i in range(2)
    } | {f"controlnet_blocks_{i}" for i in range(2)}
    for name in ("pos_embed", "time_text_embed", "transformer_blocks_0", "transformer_blocks_1"):
        for a, b in zip(jax.tree.leaves(adapter[name]), jax.tree.leaves(backbone[name])):
            np.testing.assert_array_equal(a, b)
    for i in range(2):
        np.testing.assert_array_equal(adapter[f"controlnet_blocks_{i}"]["kernel"], 0.0)
    np.testing.assert_array_equal(adapter["pos_embed_input"]["proj"]["kernel"], 0.0)  # diffusers' zero_module
    x, cond, t = _inputs()
    teacher = model.backbone.apply({"params": backbone}, x, t)
    assert float(jnp.abs(teacher).max()) > 0.1
    np.testing.assert_array_equal(np.asarray(model.apply(params, x, t, cond)), np.asarray(teacher))


def _numpy_adapted(params, model, x, cond, t):
    """``SD3ControlNetModel.forward`` then ``SD3Transformer2DModel`` with its residuals, in NumPy."""
    adapter, p = params["adapter"], model.backbone.patch_size
    b, gh = x.shape[0], SIZE // p

    def patchify(image, proj):
        kernel = np.asarray(proj["kernel"], np.float64)
        patches = image.reshape(b, gh, p, gh, p, -1).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gh, -1)
        return patches @ kernel.reshape(-1, kernel.shape[-1]) + np.asarray(proj["bias"], np.float64)

    width = model.backbone.width
    tokens = patchify(x, adapter["pos_embed"]["proj"]) + dit.sincos_pos_embed(width, gh, gh)
    tokens = tokens + patchify(cond, adapter["pos_embed_input"]["proj"])
    half = model.backbone.time_embed_channels // 2
    args = t[:, None] * np.exp(-math.log(10000) * np.arange(half) / half)[None]
    te = adapter["time_text_embed"]["timestep_embedder"]
    emb = np.concatenate([np.cos(args), np.sin(args)], -1)
    temb = _dense(te["linear_2"], (lambda h: h / (1 + np.exp(-h)))(_dense(te["linear_1"], emb)))
    residuals = []
    for i in range(len([k for k in adapter if k.startswith("controlnet_blocks_")])):
        tokens = numpy_block(adapter[f"transformer_blocks_{i}"], tokens, temb, model.backbone.num_attention_heads)
        residuals.append(_dense(adapter[f"controlnet_blocks_{i}"], tokens))
    return numpy_dit(params["backbone"], model.backbone, x, t, residuals)


@pytest.mark.parametrize("blocks", [1, 2])
def test_adapted_dit_matches_numpy_on_random_weights(blocks) -> None:
    model, params = _adapted(blocks=blocks)
    leaves, tree = jax.tree.flatten(params["adapter"])
    rng = np.random.RandomState(7)
    params = {**params, "adapter": jax.tree.unflatten(tree, [rng.normal(0, 0.2, a.shape) for a in leaves])}
    x, cond, t = _inputs()
    out = model.apply(params, x, t, cond)
    expected = _numpy_adapted(params, model, x.astype(np.float64), cond.astype(np.float64), t.astype(np.float64))
    assert np.abs(expected - np.asarray(model.backbone.apply({"params": params["backbone"]}, x, t))).max() > 0.1
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)


def test_dit_adapter_choices_are_checked() -> None:
    backbone = dit.DiT(**TINY)
    with pytest.raises(ValueError, match=r"^adapter.kind='fusion': a DiT backbone takes adapter.kind='controlnet'"):
        student.build_adapted_model(backbone, _adapter_config(kind="fusion"), cond_channels=3)
    with pytest.raises(ValueError, match=r"^adapter.dit_blocks=4: the DiT has 3 blocks to copy"):
        student.build_adapted_model(backbone, _adapter_config(dit_blocks=4), cond_channels=3)
    half = student.build_adapted_model(backbone, _adapter_config(), cond_channels=3)
    assert half.module.adapter.num_layers == 1  # 0 = half of 3 blocks, at least one
    model, params = _adapted(hint_zero_init=False)
    assert float(np.abs(params["adapter"]["pos_embed_input"]["proj"]["kernel"]).max()) > 0
    x, cond, t = _inputs()
    with pytest.raises(ValueError, match=r"^Condition of shape \(2, 4, 4, 3\) does not fit the DiT adapter"):
        model.apply(params, x, t, cond[:, :4, :4])


def test_the_default_fsdp_rule_splits_every_large_sd3_and_t5_leaf() -> None:
    """FSDP needs no rule of its own for SD3: on an 8-way axis, ``sharding.DEFAULT_RULES``' spec
    splits every leaf of 2^14+ entries of an SD3-medium-shaped transformer + its ControlNet and of
    T5-XXL (shapes only), so each device holds an eighth of them (plus the small replicated leaves)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import sd3_shapes  # noqa: PLC0415  (benchmarks/: scripts importing each other by name)
    import state_memory  # noqa: PLC0415

    from codi_jax import sharding
    from codi_jax.models import t5

    # Two blocks / layers: every leaf shape of the real models (their blocks repeat), traced fast.
    _, adapted = state_memory.shapes(dict(sd3_shapes.SD3_MEDIUM, num_layers=2), 128)
    t5_xxl = t5.T5Encoder(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64, feed_forward_proj="gated-gelu"
    )
    for tree in (adapted, t5.t5_param_shapes(t5_xxl)):
        total = per_device = 0
        for leaf in jax.tree.leaves(tree):
            spec = sharding.auto_fsdp_spec(leaf.shape, 8, sharding.DEFAULT_MIN_SIZE)
            large = math.prod(leaf.shape) >= sharding.DEFAULT_MIN_SIZE
            assert (sharding.FSDP_AXIS in spec) == large, (leaf.shape, spec)
            total += math.prod(leaf.shape)
            per_device += math.prod(leaf.shape) // (8 if large else 1)
        assert per_device < 1.01 * total / 8, (per_device, total)
