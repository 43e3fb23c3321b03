"""Diffusers (PyTorch) UNet / VAE / ControlNet weights -> this codebase's flax parameters.

Supports diffusers' ``UNet2DModel`` (``DownBlock2D`` / ``AttnDownBlock2D`` blocks, ``UNetMidBlock2D``),
``UNet2DConditionModel`` (``DownBlock2D`` / ``CrossAttnDownBlock2D`` blocks with
``transformer_layers_per_block`` ``BasicTransformerBlock`` s each, ``UNetMidBlock2DCrossAttn``: the SD 1.x,
2.x and SDXL layouts, heads per level, conv or linear ``proj_in`` / ``proj_out``, SDXL's
``addition_embed_type="text_time"``), ``AutoencoderKL``, ``ControlNetModel`` (for
``adapters.ControlNet``, SDXL's included) and ``SD3Transformer2DModel`` (SD3 / SD3.5's MMDiT, for
``dit.DiT`` with ``joint_attention_dim``). Our modules are named like
diffusers' (``down_blocks_0/resnets_1/conv1`` <-> ``down_blocks.0.resnets.1.conv1``), so the
conversion is a name mapping plus layout changes:

- conv ``weight`` (out, in, kh, kw) -> ``kernel`` (kh, kw, in, out);
- linear ``weight`` (out, in) -> ``kernel`` (in, out) (also from a 1x1 conv where our layer is
  linear, as old VAE attention projections are stored: a 1x1 conv is the same per-pixel map; SD 1.x's
  1x1-conv ``proj_in`` / ``proj_out`` are 1x1 convs in our UNet too, ``use_linear_projection=False``);
- norm ``weight`` -> ``scale``; ``bias`` -> ``bias``.

Only the reading of the safetensors file needs a package beyond numpy (``safetensors``); torch
is never imported. State dicts from ``model.state_dict()`` (torch tensors) are accepted too.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.interop import torch_state
from codi_jax.models.adapters import ControlNet
from codi_jax.models.dit import QK_NORMS, DiT, pos_embed_table
from codi_jax.models.dit_controlnet import DiTControlNet
from codi_jax.models.unet import UNet
from codi_jax.models.vae import AutoencoderKL, vae_from_diffusers_config, vae_param_shapes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

_UNCONDITIONAL_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UNCONDITIONAL_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}
_CONDITIONAL_DOWN = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
_CONDITIONAL_UP = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
_UP_OF_DOWN = {
    "DownBlock2D": "UpBlock2D",
    "AttnDownBlock2D": "AttnUpBlock2D",
    "CrossAttnDownBlock2D": "CrossAttnUpBlock2D",
}

# (field, value(s) we can represent); a config.json without the field gets diffusers' default,
# which is always the first supported value.
_COMMON_REQUIREMENTS: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("center_input_sample", (False,)),
    ("time_embedding_type", ("positional",)),
    ("class_embed_type", (None,)),
    ("num_class_embeds", (None,)),
    ("act_fn", ("silu",)),
    ("resnet_time_scale_shift", ("default",)),
    ("downsample_padding", (1,)),
    ("mid_block_scale_factor", (1, 1.0)),
)
_UNCONDITIONAL_REQUIREMENTS = _COMMON_REQUIREMENTS + (
    ("downsample_type", ("conv",)),
    ("upsample_type", ("conv",)),
)
_CONDITIONAL_REQUIREMENTS = _COMMON_REQUIREMENTS + (
    ("dual_cross_attention", (False,)),
    ("addition_embed_type", (None, "text_time")),
    ("encoder_hid_dim", (None,)),
    ("encoder_hid_dim_type", (None,)),
    ("time_embedding_act_fn", (None,)),
    ("timestep_post_act", (None,)),
    ("time_cond_proj_dim", (None,)),
    ("conv_in_kernel", (3,)),
    ("conv_out_kernel", (3,)),
    ("attention_type", ("default",)),
    ("class_embeddings_concat", (False,)),
    ("cross_attention_norm", (None,)),
    ("resnet_skip_time_act", (False,)),
    ("resnet_out_scale_factor", (1.0, 1)),
    ("reverse_transformer_layers_per_block", (None,)),
)

# Old diffusers checkpoints name UNet2DModel's attention projections differently; diffusers
# renames them on load (``ModelMixin._convert_deprecated_attention_blocks``), and so do we.
_DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

# Our parameter path -> the diffusers state-dict name: module names with a numeric suffix are
# diffusers' ModuleList indices; leaves are renamed.
_torch_name = torch_state.torch_names(
    re.compile(
        r"^(controlnet_down_blocks|controlnet_blocks|down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers"
        r"|transformer_blocks"
        r"|to_out|net|blocks)_(\d+)(?:_(\w+))?$"
    ),
    {"kernel": "weight", "scale": "weight", "bias": "bias"},
    "diffusers",
)


class UnsupportedDiffusersConfig(ValueError):
    """The diffusers model uses a feature this codebase's ``UNet`` does not implement."""


def _unsupported(class_name: str, message: str) -> UnsupportedDiffusersConfig:
    return UnsupportedDiffusersConfig(f"Cannot convert diffusers {class_name}: {message}")


def _per_level(value: Any, levels: int, field: str, class_name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise _unsupported(class_name, f"{field} has {len(value)} entries for {levels} levels.")
        return tuple(value)
    return (value,) * levels


def _attention_flags(block_types: Any, table: Mapping[str, bool], field: str, class_name: str) -> list[bool]:
    flags = []
    for block_type in block_types:
        if block_type not in table:
            raise _unsupported(
                class_name, f"{field} entry {block_type!r} is not supported; supported: {sorted(table)}."
            )
        flags.append(table[block_type])
    return flags


def _check_requirements(config: Mapping[str, Any], requirements: Sequence[tuple[str, tuple]], class_name: str) -> None:
    for field, supported in requirements:
        value = config.get(field, supported[0])
        if value not in supported:
            raise _unsupported(class_name, f"{field}={value!r} is not supported (supported: {list(supported)}).")


def _mirrored_up_types(down_types: Sequence[str]) -> tuple[str, ...]:
    return tuple(_UP_OF_DOWN.get(t, t) for t in reversed(down_types))


def _attention_levels(config: Mapping[str, Any], conditional: bool, levels: int, class_name: str) -> tuple[bool, ...]:
    """Per level, whether its blocks attend; the up blocks must mirror the down blocks."""
    down_table, up_table = (
        (_CONDITIONAL_DOWN, _CONDITIONAL_UP) if conditional else (_UNCONDITIONAL_DOWN, _UNCONDITIONAL_UP)
    )
    default_down = (
        ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
        if conditional
        else (("DownBlock2D",) + ("AttnDownBlock2D",) * 3)
    )
    down_types = config.get("down_block_types", default_down)
    up_types = config.get("up_block_types", _mirrored_up_types(default_down))
    if len(down_types) != levels or len(up_types) != levels:
        raise _unsupported(
            class_name, f"{len(down_types)} down / {len(up_types)} up block types for {levels} block_out_channels."
        )
    attention_levels = _attention_flags(down_types, down_table, "down_block_types", class_name)
    up_attention = _attention_flags(up_types, up_table, "up_block_types", class_name)
    if up_attention != attention_levels[::-1]:
        raise _unsupported(
            class_name,
            f"up_block_types {list(up_types)} do not mirror down_block_types "
            f"{list(down_types)} (our up level i has attention iff down level i does).",
        )
    return tuple(attention_levels)


def _common_fields(config: Mapping[str, Any], conditional: bool, class_name: str) -> dict[str, Any]:
    """The UNet fields every diffusers UNet maps the same way (channels, levels, norms, time)."""
    block_out_channels = tuple(int(c) for c in config.get("block_out_channels", (224, 448, 672, 896)))
    layers_per_block = config.get("layers_per_block", 2)
    if isinstance(layers_per_block, (list, tuple)):
        if len(set(layers_per_block)) != 1:
            raise _unsupported(class_name, f"layers_per_block={list(layers_per_block)} varies per level.")
        layers_per_block = layers_per_block[0]
    norm_num_groups = config.get("norm_num_groups", 32)
    if norm_num_groups is None:
        raise _unsupported(class_name, "norm_num_groups=None (groups derived from channels) is not supported.")
    time_embedding_dim = config.get("time_embedding_dim")
    if time_embedding_dim not in (None, 4 * block_out_channels[0]):
        raise _unsupported(
            class_name,
            f"time_embedding_dim={time_embedding_dim} (we use 4 * block_out_channels[0] = "
            f"{4 * block_out_channels[0]}).",
        )
    return dict(
        in_channels=int(config.get("in_channels", 4 if conditional else 3)),
        out_channels=int(config.get("out_channels", 4 if conditional else 3)),
        block_out_channels=block_out_channels,
        layers_per_block=int(layers_per_block),
        attention_levels=_attention_levels(config, conditional, len(block_out_channels), class_name),
        norm_num_groups=int(norm_num_groups),
        norm_eps=float(config.get("norm_eps", 1e-5)),
        dropout=float(config.get("dropout", 0.0)),
        flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
        freq_shift=float(config.get("freq_shift", 0)),
    )


def _unconditional_attention(config: Mapping[str, Any], fields: Mapping[str, Any], class_name: str) -> dict:
    """``UNet2DModel``: ``attention_head_dim`` is channels per head (None: one head of all channels)."""
    block_out_channels, norm_num_groups = fields["block_out_channels"], fields["norm_num_groups"]
    mid_block_type = config.get("mid_block_type", "UNetMidBlock2D")
    if mid_block_type != "UNetMidBlock2D":
        raise _unsupported(class_name, f"mid_block_type={mid_block_type!r} (we always have a UNetMidBlock2D).")
    attn_groups = config.get("attn_norm_num_groups")
    if attn_groups not in (None, norm_num_groups):
        raise _unsupported(
            class_name, f"attn_norm_num_groups={attn_groups} differs from norm_num_groups={norm_num_groups}."
        )
    mid_attention = bool(config.get("add_attention", True))
    head_dim = config.get("attention_head_dim", 8)
    attended = [c for c, a in zip(block_out_channels, fields["attention_levels"]) if a]
    attended += [block_out_channels[-1]] if mid_attention else []
    if head_dim is None:
        # diffusers: one head of all channels per block. Ours: heads = max(1, channels // head_dim).
        head_dim = max(block_out_channels)
    else:
        for channels in attended:
            if channels % head_dim:
                raise _unsupported(class_name, f"attention_head_dim={head_dim} does not divide {channels} channels.")
    return dict(mid_attention=mid_attention, attention_head_dim=int(head_dim), cross_attention_dim=None)


def _conditional_heads(config: Mapping[str, Any], fields: Mapping[str, Any], class_name: str) -> dict[str, Any]:
    """Heads per level. For ``UNet2DConditionModel`` / ``ControlNetModel`` diffusers' ``attention_head_dim``
    is the number of heads (a historical misnomer) unless ``num_attention_heads`` is given.

    One channels-per-head for every attention block maps to ``attention_head_dim`` (as before
    per-level heads existed); otherwise the heads per level map to ``num_attention_heads``.
    """
    block_out_channels, attention_levels = fields["block_out_channels"], fields["attention_levels"]
    levels = len(block_out_channels)
    field = "num_attention_heads" if config.get("num_attention_heads") is not None else "attention_head_dim"
    num_heads = _per_level(config.get(field, 8), levels, field, class_name)
    blocks = {f"level {i}": i for i in range(levels) if attention_levels[i]}
    blocks["mid block"] = levels - 1
    per_block = {}
    for block, level in blocks.items():
        channels, heads = block_out_channels[level], num_heads[level]
        if not isinstance(heads, int) or heads < 1 or channels % heads:
            raise _unsupported(class_name, f"{field}={config.get(field)!r}: {heads!r} heads on {channels} channels.")
        per_block[block] = channels // heads
    distinct = set(per_block.values())
    if len(distinct) == 1:
        return dict(attention_head_dim=int(distinct.pop()))
    return dict(num_attention_heads=tuple(int(h) for h in num_heads))


def _conditional_attention(config: Mapping[str, Any], fields: Mapping[str, Any], class_name: str) -> dict:
    """``UNet2DConditionModel`` / ``ControlNetModel``: one transformer block per attention, SD 1.x / 2.x."""
    levels = len(fields["block_out_channels"])
    mid_block_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_block_type != "UNetMidBlock2DCrossAttn":
        raise _unsupported(class_name, f"mid_block_type={mid_block_type!r} (we support UNetMidBlock2DCrossAttn).")
    cross_attention_dim = config.get("cross_attention_dim", 1280)
    if isinstance(cross_attention_dim, (list, tuple)):
        if len(set(cross_attention_dim)) != 1:
            raise _unsupported(class_name, f"cross_attention_dim={list(cross_attention_dim)} varies per level.")
        cross_attention_dim = cross_attention_dim[0]
    values = set(_per_level(config.get("only_cross_attention", False), levels, "only_cross_attention", class_name))
    if values != {False}:
        raise _unsupported(
            class_name, f"only_cross_attention={config.get('only_cross_attention')!r} (we support False only)."
        )
    if config.get("mid_block_only_cross_attention") not in (None, False):
        raise _unsupported(class_name, "mid_block_only_cross_attention=True is not supported.")
    # upcast_attention (either value) needs nothing: our attention logits and softmax are always float32.
    return dict(
        mid_attention=True,
        **_conditional_heads(config, fields, class_name),
        cross_attention_dim=int(cross_attention_dim),
        use_linear_projection=bool(config.get("use_linear_projection", False)),
        **_transformer_layers(config, levels, class_name),
        **_addition_fields(config, class_name),
    )


def _transformer_layers(config: Mapping[str, Any], levels: int, class_name: str) -> dict[str, Any]:
    """``transformer_layers_per_block`` (an int or one count per level; the up blocks read the reversed
    list, the same count per level): no field where every count is 1 (SD 1.x / 2.x)."""
    value = config.get("transformer_layers_per_block", 1)
    counts = _per_level(value, levels, "transformer_layers_per_block", class_name)
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts):
        raise _unsupported(class_name, f"transformer_layers_per_block={value!r} (we support one int >= 1 per level).")
    return {} if set(counts) == {1} else dict(transformer_layers_per_block=tuple(int(c) for c in counts))


def _addition_fields(config: Mapping[str, Any], class_name: str) -> dict[str, Any]:
    """SDXL's ``addition_embed_type="text_time"`` and its widths; no fields without it."""
    kind = config.get("addition_embed_type")
    projection = config.get("projection_class_embeddings_input_dim")
    if kind is None:
        if projection is not None:
            raise _unsupported(
                class_name,
                f"projection_class_embeddings_input_dim={projection!r} is not supported (supported: [None]).",
            )
        return {}
    time_dim = config.get("addition_time_embed_dim")
    for field, width in (("addition_time_embed_dim", time_dim), ("projection_class_embeddings_input_dim", projection)):
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise _unsupported(class_name, f"addition_embed_type={kind!r} needs {field} (a width), got {width!r}.")
    return dict(
        addition_embed_type=kind,
        addition_time_embed_dim=int(time_dim),
        projection_class_embeddings_input_dim=int(projection),
    )


def _unet_fields(config: Mapping[str, Any], class_name: str) -> dict[str, Any]:
    conditional = class_name != "UNet2DModel"
    requirements = _CONDITIONAL_REQUIREMENTS if conditional else _UNCONDITIONAL_REQUIREMENTS
    _check_requirements(config, requirements, class_name)
    fields = _common_fields(config, conditional, class_name)
    attention = _conditional_attention if conditional else _unconditional_attention
    return {**fields, **attention(config, fields, class_name)}


def unet_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Maps a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` config (config.json) to ``UNet`` fields.

    SD 1.x, 2.x and SDXL layouts map exactly (heads per level, conv or linear transformer projections,
    ``upcast_attention``, ``transformer_layers_per_block``, ``addition_embed_type="text_time"``). Raises
    ``UnsupportedDiffusersConfig`` (a ``ValueError``) naming the field for architectures our ``UNet``
    cannot reproduce exactly (e.g. ``class_embed_type``, ``reverse_transformer_layers_per_block``).
    """
    config = dict(config)
    class_name = config.get("_class_name")
    if class_name is None:  # a bare config dict (e.g. ``dict(model.config)``): infer the class
        class_name = "UNet2DConditionModel" if config.get("cross_attention_dim") is not None else "UNet2DModel"
    if class_name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise _unsupported(class_name, "only UNet2DModel and UNet2DConditionModel are supported.")
    return _unet_fields(config, class_name)


def _normalise_names(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    renamed = {}
    for name, value in state_dict.items():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in _DEPRECATED_ATTENTION_NAMES and "attentions" in parts:
            name = ".".join(parts[:-2] + [_DEPRECATED_ATTENTION_NAMES[parts[-2]], parts[-1]])
        renamed[name] = value
    return renamed


def _convert_tensor(torch_name: str, our_path: str, tensor: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
    if len(expected) == 4:  # conv kernel: (out, in, kh, kw) -> (kh, kw, in, out)
        converted = tensor.transpose(2, 3, 1, 0) if tensor.ndim == 4 else tensor
    elif len(expected) == 2 and our_path.endswith("kernel"):  # linear: (out, in) -> (in, out)
        if tensor.ndim == 4 and tensor.shape[2:] == (1, 1):  # a 1x1 conv used as a projection (SD 1.x)
            tensor = tensor[:, :, 0, 0]
        converted = tensor.T if tensor.ndim == 2 else tensor
    else:
        converted = tensor
    return torch_state.checked_float32(converted, expected, torch_name, our_path, f"diffusers {tuple(tensor.shape)}")


def unet_param_shapes(model: UNet) -> Any:
    """The shapes of ``model``'s parameters (no compilation, no random numbers drawn)."""
    size = 2 ** (len(model.block_out_channels) - 1)
    sample = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
    timesteps = jax.ShapeDtypeStruct((1,), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), sample, timesteps, model.context_spec())["params"]


def _params_from_state_dict(
    state_dict: Mapping[str, Any],
    shapes: Any,
    what: str,
    *,
    missing_what: str = "parameters missing from the diffusers state dict",
    unused_what: str | None = None,
) -> dict[str, Any]:
    """Fills the parameter tree ``shapes`` from a diffusers state dict (``what`` names our model in the
    default error for unused tensors)."""
    if unused_what is None:
        unused_what = f"diffusers tensors have no counterpart in our {what} (unsupported blocks?)"
    return torch_state.params_from_state_dict(
        _normalise_names(state_dict),
        shapes,
        _torch_name,
        _convert_tensor,
        missing_what=missing_what,
        unused_what=unused_what,
    )


def unet_params_from_diffusers(state_dict: Mapping[str, Any], model: UNet) -> dict[str, Any]:
    """Converts a diffusers UNet state dict (name -> numpy array or torch tensor) to ``model``'s params.

    Every parameter of ``model`` must be present, every tensor of the state dict must be used,
    and every shape must match; errors name the parameter. Returns a float32 numpy pytree.
    """
    return _params_from_state_dict(state_dict, unet_param_shapes(model), "UNet")


def _resolve_files(path: str, variant: str | None = None) -> tuple[str, list[str]]:
    """(config.json path, safetensors file paths) for a model directory (its ``variant`` weights, e.g.
    ``fp16``, where given) or a weights file."""
    if os.path.isfile(path):
        directory, weights = os.path.dirname(os.path.abspath(path)), [path]
    elif os.path.isdir(path):
        directory = path
        if not os.path.isfile(os.path.join(directory, CONFIG_NAME)) and os.path.isfile(
            os.path.join(directory, "unet", CONFIG_NAME)
        ):
            directory = os.path.join(directory, "unet")  # a pipeline directory: its UNet lives in unet/
        bin_hint = ("diffusion_pytorch_model.bin", ".bin file")
        weights = torch_state.safetensors_files(
            directory, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, "diffusers", bin_hint, variant=variant
        )
    else:
        raise FileNotFoundError(f"No diffusers UNet at {path}: neither a directory nor a file.")
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"Missing diffusers config {config_path} (needed beside {weights[0]}).")
    return config_path, weights


def _component_dir(path: str, subfolder: str, what: str) -> str:
    """``path``, or its ``subfolder`` where ``path`` is a pipeline directory without a ``config.json``."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        if not os.path.isfile(os.path.join(path, subfolder, CONFIG_NAME)):
            raise FileNotFoundError(f"No diffusers {what} at {path}: no {CONFIG_NAME} there nor in {subfolder}/.")
        return os.path.join(path, subfolder)
    return path


_Module = TypeVar("_Module")


def _load_component(
    path: str,
    variant: str | None,
    build: Callable[[dict[str, Any]], _Module],
    to_params: Callable[[dict[str, Any], _Module], dict[str, Any]],
) -> tuple[_Module, dict[str, Any]]:
    """``(module, params)`` of the diffusers component at ``path`` (a model directory or a weights file, as
    ``_resolve_files`` reads it; its ``variant`` weights where given): ``build`` makes the module of its
    ``config.json``, ``to_params`` converts its safetensors state dict to that module's params."""
    config_path, weight_files = _resolve_files(path, variant)
    with open(config_path) as f:
        config = json.load(f)
    module = build(config)
    return module, to_params(torch_state.read_safetensors(weight_files, "diffusers"), module)


def load_diffusers_unet(
    path: str, *, variant: str | None = None, **model_overrides: Any
) -> tuple[UNet, dict[str, Any]]:
    """Reads a local diffusers UNet (``config.json`` + ``diffusion_pytorch_model.safetensors``).

    ``path`` is a model directory (or a pipeline directory with a ``unet/`` subfolder, or a
    sharded checkpoint with a safetensors index) or the ``.safetensors`` file itself, with its
    ``config.json`` beside it; ``variant`` (``"fp16"``, ``"bf16"``) reads diffusers' variant files
    (``diffusion_pytorch_model.fp16.safetensors``), upcast. ``model_overrides`` set non-architectural
    ``UNet`` fields (``dtype``, ``remat``, ``conv_impl``). Returns ``(model, params)`` with float32 params.
    """
    build = lambda config: UNet(**unet_config_from_diffusers(config), **model_overrides)
    return _load_component(path, variant, build, unet_params_from_diffusers)


# ---------------------------------------------------------------------------------------------
# VAE: diffusers ``AutoencoderKL`` (Stable Diffusion's VAE) -> ``codi_jax.models.vae.AutoencoderKL``.
# Same name mapping and layout changes as the UNet (``encoder/mid_block/attentions_0/to_out_0`` <->
# ``encoder.mid_block.attentions.0.to_out.0``); old attention names (``query`` / ``key`` / ``value`` /
# ``proj_attn``, possibly stored as 1x1 convs) are renamed as for the UNet.
# ---------------------------------------------------------------------------------------------


def vae_params_from_diffusers(state_dict: Mapping[str, Any], model: AutoencoderKL) -> dict[str, Any]:
    """Converts a diffusers ``AutoencoderKL`` state dict (name -> numpy array or torch tensor) to ``model``'s params.

    Every parameter of ``model`` must be filled and every tensor of the state dict used, with
    matching shapes; a mismatch raises ``ValueError`` naming the tensors. Returns float32 numpy.
    """
    return _params_from_state_dict(
        state_dict,
        vae_param_shapes(model),
        "AutoencoderKL",
        missing_what="VAE parameters missing from the diffusers state dict",
        unused_what="diffusers VAE tensors have no counterpart in our AutoencoderKL (config mismatch?)",
    )


def load_diffusers_vae(
    path: str, *, variant: str | None = None, **model_overrides: Any
) -> tuple[AutoencoderKL, dict[str, Any]]:
    """Reads a local diffusers ``AutoencoderKL`` (``config.json`` + ``diffusion_pytorch_model.safetensors``).

    ``path`` is the directory ``save_pretrained`` writes (or a pipeline directory with a ``vae/``
    subfolder, or a sharded checkpoint with a safetensors index) or the ``.safetensors`` file with
    its ``config.json`` beside it; ``variant`` as for ``load_diffusers_unet``. ``model_overrides`` set
    ``dtype`` / ``conv_impl``. Returns ``(model, params)`` with float32 params.
    """
    build = lambda config: vae_from_diffusers_config(config, **model_overrides)
    return _load_component(_component_dir(path, "vae", "VAE"), variant, build, vae_params_from_diffusers)


# ---------------------------------------------------------------------------------------------
# ControlNet: diffusers ``ControlNetModel`` -> ``codi_jax.models.adapters.ControlNet`` (``output='residuals'``).
# The encoder copy has the UNet's names (``conv_in``, ``time_embedding``, ``down_blocks_i``, ``mid_block``);
# ``controlnet_cond_embedding/{conv_in, blocks_N, conv_out}`` is our ``HintNetwork`` (diffusers'
# ``ControlNetConditioningEmbedding``: conv_in, then per consecutive channel pair a conv and a stride-2 conv,
# then conv_out, i.e. ``hint_channels = conditioning_embedding_out_channels`` with ``len - 1`` downsamples);
# ``controlnet_down_blocks_k`` / ``controlnet_mid_block`` are our zero convs.
# ---------------------------------------------------------------------------------------------

_CONTROLNET_REQUIREMENTS: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("controlnet_conditioning_channel_order", ("rgb",)),
    ("global_pool_conditions", (False,)),
    ("class_embed_type", (None,)),
)


def controlnet_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Maps a diffusers ``ControlNetModel`` config (config.json) to ``adapters.ControlNet`` fields.

    The UNet fields are those of the UNet the ControlNet copies (``out_channels`` is the diffusers
    default 4: a ControlNet has no output conv; SDXL's ``transformer_layers_per_block`` and
    ``addition_embed_type="text_time"`` included); the hint network's widths are
    ``conditioning_embedding_out_channels``. Raises ``UnsupportedDiffusersConfig`` naming the field.
    """
    config = dict(config)
    class_name = config.get("_class_name", "ControlNetModel")
    if class_name != "ControlNetModel":
        raise _unsupported(class_name, "expected a ControlNetModel config.")
    _check_requirements(config, _CONTROLNET_REQUIREMENTS, class_name)
    hint_channels = config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
    if not hint_channels:
        raise _unsupported(class_name, f"conditioning_embedding_out_channels={hint_channels!r} (need >= 1 width).")
    down_types = config.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
    unet_like = {**config, "down_block_types": down_types, "up_block_types": _mirrored_up_types(down_types)}
    fields = _unet_fields(unet_like, class_name)
    return dict(
        fields,
        cond_channels=int(config.get("conditioning_channels", 3)),
        hint_channels=tuple(int(c) for c in hint_channels),
        hint_downsamples=len(hint_channels) - 1,
        output="residuals",
    )


def controlnet_param_shapes(adapter: ControlNet) -> Any:
    """The shapes of ``adapter``'s parameters (no compilation, no random numbers drawn)."""
    size = 2 ** (len(adapter.block_out_channels) - 1)
    cond_size = size * 2**adapter.hint_downsamples
    sample = jax.ShapeDtypeStruct((1, size, size, adapter.in_channels), jnp.float32)
    cond = jax.ShapeDtypeStruct((1, cond_size, cond_size, adapter.cond_channels), jnp.float32)
    timesteps = jax.ShapeDtypeStruct((1,), jnp.float32)
    context = adapter.context_spec()
    return jax.eval_shape(adapter.init, jax.random.PRNGKey(0), sample, timesteps, cond, None, context)["params"]


def controlnet_params_from_diffusers(state_dict: Mapping[str, Any], adapter_module: ControlNet) -> dict[str, Any]:
    """Converts a diffusers ``ControlNetModel`` state dict (name -> numpy array or torch tensor) to the
    params of ``adapter_module`` (a ``ControlNet`` with ``output='residuals'`` and no instructions).

    Every parameter must be present, every tensor used, every shape match; errors name the tensor.
    Returns a float32 numpy pytree (the ``"adapter"`` sub-tree of a ``ConditionalModel``).
    """
    if adapter_module.output != "residuals":
        raise ValueError(f"A diffusers ControlNet gives zero-conv residuals; adapter output={adapter_module.output!r}.")
    if adapter_module.num_instructions:
        raise ValueError(
            "A diffusers ControlNet has no instruction embedding; build the adapter with num_instructions=0."
        )
    return _params_from_state_dict(state_dict, controlnet_param_shapes(adapter_module), "ControlNet")


def load_diffusers_controlnet(
    path: str, *, variant: str | None = None, **model_overrides: Any
) -> tuple[ControlNet, dict[str, Any]]:
    """Reads a local diffusers ``ControlNetModel`` (``config.json`` + ``diffusion_pytorch_model.safetensors``).

    ``path`` is the directory ``save_pretrained`` writes (or a pipeline directory with a
    ``controlnet/`` subfolder, or a sharded checkpoint with a safetensors index) or the
    ``.safetensors`` file with its ``config.json`` beside it; ``variant`` as for ``load_diffusers_unet``.
    ``model_overrides`` set non-architectural fields (``dtype``, ``remat``, ``conv_impl``). Returns
    ``(adapter, params)``: ``ConditionalModel(backbone=unet, adapter=adapter)`` applies it with
    ``{"backbone": unet_params, "adapter": params}``; the condition goes in at 2**hint_downsamples
    times the latent size, in the range the ControlNet was trained on (diffusers: [0, 1]).
    """
    build = lambda config: ControlNet(**controlnet_config_from_diffusers(config), **model_overrides)
    directory = _component_dir(path, "controlnet", "ControlNet")
    return _load_component(directory, variant, build, controlnet_params_from_diffusers)


# ---------------------------------------------------------------------------------------------
# SD3: diffusers ``SD3Transformer2DModel`` -> ``codi_jax.models.dit.DiT`` with ``joint_attention_dim``.
# Same name mapping and layout changes (``transformer_blocks_0/attn/to_out_0`` <->
# ``transformer_blocks.0.attn.to_out.0``, ``ff_context/net_0_proj`` <-> ``ff_context.net.0.proj``,
# ``norm_q/scale`` <-> ``norm_q.weight``; the patch conv (out, in, p, p) -> ``Patchify``'s (p, p, in, out)).
# ---------------------------------------------------------------------------------------------

SD3_CLASS_NAME = "SD3Transformer2DModel"
# ``SD3Transformer2DModel.__init__``'s defaults (diffusers 0.42): a config.json may leave any out.
_SD3_DEFAULTS: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 18,
    "attention_head_dim": 64,
    "num_attention_heads": 18,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 96,
    "dual_attention_layers": (),
    "qk_norm": None,
}
_SD3_POS_EMBED = "pos_embed.pos_embed"  # PatchEmbed's persistent sin-cos buffer (1, max_size ** 2, width)


def sd3_transformer_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """``DiT`` fields of a diffusers ``SD3Transformer2DModel`` config (config.json; missing keys take
    diffusers' defaults). Raises ``UnsupportedDiffusersConfig`` (one line naming the field) for another
    class, an unknown field, ``caption_projection_dim`` other than the width, a ``qk_norm`` other than
    None / "rms_norm", ``pos_embed_max_size=None`` or ``dual_attention_layers`` out of range."""
    class_name = config.get("_class_name", SD3_CLASS_NAME)
    if class_name != SD3_CLASS_NAME:
        raise _unsupported(class_name, f"expected an {SD3_CLASS_NAME} config.")
    unknown = sorted(key for key in config if not key.startswith("_") and key not in _SD3_DEFAULTS)
    if unknown:
        raise _unsupported(
            class_name, f"config field {unknown[0]!r} is not supported (known: {sorted(_SD3_DEFAULTS)})."
        )
    c = {**_SD3_DEFAULTS, **{key: value for key, value in config.items() if not key.startswith("_")}}
    width = c["num_attention_heads"] * c["attention_head_dim"]
    refusals = (
        ("caption_projection_dim", c["caption_projection_dim"] != width, f"the width heads * head_dim = {width}"),
        ("qk_norm", c["qk_norm"] not in QK_NORMS, f"one of {list(QK_NORMS)}"),
        ("pos_embed_max_size", c["pos_embed_max_size"] is None, "an int (SD3's cropped position table)"),
    )
    for field, refused, supported in refusals:
        if refused:
            raise _unsupported(class_name, f"{field}={c[field]!r} is not supported (supported: {supported}).")
    fields = dict(
        {key: c[key] for key in ("in_channels", "patch_size", "num_layers", "num_attention_heads")},
        out_channels=c["in_channels"] if c["out_channels"] is None else c["out_channels"],
        attention_head_dim=c["attention_head_dim"],
        mlp_ratio=4.0,  # FeedForward(dim, dim_out=dim): mult 4
        time_embed_channels=256,  # CombinedTimestepTextProjEmbeddings' Timesteps(num_channels=256)
        **{key: c[key] for key in ("joint_attention_dim", "caption_projection_dim", "pooled_projection_dim")},
        qk_norm=c["qk_norm"],
        dual_attention_layers=tuple(int(i) for i in c["dual_attention_layers"]),
        pos_embed_max_size=c["pos_embed_max_size"],
        sample_size=c["sample_size"],
    )
    try:
        DiT(**fields).check_choices()
    except ValueError as error:  # e.g. dual_attention_layers out of range: one line naming the field
        raise _unsupported(class_name, str(error).replace("model.", "")) from None
    return fields


def sd3_transformer_param_shapes(model: DiT) -> Any:
    """The shapes of a joint-attention ``model``'s parameters (no compilation, no random numbers drawn)."""
    p = model.patch_size
    sample = jax.ShapeDtypeStruct((1, p, p, model.in_channels), jnp.float32)
    timesteps = jax.ShapeDtypeStruct((1,), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), sample, timesteps, model.context_spec())["params"]


def _check_sd3_pos_embed(table: Any, model: DiT) -> None:
    """diffusers' stored ``pos_embed.pos_embed`` must be the table ``model`` computes (``dit.pos_embed_table``)."""
    ours = pos_embed_table(model.width, model.pos_embed_max_size, model.sample_size // model.patch_size)
    theirs = torch_state.as_numpy(table).astype(np.float32)
    if theirs.size != ours.size:
        raise ValueError(
            f"{_SD3_POS_EMBED} has shape {tuple(theirs.shape)}; expected (1, {ours.shape[0]}, {ours.shape[1]})."
        )
    diff = float(np.abs(theirs.reshape(ours.shape) - ours).max())
    if diff > 1e-6:  # the tables agree bit for bit (tests/test_sd3_transformer.py)
        raise ValueError(
            f"{_SD3_POS_EMBED} is not the sin-cos table of pos_embed_max_size={model.pos_embed_max_size}, "
            f"sample_size={model.sample_size} (max |difference| {diff:.3g}): a modified position embedding."
        )


def sd3_transformer_params(state_dict: Mapping[str, Any], model: DiT) -> dict[str, Any]:
    """Converts a diffusers ``SD3Transformer2DModel`` state dict (name -> numpy array or torch tensor) to
    the params of ``model`` (a ``DiT`` built from ``sd3_transformer_fields``).

    Every parameter must be present, every tensor used (else a ``ValueError`` listing the leftover
    keys), every shape match. The ``pos_embed.pos_embed`` buffer, where present, is checked against the
    table ``model`` computes rather than stored. Returns a float32 numpy pytree.
    """
    if model.joint_attention_dim is None:
        raise ValueError("An SD3Transformer2DModel has joint-attention blocks: build the DiT with joint_attention_dim.")
    state_dict = dict(state_dict)
    if _SD3_POS_EMBED in state_dict:
        _check_sd3_pos_embed(state_dict.pop(_SD3_POS_EMBED), model)
    return _params_from_state_dict(state_dict, sd3_transformer_param_shapes(model), "SD3 transformer")


def load_diffusers_sd3_transformer(
    path: str, *, variant: str | None = None, **model_overrides: Any
) -> tuple[DiT, dict[str, Any]]:
    """Reads a local diffusers ``SD3Transformer2DModel`` (``config.json`` + safetensors): a model
    directory, a pipeline directory with a ``transformer/`` subfolder, or the weights file with its
    ``config.json`` beside it; ``variant`` and ``model_overrides`` (``dtype``, ``remat``,
    ``attention_impl``) as for ``load_diffusers_unet``. Returns ``(model, params)``; the model reads
    ``context={"encoder_hidden_states": ..., "pooled_projections": ...}`` (``DiT.context_spec``).
    """
    build = lambda config: DiT(**sd3_transformer_fields(config), **model_overrides)
    directory = _component_dir(path, "transformer", "SD3 transformer")
    return _load_component(directory, variant, build, sd3_transformer_params)


SD3_CONTROLNET_CLASS_NAME = "SD3ControlNetModel"
# SD3ControlNetModel's fields beyond the transformer's, with diffusers' defaults and what we take.
_SD3_CONTROLNET_OWN = {
    "extra_conditioning_channels": 0,
    "pos_embed_type": "sincos",
    "use_pos_embed": True,
    "force_zeros_for_pooled_projection": True,
}


def sd3_controlnet_fields(config: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """``(DiT fields of the copy, cond_channels)`` of a diffusers ``SD3ControlNetModel`` config: the copy's
    ``num_layers`` is its block count, ``cond_channels`` = ``in_channels + extra_conditioning_channels``
    (``pos_embed_input``'s input). Refused in one line (``UnsupportedDiffusersConfig``): another class, an
    image-only ControlNet (``joint_attention_dim`` None) and SD3.5's variants without the copy's sin-cos
    position embedding (``use_pos_embed=False`` / ``pos_embed_type`` other than ``"sincos"``)."""
    class_name = config.get("_class_name", SD3_CONTROLNET_CLASS_NAME)
    if class_name != SD3_CONTROLNET_CLASS_NAME:
        raise _unsupported(class_name, f"expected an {SD3_CONTROLNET_CLASS_NAME} config.")
    own = {key: config.get(key, default) for key, default in _SD3_CONTROLNET_OWN.items()}
    if not own["use_pos_embed"] or own["pos_embed_type"] != "sincos":
        raise _unsupported(
            class_name,
            f"use_pos_embed={own['use_pos_embed']!r}, pos_embed_type={own['pos_embed_type']!r} is not supported "
            "(the adapter copies the transformer's sin-cos patch embedding: use_pos_embed=True, 'sincos').",
        )
    if config.get("joint_attention_dim", _SD3_DEFAULTS["joint_attention_dim"]) is None:
        raise _unsupported(class_name, "joint_attention_dim=None (an image-only ControlNet) is not supported.")
    rest = {key: value for key, value in config.items() if key not in _SD3_CONTROLNET_OWN and key != "_class_name"}
    try:
        fields = sd3_transformer_fields({**rest, "_class_name": SD3_CLASS_NAME})
    except UnsupportedDiffusersConfig as error:
        raise _unsupported(class_name, str(error).split(": ", 1)[1]) from None
    return fields, int(fields["in_channels"]) + int(own["extra_conditioning_channels"])


def sd3_controlnet_module(fields: Mapping[str, Any], cond_channels: int) -> DiTControlNet:
    """Our ``DiTControlNet`` of an ``SD3ControlNetModel`` (``sd3_controlnet_fields``)."""
    return DiTControlNet(**fields, cond_channels=cond_channels)


def sd3_controlnet_param_shapes(adapter: DiTControlNet) -> Any:
    """The shapes of an SD3 ControlNet adapter's parameters (no compilation, no random numbers drawn)."""
    p = adapter.patch_size
    sample = jax.ShapeDtypeStruct((1, p, p, adapter.in_channels), jnp.float32)
    cond = jax.ShapeDtypeStruct((1, p, p, adapter.cond_channels), jnp.float32)
    timesteps = jax.ShapeDtypeStruct((1,), jnp.float32)
    rng = jax.random.PRNGKey(0)
    return jax.eval_shape(adapter.init, rng, sample, timesteps, cond, None, adapter.context_spec())["params"]


def sd3_controlnet_params(state_dict: Mapping[str, Any], adapter: DiTControlNet) -> dict[str, Any]:
    """A diffusers ``SD3ControlNetModel`` state dict -> our ``DiTControlNet`` params (names as the
    transformer's, plus ``pos_embed_input.proj`` -> ``pos_embed_input/proj`` and ``controlnet_blocks.i`` ->
    ``controlnet_blocks_i``); every tensor used, every shape checked; the position buffer checked."""
    state_dict = dict(state_dict)
    if _SD3_POS_EMBED in state_dict:
        _check_sd3_pos_embed(state_dict.pop(_SD3_POS_EMBED), adapter)
    return _params_from_state_dict(state_dict, sd3_controlnet_param_shapes(adapter), "SD3 ControlNet")


def load_diffusers_sd3_controlnet(path: str, *, variant: str | None = None) -> tuple[DiTControlNet, dict[str, Any]]:
    """Reads a local diffusers ``SD3ControlNetModel`` folder (``config.json`` + safetensors): ``(adapter, params)``."""
    build = lambda config: sd3_controlnet_module(*sd3_controlnet_fields(config))
    return _load_component(path, variant, build, sd3_controlnet_params)
