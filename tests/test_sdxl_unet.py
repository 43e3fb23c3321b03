"""SDXL's UNet2DConditionModel / ControlNetModel (several transformer blocks per attention, the
``text_time`` added conditioning) -> our UNet / ControlNet: configs, the real SDXL parameter counts,
context errors, equal outputs on tiny random models (``tests/tiny_sdxl.py``) and the export round trip.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.interop import flax_to_torch
from codi_jax.interop.torch_to_flax import (
    UnsupportedDiffusersConfig,
    controlnet_config_from_diffusers,
    controlnet_param_shapes,
    controlnet_params_from_diffusers,
    unet_config_from_diffusers,
    unet_param_shapes,
    unet_params_from_diffusers,
)
from codi_jax.models.adapters import ControlNet
from codi_jax.models.unet import UNet
from tests import tiny_sdxl
from tests.test_convert_diffusers import SD15, SD21, _compare

TIMESTEPS = np.array([3.0, 817.0], np.float32)
# diffusers' stable-diffusion-xl-base-1.0 unet/config.json, written out (defaults of omitted fields apply).
SDXL_BASE = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}
# diffusers/controlnet-canny-sdxl-1.0's config.json: the SDXL UNet's encoder and an x8 hint network.
SDXL_CONTROLNET = {
    "_class_name": "ControlNetModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "class_embed_type": None,
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "global_pool_conditions": False,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_time_scale_shift": "default",
    "transformer_layers_per_block": [1, 2, 10],
    "upcast_attention": None,
    "use_linear_projection": True,
}
TINY_FIELDS = unet_config_from_diffusers(tiny_sdxl.UNET)


def _count(tree: Any) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


# ---------------------------------------------------------------- configs (no torch needed)


def test_sdxl_config_fields() -> None:
    fields = unet_config_from_diffusers(SDXL_BASE)
    assert fields["transformer_layers_per_block"] == (1, 2, 10) and fields["attention_levels"] == (False, True, True)
    assert (
        fields["attention_head_dim"] == 64 and fields["use_linear_projection"] and fields["cross_attention_dim"] == 2048
    )
    assert (fields["addition_embed_type"], fields["addition_time_embed_dim"]) == ("text_time", 256)
    assert fields["projection_class_embeddings_input_dim"] == 2816
    # diffusers' int form is one count per level; SD 1.x / 2.x configs get none of the new fields.
    assert unet_config_from_diffusers({**SDXL_BASE, "transformer_layers_per_block": 2})[
        "transformer_layers_per_block"
    ] == (2, 2, 2)
    new = {"transformer_layers_per_block", "addition_embed_type", "addition_time_embed_dim"}
    new.add("projection_class_embeddings_input_dim")
    for sd in (SD15, SD21, {**SD15, "transformer_layers_per_block": [1, 1, 1, 1]}):
        assert not new & set(unet_config_from_diffusers(sd))
    adapter = controlnet_config_from_diffusers(SDXL_CONTROLNET)
    assert adapter["transformer_layers_per_block"] == (1, 2, 10) and adapter["addition_embed_type"] == "text_time"
    assert adapter["hint_channels"] == (16, 32, 96, 256) and adapter["hint_downsamples"] == 3


@pytest.mark.parametrize(
    "override, match",
    [
        ({"addition_embed_type": "text"}, r"addition_embed_type='text' is not supported"),
        ({"addition_time_embed_dim": None}, r"needs addition_time_embed_dim \(a width\), got None"),
        ({"projection_class_embeddings_input_dim": None}, "needs projection_class_embeddings_input_dim"),
        ({"addition_embed_type": None}, "projection_class_embeddings_input_dim=2816 is not supported"),
        ({"reverse_transformer_layers_per_block": [[10, 10, 10], [2, 2, 2], [1, 1, 1]]}, "reverse_transformer_layers"),
        ({"transformer_layers_per_block": [[1, 1], [2, 2], [10, 10]]}, "transformer_layers_per_block=.*one int"),
        ({"transformer_layers_per_block": [1, 2]}, "transformer_layers_per_block has 2 entries for 3 levels"),
        ({"transformer_layers_per_block": 0}, "transformer_layers_per_block=0"),
    ],
)
def test_sdxl_refusals(override: dict[str, Any], match: str) -> None:
    with pytest.raises(UnsupportedDiffusersConfig, match=match):
        unet_config_from_diffusers({**SDXL_BASE, **override})
    with pytest.raises(UnsupportedDiffusersConfig, match=match):
        controlnet_config_from_diffusers({**SDXL_CONTROLNET, **override})


def test_context_errors() -> None:
    """A text_time UNet reads a dict context; errors are one line naming what is missing."""
    model = UNet(**TINY_FIELDS)
    data = tiny_sdxl.inputs()
    sample = jnp.asarray(data["sample"].transpose(0, 2, 3, 1))
    params = unet_param_shapes(model)
    apply = lambda context: jax.eval_shape(model.apply, {"params": params}, sample, TIMESTEPS, context)
    assert apply(tiny_sdxl.context(data)).shape == sample.shape
    with pytest.raises(
        ValueError, match=r"^A text_time UNet needs context=.* got an array of shape \(2, 5, 32\), missing \['tokens', "
    ):
        apply(data["tokens"])
    without_ids = {k: v for k, v in tiny_sdxl.context(data).items() if k != "time_ids"}
    with pytest.raises(ValueError, match=r"missing \['time_ids'\]"):
        apply(without_ids)
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim is 64"):
        apply({**tiny_sdxl.context(data), "time_ids": data["time_ids"][:, :5]})
    plain = UNet(
        **unet_config_from_diffusers(
            {**tiny_sdxl.UNET, "addition_embed_type": None, "projection_class_embeddings_input_dim": None}
        )
    )
    with pytest.raises(ValueError, match="no addition_embed_type: context must be a token array"):
        jax.eval_shape(plain.init, jax.random.PRNGKey(0), sample, TIMESTEPS, tiny_sdxl.context(data))
    with pytest.raises(ValueError, match="addition_embed_type='text_time' needs addition_time_embed_dim"):
        jax.eval_shape(
            UNet(**{**TINY_FIELDS, "addition_time_embed_dim": None}).init,
            jax.random.PRNGKey(0),
            sample,
            TIMESTEPS,
            tiny_sdxl.context(data),
        )


def test_sdxl_param_counts() -> None:
    """Our trees for SDXL base's UNet and an SDXL ControlNet (controlnet-canny-sdxl's shape) hold exactly
    diffusers' parameter counts (diffusers' models built on the meta device: no memory)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    strip = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**strip(SDXL_BASE))
        controlnet = diffusers.ControlNetModel(**strip(SDXL_CONTROLNET))
    theirs = sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in controlnet.parameters())
    unet_shapes = unet_param_shapes(UNet(**unet_config_from_diffusers(SDXL_BASE)))
    controlnet_shapes = controlnet_param_shapes(ControlNet(**controlnet_config_from_diffusers(SDXL_CONTROLNET)))
    ours = _count(unet_shapes), _count(controlnet_shapes)
    print(f"SDXL UNet: ours {ours[0]:,} diffusers {theirs[0]:,}")
    print(f"SDXL ControlNet: ours {ours[1]:,} diffusers {theirs[1]:,}")
    assert ours == theirs
    assert ours[0] == 2_567_463_684
    mid = unet_shapes["mid_block"]["attentions_0"]
    assert sorted(k for k in mid if k.startswith("transformer_blocks_")) == [
        f"transformer_blocks_{i}" for i in range(10)
    ]


# ---------------------------------------------------------------- equivalence with diffusers


@pytest.fixture(scope="module")
def sdxl_run() -> dict[str, Any]:
    """The perturbed tiny SDXL UNet + ControlNetModel, diffusers' outputs, and ours."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    unet = tiny_sdxl.make_unet(seed=0)
    controlnet = tiny_sdxl.make_controlnet(unet, seed=7)
    data = tiny_sdxl.inputs()
    sample, tokens, cond = (torch.from_numpy(data[k]) for k in ("sample", "tokens", "cond"))
    timesteps, added = torch.from_numpy(TIMESTEPS), tiny_sdxl.added_cond_kwargs(data)
    with torch.no_grad():
        plain = unet(sample, timesteps, tokens, added_cond_kwargs=added).sample.numpy()
        down, mid = controlnet(sample, timesteps, tokens, cond, added_cond_kwargs=added, return_dict=False)
        residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        controlled = unet(sample, timesteps, tokens, added_cond_kwargs=added, **residuals).sample.numpy()
    reference = dict(plain=plain, down=[d.numpy() for d in down], mid=mid.numpy(), controlled=controlled)

    backbone = UNet(**unet_config_from_diffusers(dict(unet.config)))
    adapter = ControlNet(**controlnet_config_from_diffusers(dict(controlnet.config)))
    params = {
        "backbone": unet_params_from_diffusers(unet.state_dict(), backbone),
        "adapter": controlnet_params_from_diffusers(controlnet.state_dict(), adapter),
    }
    # One compiled backbone (hooks as arguments; zero hooks give its plain output bit for bit) and one
    # adapter: ConditionalModel is exactly adapter then backbone, two fewer compilations than applying it.
    unet_fn = jax.jit(
        lambda p, x, context, down, mid: backbone.apply(
            {"params": p}, x, TIMESTEPS, context, down_residuals=down, mid_residual=mid
        )
    )
    adapter_fn = jax.jit(lambda p, x, cond, context: adapter.apply({"params": p}, x, TIMESTEPS, cond, None, context))
    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
    x, context = nhwc(data["sample"]), tiny_sdxl.context(data)
    hooks = adapter_fn(params["adapter"], x, nhwc(data["cond"]), context)
    down, mid = hooks["down_residuals"], hooks["mid_residual"]
    controlled = unet_fn(params["backbone"], x, context, down, mid)
    plain = unet_fn(params["backbone"], x, context, [jnp.zeros_like(d) for d in down], jnp.zeros_like(mid))
    ours = dict(plain=plain, down=down, mid=mid, controlled=controlled)
    return dict(
        unet=unet,
        controlnet=controlnet,
        backbone=backbone,
        adapter=adapter,
        params=params,
        reference=reference,
        ours=ours,
        data=data,
    )


def test_sdxl_unet_matches_diffusers(sdxl_run: dict[str, Any]) -> None:
    backbone, params = sdxl_run["backbone"], sdxl_run["params"]["backbone"]
    assert backbone.transformer_layers_per_block == (1, 2) and backbone.addition_embed_type == "text_time"
    assert sorted(params["up_blocks_0"]["attentions_2"]) == [
        "norm",
        "proj_in",
        "proj_out",
        "transformer_blocks_0",
        "transformer_blocks_1",
    ]
    assert "transformer_blocks_1" not in params["up_blocks_1"]["attentions_0"]  # level 0: one block
    assert params["add_embedding"]["linear_1"]["kernel"].shape == (
        tiny_sdxl.UNET["projection_class_embeddings_input_dim"],
        64,
    )
    _compare(sdxl_run["reference"]["plain"], sdxl_run["ours"]["plain"], "SDXL UNet2DConditionModel")
    # The added conditioning matters far above the tolerance: other time ids change diffusers' output.
    import torch

    data = sdxl_run["data"]
    swapped = tiny_sdxl.added_cond_kwargs({**data, "time_ids": data["time_ids"][::-1].copy()})
    args = (torch.from_numpy(data["sample"]), torch.from_numpy(TIMESTEPS), torch.from_numpy(data["tokens"]))
    with torch.no_grad():
        other = sdxl_run["unet"](*args, added_cond_kwargs=swapped).sample.numpy()
    assert float(np.max(np.abs(other - sdxl_run["reference"]["plain"]))) > 1e-2


def test_sdxl_controlnet_residuals_match_diffusers(sdxl_run: dict[str, Any]) -> None:
    reference, ours = sdxl_run["reference"], sdxl_run["ours"]
    assert "add_embedding" in sdxl_run["params"]["adapter"]
    assert len(ours["down"]) == len(reference["down"]) == 6
    for k, (ref, got) in enumerate(zip(reference["down"], ours["down"])):
        _compare(ref, got, f"SDXL ControlNet down residual {k}")
    _compare(reference["mid"], ours["mid"], "SDXL ControlNet mid residual")


def test_sdxl_controlnet_conditioned_unet_matches_diffusers(sdxl_run: dict[str, Any]) -> None:
    _compare(sdxl_run["reference"]["controlled"], sdxl_run["ours"]["controlled"], "SDXL UNet + ControlNet output")


def _rebuilt(cls: Any, config: dict[str, Any], state: dict[str, np.ndarray]) -> Any:
    """diffusers' ``cls`` built from an exported config, the exported state dict loaded strictly."""
    import torch

    module = cls(**{k: v for k, v in config.items() if not k.startswith("_")})
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return module.eval()


def test_sdxl_export_round_trip(sdxl_run: dict[str, Any]) -> None:
    """diffusers state dict -> ours -> diffusers state dict is the identity, and the exported configs
    rebuild the same architectures (diffusers' modules load the exported weights strictly and compute
    the reference outputs)."""
    import diffusers
    import torch

    unet, controlnet = sdxl_run["unet"], sdxl_run["controlnet"]
    backbone, adapter = sdxl_run["backbone"], sdxl_run["adapter"].clone(hint_unit_range=True)
    params = sdxl_run["params"]
    pairs = [
        (unet, flax_to_torch.unet_state_dict(backbone, params["backbone"])),
        (controlnet, flax_to_torch.controlnet_state_dict(adapter, params["adapter"])),
    ]
    for module, exported in pairs:
        original = {k: v.numpy() for k, v in module.state_dict().items()}
        assert sorted(exported) == sorted(original)
        for name, value in original.items():
            np.testing.assert_array_equal(exported[name], value, err_msg=name)

    unet_config = flax_to_torch.unet_diffusers_config(backbone, tiny_sdxl.LATENT_SIZE)
    controlnet_config = flax_to_torch.controlnet_diffusers_config(adapter)
    assert unet_config["transformer_layers_per_block"] == [1, 2]
    assert controlnet_config["addition_embed_type"] == "text_time" and controlnet_config["addition_time_embed_dim"] == 8
    rebuilt_unet = _rebuilt(diffusers.UNet2DConditionModel, unet_config, pairs[0][1])
    rebuilt_controlnet = _rebuilt(diffusers.ControlNetModel, controlnet_config, pairs[1][1])
    assert UNet(**unet_config_from_diffusers(unet_config)) == backbone
    data = sdxl_run["data"]
    sample, tokens, cond = (torch.from_numpy(data[k]) for k in ("sample", "tokens", "cond"))
    timesteps, added = torch.from_numpy(TIMESTEPS), tiny_sdxl.added_cond_kwargs(data)
    with torch.no_grad():
        out = rebuilt_unet(sample, timesteps, tokens, added_cond_kwargs=added).sample.numpy()
        _, mid = rebuilt_controlnet(sample, timesteps, tokens, cond, added_cond_kwargs=added, return_dict=False)
    np.testing.assert_array_equal(out, sdxl_run["reference"]["plain"])
    np.testing.assert_array_equal(mid.numpy(), sdxl_run["reference"]["mid"])
