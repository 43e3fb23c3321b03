"""Stable Diffusion's VAE: diffusers' ``AutoencoderKL`` as a pure Flax linen module.

Structured and named like diffusers' modules (``encoder/down_blocks_0/resnets_1/conv1`` <->
``encoder.down_blocks.0.resnets.1.conv1``, ``decoder/mid_block/attentions_0/to_q``,
``quant_conv``, ``post_quant_conv``) so that converting PyTorch weights is a name mapping
(``convert_diffusers.vae_params_from_diffusers``).

Images are float32 NHWC in ``[-1, 1]``; latents are NHWC with ``latent_channels`` channels at
``1 / 2 ** (len(block_out_channels) - 1)`` of the image size. ``encode`` returns the diagonal
Gaussian posterior's ``(mean, logvar)`` (logvar clipped to ``[-30, 20]``, as diffusers'
``DiagonalGaussianDistribution``); the diffusion model sees ``(z - shift_factor) * scaling_factor``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from codi_jax.models.conv import conv2d
from codi_jax.models.layers import Conv2D, SpatialSelfAttention, Upsample, _group_norm

Dtype = Any

# diffusers' Encoder / Decoder fix these (``resnet_eps=1e-6``, GroupNorm ``eps=1e-6``).
_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)


class VaeResnetBlock(nn.Module):
    """diffusers ``ResnetBlock2D`` without a time embedding (``temb_channels=None``, as in the VAE):
    GN-SiLU-conv, GN-SiLU-conv, 1x1 ``conv_shortcut`` when the channel count changes, residual sum.
    (``layers.ResnetBlock`` always has a ``time_emb_proj``, so it cannot hold these weights.)"""

    features: int
    groups: int = 32
    eps: float = _EPS
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _group_norm(self.groups, self.eps, "norm1")(x)
        h = Conv2D(self.features, dtype=self.dtype, conv_impl=self.conv_impl, name="conv1")(nn.silu(h))
        h = _group_norm(self.groups, self.eps, "norm2")(h)
        h = Conv2D(self.features, dtype=self.dtype, conv_impl=self.conv_impl, name="conv2")(nn.silu(h))
        if x.shape[-1] != self.features:
            x = Conv2D(self.features, kernel_size=1, dtype=self.dtype, conv_impl=self.conv_impl, name="conv_shortcut")(
                x
            )
        return (x.astype(self.dtype) + h).astype(self.dtype)


class _BottomRightPaddedConv(nn.Module):
    """Stride-2 3x3 conv over the input zero-padded by one row / column at the bottom / right only."""

    features: int
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = conv2d(
            x.astype(self.dtype), kernel.astype(self.dtype), stride=2, padding=((0, 1), (0, 1)), impl=self.conv_impl
        )
        return y + bias.astype(self.dtype)


class EncoderDownsample(nn.Module):
    """diffusers ``Downsample2D(use_conv=True, padding=0)`` (``downsamplers_0.conv``): unlike the
    UNet's ``layers.Downsample`` (symmetric padding 1) it pads only the bottom and right edges."""

    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _BottomRightPaddedConv(x.shape[-1], self.dtype, self.conv_impl, name="conv")(x)


class VaeMidBlock(nn.Module):
    """diffusers ``UNetMidBlock2D`` without time embedding: resnet, one-head self-attention, resnet."""

    features: int
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = VaeResnetBlock(self.features, self.groups, _EPS, self.dtype, self.conv_impl, name="resnets_0")(x)
        if self.add_attention:  # diffusers: attention_head_dim = channels, i.e. a single head
            x = SpatialSelfAttention(self.features, self.groups, _EPS, self.dtype, name="attentions_0")(x)
        return VaeResnetBlock(self.features, self.groups, _EPS, self.dtype, self.conv_impl, name="resnets_1")(x)


class _VaeBlock(nn.Module):
    """``DownEncoderBlock2D`` (``sampler="down"``) or ``UpDecoderBlock2D`` (``sampler="up"``)."""

    features: int
    num_layers: int
    groups: int
    sampler: str | None  # "down", "up" or None (the last level)
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = VaeResnetBlock(self.features, self.groups, _EPS, self.dtype, self.conv_impl, name=f"resnets_{j}")(x)
        if self.sampler == "down":
            x = EncoderDownsample(self.dtype, self.conv_impl, name="downsamplers_0")(x)
        elif self.sampler == "up":
            x = Upsample(self.dtype, self.conv_impl, name="upsamplers_0")(x)
        return x


class _VaeCoder(nn.Module):
    """What ``Encoder`` and ``Decoder`` share: their architecture fields, the middle block and the
    output layers (group norm, SiLU, ``conv_out``)."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    groups: int
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    def conv(self, features: int, name: str) -> Conv2D:
        return Conv2D(features, dtype=self.dtype, conv_impl=self.conv_impl, name=name)

    def block(self, features: int, num_layers: int, sampler: str | None, name: str) -> _VaeBlock:
        return _VaeBlock(features, num_layers, self.groups, sampler, self.dtype, self.conv_impl, name=name)

    def mid_block(self, h: jax.Array) -> jax.Array:
        features, attention = self.block_out_channels[-1], self.mid_block_add_attention
        return VaeMidBlock(features, self.groups, attention, self.dtype, self.conv_impl, name="mid_block")(h)

    def conv_out(self, h: jax.Array, features: int) -> jax.Array:
        h = nn.silu(_group_norm(self.groups, _EPS, "conv_norm_out")(h))
        return self.conv(features, "conv_out")(h)


class Encoder(_VaeCoder):
    """diffusers ``Encoder`` with ``double_z=True``: image -> ``2 * latent_channels`` moments."""

    latent_channels: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv(self.block_out_channels[0], "conv_in")(x)
        last = len(self.block_out_channels) - 1
        for i, features in enumerate(self.block_out_channels):
            h = self.block(features, self.layers_per_block, "down" if i < last else None, f"down_blocks_{i}")(h)
        return self.conv_out(self.mid_block(h), 2 * self.latent_channels)


class Decoder(_VaeCoder):
    """diffusers ``Decoder`` (group norm): latent -> image, ``layers_per_block + 1`` resnets per level."""

    out_channels: int = 3

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid_block(self.conv(self.block_out_channels[-1], "conv_in")(z))
        reversed_channels = list(reversed(self.block_out_channels))
        last = len(reversed_channels) - 1
        for i, features in enumerate(reversed_channels):
            h = self.block(features, self.layers_per_block + 1, "up" if i < last else None, f"up_blocks_{i}")(h)
        return self.conv_out(h, self.out_channels).astype(jnp.float32)


class AutoencoderKL(nn.Module):
    """diffusers ``AutoencoderKL``. Defaults are SD 1.x / 2.x's VAE.

    ``apply`` methods: ``encode(x) -> (mean, logvar)``, ``decode(z) -> x``, ``__call__(x)`` (decode of
    the posterior mean; used by ``init``). ``latents_from_images`` / ``images_from_latents`` take
    ``params`` and apply the latent scaling; wrap them in ``jax.jit`` (``sample`` static) to compile.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    def setup(self) -> None:
        common = dict(
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            groups=self.norm_num_groups,
            mid_block_add_attention=self.mid_block_add_attention,
            dtype=self.dtype,
            conv_impl=self.conv_impl,
        )
        self.encoder = Encoder(**common, latent_channels=self.latent_channels)
        self.decoder = Decoder(**common, out_channels=self.out_channels)
        conv = dict(kernel_size=1, dtype=self.dtype, conv_impl=self.conv_impl)
        self.quant_conv = Conv2D(2 * self.latent_channels, **conv) if self.use_quant_conv else None
        self.post_quant_conv = Conv2D(self.latent_channels, **conv) if self.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images (N, H, W, in_channels) -> the posterior's ``(mean, logvar)``, float32."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents (N, h, w, latent_channels) -> images (N, H, W, out_channels), float32."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        mean, _ = self.encode(x)
        return self.decode(mean)

    @nn.nowrap
    def latents_from_images(
        self, params: Any, x: jax.Array, rng: jax.Array | None = None, sample: bool = False
    ) -> jax.Array:
        """``(z - shift_factor) * scaling_factor`` with ``z`` the posterior mean, or a posterior sample
        ``mean + exp(logvar / 2) * N(0, 1)`` drawn with ``rng`` when ``sample``."""
        mean, logvar = self.apply({"params": params}, x, method=AutoencoderKL.encode)
        z = mean
        if sample:
            if rng is None:
                raise ValueError("latents_from_images(sample=True) needs an rng key.")
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        return (z - _shift(self)) * self.scaling_factor

    @nn.nowrap
    def images_from_latents(self, params: Any, z: jax.Array) -> jax.Array:
        """Scaled latents (as ``latents_from_images`` returns) -> images: ``decode(z / scaling + shift)``."""
        return self.apply({"params": params}, z / self.scaling_factor + _shift(self), method=AutoencoderKL.decode)


def _shift(model: AutoencoderKL) -> float:
    return 0.0 if model.shift_factor is None else float(model.shift_factor)


# diffusers AutoencoderKL config fields -> (our field, diffusers' default). Fields not listed here
# (and not starting with "_") are refused, since they may change the architecture.
_CONFIG_FIELDS: dict[str, tuple[str | None, Any]] = {
    "in_channels": ("in_channels", 3),
    "out_channels": ("out_channels", 3),
    "latent_channels": ("latent_channels", 4),
    "block_out_channels": ("block_out_channels", (64,)),
    "layers_per_block": ("layers_per_block", 1),
    "norm_num_groups": ("norm_num_groups", 32),
    "use_quant_conv": ("use_quant_conv", True),
    "use_post_quant_conv": ("use_post_quant_conv", True),
    "mid_block_add_attention": ("mid_block_add_attention", True),
    "scaling_factor": ("scaling_factor", 0.18215),
    "shift_factor": ("shift_factor", None),
    "down_block_types": (None, ("DownEncoderBlock2D",)),
    "up_block_types": (None, ("UpDecoderBlock2D",)),
    "act_fn": (None, "silu"),
    "latents_mean": (None, None),
    "latents_std": (None, None),
    "sample_size": (None, 32),  # only diffusers' tiling uses it
    "force_upcast": (None, True),  # a dtype hint for pipelines
}


def _check_architecture(config: Mapping[str, Any]) -> None:
    """Raises ``ValueError`` naming the first config field our ``AutoencoderKL`` cannot reproduce."""

    def fail(field: str, message: str) -> ValueError:
        return ValueError(f"Cannot convert diffusers AutoencoderKL: {field}={config.get(field)!r} {message}")

    for field in config:
        if not field.startswith("_") and field not in _CONFIG_FIELDS:
            raise fail(field, "is an unknown config field (it may change the architecture).")
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise fail("_class_name", "is not supported (only AutoencoderKL).")
    if config.get("act_fn", "silu") != "silu":
        raise fail("act_fn", "is not supported (only 'silu').")
    levels = len(config.get("block_out_channels", (64,)))
    for field, supported in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(config.get(field, (supported,)))
        if len(types) != levels or any(t != supported for t in types):
            raise fail(field, f"is not supported (need {levels} x {supported!r}, one per block_out_channels entry).")
    for field in ("latents_mean", "latents_std"):
        if config.get(field) is not None:
            raise fail(field, "is not supported (latents_from_images applies only shift_factor and scaling_factor).")
    if not isinstance(config.get("layers_per_block", 1), int):
        raise fail("layers_per_block", "is not supported (one int for every level).")
    groups, channels = config.get("norm_num_groups", 32), list(config.get("block_out_channels", (64,)))
    if not isinstance(groups, int) or any(c % groups for c in channels):
        raise fail("norm_num_groups", f"does not divide block_out_channels={channels}.")


def vae_from_diffusers_config(config: Mapping[str, Any], **model_overrides: Any) -> AutoencoderKL:
    """The ``AutoencoderKL`` a diffusers ``AutoencoderKL`` config (``config.json`` or ``dict(vae.config)``)
    describes; missing fields get diffusers' defaults. ``model_overrides`` set ``dtype`` / ``conv_impl``.

    Raises ``ValueError`` naming the field for configs our module cannot reproduce exactly.
    """
    config = dict(config)
    _check_architecture(config)
    fields: dict[str, Any] = {}
    for field, (ours, default) in _CONFIG_FIELDS.items():
        if ours is not None:
            fields[ours] = config.get(field, default)
    fields["block_out_channels"] = tuple(int(c) for c in fields["block_out_channels"])
    for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        fields[name] = bool(fields[name])
    fields["scaling_factor"] = float(fields["scaling_factor"])
    if fields["shift_factor"] is not None:
        fields["shift_factor"] = float(fields["shift_factor"])
    return AutoencoderKL(**fields, **model_overrides)


def vae_param_shapes(model: AutoencoderKL) -> Any:
    """The shapes of ``model``'s parameters (no compilation, no random numbers drawn)."""
    size = 2 ** (len(model.block_out_channels) - 1)
    sample = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), sample)["params"]
