"""This codebase's flax ``UNet`` / ControlNet (and SD3 ``DiT`` / ``DiTControlNet``) parameters -> diffusers
(PyTorch) model folders.

The inverse of ``convert_diffusers``: the same name mapping (``_torch_name``) with the layout
changes undone (kernel ``(kh, kw, in, out)`` -> weight ``(out, in, kh, kw)``, linear ``(in, out)``
-> ``(out, in)``, norm ``scale`` -> ``weight``), plus a ``config.json`` that diffusers'
``UNet2DModel`` / ``UNet2DConditionModel`` / ``ControlNetModel`` constructs into the same
architecture. Anything diffusers cannot express is a ``ValueError`` naming the field. Only
numpy and ``safetensors`` are used; torch is never imported. Folders are written atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from codi_jax.interop import torch_state
from codi_jax.interop.torch_to_flax import (
    _SD3_POS_EMBED as SD3_POS_EMBED,
)
from codi_jax.interop.torch_to_flax import (
    CONFIG_NAME,
    SD3_CLASS_NAME,
    SD3_CONTROLNET_CLASS_NAME,
    WEIGHTS_NAME,
    _torch_name,
    controlnet_param_shapes,
    sd3_controlnet_param_shapes,
    sd3_transformer_fields,
    sd3_transformer_param_shapes,
    unet_config_from_diffusers,
    unet_param_shapes,
)
from codi_jax.models.adapters import ControlNet
from codi_jax.models.dit import DiT, pos_embed_table
from codi_jax.models.dit_controlnet import DiTControlNet
from codi_jax.models.unet import UNet

# The diffusers release these configs were checked against (tests/test_export.py).
DIFFUSERS_VERSION = "0.42.1"
# UNet fields that describe the architecture (written to config.json) ...
ARCHITECTURE_FIELDS = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "attention_levels",
    "mid_attention",
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "use_linear_projection",
    "transformer_layers_per_block",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
    "norm_num_groups",
    "norm_eps",
    "dropout",
    "flip_sin_to_cos",
    "freq_shift",
)
# ... and those that only choose how it computes (not exported).
RUNTIME_FIELDS = ("dtype", "remat", "conv_impl", "attention_impl", "remat_policy")
# ControlNet fields beyond the UNet's; hint_zero_init is only an initialisation choice.
CONTROLNET_FIELDS = (
    "cond_channels",
    "hint_channels",
    "hint_downsamples",
    "num_instructions",
    "output",
    "guidance_embedding",
    "hint_unit_range",
)
CONTROLNET_INIT_FIELDS = ("hint_zero_init",)

# ControlNet components diffusers writes as ModuleList indices (split here whatever _torch_name does).
_CONTROLNET_INDEXED = re.compile(r"^(controlnet_down_blocks|blocks)_(\d+)$")


def _field_values(module: Any, known: tuple[str, ...], kind: str) -> dict[str, Any]:
    """``module``'s dataclass fields; a field this exporter does not know is an error naming it."""
    names = [f.name for f in dataclasses.fields(module) if f.name not in ("parent", "name")]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"Cannot export {kind} field(s) {unknown} to diffusers: export_diffusers does not know how diffusers "
            "represents them."
        )
    return {name: getattr(module, name) for name in names}


def _level_heads(model: UNet) -> list[int]:
    """Heads at each level as our attention computes them (the middle block uses the last level's)."""
    if model.num_attention_heads is not None:
        return [int(h) for h in model.num_attention_heads]
    return [max(1, int(c) // int(model.attention_head_dim)) for c in model.block_out_channels]


def _attention_blocks(model: UNet) -> dict[str, tuple[int, int]]:
    """``{block: (channels, heads)}`` of every attention block; heads must divide the channels."""
    levels = len(model.block_out_channels)
    heads = _level_heads(model)
    if len(heads) != levels:
        raise ValueError(f"num_attention_heads has {len(heads)} entries for {levels} levels.")
    blocks = {f"level {i}": i for i in range(levels) if model.attention_levels[i]}
    if model.mid_attention:
        blocks["mid block"] = levels - 1
    result = {name: (int(model.block_out_channels[i]), heads[i]) for name, i in blocks.items()}
    uneven = {name: ch for name, ch in result.items() if ch[1] < 1 or ch[0] % ch[1]}
    if uneven:
        raise ValueError(f"Attention heads do not divide the channels of {uneven} (channels, heads).")
    return result


def _unconditional_head_dim(model: UNet) -> int | None:
    """``UNet2DModel``'s ``attention_head_dim``: one channels-per-head for every attention block
    (None: one head of all channels in every block)."""
    blocks = _attention_blocks(model)
    if not blocks:
        return int(model.attention_head_dim)
    if all(heads == 1 for _, heads in blocks.values()):
        return None
    per_head = {name: channels // heads for name, (channels, heads) in blocks.items()}
    if len(set(per_head.values())) != 1:
        raise ValueError(
            f"num_attention_heads={model.num_attention_heads} gives channels per head {per_head}: diffusers' "
            "UNet2DModel has one attention_head_dim (channels per head) for every attention block."
        )
    return next(iter(per_head.values()))


def _block_types(model: UNet) -> tuple[list[str], list[str]]:
    cross = model.cross_attention_dim is not None
    down, up = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if cross else ("AttnDownBlock2D", "AttnUpBlock2D")
    down_types = [down if a else "DownBlock2D" for a in model.attention_levels]
    up_types = [up if a else "UpBlock2D" for a in reversed(model.attention_levels)]
    return down_types, up_types


def _common_config(model: UNet) -> dict[str, Any]:
    down_types, up_types = _block_types(model)
    return dict(
        in_channels=int(model.in_channels),
        out_channels=int(model.out_channels),
        block_out_channels=[int(c) for c in model.block_out_channels],
        layers_per_block=int(model.layers_per_block),
        down_block_types=down_types,
        up_block_types=up_types,
        norm_num_groups=int(model.norm_num_groups),
        norm_eps=float(model.norm_eps),
        dropout=float(model.dropout),
        flip_sin_to_cos=bool(model.flip_sin_to_cos),
        freq_shift=model.freq_shift,
        act_fn="silu",
        center_input_sample=False,
        downsample_padding=1,
        mid_block_scale_factor=1,
        resnet_time_scale_shift="default",
    )


def _attention_config(model: UNet) -> dict[str, Any]:
    if model.cross_attention_dim is None:
        return dict(
            _class_name="UNet2DModel",
            mid_block_type="UNetMidBlock2D",
            add_attention=bool(model.mid_attention),
            attention_head_dim=_unconditional_head_dim(model),
            attn_norm_num_groups=None,
            time_embedding_type="positional",
            downsample_type="conv",
            upsample_type="conv",
        )
    if not model.mid_attention:
        raise ValueError(
            "mid_attention=False with cross_attention_dim set: diffusers' UNetMidBlock2DCrossAttn always has attention."
        )
    _attention_blocks(model)  # heads divide the channels
    # UNet2DConditionModel reads ``attention_head_dim`` as the number of heads per level (diffusers
    # issue #2011; it refuses ``num_attention_heads``), so the heads go there.
    return dict(
        _class_name="UNet2DConditionModel",
        mid_block_type="UNetMidBlock2DCrossAttn",
        attention_head_dim=_level_heads(model),
        cross_attention_dim=int(model.cross_attention_dim),
        use_linear_projection=bool(model.use_linear_projection),
        only_cross_attention=False,
        transformer_layers_per_block=_transformer_layers(model),
        upcast_attention=False,  # ours computes logits / softmax in float32 always; equal in float32
        **_addition_config(model),
    )


def _transformer_layers(model: UNet) -> int | list[int]:
    """diffusers' ``transformer_layers_per_block``: 1 (SD 1.x / 2.x) or one count per level (SDXL)."""
    if model.transformer_layers_per_block is None:
        return 1
    return [int(c) for c in model.transformer_layers_per_block]


def _addition_config(model: UNet) -> dict[str, Any]:
    """``addition_embed_type`` and its widths (all None without added conditioning, diffusers' defaults)."""
    if model.addition_embed_type is None:
        return dict(addition_embed_type=None, addition_time_embed_dim=None, projection_class_embeddings_input_dim=None)
    return dict(
        addition_embed_type=str(model.addition_embed_type),
        addition_time_embed_dim=int(model.addition_time_embed_dim),
        projection_class_embeddings_input_dim=int(model.projection_class_embeddings_input_dim),
    )


def _effective_architecture(model: UNet) -> dict[str, Any]:
    """What the architecture computes, independent of how the heads are written (per-level heads
    or channels per head) and of the projection flag where no transformer uses it."""
    fields = {name: getattr(model, name) for name in ARCHITECTURE_FIELDS}
    fields["block_out_channels"] = tuple(int(c) for c in model.block_out_channels)
    fields["attention_levels"] = tuple(bool(a) for a in model.attention_levels)
    fields["freq_shift"] = float(model.freq_shift)
    del fields["attention_head_dim"], fields["num_attention_heads"]
    fields["heads"] = _attention_blocks(model)
    counts = model.transformer_layers_per_block or (1,) * len(model.block_out_channels)
    fields["transformer_layers_per_block"] = tuple(int(c) for c in counts)
    if model.cross_attention_dim is None:
        del fields["use_linear_projection"], fields["transformer_layers_per_block"]
    return fields


def unet_diffusers_config(model: UNet, sample_size: int | None = None) -> dict[str, Any]:
    """A ``config.json`` that diffusers constructs into ``model``'s architecture: ``UNet2DModel``, or
    ``UNet2DConditionModel`` when ``cross_attention_dim`` is set. The inverse of
    ``unet_config_from_diffusers`` (checked: converting it back computes the same network).

    Raises ``ValueError`` naming the field diffusers cannot represent.
    """
    _field_values(model, ARCHITECTURE_FIELDS + RUNTIME_FIELDS, "UNet")
    config = {**_common_config(model), **_attention_config(model)}
    config.update(sample_size=sample_size, _diffusers_version=DIFFUSERS_VERSION)
    ours = _effective_architecture(model)
    try:
        back = _effective_architecture(UNet(**unet_config_from_diffusers(config)))
    except ValueError as error:  # our importer cannot read what we wrote: a field this exporter mis-writes
        raise ValueError(f"The exported UNet config does not convert back to this UNet: {error}") from error
    differing = {
        name: (ours.get(name), back.get(name)) for name in set(ours) | set(back) if ours.get(name) != back.get(name)
    }
    if differing:
        raise ValueError(f"The diffusers config would not rebuild this UNet; fields (ours, diffusers'): {differing}.")
    return config


def _convert_back(torch_name: str, value: Any, expected: tuple[int, ...], leaf: str) -> np.ndarray:
    array = np.asarray(jax.device_get(value), dtype=np.float32)
    if tuple(array.shape) != tuple(expected):
        raise ValueError(f"Parameter for {torch_name} has shape {tuple(array.shape)}; the model expects {expected}.")
    if array.ndim == 4:  # conv kernel (kh, kw, in, out) -> weight (out, in, kh, kw)
        array = array.transpose(3, 2, 0, 1)
    elif array.ndim == 2 and leaf == "kernel":  # linear kernel (in, out) -> weight (out, in)
        array = array.T
    return np.ascontiguousarray(array)


def state_dict(params: Any, shapes: Any, name_fn: Callable[[tuple[str, ...]], str], what: str) -> dict[str, np.ndarray]:
    """``params`` (checked against ``shapes``, the model's parameter tree) as a diffusers state dict."""
    expected = {path: leaf.shape for path, leaf in torch_state.named_leaves(shapes)[0].items()}
    given = torch_state.named_leaves(params)[0]
    missing = sorted("/".join(p) for p in set(expected) - set(given))
    extra = sorted("/".join(p) for p in set(given) - set(expected))
    if missing or extra:
        raise ValueError(f"{what} parameters do not fit the model: missing {missing[:10]}, unexpected {extra[:10]}.")
    state = {}
    for path, shape in expected.items():
        torch_name = name_fn(path)
        state[torch_name] = _convert_back(torch_name, given[path], shape, path[-1])
    return state


def unet_state_dict(model: UNet, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``model``'s params as a diffusers state dict (name -> float32 numpy): the exact inverse of
    ``unet_params_from_diffusers``. The tree must be exactly ``model``'s; errors name the leaf."""
    return state_dict(params, unet_param_shapes(model), _torch_name, "UNet")


# ---------------------------------------------------------------------------------------------
# ControlNet: our ``adapters.ControlNet`` (output='residuals') <-> diffusers ``ControlNetModel``.
# ---------------------------------------------------------------------------------------------


def controlnet_torch_name(path: tuple[str, ...]) -> str:
    parts: list[str] = []
    for component in path:
        match = _CONTROLNET_INDEXED.match(component)
        parts.extend(match.groups() if match else (component,))
    return _torch_name(tuple(parts))


def _encoder_unet(adapter: ControlNet) -> UNet:
    """The UNet whose encoder ``adapter`` copies (same architecture fields)."""
    return UNet(**{name: getattr(adapter, name) for name in ARCHITECTURE_FIELDS + RUNTIME_FIELDS})


def _check_controlnet(adapter: ControlNet) -> None:
    known = ARCHITECTURE_FIELDS + RUNTIME_FIELDS + CONTROLNET_FIELDS + CONTROLNET_INIT_FIELDS
    _field_values(adapter, known, "ControlNet")
    if adapter.output != "residuals":
        raise ValueError(
            f"ControlNet output={adapter.output!r} (the mu-fusion adapter): diffusers' ControlNetModel only adds "
            "zero-conv residuals, so it cannot represent this adapter."
        )
    if adapter.cross_attention_dim is None:
        raise ValueError(
            "diffusers' ControlNetModel copies a UNet2DConditionModel encoder (cross-attention blocks, a two-resnet "
            "cross-attention mid block); this ControlNet copies a UNet2DModel-style backbone (cross_attention_dim="
            "None), which ControlNetModel cannot represent."
        )
    if adapter.num_instructions:
        raise ValueError(
            f"ControlNet num_instructions={adapter.num_instructions}: the instruction embedding is not exported "
            "(diffusers' pipelines pass no class labels to a ControlNetModel)."
        )
    if adapter.guidance_embedding:
        raise ValueError(
            "ControlNet guidance_embedding (CFG-aware distillation): diffusers' ControlNetModel has no guidance-scale "
            "embedding, so it cannot represent this adapter."
        )
    if not adapter.hint_unit_range:
        raise ValueError(
            "ControlNet hint_unit_range=False: this adapter reads the condition in [-1, 1], diffusers' ControlNet "
            "pipelines feed it in [0, 1]; train with adapter.hint_unit_range=True to export."
        )
    if adapter.hint_downsamples != len(adapter.hint_channels) - 1:
        raise ValueError(
            f"ControlNet hint network with hint_downsamples={adapter.hint_downsamples} and hint_channels="
            f"{tuple(adapter.hint_channels)}: diffusers' conditioning_embedding_out_channels always downsamples "
            f"len(channels) - 1 = {len(adapter.hint_channels) - 1} times, so this layout cannot be expressed."
        )


def controlnet_diffusers_config(adapter: ControlNet) -> dict[str, Any]:
    """A ``config.json`` that diffusers' ``ControlNetModel`` constructs into ``adapter``'s architecture.

    Raises ``ValueError`` saying why when diffusers cannot represent the adapter (mu fusion, a
    UNet2DModel-style encoder, instructions, or a hint network whose downsampling differs).
    """
    _check_controlnet(adapter)
    unet = unet_diffusers_config(_encoder_unet(adapter))
    shared = (
        "in_channels",
        "block_out_channels",
        "layers_per_block",
        "down_block_types",
        "mid_block_type",
        "norm_num_groups",
        "norm_eps",
        "flip_sin_to_cos",
        "freq_shift",
        "act_fn",
        "downsample_padding",
        "mid_block_scale_factor",
        "resnet_time_scale_shift",
        "attention_head_dim",
        "cross_attention_dim",
        "use_linear_projection",
        "only_cross_attention",
        "transformer_layers_per_block",
        "upcast_attention",
        "addition_embed_type",
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
    )
    return {
        "_class_name": "ControlNetModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        **{key: unet[key] for key in shared},
        "conditioning_channels": int(adapter.cond_channels),
        "conditioning_embedding_out_channels": [int(c) for c in adapter.hint_channels],
        "controlnet_conditioning_channel_order": "rgb",
        "global_pool_conditions": False,
        "class_embed_type": None,
        "num_class_embeds": None,
    }


def controlnet_state_dict(adapter: ControlNet, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``adapter``'s params as a diffusers ``ControlNetModel`` state dict (name -> float32 numpy):
    the encoder copy under the UNet's names, ``controlnet_cond_embedding.{conv_in, blocks.N,
    conv_out}``, ``controlnet_down_blocks.N`` and ``controlnet_mid_block``."""
    _check_controlnet(adapter)
    return state_dict(params, controlnet_param_shapes(adapter), controlnet_torch_name, "ControlNet")


def lora_state_dict(backbone: Mapping[str, Any], lora: Mapping[str, Any], scale: float) -> dict[str, np.ndarray]:
    """The run's LoRA factors as diffusers / PEFT LoRA weights of the UNet (``pipe.load_lora_weights``):
    ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` with ``W + B @ A`` = our ``W + scale (a @ b)``
    (the scale folded into B, so PEFT's default alpha = rank, scale 1, is right). Convs: A is the
    (kh, kw) conv to the rank, B a 1x1 conv."""
    from flax import traverse_util

    kernels = traverse_util.flatten_dict(dict(backbone))
    factors = traverse_util.flatten_dict(dict(lora))
    state = {}
    for keys, a in factors.items():
        if keys[-1] != "lora_a":
            continue
        a, b = np.asarray(a, np.float32), scale * np.asarray(factors[keys[:-1] + ("lora_b",)], np.float32)
        shape = np.shape(kernels[keys[:-1] + ("kernel",)])
        module = "unet." + _torch_name(keys[:-1] + ("kernel",)).removesuffix(".weight")
        if len(shape) == 4:  # conv (kh, kw, in, out): a rows are (kh, kw, in) flattened
            lora_a, lora_b = a.reshape(*shape[:3], -1).transpose(3, 2, 0, 1), b.T[:, :, None, None]
        else:
            lora_a, lora_b = a.T, b.T
        state[f"{module}.lora_A.weight"] = np.ascontiguousarray(lora_a)
        state[f"{module}.lora_B.weight"] = np.ascontiguousarray(lora_b)
    return state


# ---------------------------------------------------------------------------------------------
# Writing folders.
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_directory(path: str, *, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary sibling directory of ``path`` to fill; on success it replaces ``path``
    (``os.replace``; an existing ``path`` is refused unless empty or ``overwrite``). On an error
    the temporary directory and the parents made for ``path`` are removed and ``path`` is left as it was."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a directory.")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty (pass overwrite to replace it).")
    parent = os.path.dirname(path)
    created = _make_parents(parent)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield staging
        _replace_directory(staging, path, parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for directory in created:  # the parents made for path, deepest first: a failure leaves no new folder
            if os.path.isdir(directory) and not os.listdir(directory):
                os.rmdir(directory)
        raise


def _make_parents(parent: str) -> list[str]:
    """Creates ``parent`` and its missing ancestors; returns those it created, deepest first."""
    created, directory = [], parent
    while not os.path.exists(directory):
        created.append(directory)
        directory = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    return created


def _replace_directory(staging: str, path: str, parent: str) -> None:
    """``os.replace(staging, path)``; a non-empty ``path`` is moved aside first and deleted after
    (or put back if the replace fails)."""
    if not (os.path.isdir(path) and os.listdir(path)):
        os.replace(staging, path)
        return
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
    previous = os.path.join(aside, "previous")
    os.replace(path, previous)
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(previous, path)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def write_model_files(directory: str, config: Mapping[str, Any], state_dict: Mapping[str, np.ndarray]) -> None:
    """``config.json`` + ``diffusion_pytorch_model.safetensors`` (what ``save_pretrained`` writes)."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
    save_file(dict(state_dict), os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})


def save_unet(
    model: UNet, params: Mapping[str, Any], path: str, *, sample_size: int | None = None, overwrite: bool = False
) -> str:
    """Writes ``model`` + ``params`` as a diffusers UNet folder at ``path`` (atomically); returns it."""
    config, state = unet_diffusers_config(model, sample_size), unet_state_dict(model, params)
    with atomic_directory(path, overwrite=overwrite) as staging:
        write_model_files(staging, config, state)
    return os.path.abspath(path)


def save_controlnet(adapter: ControlNet, params: Mapping[str, Any], path: str, *, overwrite: bool = False) -> str:
    """Writes a ControlNet adapter as a diffusers ``ControlNetModel`` folder at ``path`` (atomically)."""
    config, state = controlnet_diffusers_config(adapter), controlnet_state_dict(adapter, params)
    with atomic_directory(path, overwrite=overwrite) as staging:
        write_model_files(staging, config, state)
    return os.path.abspath(path)


# ---------------------------------------------------------------------------------------------
# SD3: our joint ``DiT`` / ``DiTControlNet`` -> diffusers ``SD3Transformer2DModel`` / ``SD3ControlNetModel``,
# the inverse of ``torch_to_flax.sd3_transformer_params`` / ``sd3_controlnet_params`` (same names).
# ---------------------------------------------------------------------------------------------

# The SD3Transformer2DModel config fields, all of them DiT fields of the same name.
SD3_CONFIG_FIELDS = (
    "sample_size",
    "patch_size",
    "in_channels",
    "num_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "caption_projection_dim",
    "pooled_projection_dim",
    "out_channels",
    "pos_embed_max_size",
    "dual_attention_layers",
    "qk_norm",
)


def sd3_transformer_diffusers_config(model: DiT) -> dict[str, Any]:
    """The ``SD3Transformer2DModel`` config.json of a joint ``DiT``; refused naming the field where
    diffusers would build another architecture (checked by reading it back: ``sd3_transformer_fields``)."""
    if model.joint_attention_dim is None:
        raise ValueError("model.joint_attention_dim=None: an image-only DiT has no SD3Transformer2DModel counterpart.")
    config = {field: getattr(model, field) for field in SD3_CONFIG_FIELDS}
    config["dual_attention_layers"] = list(config["dual_attention_layers"])
    config = {"_class_name": SD3_CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION, **config}
    fields = sd3_transformer_fields(config)
    differing = {k: (getattr(model, k), v) for k, v in fields.items() if _normal_field(getattr(model, k)) != v}
    if differing:
        raise ValueError(
            f"The SD3Transformer2DModel config would not rebuild this DiT; fields (ours, diffusers'): {differing}."
        )
    return config


def _normal_field(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _pos_embed_buffer(model: DiT) -> np.ndarray:
    """diffusers' persistent ``pos_embed.pos_embed`` buffer (1, max_size ** 2, width) of ``model``."""
    table = pos_embed_table(model.width, model.pos_embed_max_size, model.sample_size // model.patch_size)
    return np.ascontiguousarray(table[None].astype(np.float32))


def sd3_transformer_state_dict(model: DiT, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A joint ``DiT``'s params as an ``SD3Transformer2DModel`` state dict (with its position buffer)."""
    state = state_dict(params, sd3_transformer_param_shapes(model), _torch_name, "SD3 transformer")
    return {**state, SD3_POS_EMBED: _pos_embed_buffer(model)}


def sd3_controlnet_diffusers_config(adapter: DiTControlNet) -> dict[str, Any]:
    """The ``SD3ControlNetModel`` config.json of a ``DiTControlNet``: the transformer's fields with the
    copy's block count, ``extra_conditioning_channels`` beyond the latent's, and
    ``force_zeros_for_pooled_projection=False`` (our adapter reads the pooled prompt, and the pipeline
    then shifts the control latent by the VAE's ``shift_factor``, as ``batch_inputs.condition_latents``)."""
    if adapter.num_instructions:
        raise ValueError("task.num_instructions: an SD3ControlNetModel has no instruction embedding.")
    extra = adapter.cond_channels - adapter.in_channels
    if extra < 0:
        raise ValueError(
            f"adapter cond_channels={adapter.cond_channels}: fewer than the latent's {adapter.in_channels}."
        )
    config = sd3_transformer_diffusers_config(adapter)
    config.update(
        _class_name=SD3_CONTROLNET_CLASS_NAME,
        extra_conditioning_channels=extra,
        pos_embed_type="sincos",
        use_pos_embed=True,
        force_zeros_for_pooled_projection=False,
    )
    return config


def sd3_controlnet_state_dict(adapter: DiTControlNet, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A ``DiTControlNet``'s params as an ``SD3ControlNetModel`` state dict (with its position buffer)."""
    state = state_dict(params, sd3_controlnet_param_shapes(adapter), _torch_name, "SD3 ControlNet")
    return {**state, SD3_POS_EMBED: _pos_embed_buffer(adapter)}
