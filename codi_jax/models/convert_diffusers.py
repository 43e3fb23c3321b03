"""Diffusers (PyTorch) UNet weights -> this codebase's flax ``UNet`` parameters.

Supports diffusers' ``UNet2DModel`` (``DownBlock2D`` / ``AttnDownBlock2D`` blocks, ``UNetMidBlock2D``)
and ``UNet2DConditionModel`` (``DownBlock2D`` / ``CrossAttnDownBlock2D`` blocks with one
``BasicTransformerBlock`` each, ``UNetMidBlock2DCrossAttn``). Our modules are named like
diffusers' (``down_blocks_0/resnets_1/conv1`` <-> ``down_blocks.0.resnets.1.conv1``), so the
conversion is a name mapping plus layout changes:

- conv ``weight`` (out, in, kh, kw) -> ``kernel`` (kh, kw, in, out);
- linear ``weight`` (out, in) -> ``kernel`` (in, out) (also from a 1x1 conv ``proj_in`` /
  ``proj_out``, as SD 1.x stores them: a 1x1 conv is the same per-pixel linear map);
- norm ``weight`` -> ``scale``; ``bias`` -> ``bias``.

Only the reading of the safetensors file needs a package beyond numpy (``safetensors``); torch
is never imported. State dicts from ``model.state_dict()`` (torch tensors) are accepted too.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.models.unet import UNet
from codi_jax.models.vae import AutoencoderKL, vae_from_diffusers_config, vae_param_shapes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

_UNCONDITIONAL_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UNCONDITIONAL_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}
_CONDITIONAL_DOWN = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
_CONDITIONAL_UP = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}

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
    ("addition_embed_type", (None,)),
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
    ("projection_class_embeddings_input_dim", (None,)),
)

# Old diffusers checkpoints name UNet2DModel's attention projections differently; diffusers
# renames them on load (``ModelMixin._convert_deprecated_attention_blocks``), and so do we.
_DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

# Our module names with a numeric suffix that diffusers writes as a ModuleList index.
_INDEXED_MODULE = re.compile(
    r"^(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|transformer_blocks|to_out|net)_(\d+)"
    r"(?:_(\w+))?$"
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


def unet_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Maps a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` config (config.json) to ``UNet`` fields.

    Raises ``UnsupportedDiffusersConfig`` (a ``ValueError``) naming the field for architectures
    our ``UNet`` cannot reproduce exactly.
    """
    config = dict(config)
    class_name = config.get("_class_name")
    if class_name is None:  # a bare config dict (e.g. ``dict(model.config)``): infer the class
        class_name = "UNet2DConditionModel" if config.get("cross_attention_dim") is not None else "UNet2DModel"
    if class_name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise _unsupported(class_name, "only UNet2DModel and UNet2DConditionModel are supported.")
    conditional = class_name == "UNet2DConditionModel"

    requirements = _CONDITIONAL_REQUIREMENTS if conditional else _UNCONDITIONAL_REQUIREMENTS
    for field, supported in requirements:
        value = config.get(field, supported[0])
        if value not in supported:
            raise _unsupported(class_name, f"{field}={value!r} is not supported (supported: {list(supported)}).")

    block_out_channels = tuple(int(c) for c in config.get("block_out_channels", (224, 448, 672, 896)))
    levels = len(block_out_channels)
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

    down_table, up_table = (
        (_CONDITIONAL_DOWN, _CONDITIONAL_UP) if conditional else (_UNCONDITIONAL_DOWN, _UNCONDITIONAL_UP)
    )
    default_down = (
        ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
        if conditional
        else (("DownBlock2D",) + ("AttnDownBlock2D",) * 3)
    )
    down_types = config.get("down_block_types", default_down)
    up_types = config.get(
        "up_block_types",
        tuple(
            {
                "DownBlock2D": "UpBlock2D",
                "AttnDownBlock2D": "AttnUpBlock2D",
                "CrossAttnDownBlock2D": "CrossAttnUpBlock2D",
            }[t]
            for t in reversed(default_down)
        ),
    )
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

    result: dict[str, Any] = dict(
        in_channels=int(config.get("in_channels", 4 if conditional else 3)),
        out_channels=int(config.get("out_channels", 4 if conditional else 3)),
        block_out_channels=block_out_channels,
        layers_per_block=int(layers_per_block),
        attention_levels=tuple(attention_levels),
        norm_num_groups=int(norm_num_groups),
        norm_eps=float(config.get("norm_eps", 1e-5)),
        dropout=float(config.get("dropout", 0.0)),
        flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
        freq_shift=float(config.get("freq_shift", 0)),
    )

    if not conditional:
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
        attended = [c for c, a in zip(block_out_channels, attention_levels) if a]
        attended += [block_out_channels[-1]] if mid_attention else []
        if head_dim is None:
            # diffusers: one head of all channels per block. Ours: heads = max(1, channels // head_dim).
            head_dim = max(block_out_channels)
        else:
            for channels in attended:
                if channels % head_dim:
                    raise _unsupported(
                        class_name, f"attention_head_dim={head_dim} does not divide {channels} channels."
                    )
        result.update(mid_attention=mid_attention, attention_head_dim=int(head_dim), cross_attention_dim=None)
        return result

    mid_block_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_block_type != "UNetMidBlock2DCrossAttn":
        raise _unsupported(class_name, f"mid_block_type={mid_block_type!r} (we support UNetMidBlock2DCrossAttn).")
    cross_attention_dim = config.get("cross_attention_dim", 1280)
    if isinstance(cross_attention_dim, (list, tuple)):
        if len(set(cross_attention_dim)) != 1:
            raise _unsupported(class_name, f"cross_attention_dim={list(cross_attention_dim)} varies per level.")
        cross_attention_dim = cross_attention_dim[0]
    for field in ("only_cross_attention", "transformer_layers_per_block"):
        default = False if field == "only_cross_attention" else 1
        values = set(_per_level(config.get(field, default), levels, field, class_name))
        if values != {default}:
            raise _unsupported(class_name, f"{field}={config.get(field)!r} (we support {default!r} only).")
    if config.get("mid_block_only_cross_attention") not in (None, False):
        raise _unsupported(class_name, "mid_block_only_cross_attention=True is not supported.")
    # diffusers' ``attention_head_dim`` is the number of heads here unless num_attention_heads is set.
    num_heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    num_heads = _per_level(num_heads, levels, "num_attention_heads", class_name)
    head_dims = {}
    for level, (channels, heads) in enumerate(zip(block_out_channels, num_heads)):
        if attention_levels[level]:
            head_dims[f"level {level}"] = (channels, heads)
    head_dims["mid block"] = (block_out_channels[-1], num_heads[-1])
    if any(channels % heads for channels, heads in head_dims.values()):
        raise _unsupported(class_name, f"attention heads do not divide the channels: {head_dims} (channels, heads).")
    distinct = {channels // heads for channels, heads in head_dims.values()}
    if len(distinct) != 1:
        per_block = {name: channels // heads for name, (channels, heads) in head_dims.items()}
        raise _unsupported(
            class_name,
            f"our UNet uses one channels-per-head for every attention block; this model's are {per_block} "
            "(e.g. SD 1.x has 8 heads at every level, so 40/80/160 channels per head).",
        )
    result.update(
        mid_attention=True, attention_head_dim=int(distinct.pop()), cross_attention_dim=int(cross_attention_dim)
    )
    return result


def _torch_name(path: tuple[str, ...]) -> str:
    """Our parameter path -> the diffusers state-dict name."""
    parts = []
    for component in path[:-1]:
        match = _INDEXED_MODULE.match(component)
        if match:
            parts.extend(p for p in match.groups() if p is not None)
        else:
            parts.append(component)
    leaves = {"kernel": "weight", "scale": "weight", "bias": "bias"}
    if path[-1] not in leaves:
        raise ValueError(f"No diffusers counterpart for parameter {'/'.join(path)} (leaf {path[-1]!r}).")
    parts.append(leaves[path[-1]])
    return ".".join(parts)


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor from model.state_dict()
        value = value.detach().cpu().float().numpy()
    return np.asarray(value)


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
    if tuple(converted.shape) != tuple(expected):
        raise ValueError(
            f"Shape mismatch for {torch_name} (diffusers {tuple(tensor.shape)}) -> {our_path}: expected "
            f"{tuple(expected)} after conversion, got {tuple(converted.shape)}."
        )
    return np.ascontiguousarray(converted, dtype=np.float32)


def unet_param_shapes(model: UNet) -> Any:
    """The shapes of ``model``'s parameters (no compilation, no random numbers drawn)."""
    size = 2 ** (len(model.block_out_channels) - 1)
    sample = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
    timesteps = jax.ShapeDtypeStruct((1,), jnp.float32)
    context = None
    if model.cross_attention_dim is not None:
        context = jax.ShapeDtypeStruct((1, 1, model.cross_attention_dim), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), sample, timesteps, context)["params"]


def unet_params_from_diffusers(state_dict: Mapping[str, Any], model: UNet) -> dict[str, Any]:
    """Converts a diffusers UNet state dict (name -> numpy array or torch tensor) to ``model``'s params.

    Every parameter of ``model`` must be present, every tensor of the state dict must be used,
    and every shape must match; errors name the parameter. Returns a float32 numpy pytree.
    """
    state_dict = _normalise_names(state_dict)
    shapes = unet_param_shapes(model)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    converted, missing, used = [], [], set()
    for key_path, shape in flat:
        path = tuple(k.key for k in key_path)
        torch_name = _torch_name(path)
        our_path = "/".join(path)
        if torch_name not in state_dict:
            missing.append(f"{torch_name} (for {our_path})")
            converted.append(None)
            continue
        used.add(torch_name)
        converted.append(_convert_tensor(torch_name, our_path, _as_numpy(state_dict[torch_name]), shape.shape))
    if missing:
        raise ValueError(
            f"{len(missing)} parameters missing from the diffusers state dict: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}"
        )
    unused = sorted(set(state_dict) - used)
    if unused:
        raise ValueError(
            f"{len(unused)} diffusers tensors have no counterpart in our UNet (unsupported blocks?): "
            f"{unused[:10]}{' ...' if len(unused) > 10 else ''}"
        )
    return jax.tree_util.tree_unflatten(treedef, converted)


def _resolve_files(path: str) -> tuple[str, list[str]]:
    """(config.json path, safetensors file paths) for a model directory or a weights file."""
    if os.path.isfile(path):
        directory, weights = os.path.dirname(os.path.abspath(path)), [path]
    elif os.path.isdir(path):
        directory = path
        if not os.path.isfile(os.path.join(directory, CONFIG_NAME)) and os.path.isfile(
            os.path.join(directory, "unet", CONFIG_NAME)
        ):
            directory = os.path.join(directory, "unet")  # a pipeline directory: its UNet lives in unet/
        index = os.path.join(directory, WEIGHTS_INDEX_NAME)
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            weights = [os.path.join(directory, shard) for shard in shards]
        else:
            weights = [os.path.join(directory, WEIGHTS_NAME)]
    else:
        raise FileNotFoundError(f"No diffusers UNet at {path}: neither a directory nor a file.")
    for file in weights:
        if not os.path.isfile(file):
            hint = ""
            if os.path.isfile(os.path.join(directory, "diffusion_pytorch_model.bin")):
                hint = " (only a PyTorch .bin file is there: save it as safetensors first)"
            raise FileNotFoundError(f"Missing diffusers weights file {file}{hint}.")
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"Missing diffusers config {config_path} (needed beside {weights[0]}).")
    return config_path, weights


def load_diffusers_unet(path: str, **model_overrides: Any) -> tuple[UNet, dict[str, Any]]:
    """Reads a local diffusers UNet (``config.json`` + ``diffusion_pytorch_model.safetensors``).

    ``path`` is a model directory (or a pipeline directory with a ``unet/`` subfolder, or a
    sharded checkpoint with a safetensors index) or the ``.safetensors`` file itself, with its
    ``config.json`` beside it. ``model_overrides`` set non-architectural ``UNet`` fields
    (``dtype``, ``remat``, ``conv_impl``). Returns ``(model, params)`` with float32 params.
    """
    config_path, weight_files = _resolve_files(path)
    with open(config_path) as f:
        fields = unet_config_from_diffusers(json.load(f))
    try:
        from safetensors.numpy import load_file
    except ImportError as error:  # pragma: no cover - safetensors is installed with the test extras
        raise ImportError(
            "Reading diffusers weights needs the `safetensors` package (pip install safetensors)."
        ) from error
    state_dict: dict[str, np.ndarray] = {}
    for file in weight_files:
        state_dict.update(load_file(file))
    model = UNet(**fields, **model_overrides)
    return model, unet_params_from_diffusers(state_dict, model)


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
    state_dict = _normalise_names(state_dict)
    flat, treedef = jax.tree_util.tree_flatten_with_path(vae_param_shapes(model))
    converted, missing, used = [], [], set()
    for key_path, shape in flat:
        path = tuple(k.key for k in key_path)
        torch_name, our_path = _torch_name(path), "/".join(path)
        if torch_name not in state_dict:
            missing.append(f"{torch_name} (for {our_path})")
            continue
        used.add(torch_name)
        converted.append(_convert_tensor(torch_name, our_path, _as_numpy(state_dict[torch_name]), shape.shape))
    if missing:
        raise ValueError(
            f"{len(missing)} VAE parameters missing from the diffusers state dict: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}"
        )
    unused = sorted(set(state_dict) - used)
    if unused:
        raise ValueError(
            f"{len(unused)} diffusers VAE tensors have no counterpart in our AutoencoderKL (config mismatch?): "
            f"{unused[:10]}{' ...' if len(unused) > 10 else ''}"
        )
    return jax.tree_util.tree_unflatten(treedef, converted)


def load_diffusers_vae(path: str, **model_overrides: Any) -> tuple[AutoencoderKL, dict[str, Any]]:
    """Reads a local diffusers ``AutoencoderKL`` (``config.json`` + ``diffusion_pytorch_model.safetensors``).

    ``path`` is the directory ``save_pretrained`` writes (or a pipeline directory with a ``vae/``
    subfolder, or a sharded checkpoint with a safetensors index) or the ``.safetensors`` file with
    its ``config.json`` beside it. ``model_overrides`` set ``dtype`` / ``conv_impl``. Returns
    ``(model, params)`` with float32 params.
    """
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        if os.path.isfile(os.path.join(path, "vae", CONFIG_NAME)):
            path = os.path.join(path, "vae")  # a pipeline directory: its VAE lives in vae/
        else:
            raise FileNotFoundError(f"No diffusers VAE at {path}: no {CONFIG_NAME} there nor in vae/.")
    config_path, weight_files = _resolve_files(path)
    with open(config_path) as f:
        model = vae_from_diffusers_config(json.load(f), **model_overrides)
    try:
        from safetensors.numpy import load_file
    except ImportError as error:  # pragma: no cover - safetensors is installed with the test extras
        raise ImportError(
            "Reading diffusers weights needs the `safetensors` package (pip install safetensors)."
        ) from error
    state_dict: dict[str, np.ndarray] = {}
    for file in weight_files:
        state_dict.update(load_file(file))
    return model, vae_params_from_diffusers(state_dict, model)
