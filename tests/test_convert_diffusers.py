"""diffusers PyTorch UNet -> our flax UNet: configs, names, layouts, errors, and equal outputs.

The equivalence tests build tiny randomly initialised diffusers models (torch is a test-only
reference, skipped when missing) and compare outputs on the same inputs (NCHW vs NHWC).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.models.convert_diffusers import (
    UnsupportedDiffusersConfig,
    load_diffusers_unet,
    unet_config_from_diffusers,
    unet_param_shapes,
    unet_params_from_diffusers,
)
from codi_jax.models.unet import UNet

UNCONDITIONAL = dict(
    _class_name="UNet2DModel",
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=[16, 32],
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=["DownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=8,
)
CONDITIONAL = dict(
    _class_name="UNet2DConditionModel",
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=[16, 32],
    layers_per_block=2,
    norm_num_groups=8,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[1, 4],
    cross_attention_dim=24,
    use_linear_projection=False,
)
TIMESTEPS = np.array([3.0, 817.0], np.float32)


# ---------------------------------------------------------------- configs (no torch needed)


def test_unconditional_config() -> None:
    fields = unet_config_from_diffusers(UNCONDITIONAL)
    assert fields == dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_levels=(False, True),
        norm_num_groups=8,
        norm_eps=1e-5,
        dropout=0.0,
        flip_sin_to_cos=True,
        freq_shift=0.0,
        mid_attention=True,
        attention_head_dim=8,
        cross_attention_dim=None,
    )
    UNet(**fields)  # every field is a UNet field
    # attention_head_dim=None is one head of all channels per block in diffusers.
    single_head = unet_config_from_diffusers({**UNCONDITIONAL, "attention_head_dim": None, "add_attention": False})
    assert single_head["attention_head_dim"] == 32 and not single_head["mid_attention"]


def test_conditional_config_heads() -> None:
    fields = unet_config_from_diffusers(CONDITIONAL)
    assert fields["cross_attention_dim"] == 24 and fields["attention_head_dim"] == 8 and fields["mid_attention"]
    # SD 2.x: 5/10/20/20 heads on 320/640/1280/1280 channels = 64 channels per head.
    sd2 = unet_config_from_diffusers(
        {
            **CONDITIONAL,
            "block_out_channels": [320, 640, 1280, 1280],
            "norm_num_groups": 32,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "attention_head_dim": [5, 10, 20, 20],
            "cross_attention_dim": 1024,
            "use_linear_projection": True,
        }
    )
    assert sd2["attention_head_dim"] == 64 and sd2["attention_levels"] == (True, True, True, False)
    # SD 1.x: 8 heads at every level -> 40 / 80 / 160 channels per head, which one head_dim cannot express.
    with pytest.raises(UnsupportedDiffusersConfig, match="channels-per-head"):
        unet_config_from_diffusers(
            {
                **CONDITIONAL,
                "block_out_channels": [320, 640, 1280, 1280],
                "norm_num_groups": 32,
                "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                "attention_head_dim": 8,
            }
        )


@pytest.mark.parametrize(
    "override, match",
    [
        ({"down_block_types": ["DownBlock2D", "AttnSkipDownBlock2D"]}, "AttnSkipDownBlock2D"),
        ({"up_block_types": ["UpBlock2D", "UpBlock2D"]}, "do not mirror"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        ({"num_class_embeds": 10}, "num_class_embeds"),
        ({"attn_norm_num_groups": 4}, "attn_norm_num_groups"),
        ({"attention_head_dim": 12}, "does not divide 32"),
        ({"_class_name": "UNet1DModel"}, "UNet1DModel"),
    ],
)
def test_unsupported_unconditional_configs(override: dict[str, Any], match: str) -> None:
    with pytest.raises(UnsupportedDiffusersConfig, match=match):
        unet_config_from_diffusers({**UNCONDITIONAL, **override})


@pytest.mark.parametrize(
    "override, match",
    [
        ({"down_block_types": ["DownBlock2D", "SimpleCrossAttnDownBlock2D"]}, "SimpleCrossAttnDownBlock2D"),
        ({"transformer_layers_per_block": 2}, "transformer_layers_per_block"),
        ({"addition_embed_type": "text_time"}, "addition_embed_type"),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
        ({"only_cross_attention": True}, "only_cross_attention"),
    ],
)
def test_unsupported_conditional_configs(override: dict[str, Any], match: str) -> None:
    with pytest.raises(UnsupportedDiffusersConfig, match=match):
        unet_config_from_diffusers({**CONDITIONAL, **override})


def _fake_state_dict(model: UNet) -> dict[str, np.ndarray]:
    """A diffusers-layout state dict for ``model`` built from our shapes (inverse layout changes)."""
    from codi_jax.models.convert_diffusers import _torch_name

    rng = np.random.RandomState(0)
    state = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(unet_param_shapes(model))[0]:
        path = tuple(k.key for k in key_path)
        value = rng.randn(*leaf.shape).astype(np.float32)
        if len(leaf.shape) == 4:
            value = value.transpose(3, 2, 0, 1)
        elif len(leaf.shape) == 2:
            value = value.T
        state[_torch_name(path)] = value
    return state


def test_names_layouts_and_state_dict_errors() -> None:
    model = UNet(**unet_config_from_diffusers(UNCONDITIONAL))
    state = _fake_state_dict(model)
    assert "down_blocks.0.resnets.0.conv1.weight" in state and "up_blocks.0.resnets.1.conv_shortcut.weight" in state
    assert "mid_block.attentions.0.to_out.0.weight" in state and "time_embedding.linear_1.weight" in state
    params = unet_params_from_diffusers(state, model)
    np.testing.assert_array_equal(
        params["down_blocks_0"]["resnets_0"]["conv1"]["kernel"],
        state["down_blocks.0.resnets.0.conv1.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        params["time_embedding"]["linear_1"]["kernel"], state["time_embedding.linear_1.weight"].T
    )
    np.testing.assert_array_equal(params["conv_norm_out"]["scale"], state["conv_norm_out.weight"])

    # Old checkpoints' attention names (query/key/value/proj_attn) are renamed as diffusers does.
    old = {
        k.replace("attentions.0.to_q.", "attentions.0.query.").replace(
            "attentions.0.to_out.0.", "attentions.0.proj_attn."
        ): v
        for k, v in state.items()
    }
    assert "mid_block.attentions.0.query.weight" in old
    old_params = unet_params_from_diffusers(old, model)
    jax.tree.map(np.testing.assert_array_equal, old_params, params)

    bad = dict(state)
    bad["up_blocks.0.resnets.1.conv1.weight"] = np.zeros((32, 40, 3, 3), np.float32)
    with pytest.raises(
        ValueError, match=r"up_blocks\.0\.resnets\.1\.conv1\.weight.*up_blocks_0/resnets_1/conv1/kernel"
    ):
        unet_params_from_diffusers(bad, model)
    missing = dict(state)
    del missing["mid_block.resnets.1.norm2.bias"]
    with pytest.raises(ValueError, match=r"1 parameters missing.*mid_block\.resnets\.1\.norm2\.bias"):
        unet_params_from_diffusers(missing, model)
    extra = {**state, "class_embedding.weight": np.zeros((10, 64), np.float32)}
    with pytest.raises(ValueError, match="class_embedding.weight"):
        unet_params_from_diffusers(extra, model)


def test_load_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_diffusers_unet(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text(json.dumps(UNCONDITIONAL))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_diffusers_unet(str(tmp_path))
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="save it as safetensors"):
        load_diffusers_unet(str(tmp_path))
    weights_only = tmp_path / "elsewhere"
    weights_only.mkdir()
    (weights_only / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_diffusers_unet(str(weights_only / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**UNCONDITIONAL, "down_block_types": ["K", "AttnDownBlock2D"]}))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedDiffusersConfig, match="'K'"):
        load_diffusers_unet(str(tmp_path))


# ---------------------------------------------------------------- equivalence with diffusers


def _perturbed(module: Any, seed: int) -> Any:
    """Randomises every parameter (norm scales / biases too, so swapped names cannot pass)."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return module.eval()


def _save_pretrained_files(module: Any, config: dict[str, Any], directory: str) -> None:
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**config, "_diffusers_version": "0.42.1"}, f)
    save_file(
        {k: v.numpy() for k, v in module.state_dict().items()},
        os.path.join(directory, "diffusion_pytorch_model.safetensors"),
    )


def _compare(reference: np.ndarray, ours: jax.Array) -> None:
    ours_nchw = np.asarray(ours).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(ours_nchw, reference, atol=1e-4, rtol=1e-4)


def test_unet2d_model_matches_diffusers(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    config = {k: v for k, v in UNCONDITIONAL.items() if k != "_class_name"}
    reference_model = _perturbed(diffusers.UNet2DModel(**config), seed=1)
    sample = np.random.RandomState(0).randn(2, 3, 16, 16).astype(np.float32)
    with torch.no_grad():
        reference = reference_model(torch.from_numpy(sample), torch.from_numpy(TIMESTEPS)).sample.numpy()

    model = UNet(**unet_config_from_diffusers(dict(reference_model.config)))
    params = unet_params_from_diffusers(reference_model.state_dict(), model)
    apply = jax.jit(model.apply)
    _compare(reference, apply({"params": params}, jnp.asarray(sample.transpose(0, 2, 3, 1)), TIMESTEPS))

    # Through the files: config.json + diffusion_pytorch_model.safetensors, by directory and by file.
    directory = str(tmp_path / "unet2d")
    _save_pretrained_files(reference_model, UNCONDITIONAL, directory)
    for path in (directory, os.path.join(directory, "diffusion_pytorch_model.safetensors")):
        loaded_model, loaded_params = load_diffusers_unet(path)
        assert loaded_model == model
        jax.tree.map(np.testing.assert_array_equal, loaded_params, params)


def test_unet2d_condition_model_matches_diffusers(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    config = {k: v for k, v in CONDITIONAL.items() if k != "_class_name"}
    reference_model = _perturbed(diffusers.UNet2DConditionModel(**config), seed=2)
    sample = np.random.RandomState(0).randn(2, 4, 16, 16).astype(np.float32)
    context = np.random.RandomState(1).randn(2, 5, 24).astype(np.float32)
    with torch.no_grad():
        reference = reference_model(
            torch.from_numpy(sample), torch.from_numpy(TIMESTEPS), torch.from_numpy(context)
        ).sample.numpy()

    # A pipeline directory: the UNet lives in unet/ (with SD 1.x-style 1x1-conv projections).
    _save_pretrained_files(reference_model, CONDITIONAL, str(tmp_path / "pipeline" / "unet"))
    model, params = load_diffusers_unet(str(tmp_path / "pipeline"))
    assert model.cross_attention_dim == 24 and model.layers_per_block == 2
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(sample.transpose(0, 2, 3, 1)), TIMESTEPS, context)
    _compare(reference, out)
