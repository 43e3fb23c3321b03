"""CoDi's conditional model as a diffusers custom component (PyTorch; needs torch and diffusers).

``python -m codi_jax.export`` copies this file beside the weights of a run that diffusers' own
classes cannot represent: a ControlNet on a pixel ``UNet2DModel`` backbone (the CPU demo), the
mu-fusion adapter (full CoDi), the T2I adapter, an instruction embedding or a CFG-distilled
student (a guidance-scale embedding). It loads with

    from diffusers import AutoModel
    model = AutoModel.from_pretrained(FOLDER, subfolder="codi_model", trust_remote_code=True)

and ``model(sample, timestep, cond, encoder_hidden_states=None, guidance_scale=None,
instruction=None)`` returns the network output, as ``codi_jax``'s ``ConditionalModel`` does (NCHW
here, NHWC there). The backbone is diffusers' own ``UNet2DModel`` / ``UNet2DConditionModel``; the
adapter reuses the backbone's class for its encoder copy. Only the blocks are called: the
forward below is diffusers' UNet forward with the adapter's hooks on the skips and the middle.

This module imports nothing from ``codi_jax``: the exported folder needs torch and diffusers only.
"""

from __future__ import annotations

from typing import Any

import diffusers
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn import functional as F


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)


def _cross(block: nn.Module) -> bool:
    return bool(getattr(block, "has_cross_attention", False))


def time_embedding(unet: nn.Module, timestep: Any, sample: torch.Tensor) -> torch.Tensor:
    """The UNet's time embedding of (possibly fractional) timesteps, one per example."""
    t = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32)
    t = t.reshape(-1).expand(sample.shape[0]) if t.numel() == 1 else t.reshape(sample.shape[0])
    return unet.time_embedding(unet.time_proj(t).to(sample.dtype))


def encode(unet: nn.Module, sample: torch.Tensor, emb: torch.Tensor, context, hint=None):
    """``(skips, middle)`` of the UNet's encoder; ``hint`` is added after ``conv_in``."""
    h = unet.conv_in(sample)
    if hint is not None:
        h = h + hint
    skips = [h]
    for block in unet.down_blocks:
        if _cross(block):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
        else:
            h, res = block(hidden_states=h, temb=emb)
        skips.extend(res)
    if unet.mid_block is not None:
        h = unet.mid_block(h, emb, encoder_hidden_states=context) if _cross(unet.mid_block) else unet.mid_block(h, emb)
    return skips, h


def decode(unet: nn.Module, h: torch.Tensor, skips: list, emb: torch.Tensor, context) -> torch.Tensor:
    """The UNet's decoder from the middle features and the (adapted) skips."""
    for block in unet.up_blocks:
        n = len(block.resnets)
        res, skips = tuple(skips[-n:]), skips[:-n]
        if _cross(block):
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=context)
        else:
            h = block(hidden_states=h, res_hidden_states_tuple=res, temb=emb)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


class HintNetwork(nn.Module):
    """``codi_jax.models.adapters.HintNetwork``: conv-SiLU stack, ``num_downsamples`` stride-2 stages."""

    def __init__(self, cond_channels: int, channels: list[int], num_downsamples: int, out_features: int) -> None:
        super().__init__()
        self.conv_in = _conv(cond_channels, channels[0])
        blocks = []
        for i in range(len(channels) - 1):
            blocks.append(_conv(channels[i], channels[i]))
            blocks.append(_conv(channels[i], channels[i + 1], stride=2 if i < num_downsamples else 1))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = _conv(channels[-1], out_features)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(cond))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)


class ControlNetAdapter(nn.Module):
    """``adapters.ControlNet``: the backbone's encoder copy reading the condition through the hint
    network; ``output='residuals'`` (zero convs) or ``'blend'`` (per-channel mu)."""

    def __init__(self, backbone: dict[str, Any], adapter: dict[str, Any], skip_channels: list[int]) -> None:
        super().__init__()
        self.output, self.unit_range = adapter["output"], bool(adapter["hint_unit_range"])
        encoder = getattr(diffusers, backbone["_class_name"]).from_config(backbone)
        encoder.up_blocks, encoder.conv_norm_out, encoder.conv_out = nn.ModuleList(), None, nn.Identity()
        self.encoder = encoder
        width = backbone["block_out_channels"][0]
        hint = adapter["hint_channels"]
        self.controlnet_cond_embedding = HintNetwork(adapter["cond_channels"], hint, adapter["hint_downsamples"], width)
        temb = 4 * width
        if adapter["num_instructions"]:
            self.instruction_embedding = nn.Embedding(adapter["num_instructions"], temb)
        if adapter["guidance_embedding"]:
            self.guidance_embedding_linear_1 = nn.Linear(width, temb)
            self.guidance_embedding_linear_2 = nn.Linear(temb, temb)
        if self.output == "residuals":
            self.controlnet_down_blocks = nn.ModuleList(_conv(c, c, kernel=1) for c in skip_channels)
            mid = backbone["block_out_channels"][-1]
            self.controlnet_mid_block = _conv(mid, mid, kernel=1)
        else:
            for k, c in enumerate(skip_channels):
                self.register_parameter(f"fusion_mu_{k}", nn.Parameter(torch.zeros(c)))
            self.fusion_mu_mid = nn.Parameter(torch.zeros(backbone["block_out_channels"][-1]))

    def guidance_offset(self, w: torch.Tensor) -> torch.Tensor:
        """``e(w) - e(1)``: exactly 0 at w = 1 (no guidance)."""

        def embed(values: torch.Tensor) -> torch.Tensor:
            width = self.guidance_embedding_linear_1.in_features
            sinusoid = get_timestep_embedding(1000.0 * values, width, flip_sin_to_cos=True, downscale_freq_shift=0)
            return self.guidance_embedding_linear_2(F.silu(self.guidance_embedding_linear_1(sinusoid)))

        return embed(w) - embed(torch.ones_like(w))

    def forward(self, sample, timestep, cond, context=None, guidance_scale=None, instruction=None) -> dict:
        emb = time_embedding(self.encoder, timestep, sample)
        if hasattr(self, "instruction_embedding"):
            emb = emb + self.instruction_embedding(instruction.long())
        if hasattr(self, "guidance_embedding_linear_1"):
            w = torch.ones(sample.shape[0]) if guidance_scale is None else torch.as_tensor(guidance_scale)
            emb = emb + self.guidance_offset(w.float().reshape(-1).expand(sample.shape[0]).to(sample.device))
        hint = self.controlnet_cond_embedding((cond + 1.0) / 2.0 if self.unit_range else cond)
        skips, mid = encode(self.encoder, sample, emb, context, hint)
        if self.output == "residuals":
            residuals = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]
            return {"down_residuals": residuals, "mid_residual": self.controlnet_mid_block(mid)}
        mus = [getattr(self, f"fusion_mu_{k}") for k in range(len(skips))]
        return {"down_blend": list(zip(skips, mus)), "mid_blend": (mid, self.fusion_mu_mid)}


class T2IAdapter(nn.Module):
    """``adapters.T2IAdapter``: a light encoder of the condition alone, zero-conv skip residuals."""

    def __init__(self, adapter: dict[str, Any], skip_specs: list[list[int]], mid_channels: int) -> None:
        super().__init__()
        channels, self.skip_levels = adapter["t2i_channels"], [level for _, level in skip_specs]
        self.stem = _conv(adapter["cond_channels"], channels[0])
        if adapter["num_instructions"]:
            self.instruction_embedding = nn.Embedding(adapter["num_instructions"], channels[0])
        previous = channels[0]
        for i, width in enumerate(channels):
            setattr(self, f"body_{i}_in", _conv(previous, width, stride=1 if i == 0 else 2))
            setattr(self, f"body_{i}_conv1", _conv(width, width))
            setattr(self, f"body_{i}_conv2", _conv(width, width))
            previous = width
        for k, (c, level) in enumerate(skip_specs):
            setattr(self, f"adapter_down_{k}", _conv(channels[level], c, kernel=1))
        self.adapter_mid = _conv(channels[-1], mid_channels, kernel=1)
        self.levels = len(channels)

    def forward(self, sample, timestep, cond, context=None, guidance_scale=None, instruction=None) -> dict:
        h = self.stem(cond)
        if hasattr(self, "instruction_embedding"):
            h = h + self.instruction_embedding(instruction.long())[:, :, None, None]
        features = []
        for i in range(self.levels):
            h = getattr(self, f"body_{i}_in")(F.silu(h))
            r = getattr(self, f"body_{i}_conv1")(F.silu(h))
            h = h + getattr(self, f"body_{i}_conv2")(F.silu(r))
            features.append(h)
        residuals = [getattr(self, f"adapter_down_{k}")(features[level]) for k, level in enumerate(self.skip_levels)]
        return {"down_residuals": residuals, "mid_residual": self.adapter_mid(features[-1])}


def apply_hooks(skips: list, mid: torch.Tensor, hooks: dict) -> tuple[list, torch.Tensor]:
    """Residuals ``h + r`` or blends ``h + mu (f - h)`` (mu per channel) on the skips and the middle."""
    if "down_residuals" in hooks:
        return [s + r for s, r in zip(skips, hooks["down_residuals"])], mid + hooks["mid_residual"]
    per_channel = lambda mu: mu.reshape(1, -1, 1, 1)  # noqa: E731
    skips = [s + per_channel(mu) * (f - s) for s, (f, mu) in zip(skips, hooks["down_blend"])]
    f, mu = hooks["mid_blend"]
    return skips, mid + per_channel(mu) * (f - mid)


class CoDiModel(ModelMixin, ConfigMixin):
    """Backbone + adapter: ``(sample, timestep, cond[, context, guidance_scale, instruction]) -> output``."""

    @register_to_config
    def __init__(
        self,
        backbone_config: dict[str, Any] | None = None,
        adapter_config: dict[str, Any] | None = None,
        skip_specs: list[list[int]] | None = None,
        auto_map: dict[str, str] | None = None,  # how AutoModel finds this class (kept in the config)
    ) -> None:
        super().__init__()
        backbone, adapter = backbone_config, adapter_config
        self.backbone = getattr(diffusers, backbone["_class_name"]).from_config(backbone)
        if adapter["kind"] == "t2i":
            self.adapter = T2IAdapter(adapter, skip_specs, backbone["block_out_channels"][-1])
        else:
            self.adapter = ControlNetAdapter(backbone, adapter, [c for c, _ in skip_specs])

    def forward(self, sample, timestep, cond, encoder_hidden_states=None, guidance_scale=None, instruction=None):
        context = encoder_hidden_states
        hooks = self.adapter(sample, timestep, cond, context, guidance_scale, instruction)
        emb = time_embedding(self.backbone, timestep, sample)
        skips, mid = encode(self.backbone, sample, emb, context)
        skips, mid = apply_hooks(skips, mid, hooks)
        return decode(self.backbone, mid, skips, emb, context)
