"""A DiT backbone (Peebles & Xie 2023): patchify, fixed 2-D sin-cos positions, adaLN-zero blocks.

Structured and named like diffusers' ``SD3Transformer2DModel`` with its image-only blocks
(``SD3SingleTransformerBlock``), so that a converter is a name mapping: ``pos_embed.proj`` (the
patch conv), ``time_text_embed.timestep_embedder.linear_{1,2}``, ``transformer_blocks.i`` with
``norm1.linear`` (adaLN-zero: shift / scale / gate for attention and MLP), ``attn.to_{q,k,v}``,
``attn.to_out.0``, ``ff.net.0.proj`` / ``ff.net.2`` (tanh GELU), then ``norm_out.linear``
(adaLN: scale, shift) and ``proj_out``; unpatchify as diffusers' ``nhwpqc`` order.

With ``joint_attention_dim`` set it is SD3's MMDiT (diffusers' ``SD3Transformer2DModel`` proper):
``context_embedder``, the pooled text projection ``time_text_embed.text_embedder.linear_{1,2}``
(added to the time embedding) and ``JointTransformerBlock`` s (``JointBlock``): image and text
streams with their own adaLN-zero (``norm1`` / ``norm1_context``) and MLPs (``ff`` / ``ff_context``)
meeting in one attention over ``[image tokens, text tokens]`` (``attn.to_{q,k,v}`` /
``attn.add_{q,k,v}_proj``, optional SD3.5 RMS ``norm_q`` / ``norm_k`` / ``norm_added_{q,k}``, SD3.5's
extra image self-attention ``attn2`` in ``dual_attention_layers``); the last block is
``context_pre_only`` (no text output). ``context`` is then a dict ``SD3_CONTEXT_KEYS``.
``pos_embed_max_size`` crops the centre of a ``pos_embed_max_size``-square table as diffusers'
``PatchEmbed.cropped_pos_embed``.

NHWC in and out, as the UNet: ``__call__(sample, timesteps, context=None, *, train=False, ...)``.
Adapter seam: ``block_residuals`` are added to the hidden states after the blocks the way
diffusers' ``SD3Transformer2DModel`` adds an ``SD3ControlNetModel``'s ``block_controlnet_hidden_states``
(``residual_index``; the joint model, as diffusers, adds none after its ``context_pre_only`` last
block); ``embed(..., hint=...)`` adds a condition's tokens after the position embedding (the
ControlNet's ``pos_embed_input``); ``return_features`` gives each block's output.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
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


def _sincos_2d(dim: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(len(rows) * len(cols), dim) float32 for tokens in row-major order: the first half encodes the
    column position, the second the row position (diffusers' ``get_2d_sincos_pos_embed_from_grid``)."""
    if dim % 4:
        raise ValueError(f"DiT width {dim}: the 2-D sin-cos position embedding needs a multiple of 4.")
    row_grid, col_grid = np.meshgrid(rows, cols, indexing="ij")
    return np.concatenate([sincos_1d(dim // 2, col_grid), sincos_1d(dim // 2, row_grid)], axis=1).astype(np.float32)


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """(grid_h * grid_w, dim) float32 for tokens in row-major order: the first half encodes the
    column, the second the row, as diffusers' ``get_2d_sincos_pos_embed(dim, grid, base_size=grid)``
    (integer positions: a square grid at the model's own size)."""
    return _sincos_2d(dim, np.arange(grid_h), np.arange(grid_w))


def pos_embed_positions(max_size: int, base_size: int) -> np.ndarray:
    """The ``max_size`` positions along each side of SD3's table: diffusers' ``get_2d_sincos_pos_embed(
    dim, max_size, base_size=base_size)`` grid, ``arange(max_size) / (max_size / base_size)`` in float32."""
    return np.arange(max_size, dtype=np.float32) / np.float32(max_size / base_size)


def pos_embed_table(dim: int, max_size: int, base_size: int) -> np.ndarray:
    """(max_size * max_size, dim) float32: diffusers' ``PatchEmbed.pos_embed`` buffer (``pos_embed_max_size``
    set; ``base_size = sample_size // patch_size``), without its leading batch axis."""
    positions = pos_embed_positions(max_size, base_size)
    return _sincos_2d(dim, positions, positions)


def cropped_pos_embed(dim: int, max_size: int, base_size: int, grid_h: int, grid_w: int) -> np.ndarray:
    """(grid_h * grid_w, dim): the centred ``grid_h x grid_w`` window of ``pos_embed_table`` (top /
    left offsets ``(max_size - grid) // 2``), as diffusers' ``PatchEmbed.cropped_pos_embed``; computed
    from the window's positions (the table is separable), which gives the same numbers."""
    for side, grid in (("Height", grid_h), ("Width", grid_w)):
        if grid > max_size:
            raise ValueError(f"{side} ({grid}) cannot be greater than `pos_embed_max_size`: {max_size}.")
    positions = pos_embed_positions(max_size, base_size)
    top, left = (max_size - grid_h) // 2, (max_size - grid_w) // 2
    return _sincos_2d(dim, positions[top : top + grid_h], positions[left : left + grid_w])


def residual_index(block: int, num_blocks: int, num_residuals: int) -> int:
    """Which of ``num_residuals`` residuals is added after ``block``: diffusers'
    ``SD3Transformer2DModel`` (0.42) ``int(block / (num_blocks / num_residuals))`` (each residual
    serves ``num_blocks / num_residuals`` consecutive blocks)."""
    return int(block / (num_blocks / num_residuals))


QK_NORMS = (None, "rms_norm")


class RMSNorm(nn.Module):
    """diffusers ``RMSNorm(head_dim, eps=1e-6)`` with its ``weight`` (here ``scale``), applied per head
    of (..., heads * head_dim) projections (SD3.5's ``qk_norm="rms_norm"``); statistics in float32."""

    heads: int
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        head_dim = x.shape[-1] // self.heads
        scale = self.param("scale", nn.initializers.ones, (head_dim,), jnp.float32)
        h = x.astype(jnp.float32).reshape(*x.shape[:-1], self.heads, head_dim)
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), -1, keepdims=True) + self.eps) * scale
        return h.reshape(x.shape).astype(x.dtype)


def _qkv(x: jax.Array, names: Sequence[str], norms: Sequence[str], heads: int, qk_norm: str | None, dtype: Dtype):
    """Biased projections ``names`` (q, k, v) of ``x``; with ``qk_norm``, q and k through ``RMSNorm`` s
    named ``norms`` (called from a compact method: the modules are its children)."""
    c = x.shape[-1]
    q, k, v = (nn.Dense(c, dtype=dtype, kernel_init=XAVIER, name=name)(x) for name in names)
    if qk_norm is not None:
        q, k = RMSNorm(heads, name=norms[0])(q), RMSNorm(heads, name=norms[1])(k)
    return q, k, v


class SelfAttention(nn.Module):
    """diffusers ``Attention`` of an SD3 block: biased ``to_q`` / ``to_k`` / ``to_v`` / ``to_out_0``;
    with ``qk_norm``, ``norm_q`` / ``norm_k`` on the heads of q and k."""

    heads: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "dot_product"  # see ``layers.ATTENTION_IMPLS``
    qk_norm: str | None = None  # see ``QK_NORMS``

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = _qkv(x, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"), self.heads, self.qk_norm, self.dtype)
        out = layers.attention(q, k, v, self.heads, self.attention_impl)
        return nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=XAVIER, name="to_out_0")(out)


class JointAttention(nn.Module):
    """diffusers ``Attention(added_kv_proj_dim=dim)`` run by ``JointAttnProcessor2_0``: image q / k / v
    (``to_*``) and text q / k / v (``add_*_proj``; with ``qk_norm`` ``norm_q`` / ``norm_k`` /
    ``norm_added_q`` / ``norm_added_k``) attend jointly over ``[image tokens, text tokens]`` (that
    order), split back: image through ``to_out_0``, text through ``to_add_out`` (None when
    ``context_pre_only``: the text output is not used)."""

    heads: int
    context_pre_only: bool = False
    qk_norm: str | None = None
    dtype: Dtype = jnp.float32
    attention_impl: str = "dot_product"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        image = _qkv(x, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"), self.heads, self.qk_norm, self.dtype)
        text = _qkv(
            context,
            ("add_q_proj", "add_k_proj", "add_v_proj"),
            ("norm_added_q", "norm_added_k"),
            self.heads,
            self.qk_norm,
            self.dtype,
        )
        q, k, v = (jnp.concatenate([a, b.astype(a.dtype)], axis=1) for a, b in zip(image, text))
        out = layers.attention(q, k, v, self.heads, self.attention_impl)
        n, c = x.shape[1], x.shape[-1]
        image_out = nn.Dense(c, dtype=self.dtype, kernel_init=XAVIER, name="to_out_0")(out[:, :n])
        if self.context_pre_only:
            return image_out, None
        return image_out, nn.Dense(c, dtype=self.dtype, kernel_init=XAVIER, name="to_add_out")(out[:, n:])


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


def _modulate(normed: jax.Array, shift: jax.Array, scale: jax.Array, dtype: Dtype) -> jax.Array:
    return (normed * (1 + scale) + shift).astype(dtype)


class JointBlock(nn.Module):
    """diffusers ``JointTransformerBlock`` (SD3's MMDiT block) on (image tokens, text tokens, temb).

    Image: ``norm1`` adaLN-zero (``AdaLayerNormZero``: shift / scale / gate for attention and MLP;
    with ``dual_attention`` ``SD35AdaLayerNormZeroX``'s three more for ``attn2``, SD3.5's image
    self-attention on the same normalised tokens), ``attn`` (``JointAttention``), ``ff``. Text:
    ``norm1_context`` adaLN-zero and ``ff_context``; for ``context_pre_only`` (the last block)
    ``norm1_context`` is ``AdaLayerNormContinuous`` (scale, shift) and the text output is None.
    LayerNorms eps 1e-6 without affine (``layers.layer_norm``); returns ``(image, text)``.
    """

    heads: int
    mlp_ratio: float = 4.0
    context_pre_only: bool = False
    qk_norm: str | None = None
    dual_attention: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "dot_product"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, temb: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        c, dtype = x.shape[-1], self.dtype
        mods = Modulation(9 if self.dual_attention else 6, dtype, name="norm1")(temb, c)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        context_mods = Modulation(2 if self.context_pre_only else 6, dtype, name="norm1_context")(temb, c)
        c_shift, c_scale = context_mods[::-1] if self.context_pre_only else context_mods[:2]
        normed = layers.layer_norm(x)
        joint = JointAttention(self.heads, self.context_pre_only, self.qk_norm, dtype, self.attention_impl, name="attn")
        normed_context = _modulate(layers.layer_norm(context), c_shift, c_scale, dtype)
        attn, context_attn = joint(_modulate(normed, shift_msa, scale_msa, dtype), normed_context)
        x = x + gate_msa * attn
        if self.dual_attention:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            attn2 = SelfAttention(self.heads, dtype, self.attention_impl, self.qk_norm, name="attn2")
            x = x + gate_msa2 * attn2(_modulate(normed, shift_msa2, scale_msa2, dtype))
        hidden = int(self.mlp_ratio * c)
        ff = FeedForward(hidden, dtype, name="ff")
        x = x + gate_mlp * ff(_modulate(layers.layer_norm(x), shift_mlp, scale_mlp, dtype))
        if self.context_pre_only:
            return x.astype(dtype), None
        c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = context_mods[2:]
        context = context + c_gate_msa * context_attn
        normed_context = _modulate(layers.layer_norm(context), c_shift_mlp, c_scale_mlp, dtype)
        context = context + c_gate_mlp * FeedForward(hidden, dtype, name="ff_context")(normed_context)
        return x.astype(dtype), context.astype(dtype)


@functools.cache
def _block_class(block: type[nn.Module], remat: bool, policy: str) -> type[nn.Module]:
    if not remat:
        return block
    if policy not in REMAT_POLICIES:
        raise ValueError(f"model.remat_policy={policy!r}; valid: {sorted(REMAT_POLICIES)}.")
    return nn.remat(block, policy=REMAT_POLICIES[policy])


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
    """diffusers ``PatchEmbed``: ``proj`` (patches -> tokens, row-major) plus the fixed 2-D sin-cos
    position embedding: the token grid's own integer positions, or with ``pos_embed_max_size`` the
    centred window of SD3's table (``cropped_pos_embed``; ``base_size`` is diffusers' ``sample_size //
    patch_size``). ``positions=False``: ``proj`` alone (diffusers' ``pos_embed_type=None``, as the
    ControlNet's ``pos_embed_input``)."""

    features: int
    patch_size: int
    dtype: Dtype = jnp.float32
    pos_embed_max_size: int | None = None
    base_size: int | None = None
    positions: bool = True
    kernel_init: Any = XAVIER_CONV  # proj's

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        tokens = Patchify(self.features, self.patch_size, self.dtype, self.kernel_init, name="proj")(x)
        if not self.positions:
            return tokens
        grid_h, grid_w = x.shape[1] // self.patch_size, x.shape[2] // self.patch_size
        if self.pos_embed_max_size is None:
            table = sincos_pos_embed(self.features, grid_h, grid_w)
        else:
            table = cropped_pos_embed(self.features, self.pos_embed_max_size, self.base_size, grid_h, grid_w)
        return tokens + jnp.asarray(table, self.dtype)


class TimeEmbed(nn.Module):
    """diffusers ``CombinedTimestepTextProjEmbeddings``: sinusoid (``channels``, cos first, no shift) ->
    ``timestep_embedder`` (``linear_1`` -> SiLU -> ``linear_2``), plus, given ``pooled`` text
    embeddings, ``text_embedder`` (``PixArtAlphaTextProjection(act_fn="silu")``: the same linear ->
    SiLU -> linear); float32."""

    features: int
    channels: int = 256

    @nn.compact
    def __call__(self, timesteps: jax.Array, pooled: jax.Array | None = None) -> jax.Array:
        emb = layers.timestep_embedding(timesteps, self.channels, flip_sin_to_cos=True, freq_shift=0.0)
        temb = layers.TimestepEmbedding(self.features, name="timestep_embedder")(emb)
        if pooled is None:
            return temb
        return temb + layers.TimestepEmbedding(self.features, name="text_embedder")(pooled.astype(jnp.float32))


def unpatchify(tokens: jax.Array, grid_h: int, grid_w: int, patch_size: int) -> jax.Array:
    """(B, h w, p p c) tokens -> (B, h p, w p, c), diffusers' ``nhwpqc`` order within a token."""
    b, p = tokens.shape[0], patch_size
    x = tokens.reshape(b, grid_h, grid_w, p, p, -1).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid_h * p, grid_w * p, x.shape[-1])


SD3_CONTEXT_KEYS = ("encoder_hidden_states", "pooled_projections")


class DiT(nn.Module):
    """Velocity (or any) prediction DiT on NHWC images / latents; with ``joint_attention_dim`` SD3's MMDiT.

    Attributes (diffusers ``SD3Transformer2DModel``'s names where it has them):
      in_channels / out_channels: image channels in and out.
      patch_size: p; the token grid is (H / p, W / p).
      num_layers: adaLN-zero blocks.
      num_attention_heads / attention_head_dim: width = heads * head_dim (a multiple of 4).
      mlp_ratio: MLP hidden width over the width.
      time_embed_channels: the sinusoidal time embedding's channels (SD3: 256).
      dtype / remat / attention_impl / remat_policy: how it is computed, as the UNet's.
      joint_attention_dim: None (image-only blocks) or the text tokens' width: ``JointBlock`` s, and
        ``context`` is a dict ``{"encoder_hidden_states": (B, L, joint_attention_dim),
        "pooled_projections": (B, pooled_projection_dim)}`` (``context_spec``).
      caption_projection_dim: ``context_embedder``'s width; None or the width (SD3's blocks need it).
      pooled_projection_dim: the pooled text embedding's width (needed with ``joint_attention_dim``).
      qk_norm: None or "rms_norm" (SD3.5: RMSNorm on the heads of q and k).
      dual_attention_layers: the blocks with SD3.5's extra image self-attention ``attn2``.
      pos_embed_max_size / sample_size: SD3's cropped position table (``cropped_pos_embed``, base size
        ``sample_size // patch_size``); None: the token grid's integer positions.
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
    joint_attention_dim: int | None = None
    caption_projection_dim: int | None = None
    pooled_projection_dim: int | None = None
    qk_norm: str | None = None
    dual_attention_layers: tuple[int, ...] = ()
    pos_embed_max_size: int | None = None
    sample_size: int | None = None

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def cross_attention_dim(self) -> int | None:
        """The text tokens' width (``joint_attention_dim``), None without text: the UNet's field of that
        name, which ``networks.placeholder_context`` reads before ``context_spec``."""
        return self.joint_attention_dim

    def context_spec(self, batch: int = 1, tokens: int = 1) -> dict[str, jax.ShapeDtypeStruct] | None:
        """``ShapeDtypeStruct`` s of the ``context`` this DiT reads: None without text, else the
        ``SD3_CONTEXT_KEYS`` dict (diffusers' ``encoder_hidden_states`` / ``pooled_projections``)."""
        if self.joint_attention_dim is None:
            return None
        return {
            "encoder_hidden_states": jax.ShapeDtypeStruct((batch, tokens, self.joint_attention_dim), jnp.float32),
            "pooled_projections": jax.ShapeDtypeStruct((batch, self.pooled_projection_dim), jnp.float32),
        }

    def check_choices(self) -> None:
        """Known ``attention_impl`` / ``remat_policy``, a width the position embedding takes, consistent
        text fields (errors name the field)."""
        if self.attention_impl not in layers.ATTENTION_IMPLS:
            raise ValueError(f"model.attention_impl={self.attention_impl!r}; valid: {layers.ATTENTION_IMPLS}.")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"model.remat_policy={self.remat_policy!r}; valid: {sorted(REMAT_POLICIES)}.")
        if self.width % 4 or self.width < 4:
            raise ValueError(
                f"DiT width num_attention_heads * attention_head_dim = {self.width}: must be a multiple of 4."
            )
        if self.pos_embed_max_size is not None and (self.sample_size or 0) < self.patch_size:
            raise ValueError(
                f"model.pos_embed_max_size={self.pos_embed_max_size} needs model.sample_size >= patch_size "
                f"(the table's base size is sample_size // patch_size); got sample_size={self.sample_size}."
            )
        self.check_text_fields()

    def check_text_fields(self) -> None:
        """The joint-attention fields: all set or all at their image-only defaults."""
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"model.qk_norm={self.qk_norm!r}; valid: {QK_NORMS}.")
        if self.joint_attention_dim is None:
            text_only = dict(
                caption_projection_dim=self.caption_projection_dim,
                pooled_projection_dim=self.pooled_projection_dim,
                qk_norm=self.qk_norm,
                dual_attention_layers=tuple(self.dual_attention_layers) or None,
            )
            for field, value in text_only.items():
                if value is not None:
                    raise ValueError(f"model.{field}={value!r} needs model.joint_attention_dim (the text blocks).")
            return
        if self.pooled_projection_dim is None:
            raise ValueError("model.joint_attention_dim is set: model.pooled_projection_dim is needed too.")
        if self.caption_projection_dim not in (None, self.width):
            raise ValueError(
                f"model.caption_projection_dim={self.caption_projection_dim}: SD3's joint blocks need the width "
                f"num_attention_heads * attention_head_dim = {self.width} (or None)."
            )
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"model.dual_attention_layers {bad} are not block indices (num_layers={self.num_layers}).")

    def check_input(self, sample: jax.Array) -> None:
        self.check_choices()
        if sample.ndim != 4 or sample.shape[-1] != self.in_channels:
            raise ValueError(f"DiT expects NHWC input with {self.in_channels} channels, got shape {sample.shape}.")
        if sample.shape[1] % self.patch_size or sample.shape[2] % self.patch_size:
            raise ValueError(f"Image size {sample.shape[1:3]} must be divisible by patch_size={self.patch_size}.")

    def split_context(self, context: Any, batch: int) -> tuple[jax.Array | None, jax.Array | None]:
        """``(encoder_hidden_states, pooled_projections)`` of ``context``: ``(None, None)`` for the
        image-only DiT (which refuses a context), the ``SD3_CONTEXT_KEYS`` entries for the joint one."""
        if self.joint_attention_dim is None:
            if context is not None:
                raise ValueError("This DiT has no text blocks: context must be None.")
            return None, None
        if not isinstance(context, Mapping) or sorted(context) != sorted(SD3_CONTEXT_KEYS):
            got = f"a dict with keys {sorted(context)}" if isinstance(context, Mapping) else type(context).__name__
            raise ValueError(
                f"This DiT's joint attention reads context = a dict with keys {SD3_CONTEXT_KEYS}; got {got}."
            )
        tokens, pooled = (context[key] for key in SD3_CONTEXT_KEYS)
        spec = self.context_spec(batch, tokens.shape[1] if tokens.ndim == 3 else 1)
        for key, value in zip(SD3_CONTEXT_KEYS, (tokens, pooled)):
            if tuple(value.shape) != spec[key].shape:
                raise ValueError(f"context[{key!r}] has shape {tuple(value.shape)}; expected {spec[key].shape}.")
        return tokens, pooled

    def embed(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        hint: jax.Array | None = None,
        pooled: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """``(tokens, temb)``: patches + positions (+ ``hint`` tokens, a ControlNet's condition) and the
        time embedding (+ the ``pooled`` text projection)."""
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (sample.shape[0],))
        temb = TimeEmbed(self.width, self.time_embed_channels, name="time_text_embed")(timesteps, pooled)
        base_size = None if self.sample_size is None else self.sample_size // self.patch_size
        tokens = PatchEmbed(
            self.width, self.patch_size, self.dtype, self.pos_embed_max_size, base_size, name="pos_embed"
        )(sample)
        if hint is not None:
            tokens = tokens + hint.astype(tokens.dtype)
        return tokens, temb

    def embed_text(self, text: jax.Array) -> jax.Array:
        """The text tokens in the model's width: ``context_embedder`` (a linear)."""
        return nn.Dense(self.width, dtype=self.dtype, name="context_embedder")(text)

    def check_residuals(self, residuals: Sequence[jax.Array] | None) -> None:
        if residuals is not None and not 1 <= len(residuals) <= self.num_layers:
            raise ValueError(
                f"block_residuals: {len(residuals)} arrays for {self.num_layers} blocks; give 1 to {self.num_layers}."
            )

    def add_residual(self, tokens: jax.Array, residuals: Sequence[jax.Array] | None, block: int) -> jax.Array:
        """``tokens`` plus the residual serving ``block`` (``residual_index``), if any."""
        if residuals is None:
            return tokens
        residual = residuals[residual_index(block, self.num_layers, len(residuals))]
        if residual.shape != tokens.shape:
            raise ValueError(
                f"block_residuals entry for block {block} has shape {residual.shape}; expected {tokens.shape}."
            )
        return tokens + residual.astype(tokens.dtype)

    def blocks(
        self, tokens: jax.Array, temb: jax.Array, residuals: Sequence[jax.Array] | None = None
    ) -> tuple[jax.Array, list[jax.Array]]:
        """The image-only blocks in order, ``residuals`` added after them (``residual_index``); returns
        the final tokens and each block's output (before its residual)."""
        block_cls = _block_class(DiTBlock, self.remat, self.remat_policy)
        self.check_residuals(residuals)
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
            tokens = self.add_residual(tokens, residuals, i)
        return tokens, features

    def joint_blocks(
        self,
        tokens: jax.Array,
        text: jax.Array,
        temb: jax.Array,
        residuals: Sequence[jax.Array] | None = None,
        last_context_pre_only: bool = True,
    ) -> tuple[jax.Array, list[jax.Array]]:
        """The ``JointBlock`` s (the last ``context_pre_only``, unless ``last_context_pre_only=False``, as
        in ``SD3ControlNetModel``) on image ``tokens`` and embedded ``text``; ``residuals`` added to the
        image tokens after every block but the last, as ``SD3Transformer2DModel.forward`` adds
        ``block_controlnet_hidden_states``. Returns the final image tokens and each block's image
        output (before its residual)."""
        block_cls = _block_class(JointBlock, self.remat, self.remat_policy)
        self.check_residuals(residuals)
        features = []
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            tokens, text = block_cls(
                self.num_attention_heads,
                self.mlp_ratio,
                context_pre_only=last and last_context_pre_only,
                qk_norm=self.qk_norm,
                dual_attention=i in self.dual_attention_layers,
                dtype=self.dtype,
                attention_impl=self.attention_impl,
                name=f"transformer_blocks_{i}",
            )(tokens, text, temb)
            features.append(tokens)
            if not last:
                tokens = self.add_residual(tokens, residuals, i)
        return tokens, features

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        context: Mapping[str, jax.Array] | None = None,
        *,
        block_residuals: Sequence[jax.Array] | None = None,
        return_features: bool = False,
        train: bool = False,
    ):
        """The network output (NHWC, float32) for ``sample`` at model times ``timesteps`` (and, for the
        joint model, the ``context`` dict); with ``return_features``, ``(output, {"blocks": [each
        block's output tokens]})``. ``train`` is accepted for the backbones' common interface (no
        dropout here)."""
        del train
        self.check_input(sample)
        text, pooled = self.split_context(context, sample.shape[0])
        tokens, temb = self.embed(sample, timesteps, pooled=pooled)
        if text is None:
            tokens, features = self.blocks(tokens, temb, block_residuals)
        else:
            tokens, features = self.joint_blocks(tokens, self.embed_text(text), temb, block_residuals)
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
    if "dual_attention_layers" in cfg:  # a list from JSON / ml_collections: module fields are hashable
        cfg["dual_attention_layers"] = tuple(int(i) for i in cfg["dual_attention_layers"])
    model = DiT(**cfg)
    model.check_choices()
    return model
