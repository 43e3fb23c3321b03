"""diffusers' ``SD3Transformer2DModel`` (SD3 / SD3.5 MMDiT) -> our joint-attention ``DiT``: equal outputs on
tiny random models (with and without ControlNet residuals), the cropped position table, the config
and state-dict refusals, the context interface ``networks.placeholder_context`` reads, and loading a
saved model folder.

torch / diffusers are test-only references (the module skips without them). Every diffusers parameter
is perturbed by N(0, 0.05^2) so that no zero-initialised gate or projection hides a mismatch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.interop import torch_to_flax
from codi_jax.interop.torch_to_flax import UnsupportedDiffusersConfig, sd3_transformer_fields, sd3_transformer_params
from codi_jax.models import dit, networks

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=32,
    caption_projection_dim=32,
    pooled_projection_dim=24,
    out_channels=5,
    pos_embed_max_size=16,
)
CONFIGS = {
    "sd3_medium": dict(TINY),  # no qk_norm, no dual attention
    "sd35": dict(TINY, qk_norm="rms_norm", dual_attention_layers=(0,)),
    "sd35_all_dual": dict(
        TINY, num_attention_heads=2, caption_projection_dim=16, qk_norm="rms_norm", dual_attention_layers=(0, 1, 2)
    ),
}
SD3 = r"^Cannot convert diffusers SD3Transformer2DModel: "
BATCH, HEIGHT, WIDTH, TEXT_TOKENS = 2, 12, 8, 7  # a non-square latent: the crop's top / left differ


def _tolerance(theirs: np.ndarray) -> float:
    return 1e-5 * max(1.0, float(np.abs(theirs).max()))


def _diffusers_model(config: dict[str, Any], seed: int = 0):
    """A seeded ``SD3Transformer2DModel`` with every parameter perturbed (none trivially zero or one)."""
    torch.manual_seed(seed)
    model = diffusers.SD3Transformer2DModel(**config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def _converted(torch_model) -> tuple[dit.DiT, dict[str, Any]]:
    model = dit.DiT(**sd3_transformer_fields(dict(torch_model.config)))
    return model, sd3_transformer_params(torch_model.state_dict(), model)


def _inputs(config: dict[str, Any], seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    return dict(
        hidden_states=rng.randn(BATCH, config["in_channels"], HEIGHT, WIDTH).astype(np.float32),
        encoder_hidden_states=rng.randn(BATCH, TEXT_TOKENS, config["joint_attention_dim"]).astype(np.float32),
        pooled_projections=rng.randn(BATCH, config["pooled_projection_dim"]).astype(np.float32),
        timestep=np.array([3.0, 700.0], np.float32),
    )


def _theirs(torch_model, inputs: dict[str, np.ndarray], residuals: list[np.ndarray] | None = None) -> np.ndarray:
    tensors = {key: torch.from_numpy(value) for key, value in inputs.items()}
    controlnet = None if residuals is None else [torch.from_numpy(r) for r in residuals]
    with torch.no_grad():
        out = torch_model(**tensors, block_controlnet_hidden_states=controlnet).sample
    return out.numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC


def _ours(model: dit.DiT, params: Any, inputs: dict[str, np.ndarray], residuals=None) -> np.ndarray:
    context = {key: inputs[key] for key in dit.SD3_CONTEXT_KEYS}
    sample = inputs["hidden_states"].transpose(0, 2, 3, 1)
    return np.asarray(model.apply({"params": params}, sample, inputs["timestep"], context, block_residuals=residuals))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers_with_and_without_controlnet_residuals(name: str) -> None:
    """3 blocks; 2 residuals serve blocks 0 and 1 (``int(i / 1.5)``), 3 residuals blocks 0 and 1 only:
    diffusers adds none after the ``context_pre_only`` last block."""
    config = CONFIGS[name]
    torch_model = _diffusers_model(config)
    model, params = _converted(torch_model)
    inputs = _inputs(config)
    tokens, width = (HEIGHT // 2) * (WIDTH // 2), model.width
    rng = np.random.RandomState(2)
    for residuals in (None, [rng.randn(BATCH, tokens, width).astype(np.float32) for _ in range(2)], "three"):
        if residuals == "three":
            residuals = [rng.randn(BATCH, tokens, width).astype(np.float32) for _ in range(3)]
        theirs = _theirs(torch_model, inputs, residuals)
        ours = _ours(model, params, inputs, residuals)
        assert ours.shape == (BATCH, HEIGHT, WIDTH, config["out_channels"])
        assert np.abs(ours - theirs).max() <= _tolerance(theirs), (name, residuals is None)
    unused_last = residuals[:2] + [residuals[2] + 100.0]  # the last residual would serve the last block
    np.testing.assert_array_equal(_ours(model, params, inputs, unused_last), ours)


def test_parameter_names_and_layouts() -> None:
    torch_model = _diffusers_model(CONFIGS["sd35"])
    model, params = _converted(torch_model)
    block0, block2 = params["transformer_blocks_0"], params["transformer_blocks_2"]
    assert {"attn2", "norm1_context", "ff_context"} <= set(block0) and "attn2" not in params["transformer_blocks_1"]
    assert "to_add_out" not in block2["attn"] and "ff_context" not in block2  # context_pre_only
    assert block0["norm1"]["linear"]["kernel"].shape == (32, 9 * 32)  # SD35AdaLayerNormZeroX
    assert block2["norm1_context"]["linear"]["kernel"].shape == (32, 2 * 32)  # AdaLayerNormContinuous
    weight = torch_model.state_dict()["pos_embed.proj.weight"].numpy()  # (out, in, p, p)
    np.testing.assert_array_equal(params["pos_embed"]["proj"]["kernel"], weight.transpose(2, 3, 1, 0))
    norm = torch_model.state_dict()["transformer_blocks.1.attn.norm_added_k.weight"].numpy()
    np.testing.assert_array_equal(params["transformer_blocks_1"]["attn"]["norm_added_k"]["scale"], norm)


def test_position_table_and_crop_are_diffusers_bit_for_bit() -> None:
    embeddings = diffusers.models.embeddings
    for dim, max_size, sample_size in ((32, 16, 8), (64, 24, 40), (64, 192, 128)):  # SD3 / SD3.5's table sizes
        patch = embeddings.PatchEmbed(sample_size, sample_size, 2, 4, dim, pos_embed_max_size=max_size)
        table = dit.pos_embed_table(dim, max_size, sample_size // 2)
        np.testing.assert_array_equal(table, patch.pos_embed[0].numpy())
        for grid_h, grid_w in ((6, 4), (5, 16), (max_size, max_size - 1)):
            expected = patch.cropped_pos_embed(grid_h * 2, grid_w * 2)[0].numpy()
            np.testing.assert_array_equal(
                dit.cropped_pos_embed(dim, max_size, sample_size // 2, grid_h, grid_w), expected
            )
    with pytest.raises(ValueError, match=r"^Height \(17\) cannot be greater than `pos_embed_max_size`: 16"):
        dit.cropped_pos_embed(32, 16, 4, 17, 2)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"_class_name": "FluxTransformer2DModel"},
            r"^Cannot convert diffusers FluxTransformer2DModel: expected an SD3",
        ),
        ({"caption_projection_dim": 48}, SD3 + r"caption_projection_dim=48 is not supported"),
        ({"qk_norm": "layer_norm"}, SD3 + r"qk_norm='layer_norm' is not supported"),
        ({"pos_embed_max_size": None}, SD3 + r"pos_embed_max_size=None is not supported"),
        ({"dual_attention_layers": [0, 3]}, SD3 + r"dual_attention_layers \[3\] are not block indices"),
        ({"use_pos_embed": False}, SD3 + r"config field 'use_pos_embed' is not supported"),
    ],
)
def test_config_refusals_name_the_field(override: dict[str, Any], message: str) -> None:
    config = {"_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.42.1", **TINY, **override}
    with pytest.raises(UnsupportedDiffusersConfig, match=message) as info:
        sd3_transformer_fields(config)
    assert "\n" not in str(info.value)


def test_config_defaults_are_sd3_medium() -> None:
    fields = sd3_transformer_fields({"_class_name": "SD3Transformer2DModel", "pos_embed_max_size": 192})
    assert fields["num_layers"] == 18 and fields["num_attention_heads"] * fields["attention_head_dim"] == 1152
    assert fields["joint_attention_dim"] == 4096 and fields["pooled_projection_dim"] == 2048
    assert (fields["qk_norm"], fields["dual_attention_layers"], fields["sample_size"]) == (None, (), 128)


def test_state_dict_leftover_missing_and_modified_table_are_refused() -> None:
    torch_model = _diffusers_model(CONFIGS["sd3_medium"])
    model = dit.DiT(**sd3_transformer_fields(dict(torch_model.config)))
    state = {key: value.numpy() for key, value in torch_model.state_dict().items()}
    extra = {"transformer_blocks.0.attn.to_add_k.weight": np.zeros((32, 32)), "image_proj.proj.bias": np.zeros(4)}
    with pytest.raises(ValueError, match=r"^2 diffusers tensors have no counterpart .*'image_proj.proj.bias'"):
        sd3_transformer_params({**state, **extra}, model)
    missing = {key: value for key, value in state.items() if key != "transformer_blocks.1.ff_context.net.2.bias"}
    with pytest.raises(ValueError, match=r"^1 parameters missing .*transformer_blocks.1.ff_context.net.2.bias"):
        sd3_transformer_params(missing, model)
    shifted = dict(state, **{"pos_embed.pos_embed": state["pos_embed.pos_embed"] + 1e-3})
    with pytest.raises(ValueError, match=r"^pos_embed.pos_embed is not the sin-cos table"):
        sd3_transformer_params(shifted, model)
    with pytest.raises(ValueError, match="joint_attention_dim"):
        sd3_transformer_params(state, dit.DiT(num_layers=3, num_attention_heads=4, attention_head_dim=8))


def test_context_interface_and_placeholder() -> None:
    """``cross_attention_dim`` / ``context_spec`` as ``networks.placeholder_context`` reads them; the
    image-only DiT keeps refusing a context and the joint one refuses anything but the dict."""
    model = dit.dit_from_config({"kind": "dit", **dict(TINY, dual_attention_layers=[1]), "time_embed_channels": 16})  # noqa: E501
    assert model.dual_attention_layers == (1,) and model.cross_attention_dim == 32
    placeholder = networks.placeholder_context(model)
    assert {key: value.shape for key, value in placeholder.items()} == {
        "encoder_hidden_states": (1, 1, 32),
        "pooled_projections": (1, 24),
    }
    params = networks.init_teacher_params(model, 8, jax.random.PRNGKey(0))
    assert "context_embedder" in params and "text_embedder" in params["time_text_embed"]
    x, t = jnp.zeros((2, 8, 8, 4)), jnp.ones((2,))
    with pytest.raises(ValueError, match=r"reads context = a dict with keys .*; got ndarray"):
        model.apply({"params": params}, x, t, np.zeros((2, 3, 32), np.float32))
    with pytest.raises(ValueError, match=r"^context\['pooled_projections'\] has shape \(2, 23\); expected \(2, 24\)"):
        context = {"encoder_hidden_states": jnp.zeros((2, 3, 32)), "pooled_projections": jnp.zeros((2, 23))}
        model.apply({"params": params}, x, t, context)
    image_only = dit.DiT(num_layers=1, num_attention_heads=2, attention_head_dim=8)
    assert image_only.cross_attention_dim is None and networks.placeholder_context(image_only) is None
    with pytest.raises(ValueError, match=r"^model.qk_norm='rms_norm' needs model.joint_attention_dim"):
        dit.DiT(qk_norm="rms_norm").check_choices()
    with pytest.raises(ValueError, match=r"^model.pos_embed_max_size=16 needs model.sample_size"):
        dit.DiT(pos_embed_max_size=16).check_choices()


def test_load_saved_model_folder(tmp_path) -> None:
    pytest.importorskip("safetensors")
    torch_model = _diffusers_model(CONFIGS["sd35"])
    torch_model.save_pretrained(tmp_path / "transformer")
    model, params = torch_to_flax.load_diffusers_sd3_transformer(str(tmp_path))  # a pipeline-like folder
    inputs = _inputs(CONFIGS["sd35"], seed=3)
    theirs = _theirs(torch_model, inputs)
    assert np.abs(_ours(model, params, inputs) - theirs).max() <= _tolerance(theirs)
