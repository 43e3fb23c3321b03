"""A DiT backbone (Peebles & Xie 2023): patchify, fixed 2-D sin-cos positions, adaLN-zero blocks.

Structured and named like diffusers' ``SD3Transformer2DModel`` with its image-only blocks
(``SD3SingleTransformerBlock``), so that a converter is a name mapping: ``pos_embed.proj`` (the
patch conv), ``time_text_embed.timestep_embedder.linear_{1,2}``, ``transformer_blocks.i`` with
``norm1.linear`` (adaLN-zero: shift / scale / gate for attention and MLP), ``attn.to_{q,k,v}``,
``attn.to_out.0``, ``ff.net.0.proj`` / ``ff.net.2`` (tanh GELU), then ``norm_out.linear``
(adaLN: scale, shift) and ``proj_out``; unpatchify as diffusers' ``nhwpqc`` order. Joint-attention
(MMDiT) text blocks are not here yet.

NHWC in and out, as the UNet: ``__call__(sample, timesteps, context=None, *, train=False, ...)``.
Adapter seam: ``block_residuals`` are added to the hidden states after the blocks the way
diffusers' ``SD3Transformer2DModel`` adds an ``SD3ControlNetModel``'s ``block_controlnet_hidden_states``
(``residual_index``); ``embed(..., hint=...)`` adds a condition's tokens after the position
embedding (the ControlNet's ``pos_embed_input``); ``return_features`` gives each block's output.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.models import layers
from codi_jax.models.unet import REMAT_POLICIES

Dtype = Any
ZERO = nn.initializers.zeros
XAVIER = nn.initializers.xavier_uniform()
# The patch conv initialised as the linear map it is (DiT's ``xavier_uniform_`` on the flattened kernel).
XAVIER_CONV = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """``[sin(p w), cos(p w)]`` with ``w_i = 10000^(-i / (dim / 2))``: diffusers'
    ``get_1d_sincos_pos_embed_from_grid`` (float64)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(np.asarray(positions, np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """(grid_h * grid_w, dim) float32 for tokens in row-major order: the first half encodes the
    column, the second the row, as diffusers' ``get_2d_sincos_pos_embed(dim, grid, base_size=grid)``
    (integer positions: a square grid at the model's own size)."""
    if dim % 4:
        raise ValueError(f"DiT width {dim}: the 2-D sin-cos position embedding needs a multiple of 4.")
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1).astype(np.float32)


def residual_index(block: int, num_blocks: int, num_residuals: int) -> int:
    """Which of ``num_residuals`` residuals is added after ``block``: diffusers'
    ``SD3Transformer2DModel`` (0.42) ``int(block / (num_blocks / num_residuals))`` (each residual
    serves ``num_blocks / num_residuals`` consecutive blocks)."""
    return int(block / (num_blocks / num_residuals))


class SelfAttention(nn.Module):
    """diffusers ``Attention`` of an SD3 block: biased ``to_q`` / ``to_k`` / ``to_v`` / ``to_out_0``."""

    heads: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "dot_product"  # see ``layers.ATTENTION_IMPLS``

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        q, k, v = (nn.Dense(c, dtype=self.dtype, kernel_init=XAVIER, name=f"to_{n}")(x) for n in "qkv")
        out = layers.attention(q, k, v, self.heads, self.attention_impl)
        return nn.Dense(c, dtype=self.dtype, kernel_init=XAVIER, name="to_out_0")(out)


class FeedForward(nn.Module):
    """diffusers ``FeedForward(activation_fn="gelu-approximate")``: ``net_0_proj`` -> tanh GELU -> ``net_2``."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=XAVIER, name="net_0_proj")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=XAVIER, name="net_2")(nn.gelu(h, approximate=True))


class Modulation(nn.Module):
    """``linear(silu(temb))`` split in ``chunks`` (diffusers' ``AdaLayerNormZero`` / ``AdaLayerNormContinuous``
    projection), zero-initialised (adaLN-zero)."""

    chunks: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, temb: jax.Array, features: int) -> list[jax.Array]:
        out = nn.Dense(self.chunks * features, dtype=self.dtype, kernel_init=ZERO, name="linear")(nn.silu(temb))
        return [chunk[:, None, :] for chunk in jnp.split(out, self.chunks, axis=-1)]


class DiTBlock(nn.Module):
    """diffusers ``SD3SingleTransformerBlock``: adaLN-zero, self-attention, tanh-GELU MLP, gated residuals."""

    heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "dot_product"

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        c = x.shape[-1]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = Modulation(6, self.dtype, name="norm1")(
            temb, c
        )
        h = (layers.layer_norm(x) * (1 + scale_msa) + shift_msa).astype(self.dtype)
        x = x + gate_msa * SelfAttention(self.heads, self.dtype, self.attention_impl, name="attn")(h)
        h = (layers.layer_norm(x) * (1 + scale_mlp) + shift_mlp).astype(self.dtype)
        x = x + gate_mlp * FeedForward(int(self.mlp_ratio * c), self.dtype, name="ff")(h)
        return x.astype(self.dtype)


@functools.cache
def _block_class(remat: bool, policy: str):
    if not remat:
        return DiTBlock
    if policy not in REMAT_POLICIES:
        raise ValueError(f"model.remat_policy={policy!r}; valid: {sorted(REMAT_POLICIES)}.")
    return nn.remat(DiTBlock, policy=REMAT_POLICIES[policy])


class Patchify(nn.Module):
    """diffusers ``PatchEmbed.proj``: a conv with kernel = stride = ``patch_size`` (kernel
    ``(p, p, in, out)``, bias), computed as one matmul on the non-overlapping patches."""

    features: int
    patch_size: int
    dtype: Dtype = jnp.float32
    kernel_init: Any = XAVIER_CONV

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p, (b, height, width, c) = self.patch_size, x.shape
        kernel = self.param("kernel", self.kernel_init, (p, p, c, self.features), jnp.float32)
        bias = self.param("bias", ZERO, (self.features,), jnp.float32)
        patches = x.reshape(b, height // p, p, width // p, p, c).astype(self.dtype)
        out = jnp.einsum("bhpwqc,pqcd->bhwd", patches, kernel.astype(self.dtype))
        return (out + bias.astype(self.dtype)).reshape(b, -1, self.features)


class PatchEmbed(nn.Module):
    """``proj`` (patches -> tokens, row-major) plus the fixed 2-D sin-cos position embedding."""

    features: int
    patch_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        tokens = Patchify(self.features, self.patch_size, self.dtype, name="proj")(x)
        grid_h, grid_w = x.shape[1] // self.patch_size, x.shape[2] // self.patch_size
        return tokens + jnp.asarray(sincos_pos_embed(self.features, grid_h, grid_w), self.dtype)


class TimeEmbed(nn.Module):
    """diffusers ``CombinedTimestepTextProjEmbeddings`` without its text part: sinusoid (``channels``,
    cos first, no shift) -> ``timestep_embedder`` (``linear_1`` -> SiLU -> ``linear_2``), float32."""

    features: int
    channels: int = 256

    @nn.compact
    def __call__(self, timesteps: jax.Array) -> jax.Array:
        emb = layers.timestep_embedding(timesteps, self.channels, flip_sin_to_cos=True, freq_shift=0.0)
        return layers.TimestepEmbedding(self.features, name="timestep_embedder")(emb)


def unpatchify(tokens: jax.Array, grid_h: int, grid_w: int, patch_size: int) -> jax.Array:
    """(B, h w, p p c) tokens -> (B, h p, w p, c), diffusers' ``nhwpqc`` order within a token."""
    b, p = tokens.shape[0], patch_size
    x = tokens.reshape(b, grid_h, grid_w, p, p, -1).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid_h * p, grid_w * p, x.shape[-1])


class DiT(nn.Module):
    """Velocity (or any) prediction DiT on NHWC images / latents.

    Attributes (diffusers ``SD3Transformer2DModel``'s names where it has them):
      in_channels / out_channels: image channels in and out.
      patch_size: p; the token grid is (H / p, W / p).
      num_layers: adaLN-zero blocks.
      num_attention_heads / attention_head_dim: width = heads * head_dim (a multiple of 4).
      mlp_ratio: MLP hidden width over the width.
      time_embed_channels: the sinusoidal time embedding's channels (SD3: 256).
      dtype / remat / attention_impl / remat_policy: how it is computed, as the UNet's.
    """

    in_channels: int = 3
    out_channels: int = 3
    patch_size: int = 2
    num_layers: int = 8
    num_attention_heads: int = 4
    attention_head_dim: int = 64
    mlp_ratio: float = 4.0
    time_embed_channels: int = 256
    dtype: Dtype = jnp.float32
    remat: bool = False
    attention_impl: str = "dot_product"
    remat_policy: str = "full"

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def cross_attention_dim(self) -> None:
        """No text context (the UNet's field of that name; MMDiT blocks are not here yet)."""
        return None

    def check_choices(self) -> None:
        """Known ``attention_impl`` / ``remat_policy``, a width the position embedding takes."""
        if self.attention_impl not in layers.ATTENTION_IMPLS:
            raise ValueError(f"model.attention_impl={self.attention_impl!r}; valid: {layers.ATTENTION_IMPLS}.")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"model.remat_policy={self.remat_policy!r}; valid: {sorted(REMAT_POLICIES)}.")
        if self.width % 4 or self.width < 4:
            raise ValueError(
                f"DiT width num_attention_heads * attention_head_dim = {self.width}: must be a multiple of 4."
            )

    def check_input(self, sample: jax.Array) -> None:
        self.check_choices()
        if sample.ndim != 4 or sample.shape[-1] != self.in_channels:
            raise ValueError(f"DiT expects NHWC input with {self.in_channels} channels, got shape {sample.shape}.")
        if sample.shape[1] % self.patch_size or sample.shape[2] % self.patch_size:
            raise ValueError(f"Image size {sample.shape[1:3]} must be divisible by patch_size={self.patch_size}.")

    def embed(
        self, sample: jax.Array, timesteps: jax.Array, hint: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """``(tokens, temb)``: patches + positions (+ ``hint`` tokens, a ControlNet's condition) and the
        time embedding."""
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (sample.shape[0],))
        temb = TimeEmbed(self.width, self.time_embed_channels, name="time_text_embed")(timesteps)
        tokens = PatchEmbed(self.width, self.patch_size, self.dtype, name="pos_embed")(sample)
        if hint is not None:
            tokens = tokens + hint.astype(tokens.dtype)
        return tokens, temb

    def blocks(
        self, tokens: jax.Array, temb: jax.Array, residuals: Sequence[jax.Array] | None = None
    ) -> tuple[jax.Array, list[jax.Array]]:
        """The blocks in order, ``residuals`` added after them (``residual_index``); returns the
        final tokens and each block's output (before its residual)."""
        block_cls = _block_class(self.remat, self.remat_policy)
        if residuals is not None and not 1 <= len(residuals) <= self.num_layers:
            raise ValueError(
                f"block_residuals: {len(residuals)} arrays for {self.num_layers} blocks; give 1 to {self.num_layers}."
            )
        features = []
        for i in range(self.num_layers):
            tokens = block_cls(
                self.num_attention_heads,
                self.mlp_ratio,
                self.dtype,
                self.attention_impl,
                name=f"transformer_blocks_{i}",
            )(tokens, temb)
            features.append(tokens)
            if residuals is not None:
                residual = residuals[residual_index(i, self.num_layers, len(residuals))]
                if residual.shape != tokens.shape:
                    raise ValueError(
                        f"block_residuals entry for block {i} has shape {residual.shape}; expected {tokens.shape}."
                    )
                tokens = tokens + residual.astype(tokens.dtype)
        return tokens, features

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        context: jax.Array | None = None,
        *,
        block_residuals: Sequence[jax.Array] | None = None,
        return_features: bool = False,
        train: bool = False,
    ):
        """The network output (NHWC, float32) for ``sample`` at model times ``timesteps``; with
        ``return_features``, ``(output, {"blocks": [each block's output tokens]})``. ``train`` is
        accepted for the backbones' common interface (no dropout here)."""
        del train
        self.check_input(sample)
        if context is not None:
            raise ValueError("This DiT has no text blocks: context must be None.")
        tokens, temb = self.embed(sample, timesteps)
        tokens, features = self.blocks(tokens, temb, block_residuals)
        scale, shift = Modulation(2, self.dtype, name="norm_out")(temb, self.width)
        tokens = (layers.layer_norm(tokens) * (1 + scale) + shift).astype(self.dtype)
        p = self.patch_size
        out = nn.Dense(p * p * self.out_channels, dtype=self.dtype, kernel_init=ZERO, name="proj_out")(tokens)
        out = unpatchify(out, sample.shape[1] // p, sample.shape[2] // p, p).astype(jnp.float32)
        return (out, {"blocks": features}) if return_features else out


def dit_from_config(model_config) -> DiT:
    """Builds a ``DiT`` from a config section (``kind='dit'``); unknown fields are an error naming them."""
    cfg = dict(model_config)
    cfg.pop("parametrization", None)  # a training choice, stored beside the architecture
    cfg.pop("kind", None)
    valid = set(DiT.__dataclass_fields__) - {"parent", "name"}
    unknown = set(cfg) - valid
    if unknown:
        raise ValueError(f"Unknown DiT model config fields {sorted(unknown)}; valid: {sorted(valid)}.")
    if isinstance(cfg.get("dtype"), str):
        cfg["dtype"] = jnp.dtype(cfg["dtype"])
    model = DiT(**cfg)
    model.check_choices()
    return model
