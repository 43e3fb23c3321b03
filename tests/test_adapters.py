"""Adapters: exact equality with the backbone at initialisation, the ControlNet copy, LoRA, the
trainable / frozen split after a real optimizer step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from codi_jax.models import adapters, lora, student
from codi_jax.models.unet import UNet

TINY = dict(
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    attention_levels=(False, True),
    attention_head_dim=16,
)
BATCH, SIZE = 2, 16
MODEL_T = np.array([3.0, 817.0], np.float32)


def _adapter_config(**overrides) -> ml_collections.ConfigDict:
    config = adapters.default_adapter_config()
    config.hint_channels = (8, 16)
    config.t2i_channels = (8, 16)
    config.update(overrides)
    return config


@functools.cache
def _backbone_and_params():
    backbone = UNet(**TINY)
    sample = jnp.zeros((1, SIZE, SIZE, 3))
    params = jax.jit(backbone.init)(jax.random.PRNGKey(1), sample, jnp.zeros((1,)))["params"]
    # Non-trivial biases / norms so that "equal" is not "both zero".
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    leaves = [x + 0.05 * rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
    return backbone, jax.tree.unflatten(tree, leaves)


def _inputs(cond_channels: int = 3):
    rng = np.random.default_rng(1)
    z = rng.standard_normal((BATCH, SIZE, SIZE, 3)).astype(np.float32)
    cond = rng.uniform(-1, 1, (BATCH, SIZE, SIZE, cond_channels)).astype(np.float32)
    return z, cond


def _build(kind: str, num_instructions: int = 0, **overrides):
    backbone, backbone_params = _backbone_and_params()
    model = student.build_adapted_model(
        backbone, _adapter_config(kind=kind, **overrides), cond_channels=3, num_instructions=num_instructions
    )
    instruction = jnp.zeros((BATCH,), jnp.int32) if num_instructions else None
    _, cond = _inputs()
    params = jax.jit(model.init)(jax.random.PRNGKey(2), backbone_params, jnp.asarray(cond), instruction)
    return model, params, backbone, backbone_params


@pytest.mark.parametrize(
    "kind,extra",
    [
        ("controlnet", {}),
        ("controlnet", {"hint_zero_init": False}),
        ("fusion", {"train_backbone": True}),
        ("fusion", {"train_backbone": True, "hint_zero_init": False}),
        ("t2i", {}),
        ("controlnet", {"lora_rank": 2}),
    ],
)
def test_adapter_at_init_equals_backbone_exactly(kind, extra) -> None:
    model, params, backbone, backbone_params = _build(kind, **extra)
    z, cond = _inputs()
    expected = jax.jit(backbone.apply)({"params": backbone_params}, z, MODEL_T)
    got = jax.jit(model.apply)(params, z, MODEL_T, cond)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    # ...and the condition actually reaches the output once the zero-init parameters move.
    perturbed = jax.tree.map(lambda x: x + 0.1, params)
    moved = jax.jit(model.apply)(perturbed, z, MODEL_T, cond)
    moved_other = jax.jit(model.apply)(perturbed, z, MODEL_T, -cond)
    assert float(jnp.max(jnp.abs(moved - moved_other))) > 1e-3


@pytest.mark.parametrize("kind", ["controlnet", "fusion"])
def test_random_hint_init_escapes_the_zero_init_saddle(kind) -> None:
    """With diffusers' zero-init hint conv the first gradient of the adapter's output layer (zero
    convs / mu) does not depend on the condition at all; with a random hint conv it does."""
    z, cond = _inputs()
    target = np.random.default_rng(3).standard_normal(z.shape).astype(np.float32)

    def output_layer_grads(hint_zero_init: bool, c: np.ndarray):
        model, params, _, _ = _build(kind, train_backbone=kind == "fusion", hint_zero_init=hint_zero_init)
        loss = lambda p: jnp.mean(jnp.square(model.apply(p, z, MODEL_T, c) - target))
        grads = jax.jit(jax.grad(loss))(params)["adapter"]
        names = [n for n in grads if n.startswith(("controlnet_down", "controlnet_mid", "fusion_mu"))]
        assert names
        return np.concatenate([np.ravel(x) for n in names for x in jax.tree.leaves(grads[n])])

    zero_a, zero_b = output_layer_grads(True, cond), output_layer_grads(True, -cond)
    np.testing.assert_array_equal(zero_a, zero_b)
    rand_a, rand_b = output_layer_grads(False, cond), output_layer_grads(False, -cond)
    assert float(np.max(np.abs(rand_a - rand_b))) > 1e-3 * float(np.max(np.abs(rand_a)))


def test_controlnet_copies_the_encoder() -> None:
    _, params, _, backbone_params = _build("controlnet")
    adapter = params["adapter"]
    copied = [name for name in adapter if name.startswith(adapters.ENCODER_PREFIXES)]
    assert sorted(copied) == sorted(["conv_in", "time_embedding", "down_blocks_0", "down_blocks_1", "mid_block"])
    for name in copied:
        jax.tree.map(np.testing.assert_array_equal, adapter[name], backbone_params[name])
    # Zero convs: one per skip plus the middle, all zeros.
    zero_convs = [name for name in adapter if name.startswith("controlnet_") and name != "controlnet_cond_embedding"]
    assert len(zero_convs) == len(UNet(**TINY).skip_specs()) + 1
    for name in zero_convs:
        assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(adapter[name]))


def test_instruction_embedding_changes_output() -> None:
    model, params, _, _ = _build("controlnet", num_instructions=4)
    z, cond = _inputs()
    params = jax.tree.map(lambda x: x + 0.1, params)
    params["adapter"]["instruction_embedding"]["embedding"] = jnp.asarray(
        np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    )
    apply = jax.jit(model.apply)
    a = apply(params, z, MODEL_T, cond, jnp.array([0, 0]))
    b = apply(params, z, MODEL_T, cond, jnp.array([1, 2]))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    with pytest.raises(ValueError, match="instructions"):
        model.apply(params, z, MODEL_T, cond)


def test_lora_merge_equals_dense_formula() -> None:
    _, backbone_params = _backbone_and_params()
    pattern = r"(to_q|conv1)/kernel$"
    factors = lora.init_lora(jax.random.PRNGKey(0), backbone_params, pattern, rank=3)
    paths = lora.target_paths(backbone_params, pattern)
    assert paths and all(p[-2] in ("to_q", "conv1") for p in paths)
    rng = np.random.default_rng(4)
    factors = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(np.float32)), factors)
    merged = lora.merge_lora(backbone_params, factors, scale=0.5)
    from flax import traverse_util

    flat_in, flat_out = traverse_util.flatten_dict(backbone_params), traverse_util.flatten_dict(merged)
    flat_f = traverse_util.flatten_dict(factors)
    for keys, kernel in flat_in.items():
        if keys in paths:
            a, b = np.asarray(flat_f[keys[:-1] + ("lora_a",)]), np.asarray(flat_f[keys[:-1] + ("lora_b",)])
            expected = np.asarray(kernel) + 0.5 * (a @ b).reshape(kernel.shape)
            np.testing.assert_allclose(np.asarray(flat_out[keys]), expected, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(np.asarray(flat_out[keys]), np.asarray(kernel))
    with pytest.raises(ValueError, match="No backbone kernel matches"):
        lora.init_lora(jax.random.PRNGKey(0), backbone_params, "no_such_layer", rank=2)


@pytest.mark.parametrize(
    "kind,extra", [("controlnet", {}), ("fusion", {"train_backbone": True}), ("t2i", {"lora_rank": 2})]
)
def test_only_trainable_params_change_after_an_optimizer_step(kind, extra) -> None:
    model, params, _, _ = _build(kind, **extra)
    optimizer = optax.adamw(1e-2, weight_decay=0.1)
    trained, frozen = model.split(params)
    assert set(trained) | set(frozen) == set(params) and not set(trained) & set(frozen)
    opt_state = optimizer.init(trained)
    z, cond = _inputs()
    target = np.random.default_rng(5).standard_normal(z.shape).astype(np.float32)

    @jax.jit
    def step(trained, opt_state):
        loss = lambda p: jnp.mean(jnp.square(model.apply({**frozen, **p}, z, MODEL_T, cond) - target))
        grads = jax.grad(loss)(trained)
        updates, opt_state = optimizer.update(grads, opt_state, trained)
        return {**frozen, **optax.apply_updates(trained, updates)}

    new = step(trained, opt_state)
    for key in params:
        changed = [
            not np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(jax.tree.leaves(params[key]), jax.tree.leaves(new[key]))
        ]
        if model.is_trained(key):
            assert any(changed), key
        else:
            assert not any(changed), f"frozen {key} changed"
    expect_backbone_trained = kind == "fusion"
    assert model.is_trained("backbone") == expect_backbone_trained
    counts = student.trainable_param_count(model, params)
    total = student.count_params(params)
    assert 0 < counts < total if not expect_backbone_trained else counts == total


def test_bad_adapter_config_and_condition_errors() -> None:
    backbone, backbone_params = _backbone_and_params()
    with pytest.raises(ValueError, match="adapter.kind='nope'"):
        student.build_adapted_model(backbone, _adapter_config(kind="nope"), 3)
    with pytest.raises(ValueError, match="LoRA is for a frozen backbone"):
        student.build_adapted_model(backbone, _adapter_config(kind="fusion", train_backbone=True, lora_rank=2), 3)
    model, params, _, _ = _build("controlnet")
    z, cond = _inputs()
    with pytest.raises(ValueError, match="3 channels"):
        model.apply(params, z, MODEL_T, cond[..., :1])
    wrong = jax.tree.map(lambda x: x[..., :1] if x.ndim == 4 else x, backbone_params)
    with pytest.raises(ValueError, match="shape"):
        adapters.init_from_backbone(dict(params), wrong, copy_encoder=True)


def test_hint_network_has_diffusers_layout() -> None:
    """diffusers' ControlNetConditioningEmbedding is ``channels = conditioning_embedding_out_channels``
    with one stride-2 stage per consecutive pair: conv_in, blocks_0..5 (conv, stride-2 conv), conv_out."""
    hint = adapters.HintNetwork(out_features=16, channels=(4, 8, 8, 16), num_downsamples=3)
    cond = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    params = jax.eval_shape(hint.init, jax.random.PRNGKey(0), cond)["params"]
    kernels = {name: leaf["kernel"].shape for name, leaf in params.items()}
    assert kernels == {
        "conv_in": (3, 3, 3, 4),
        "blocks_0": (3, 3, 4, 4),
        "blocks_1": (3, 3, 4, 8),
        "blocks_2": (3, 3, 8, 8),
        "blocks_3": (3, 3, 8, 8),
        "blocks_4": (3, 3, 8, 8),
        "blocks_5": (3, 3, 8, 16),
        "conv_out": (3, 3, 16, 16),
    }
    assert jax.eval_shape(hint.apply, {"params": params}, cond).shape == (1, 8, 8, 16)
    with pytest.raises(ValueError, match="3 downsamples need at least 4 channel widths"):
        jax.eval_shape(adapters.HintNetwork(16, (4, 8), num_downsamples=3).init, jax.random.PRNGKey(0), cond)


def test_controlnet_copies_heads_and_projection_layout() -> None:
    """A backbone with per-level heads and SD 1.x's 1x1-conv projections gives a ControlNet whose
    encoder copy has the backbone's tree (so init_from_backbone copies it leaf for leaf)."""
    backbone = UNet(**TINY, cross_attention_dim=8, num_attention_heads=(1, 4), use_linear_projection=False)
    model = adapters.build_conditional_model(backbone, _adapter_config(hint_downsamples=1), cond_channels=3)
    assert model.adapter.num_attention_heads == (1, 4) and not model.adapter.use_linear_projection
    z = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
    cond = jax.ShapeDtypeStruct((1, 2 * SIZE, 2 * SIZE, 3), jnp.float32)
    context = jax.ShapeDtypeStruct((1, 5, 8), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), z, MODEL_T[:1], cond, None, context)["params"]
    shapes = jax.tree.map(lambda a: a.shape, params)
    assert shapes["adapter"]["mid_block"] == shapes["backbone"]["mid_block"]
    assert shapes["adapter"]["down_blocks_1"]["attentions_0"]["proj_in"]["kernel"] == (1, 1, 32, 32)
