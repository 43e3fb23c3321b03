"""The DiT backbone: shapes, adaLN-zero init (output exactly 0), a NumPy forward of the whole network
(blocks, residual seam) on random weights, and its parts against diffusers' functions."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.models import dit, layers

TINY = dict(patch_size=2, num_layers=3, num_attention_heads=2, attention_head_dim=8, time_embed_channels=16)


def _model(**overrides) -> dit.DiT:
    return dit.DiT(**{**TINY, **overrides})


def _random_params(model: dit.DiT, size: int = 8, seed: int = 0) -> dict:
    """Initialised params with every leaf (the zero-initialised ones too) replaced by N(0, 0.2^2)."""
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, model.in_channels)), jnp.zeros((1,)))
    leaves, tree = jax.tree.flatten(variables["params"])
    rng = np.random.RandomState(seed)
    return jax.tree.unflatten(tree, [rng.normal(0, 0.2, x.shape).astype(np.float32) for x in leaves])


# ---------------------------------------------------------------- NumPy reference


def _dense(p, x):
    return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def _silu(x):
    return x / (1 + np.exp(-x))


def _layer_norm(x, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def _attention(p, x, heads):
    b, n, c = x.shape
    q, k, v = (_dense(p[f"to_{name}"], x).reshape(b, n, heads, c // heads) for name in "qkv")
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(c // heads)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return _dense(p["to_out_0"], np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, c))


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def numpy_block(p, x, temb, heads):
    """diffusers ``SD3SingleTransformerBlock.forward`` in NumPy (float64)."""
    mod = _dense(p["norm1"]["linear"], _silu(temb))[:, None, :]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = np.split(mod, 6, axis=-1)
    x = x + gate_msa * _attention(p["attn"], _layer_norm(x) * (1 + scale_msa) + shift_msa, heads)
    h = _layer_norm(x) * (1 + scale_mlp) + shift_mlp
    return x + gate_mlp * _dense(p["ff"]["net_2"], _gelu_tanh(_dense(p["ff"]["net_0_proj"], h)))


def numpy_dit(params, model, x, timesteps, residuals=None):
    """The whole DiT in NumPy: conv patchify (stride p), sin-cos positions, sinusoid -> MLP time
    embedding, blocks with residuals after block i at ``int(i / (L / n))`` (diffusers'
    ``SD3Transformer2DModel``), adaLN final layer, ``nhwpqc`` unpatchify."""
    p_, (b, h, w, c) = model.patch_size, x.shape
    gh, gw = h // p_, w // p_
    kernel = np.asarray(params["pos_embed"]["proj"]["kernel"], np.float64)
    patches = x.reshape(b, gh, p_, gw, p_, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, -1)
    tokens = patches @ kernel.reshape(-1, kernel.shape[-1]) + np.asarray(params["pos_embed"]["proj"]["bias"])
    tokens = tokens + dit.sincos_pos_embed(model.width, gh, gw)
    half = model.time_embed_channels // 2
    args = timesteps[:, None] * np.exp(-math.log(10000) * np.arange(half) / half)[None]
    emb = np.concatenate([np.cos(args), np.sin(args)], -1)  # flip_sin_to_cos=True
    te = params["time_text_embed"]["timestep_embedder"]
    temb = _dense(te["linear_2"], _silu(_dense(te["linear_1"], emb)))
    for i in range(model.num_layers):
        tokens = numpy_block(params[f"transformer_blocks_{i}"], tokens, temb, model.num_attention_heads)
        if residuals is not None:
            tokens = tokens + residuals[int(i / (model.num_layers / len(residuals)))]
    scale, shift = np.split(_dense(params["norm_out"]["linear"], _silu(temb))[:, None, :], 2, axis=-1)
    out = _dense(params["proj_out"], _layer_norm(tokens) * (1 + scale) + shift)
    out = out.reshape(b, gh, gw, p_, p_, -1).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(b, h, w, -1)


# ---------------------------------------------------------------- tests


def test_output_shape_and_exactly_zero_at_init() -> None:
    """adaLN-zero: every block's gates and the final projection start at 0, so the output is 0."""
    model = _model(in_channels=4, out_channels=5)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 12, 4))
    variables = model.init(jax.random.PRNGKey(0), x, jnp.zeros((2,)))
    out = model.apply(variables, x, jnp.array([10.0, 900.0]))
    assert out.shape == (2, 8, 12, 5) and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    params = variables["params"]
    assert set(params) == {"pos_embed", "time_text_embed", "norm_out", "proj_out"} | {
        f"transformer_blocks_{i}" for i in range(3)
    }
    assert params["pos_embed"]["proj"]["kernel"].shape == (2, 2, 4, 16)
    assert params["transformer_blocks_0"]["norm1"]["linear"]["kernel"].shape == (16, 96)
    np.testing.assert_array_equal(params["transformer_blocks_0"]["norm1"]["linear"]["kernel"], 0.0)


def test_one_block_matches_numpy() -> None:
    block = dit.DiTBlock(heads=2)
    x = np.random.RandomState(1).randn(2, 6, 16).astype(np.float32)
    temb = np.random.RandomState(2).randn(2, 16).astype(np.float32)
    variables = block.init(jax.random.PRNGKey(0), x, temb)
    leaves, tree = jax.tree.flatten(variables["params"])
    rng = np.random.RandomState(3)
    params = jax.tree.unflatten(tree, [rng.normal(0, 0.3, a.shape).astype(np.float32) for a in leaves])
    out = block.apply({"params": params}, x, temb)
    expected = numpy_block(params, x.astype(np.float64), temb.astype(np.float64), heads=2)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_residuals", [None, 1, 2, 3])
def test_whole_network_with_residual_seam_matches_numpy(num_residuals) -> None:
    """3 blocks; 2 residuals serve blocks (0, 1) and 2 (diffusers' interval ``int(i / 1.5)``)."""
    model = _model()
    params = _random_params(model)
    x = np.random.RandomState(4).randn(2, 8, 8, 3).astype(np.float32)
    timesteps = np.array([30.0, 770.0], np.float32)
    residuals = None
    if num_residuals:
        residuals = [np.random.RandomState(10 + k).randn(2, 16, 16).astype(np.float32) for k in range(num_residuals)]
    out = model.apply({"params": params}, x, timesteps, block_residuals=residuals)
    expected = numpy_dit(params, model, x.astype(np.float64), timesteps.astype(np.float64), residuals)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=2e-5)


def test_residual_index_is_diffusers_interval() -> None:
    for num_blocks, num_residuals in ((12, 12), (12, 6), (12, 5), (8, 3), (3, 2), (24, 1)):
        interval = num_blocks / num_residuals  # SD3Transformer2DModel.forward's interval_control
        got = [dit.residual_index(i, num_blocks, num_residuals) for i in range(num_blocks)]
        assert got == [int(i / interval) for i in range(num_blocks)]
        assert sorted(set(got)) == list(range(num_residuals))


def test_features_hint_and_seam_errors() -> None:
    model = _model()
    params = _random_params(model)
    x = jnp.asarray(np.random.RandomState(5).randn(2, 8, 8, 3).astype(np.float32))
    out, features = model.apply({"params": params}, x, jnp.ones((2,)), return_features=True)
    assert len(features["blocks"]) == 3 and features["blocks"][0].shape == (2, 16, 16)
    zeros = [jnp.zeros((2, 16, 16))] * 3
    np.testing.assert_array_equal(model.apply({"params": params}, x, jnp.ones((2,)), block_residuals=zeros), out)
    with pytest.raises(ValueError, match=r"^block_residuals: 4 arrays for 3 blocks"):
        model.apply({"params": params}, x, jnp.ones((2,)), block_residuals=zeros + zeros[:1])
    with pytest.raises(ValueError, match=r"^block_residuals entry for block 0 has shape \(2, 16, 8\)"):
        model.apply({"params": params}, x, jnp.ones((2,)), block_residuals=[jnp.zeros((2, 16, 8))])
    with pytest.raises(ValueError, match="no text blocks"):
        model.apply({"params": params}, x, jnp.ones((2,)), jnp.zeros((2, 1, 4)))
    with pytest.raises(ValueError, match=r"divisible by patch_size=2"):
        model.apply({"params": params}, x[:, :7], jnp.ones((2,)))


def test_patchify_is_the_strided_conv_and_unpatchify_inverts_it() -> None:
    x = np.random.RandomState(6).randn(2, 8, 12, 3).astype(np.float32)
    patchify = dit.Patchify(features=5, patch_size=4)
    variables = patchify.init(jax.random.PRNGKey(0), x)
    kernel = variables["params"]["kernel"]
    conv = jax.lax.conv_general_dilated(x, kernel, (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(patchify.apply(variables, x), np.asarray(conv).reshape(2, 6, 5), atol=1e-5)
    tokens = x.reshape(2, 2, 4, 3, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 6, 48)  # (p, q, c) per token
    np.testing.assert_array_equal(dit.unpatchify(jnp.asarray(tokens), 2, 3, 4), x)


def test_position_embedding_matches_diffusers() -> None:
    torch = pytest.importorskip("torch")
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    for dim, grid in ((16, 4), (64, 8)):
        expected = embeddings.get_2d_sincos_pos_embed(dim, grid, base_size=grid, output_type="pt")
        np.testing.assert_allclose(dit.sincos_pos_embed(dim, grid, grid), expected.to(torch.float32).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 4"):
        dit.sincos_pos_embed(18, 2, 2)


def test_layer_norm_gradient_matches_autodiff() -> None:
    """``layers.layer_norm``'s hand-written VJP against autodiff of the plain formula."""
    x = jnp.asarray(np.random.RandomState(7).randn(3, 5, 16).astype(np.float32) * 3 + 1)
    g = jnp.asarray(np.random.RandomState(8).randn(3, 5, 16).astype(np.float32))

    def plain(x):
        centred = x - x.mean(-1, keepdims=True)
        return centred / jnp.sqrt(jnp.mean(centred**2, -1, keepdims=True) + 1e-6)

    np.testing.assert_allclose(layers.layer_norm(x), _layer_norm(np.asarray(x, np.float64)), atol=1e-5)
    np.testing.assert_allclose(layers.layer_norm(x), plain(x), atol=1e-6)
    ours = jax.vjp(layers.layer_norm, x)[1](g)[0]
    np.testing.assert_allclose(ours, jax.vjp(plain, x)[1](g)[0], atol=2e-5)


def test_config_builds_the_dit_and_refuses_unknown_fields() -> None:
    model = dit.dit_from_config({"kind": "dit", "parametrization": "v", "dtype": "bfloat16", **TINY})
    assert model.dtype == jnp.bfloat16 and model.width == 16
    with pytest.raises(ValueError, match=r"^Unknown DiT model config fields \['block_out_channels'\]"):
        dit.dit_from_config({**TINY, "block_out_channels": (8,)})
    with pytest.raises(ValueError, match=r"^model.attention_impl='flash'"):
        dit.dit_from_config({**TINY, "attention_impl": "flash"})
