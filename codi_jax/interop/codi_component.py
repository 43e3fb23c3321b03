"""A conditional run that diffusers' own classes cannot represent, as one custom component.

diffusers' ``ControlNetModel`` copies a cross-attention ``UNet2DConditionModel`` encoder and adds
zero-conv residuals read from a [0, 1] condition. Everything else CoDi trains (a ControlNet on a
pixel ``UNet2DModel`` backbone as in the CPU demo, the mu-fusion adapter of full CoDi, the T2I
adapter, an instruction embedding, a CFG-distilled student's guidance-scale embedding, a [-1, 1]
hint) is exported as ``codi_model/``: ``config.json`` (``auto_map`` -> ``codi_model.CoDiModel``),
``diffusion_pytorch_model.safetensors`` (backbone under ``backbone.``, adapter under ``adapter.``)
and ``codi_model.py``, a copy of ``codi_jax/interop/codi_model.py`` (PyTorch + diffusers only).
``diffusers.AutoModel.from_pretrained(DIR, subfolder="codi_model", trust_remote_code=True)`` loads it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np

from codi_jax.interop import flax_to_torch
from codi_jax.models import adapters

NAME = "codi_model"  # the subfolder, the module file's stem
MODULE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{NAME}.py")


def diffusers_gap(model: adapters.ConditionalModel) -> str | None:
    """Why diffusers' ``UNet2DConditionModel`` + ``ControlNetModel`` cannot represent ``model``
    (the run then exports as this component), or None when they can."""
    adapter = model.adapter
    if not isinstance(adapter, adapters.ControlNet):
        return "the T2I adapter has no diffusers counterpart"
    try:
        flax_to_torch.unet_diffusers_config(model.backbone)
        flax_to_torch.controlnet_diffusers_config(adapter)
    except ValueError as error:
        return str(error)
    return None


def _adapter_fields(adapter: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(adapter, adapters.T2IAdapter):
        stem = np.shape(params["stem"]["kernel"])  # (kh, kw, condition channels, width)
        return {
            "kind": "t2i",
            "cond_channels": int(stem[2]),
            "t2i_channels": [int(c) for c in adapter.channels],
            "num_instructions": int(adapter.num_instructions),
        }
    return {
        "kind": "controlnet" if adapter.output == "residuals" else "fusion",
        "output": adapter.output,
        "cond_channels": int(adapter.cond_channels),
        "hint_channels": [int(c) for c in adapter.hint_channels],
        "hint_downsamples": int(adapter.hint_downsamples),
        "hint_unit_range": bool(adapter.hint_unit_range),
        "num_instructions": int(adapter.num_instructions),
        "guidance_embedding": bool(adapter.guidance_embedding),
    }


def component_config(model: adapters.ConditionalModel, params: Mapping[str, Any], sample_size: int | None) -> dict:
    """``codi_model/config.json``: the backbone's diffusers config, the adapter's fields, the skips."""
    return {
        "_class_name": "CoDiModel",
        "_diffusers_version": flax_to_torch.DIFFUSERS_VERSION,
        "auto_map": {"AutoModel": f"{NAME}.CoDiModel"},
        "backbone_config": flax_to_torch.unet_diffusers_config(model.backbone, sample_size),
        "adapter_config": _adapter_fields(model.adapter, params["adapter"]),
        "skip_specs": [[int(c), int(level)] for c, level in model.backbone.skip_specs()],
    }


def _adapter_torch_name(path: tuple[str, ...]) -> str:
    """Our adapter parameter path -> its name in ``codi_model.py``'s adapter module."""
    if len(path) == 1:  # fusion_mu_k, fusion_mu_mid
        return path[0]
    if path[0] == "instruction_embedding":
        return "instruction_embedding.weight"
    name = flax_to_torch.controlnet_torch_name(path)
    return f"encoder.{name}" if path[0].startswith(adapters.ENCODER_PREFIXES) else name


def component_state_dict(model: adapters.ConditionalModel, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``params`` (LoRA merged) as ``codi_model``'s state dict: ``backbone.*`` and ``adapter.*``."""
    backbone = flax_to_torch.unet_state_dict(model.backbone, params["backbone"])
    adapter = flax_to_torch.state_dict(params["adapter"], params["adapter"], _adapter_torch_name, "Adapter")
    return {**{f"backbone.{k}": v for k, v in backbone.items()}, **{f"adapter.{k}": v for k, v in adapter.items()}}


def write(directory: str, config: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> None:
    """The component folder: config, weights and the PyTorch module file."""
    flax_to_torch.write_model_files(directory, config, state)
    shutil.copyfile(MODULE_FILE, os.path.join(directory, f"{NAME}.py"))
