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

from codi_jax.interop.torch_to_flax import (
    UnsupportedDiffusersConfig,
    controlnet_config_from_diffusers,
    controlnet_param_shapes,
    controlnet_params_from_diffusers,
    load_diffusers_controlnet,
    load_diffusers_unet,
    unet_config_from_diffusers,
    unet_param_shapes,
    unet_params_from_diffusers,
)
from codi_jax.models.adapters import ConditionalModel, ControlNet
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
# diffusers' stable-diffusion-v1-5 unet/config.json, written out (defaults of omitted fields apply).
SD15 = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# stable-diffusion-2-1's: heads [5, 10, 20, 20] (64 channels per head), linear projections, fp32 scores.
SD21 = {
    **SD15,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "sample_size": 96,
    "use_linear_projection": True,
    "upcast_attention": True,
    "dual_cross_attention": False,
    "num_class_embeds": None,
}


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
    assert fields["use_linear_projection"] is False and "num_attention_heads" not in fields
    # SD 2.x: 5/10/20/20 heads on 320/640/1280/1280 channels = 64 channels per head.
    sd2 = unet_config_from_diffusers(SD21)
    assert sd2["attention_head_dim"] == 64 and sd2["attention_levels"] == (True, True, True, False)
    assert sd2["use_linear_projection"] is True and "num_attention_heads" not in sd2
    # SD 1.x: 8 heads at every level -> 40 / 80 / 160 channels per head: heads per level.
    sd1 = unet_config_from_diffusers(SD15)
    assert sd1["num_attention_heads"] == (8, 8, 8, 8) and "attention_head_dim" not in sd1
    assert sd1["use_linear_projection"] is False and sd1["cross_attention_dim"] == 768
    # num_attention_heads, where given, wins over attention_head_dim (as in diffusers).
    given = unet_config_from_diffusers({**SD15, "num_attention_heads": [5, 10, 20, 20]})
    assert given["attention_head_dim"] == 64


def test_sd_param_counts() -> None:
    """Our trees for SD 1.5's UNet and an SD 1.5 ControlNet hold exactly diffusers' parameter counts
    (counted from diffusers on the meta device: 859,520,964 and 361,279,120; SD 2.1's UNet: 865,910,724,
    the same tree as SD 1.5's but for the 1024-wide context and linear projections)."""

    def count(shapes: Any) -> int:
        return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))

    sd15 = unet_param_shapes(UNet(**unet_config_from_diffusers(SD15)))
    assert count(sd15) == 859_520_964
    assert sd15["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].shape == (1, 1, 320, 320)  # a 1x1 conv
    controlnet_fields = {k: v for k, v in SD15.items() if k not in ("up_block_types", "out_channels", "sample_size")}
    controlnet = ControlNet(**controlnet_config_from_diffusers({**controlnet_fields, "_class_name": "ControlNetModel"}))
    assert controlnet.hint_channels == (16, 32, 96, 256) and controlnet.hint_downsamples == 3
    assert count(controlnet_param_shapes(controlnet)) == 361_279_120


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
        ({"transformer_layers_per_block": [[1, 1], [2, 2]]}, "transformer_layers_per_block"),
        ({"addition_embed_type": "text_time"}, "addition_embed_type"),  # without its widths
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
        ({"only_cross_attention": True}, "only_cross_attention"),
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"attention_head_dim": [1, 3]}, r"attention_head_dim=\[1, 3\]: 3 heads on 32 channels"),
        ({"attention_head_dim": [1, 4, 4]}, "attention_head_dim has 3 entries for 2 levels"),
        ({"num_attention_heads": 5}, "num_attention_heads=5: 5 heads on 32 channels"),
    ],
)
def test_unsupported_conditional_configs(override: dict[str, Any], match: str) -> None:
    with pytest.raises(UnsupportedDiffusersConfig, match=match):
        unet_config_from_diffusers({**CONDITIONAL, **override})


def _fake_state_dict(model: UNet) -> dict[str, np.ndarray]:
    """A diffusers-layout state dict for ``model`` built from our shapes (inverse layout changes)."""
    from codi_jax.interop.torch_to_flax import _torch_name

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


def _compare(reference: np.ndarray, ours: jax.Array, what: str, rel: float = 1e-5) -> None:
    """max |ours - reference| <= rel * max(1, max |reference|), ours NHWC vs reference NCHW."""
    ours_nchw = np.asarray(ours).transpose(0, 3, 1, 2)
    assert ours_nchw.shape == reference.shape, (what, ours_nchw.shape, reference.shape)
    error, scale = float(np.max(np.abs(ours_nchw - reference))), float(np.max(np.abs(reference)))
    print(f"{what}: max abs err {error:.3g} (max |ref| {scale:.3g})")
    assert error <= rel * max(1.0, scale), (what, error, scale)


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
    out = apply({"params": params}, jnp.asarray(sample.transpose(0, 2, 3, 1)), TIMESTEPS)
    _compare(reference, out, "UNet2DModel")

    # Through the files: config.json + diffusion_pytorch_model.safetensors, by directory and by file.
    directory = str(tmp_path / "unet2d")
    _save_pretrained_files(reference_model, UNCONDITIONAL, directory)
    for path in (directory, os.path.join(directory, "diffusion_pytorch_model.safetensors")):
        loaded_model, loaded_params = load_diffusers_unet(path)
        assert loaded_model == model
        jax.tree.map(np.testing.assert_array_equal, loaded_params, params)


# Tiny SD-shaped layouts: cross-attention at every level but the last, mid-block attention, text context.
# SD 1.x-like: attention_head_dim=2 means 2 heads everywhere (8 channels per head at level 0, 16 in the
# middle block) and 1x1-conv proj_in / proj_out. SD 2.x-like: per-level heads [2, 4] (8 channels per
# head everywhere), linear projections, upcast_attention (one res-block per level, to compile faster).
SD15_TINY = dict(
    _class_name="UNet2DConditionModel",
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=[16, 32],
    layers_per_block=2,
    norm_num_groups=8,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=2,
    cross_attention_dim=24,
)
SD21_TINY = dict(
    SD15_TINY, layers_per_block=1, attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True
)
HINT_CHANNELS = (4, 8, 8, 16)  # 3 stride-2 stages: the condition is at 8x the latent size


def _diffusers_unet(config: dict[str, Any], seed: int) -> Any:
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)  # diffusers' own initialisation draws from the global generator
    return _perturbed(diffusers.UNet2DConditionModel(**{k: v for k, v in config.items() if k != "_class_name"}), seed)


def _unet_inputs(size: int) -> tuple[np.ndarray, np.ndarray]:
    sample = np.random.RandomState(0).randn(2, 4, size, size).astype(np.float32)
    context = np.random.RandomState(1).randn(2, 5, 24).astype(np.float32)
    return sample, context


def _reference_unet(reference_model: Any, sample: np.ndarray, context: np.ndarray, **residuals: Any) -> np.ndarray:
    import torch

    with torch.no_grad():
        args = (torch.from_numpy(sample), torch.from_numpy(TIMESTEPS), torch.from_numpy(context))
        return reference_model(*args, **residuals).sample.numpy()


def test_sd15_layout_unet_matches_diffusers(tmp_path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    reference_model = _diffusers_unet(SD15_TINY, seed=2)
    sample, context = _unet_inputs(16)
    reference = _reference_unet(reference_model, sample, context)

    # A pipeline directory: the UNet lives in unet/.
    _save_pretrained_files(reference_model, SD15_TINY, str(tmp_path / "pipeline" / "unet"))
    model, params = load_diffusers_unet(str(tmp_path / "pipeline"))
    assert model.num_attention_heads == (2, 2) and not model.use_linear_projection
    assert params["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].shape == (1, 1, 16, 16)
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(sample.transpose(0, 2, 3, 1)), TIMESTEPS, context)
    _compare(reference, out, "UNet2DConditionModel SD 1.x layout")


def test_sd21_layout_unet_matches_diffusers() -> None:
    pytest.importorskip("torch")
    reference_model = _diffusers_unet(SD21_TINY, seed=3)
    sample, context = _unet_inputs(16)
    reference = _reference_unet(reference_model, sample, context)

    model = UNet(**unet_config_from_diffusers(dict(reference_model.config)))
    assert model.attention_head_dim == 8 and model.num_attention_heads is None and model.use_linear_projection
    params = unet_params_from_diffusers(reference_model.state_dict(), model)
    assert params["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].shape == (16, 16)
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(sample.transpose(0, 2, 3, 1)), TIMESTEPS, context)
    _compare(reference, out, "UNet2DConditionModel SD 2.x layout")


@pytest.fixture(scope="module")
def controlnet_run(tmp_path_factory) -> dict[str, Any]:
    """A perturbed tiny diffusers UNet + ControlNetModel (SD 1.x layout), their outputs, and ours."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("safetensors")
    unet = _diffusers_unet(SD15_TINY, seed=4)
    torch.manual_seed(5)
    controlnet = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS)
    controlnet = _perturbed(controlnet, seed=5)  # diffusers zero-inits the zero convs and hint conv_out
    directory = str(tmp_path_factory.mktemp("controlnet"))
    controlnet.save_pretrained(directory)
    sample, context = _unet_inputs(8)
    cond = np.random.RandomState(2).uniform(0, 1, (2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        down, mid = controlnet(
            torch.from_numpy(sample),
            torch.from_numpy(TIMESTEPS),
            torch.from_numpy(context),
            torch.from_numpy(cond),
            return_dict=False,
        )
    residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    reference = dict(down=[d.numpy() for d in down], mid=mid.numpy())
    reference["out"] = _reference_unet(unet, sample, context, **residuals)

    adapter, adapter_params = load_diffusers_controlnet(directory)
    backbone = UNet(**unet_config_from_diffusers(dict(unet.config)))
    params = {"backbone": unet_params_from_diffusers(unet.state_dict(), backbone), "adapter": adapter_params}
    model = ConditionalModel(backbone=backbone, adapter=adapter)

    @jax.jit
    def run(params, x, cond, context):
        hooks = adapter.apply({"params": params["adapter"]}, x, TIMESTEPS, cond, None, context)
        return hooks, model.apply({"params": params}, x, TIMESTEPS, cond, None, context)

    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
    hooks, out = run(params, nhwc(sample), nhwc(cond), context)
    ours = dict(down=hooks["down_residuals"], mid=hooks["mid_residual"], out=out)
    return dict(reference=reference, ours=ours, adapter=adapter, adapter_params=adapter_params, directory=directory)


def test_controlnet_residuals_match_diffusers(controlnet_run: dict[str, Any]) -> None:
    reference, ours = controlnet_run["reference"], controlnet_run["ours"]
    adapter = controlnet_run["adapter"]
    assert adapter.hint_channels == HINT_CHANNELS and adapter.hint_downsamples == 3 and adapter.cond_channels == 3
    assert adapter.num_attention_heads == (2, 2) and not adapter.use_linear_projection
    assert len(ours["down"]) == len(reference["down"]) == 6
    for k, (ref, got) in enumerate(zip(reference["down"], ours["down"])):
        _compare(ref, got, f"ControlNet down residual {k}")
    _compare(reference["mid"], ours["mid"], "ControlNet mid residual")


def test_controlnet_conditioned_unet_matches_diffusers(controlnet_run: dict[str, Any]) -> None:
    """UNet2DConditionModel with the ControlNetModel's residuals added (as StableDiffusionControlNetPipeline
    does) equals our ConditionalModel(backbone, ControlNet)."""
    _compare(controlnet_run["reference"]["out"], controlnet_run["ours"]["out"], "UNet + ControlNet output")


def test_controlnet_load_paths_and_errors(controlnet_run: dict[str, Any], tmp_path) -> None:
    directory = controlnet_run["directory"]
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    os.symlink(directory, pipeline / "controlnet")
    for path in (str(pipeline), os.path.join(directory, "diffusion_pytorch_model.safetensors")):
        adapter, params = load_diffusers_controlnet(path)
        assert adapter == controlnet_run["adapter"]
        jax.tree.map(np.testing.assert_array_equal, params, controlnet_run["adapter_params"])
    with pytest.raises(FileNotFoundError, match="controlnet/"):
        load_diffusers_controlnet(str(tmp_path))
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    for override, match in [
        ({"controlnet_conditioning_channel_order": "bgr"}, "controlnet_conditioning_channel_order"),
        ({"global_pool_conditions": True}, "global_pool_conditions"),
        ({"transformer_layers_per_block": [[1], [2, 2]]}, "transformer_layers_per_block"),
        ({"addition_embed_type": "text"}, "addition_embed_type"),
        ({"_class_name": "UNet2DConditionModel"}, "expected a ControlNetModel"),
    ]:
        with pytest.raises(UnsupportedDiffusersConfig, match=match):
            controlnet_config_from_diffusers({**config, **override})
    state = {k: v.numpy() for k, v in _diffusers_unet(SD15_TINY, seed=6).state_dict().items()}
    with pytest.raises(ValueError, match=r"parameters missing.*controlnet_cond_embedding\.blocks\.0\.weight"):
        controlnet_params_from_diffusers(state, controlnet_run["adapter"])
