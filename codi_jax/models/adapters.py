"""Conditional adapters that turn the unconditional backbone (UNet or DiT) into a conditional one.

Every adapter is built so that at initialisation the adapted model computes exactly what the
unconditional backbone computes (CoDi starts from the teacher):

  ControlNet  a trainable copy of the backbone's encoder (same parameter names, initialised from
              the backbone) that reads the condition through a small hint network; its skip and
              middle features reach the backbone through zero-initialised 1x1 convs
              (``output='residuals'``, PE-CoDi) or are blended in as ``(1 - mu) h + mu f`` with
              learnable per-channel ``mu`` initialised to 0 (``output='blend'``, full CoDi).
  T2IAdapter  a light convolutional encoder of the condition alone (no backbone copy, no time
              input) whose per-level features become skip residuals through zero-init 1x1 convs.
  LoRA        low-rank updates of the backbone's kernels: ``codi_jax.models.lora``.
  DiTControlNet  a DiT backbone's ControlNet (``codi_jax.models.dit_controlnet``, diffusers'
              ``SD3ControlNetModel`` layout): a copy of its first blocks, zero-init linear residuals.

``ConditionalModel`` is backbone + adapter with parameters ``{"backbone": ..., "adapter": ...}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from codi_jax.models import layers
from codi_jax.models.conditioning import Conditioned, Conditioning
from codi_jax.models.dit import DiT
from codi_jax.models.dit_controlnet import DiTControlNet
from codi_jax.models.unet import UNet, split_context

ADAPTER_KINDS = ("controlnet", "fusion", "t2i")
# Backbone sub-trees a ControlNet copies: the whole encoder, under the same names.
ENCODER_PREFIXES = ("conv_in", "time_embedding", "add_embedding", "down_blocks_", "mid_block")
# A DiT ControlNet's copy: its patch and time embeddings and first blocks (``DiTControlNet``).
DIT_PREFIXES = ("pos_embed", "time_text_embed", "context_embedder", "transformer_blocks_")


def _zero_conv(features: int, name: str) -> layers.Conv2D:
    return layers.Conv2D(features, kernel_size=1, kernel_init=nn.initializers.zeros, name=name)


class HintNetwork(nn.Module):
    """Condition image -> features added after the encoder copy's ``conv_in`` (diffusers'
    ``ControlNetConditioningEmbedding``): conv-SiLU stack, optional stride-2 stages (for latent
    backbones whose input is smaller than the condition), zero-initialised last conv.

    ``conv_in`` (to ``channels[0]``), then per consecutive pair ``(channels[i], channels[i + 1])`` a
    conv ``blocks_{2i}`` and a conv ``blocks_{2i+1}``, stride 2 for the first ``num_downsamples``
    pairs, each followed by SiLU, then ``conv_out``. diffusers' layout is
    ``channels = conditioning_embedding_out_channels`` with ``num_downsamples = len(channels) - 1``
    (SD: (16, 32, 96, 256), 3 stride-2 stages, the condition at 8x the latent size).
    """

    out_features: int
    channels: Sequence[int] = (16, 32)
    num_downsamples: int = 0
    conv_impl: str = "auto"
    # diffusers zero-initialises conv_out too. With the zero convs after the encoder copy also at 0
    # that is a saddle: neither gets a condition-dependent gradient until the other has moved
    # (ControlNet's "sudden convergence"). The adapter's output is exactly 0 at init either way.
    zero_init_out: bool = True

    @nn.compact
    def __call__(self, cond: jax.Array) -> jax.Array:
        if not 0 <= self.num_downsamples <= len(self.channels) - 1:
            raise ValueError(
                f"Hint network: {self.num_downsamples} downsamples need at least {self.num_downsamples + 1} "
                f"channel widths (one stride-2 stage per consecutive pair); got channels={tuple(self.channels)}."
            )
        h = nn.silu(layers.Conv2D(self.channels[0], conv_impl=self.conv_impl, name="conv_in")(cond))
        for i in range(len(self.channels) - 1):
            h = nn.silu(layers.Conv2D(self.channels[i], conv_impl=self.conv_impl, name=f"blocks_{2 * i}")(h))
            stride = 2 if i < self.num_downsamples else 1
            name = f"blocks_{2 * i + 1}"
            h = nn.silu(layers.Conv2D(self.channels[i + 1], stride=stride, conv_impl=self.conv_impl, name=name)(h))
        out_init = nn.initializers.zeros if self.zero_init_out else nn.initializers.lecun_normal()
        return layers.Conv2D(self.out_features, kernel_init=out_init, conv_impl=self.conv_impl, name="conv_out")(h)


class ControlNet(Conditioned, UNet):
    """Encoder copy of the backbone reading ``(z_t, t, cond)``; returns the backbone's hooks.

    Inherits the backbone's architecture fields so that ``encode`` builds the same parameter tree
    (``conv_in``, ``time_embedding``, ``down_blocks_i``, ``mid_block``) as the UNet it copies.
    """

    cond_channels: int = 3
    hint_channels: Sequence[int] = (16, 32)
    hint_downsamples: int = 0
    hint_zero_init: bool = True
    num_instructions: int = 0  # > 0: a learned instruction embedding added to the time embedding
    output: str = "residuals"  # "residuals" (zero convs, PE-CoDi) | "blend" (mu fusion, full CoDi)
    guidance_embedding: bool = False  # CFG-aware distillation: the guidance scale w enters the temb
    hint_unit_range: bool = False  # the hint network reads (cond + 1) / 2 in [0, 1], as diffusers' ControlNets

    def guidance_offset(self, guidance_scale: jax.Array, batch: int, features: int) -> jax.Array:
        """``e(w) - e(1)`` with ``e`` = sinusoid(1000 w) -> dense -> SiLU -> zero-init dense: 0 at
        init for every w, and exactly 0 at w = 1 whatever the weights (so w = 1 is no guidance)."""
        w = jnp.broadcast_to(jnp.asarray(guidance_scale, jnp.float32), (batch,))
        hidden = nn.Dense(features, name="guidance_embedding_linear_1")
        out = nn.Dense(features, kernel_init=nn.initializers.zeros, name="guidance_embedding_linear_2")

        def embed(values):
            sinusoid = layers.timestep_embedding(1000.0 * values, self.block_out_channels[0])
            return out(nn.silu(hidden(sinusoid)))

        return embed(w) - embed(jnp.ones_like(w))

    @nn.compact
    def conditioned(
        self, sample: jax.Array, timesteps: jax.Array, inputs: Conditioning, *, train: bool = False
    ) -> dict[str, Any]:
        """The backbone hooks for ``(sample, timesteps, inputs)``; ``inputs.context`` as the backbone's
        (a ``TEXT_TIME_KEYS`` dict for a text_time encoder: its ``add_embedding`` reads the extras)."""
        self.check_input(sample)
        inputs.check(sample, "ControlNet", channels=self.cond_channels, takes_guidance_scale=True)
        cond, instruction, guidance_scale = inputs.cond, inputs.instruction, inputs.guidance_scale
        context, added = split_context(inputs.context, self.addition_embed_type)
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (sample.shape[0],))
        temb = self.time_embed(timesteps, added)
        if self.num_instructions:
            temb = temb + layers.instruction_embedding(self.num_instructions, temb.shape[-1], instruction)
        if self.guidance_embedding:
            if guidance_scale is None:
                raise ValueError("This adapter was built for a guidance scale (codi.cfg); none was given.")
            temb = temb + self.guidance_offset(guidance_scale, sample.shape[0], temb.shape[-1])
        hint = HintNetwork(
            self.block_out_channels[0],
            tuple(self.hint_channels),
            self.hint_downsamples,
            self.conv_impl,
            self.hint_zero_init,
            name="controlnet_cond_embedding",
        )((cond.astype(jnp.float32) + 1.0) / 2.0 if self.hint_unit_range else cond.astype(jnp.float32))
        if hint.shape[1:3] != sample.shape[1:3]:
            raise ValueError(
                f"Hint features {hint.shape[1:3]} do not match the input {sample.shape[1:3]}: condition size "
                f"{cond.shape[1:3]} with hint_downsamples={self.hint_downsamples}."
            )
        skips, mid = self.encode(sample, temb, context, train=train, hint=hint)
        if self.output == "residuals":
            residuals = [_zero_conv(s.shape[-1], f"controlnet_down_blocks_{k}")(s) for k, s in enumerate(skips)]
            return {
                "down_residuals": residuals,
                "mid_residual": _zero_conv(mid.shape[-1], "controlnet_mid_block")(mid),
            }
        if self.output == "blend":
            mus = [self.param(f"fusion_mu_{k}", nn.initializers.zeros, (s.shape[-1],)) for k, s in enumerate(skips)]
            mu_mid = self.param("fusion_mu_mid", nn.initializers.zeros, (mid.shape[-1],))
            return {"down_blend": list(zip(skips, mus)), "mid_blend": (mid, mu_mid)}
        raise ValueError(f"ControlNet output={self.output!r}; valid: 'residuals', 'blend'.")


class T2IAdapter(Conditioned):
    """Light condition encoder (T2I-Adapter style): per level, a conv and a residual conv pair at
    that level's resolution; each backbone skip gets a zero-init 1x1 projection of its level's
    feature. Independent of ``z_t`` and ``t``, so it can be computed once per sampling run."""

    skip_specs: Sequence[tuple[int, int]]  # (channels, level) of each backbone skip
    mid_channels: int
    channels: Sequence[int] = (32, 64, 64)
    num_instructions: int = 0
    conv_impl: str = "auto"

    @nn.compact
    def conditioned(
        self, sample: jax.Array, timesteps: jax.Array, inputs: Conditioning, *, train: bool = False
    ) -> dict[str, Any]:
        """The backbone hooks for ``inputs.cond`` (and ``inputs.instruction``) alone."""
        del timesteps, train
        levels = max(level for _, level in self.skip_specs) + 1
        if len(self.channels) != levels:
            raise ValueError(f"T2I adapter needs one channel count per level ({levels}), got {tuple(self.channels)}.")
        inputs.check(sample, "T2I adapter", same_size=True)
        h = layers.Conv2D(self.channels[0], conv_impl=self.conv_impl, name="stem")(inputs.cond.astype(jnp.float32))
        if self.num_instructions:
            embedded = layers.instruction_embedding(self.num_instructions, self.channels[0], inputs.instruction)
            h = h + embedded[:, None, None, :]
        features = []
        for i, width in enumerate(self.channels):
            stride = 1 if i == 0 else 2
            h = layers.Conv2D(width, stride=stride, conv_impl=self.conv_impl, name=f"body_{i}_in")(nn.silu(h))
            r = layers.Conv2D(width, conv_impl=self.conv_impl, name=f"body_{i}_conv1")(nn.silu(h))
            h = h + layers.Conv2D(width, conv_impl=self.conv_impl, name=f"body_{i}_conv2")(nn.silu(r))
            features.append(h)
        residuals = [
            _zero_conv(channels, f"adapter_down_{k}")(features[level])
            for k, (channels, level) in enumerate(self.skip_specs)
        ]
        mid = _zero_conv(self.mid_channels, "adapter_mid")(features[-1])
        return {"down_residuals": residuals, "mid_residual": mid}


class ConditionalModel(Conditioned):
    """Backbone (UNet or DiT) + adapter: ``(z_t, model time, cond[, instruction]) -> network output``."""

    backbone: UNet | DiT
    adapter: nn.Module

    @nn.compact
    def conditioned(
        self, sample: jax.Array, timesteps: jax.Array, inputs: Conditioning, *, train: bool = False
    ) -> jax.Array:
        """The backbone's output with the adapter's hooks; ``inputs.context`` as the backbone's,
        ``instruction`` / ``guidance_scale`` for adapters built with ``num_instructions`` /
        ``guidance_embedding``."""
        hooks = self.adapter.conditioned(sample, timesteps, inputs, train=train)
        return self.backbone(sample, timesteps, inputs.context, train=train, **hooks)


def default_adapter_config() -> ml_collections.ConfigDict:
    """The ``adapter`` config section and its defaults (PE-CoDi with a ControlNet)."""
    config = ml_collections.ConfigDict()
    config.kind = "controlnet"  # 'controlnet' (zero-conv residuals) | 'fusion' (mu blend) | 't2i'
    config.train_backbone = False  # False: PE-CoDi (only adapter / LoRA params train); True: full CoDi
    config.hint_channels = (16, 32)  # ControlNet hint network widths
    config.hint_downsamples = 0  # stride-2 stages in the hint network (8x for SD latents: 3)
    config.hint_zero_init = True  # diffusers' zero-init hint conv_out; False escapes the init saddle
    config.hint_unit_range = False  # True: the condition enters the hint network in [0, 1] (diffusers)
    config.init_from = ""  # a converted ControlNetModel (a convert --controlnet workdir/controlnet) to start from
    config.dit_blocks = 0  # DiT backbones: blocks the ControlNet copies (SD3ControlNetModel); 0 = half
    config.t2i_channels = ()  # T2I encoder widths per level; () = the backbone's block_out_channels
    config.lora_rank = 0  # > 0: LoRA of this rank on the backbone kernels matched by lora_targets
    config.lora_alpha = 0.0  # LoRA scale alpha / rank; 0 = rank (scale 1)
    config.lora_targets = r"(to_q|to_k|to_v|to_out_0|conv1|conv2)/kernel$"
    return config


def build_conditional_model(
    backbone: UNet | DiT,
    adapter_config: ml_collections.ConfigDict,
    cond_channels: int,
    num_instructions: int = 0,
    guidance_embedding: bool = False,
) -> ConditionalModel:
    """The adapted model for ``adapter_config.kind``; the backbone module is used as is."""
    kind = adapter_config.kind
    if isinstance(backbone, DiT):
        return ConditionalModel(
            backbone=backbone,
            adapter=_dit_controlnet(backbone, adapter_config, cond_channels, num_instructions, guidance_embedding),
        )
    if guidance_embedding and kind == "t2i":
        raise ValueError("codi.cfg (a guidance-scale embedding) needs a time-conditioned adapter: controlnet / fusion.")
    if kind in ("controlnet", "fusion"):
        fields = {k: getattr(backbone, k) for k in UNet.__dataclass_fields__ if k not in ("parent", "name")}
        adapter = ControlNet(
            **fields,
            cond_channels=cond_channels,
            hint_channels=tuple(adapter_config.hint_channels),
            hint_downsamples=adapter_config.hint_downsamples,
            hint_zero_init=adapter_config.hint_zero_init,
            num_instructions=num_instructions,
            output="residuals" if kind == "controlnet" else "blend",
            guidance_embedding=guidance_embedding,
            hint_unit_range=bool(adapter_config.hint_unit_range),
        )
    elif kind == "t2i":
        adapter = T2IAdapter(
            skip_specs=tuple(backbone.skip_specs()),
            mid_channels=backbone.block_out_channels[-1],
            channels=tuple(adapter_config.t2i_channels or backbone.block_out_channels),
            num_instructions=num_instructions,
            conv_impl=backbone.conv_impl,
        )
    else:
        raise ValueError(f"adapter.kind={kind!r}; valid kinds: {ADAPTER_KINDS}.")
    return ConditionalModel(backbone=backbone, adapter=adapter)


def _dit_controlnet(
    backbone: DiT, adapter_config: ml_collections.ConfigDict, cond_channels: int, num_instructions: int, guidance: bool
) -> DiTControlNet:
    """A DiT backbone's adapter: ``kind='controlnet'`` only (full CoDi trains the backbone with it)."""
    if adapter_config.kind != "controlnet" or guidance:
        what = "codi.cfg_range" if guidance else f"adapter.kind={adapter_config.kind!r}"
        raise ValueError(f"{what}: a DiT backbone takes adapter.kind='controlnet' (an SD3ControlNetModel copy) only.")
    blocks = int(adapter_config.dit_blocks) or max(1, backbone.num_layers // 2)
    if not 1 <= blocks <= backbone.num_layers:
        raise ValueError(f"adapter.dit_blocks={blocks}: the DiT has {backbone.num_layers} blocks to copy (0 = half).")
    fields = {k: getattr(backbone, k) for k in DiT.__dataclass_fields__ if k not in ("parent", "name")}
    dual = tuple(i for i in backbone.dual_attention_layers if i < blocks)  # those of the copied blocks
    return DiTControlNet(
        **{**fields, "num_layers": blocks, "dual_attention_layers": dual},
        cond_channels=cond_channels,
        hint_zero_init=bool(adapter_config.hint_zero_init),
        num_instructions=num_instructions,
    )


def init_from_backbone(params: dict, backbone_params: Any, *, copy_encoder: bool) -> dict:
    """Puts the pre-trained backbone into a freshly initialised ``ConditionalModel`` tree and, for a
    ControlNet, copies the backbone's encoder into the adapter (the ControlNet initialisation).

    Works inside ``jit`` (pure tree surgery); shapes must match or it raises naming the leaf.
    """
    fresh = params["backbone"]
    if jax.tree.structure(fresh) != jax.tree.structure(backbone_params):
        raise ValueError("Pre-trained backbone parameters do not have the structure of the configured backbone.")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(fresh), jax.tree.leaves(backbone_params)):
        if a.shape != b.shape:
            raise ValueError(f"Backbone parameter {jax.tree_util.keystr(path)}: shape {b.shape}, expected {a.shape}.")
    adapter = dict(params["adapter"])
    for name in adapter if copy_encoder else ():
        if name.startswith(ENCODER_PREFIXES + DIT_PREFIXES) and name in backbone_params:
            adapter[name] = jax.tree.map(jnp.copy, backbone_params[name])
    return {**params, "backbone": backbone_params, "adapter": adapter}
