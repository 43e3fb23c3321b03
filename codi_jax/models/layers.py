"""UNet building blocks, named like diffusers' modules so weight conversion is a name mapping.

Parameters are float32; ``dtype`` is the compute dtype. GroupNorm / LayerNorm statistics,
softmax and the time embedding run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from codi_jax.models.conv import conv2d

Dtype = Any


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' ``Timesteps``."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Conv2D(nn.Module):
    """Conv with ``kernel`` (kh, kw, in, out) and ``bias``; PyTorch-style symmetric padding."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    use_bias: bool = True
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), stride=self.stride, impl=self.conv_impl)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def _group_stats(x: jax.Array, num_groups: int, eps: float) -> tuple[jax.Array, jax.Array]:
    """Per-(example, channel) mean and 1/std of ``x``'s groups, float32, shaped to broadcast on ``x``."""
    n, c = x.shape[0], x.shape[-1]
    spatial = tuple(range(1, x.ndim - 1))
    mean = jnp.mean(x, spatial).reshape(n, num_groups, -1).mean(-1)
    mean_sq = jnp.mean(jnp.square(x), spatial).reshape(n, num_groups, -1).mean(-1)
    inv_std = lax.rsqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0) + eps)
    per_channel = (n,) + (1,) * (x.ndim - 2) + (c,)
    group_size = c // num_groups
    return (
        jnp.repeat(mean, group_size, axis=1).reshape(per_channel),
        jnp.repeat(inv_std, group_size, axis=1).reshape(per_channel),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm_f32(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, eps: float) -> jax.Array:
    mean, inv_std = _group_stats(x, num_groups, eps)
    return (x - mean) * (inv_std * scale) + bias


def _group_norm_fwd(x, scale, bias, num_groups, eps):
    mean, inv_std = _group_stats(x, num_groups, eps)
    return (x - mean) * (inv_std * scale) + bias, (x, mean, inv_std, scale)


def _group_norm_bwd(num_groups, eps, residuals, dy):
    x, mean, inv_std, scale = residuals
    n, c = x.shape[0], x.shape[-1]
    spatial = tuple(range(1, x.ndim - 1))
    x_hat = (x - mean) * inv_std
    sum_dy = jnp.sum(dy, spatial)  # (n, c); one pass over dy and x for both sums
    sum_dy_xhat = jnp.sum(dy * x_hat, spatial)
    count = x.size // (n * num_groups)  # elements per (example, group)
    per_group = lambda v: jnp.repeat(v.reshape(n, num_groups, -1).sum(-1), c // num_groups, axis=1)
    per_channel = (n,) + (1,) * (x.ndim - 2) + (c,)
    mean_dxhat = (per_group(sum_dy * scale) / count).reshape(per_channel)
    mean_dxhat_xhat = (per_group(sum_dy_xhat * scale) / count).reshape(per_channel)
    dx = inv_std * (dy * scale - mean_dxhat - x_hat * mean_dxhat_xhat)
    return dx, jnp.sum(sum_dy_xhat, 0), jnp.sum(sum_dy, 0)


_group_norm_f32.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, eps: float) -> jax.Array:
    """GroupNorm over all axes but the batch (channels last) in float32, as flax's ``nn.GroupNorm``.

    Statistics are per-channel means over the spatial axes (reductions XLA:CPU vectorises along
    channels), combined per group on tiny ``(n, c)`` arrays. The hand-written gradient is the
    textbook one: two per-channel sums over ``dy`` and ``dy * x_hat`` and one elementwise pass.
    (Autodiff of the same forward let XLA:CPU build huge fusions that recompute the normalisation
    many times over, slower than flax's GroupNorm.)
    """
    c = x.shape[-1]
    if c % num_groups:
        raise ValueError(f"GroupNorm: {num_groups} groups do not divide {c} channels.")
    return _group_norm_f32(x.astype(jnp.float32), scale, bias, num_groups, eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _layer_norm_f32(x: jax.Array, eps: float) -> jax.Array:
    return _layer_norm_fwd(x, eps)[0]


def _layer_norm_fwd(x, eps):
    centred = x - jnp.mean(x, -1, keepdims=True)
    inv_std = lax.rsqrt(jnp.mean(jnp.square(centred), -1, keepdims=True) + eps)
    y = centred * inv_std
    return y, (y, inv_std)


def _layer_norm_bwd(eps, residuals, dy):
    y, inv_std = residuals
    mean_dy = jnp.mean(dy, -1, keepdims=True)
    return (inv_std * (dy - mean_dy - y * jnp.mean(dy * y, -1, keepdims=True)),)


_layer_norm_f32.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm over the last axis without scale or bias (DiT's adaLN norms), in float32.

    The gradient is the textbook one, written by hand: XLA:CPU fused autodiff's gradient of the
    same forward through a stack of residual blocks into fusions that recompute every block
    above (a 8-block DiT's backward took 4x its 4-block one; with this it takes 2x).
    """
    return _layer_norm_f32(x.astype(jnp.float32), eps)


class GroupNorm(nn.Module):
    """``nn.GroupNorm(dtype=float32)``: same ``scale`` / ``bias`` parameters ``(C,)``, float32 output,
    equal values and gradients to float tolerance (tests/test_conv.py); ~8% off a CPU train step."""

    num_groups: int = 32
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return group_norm(x, scale, bias, self.num_groups, self.epsilon)


def _group_norm(num_groups: int, eps: float, name: str) -> nn.Module:
    """``GroupNorm`` on the CPU backend (measured faster there), flax's elsewhere; the two hold the
    same parameters, so checkpoints move freely between backends."""
    if jax.default_backend() == "cpu":
        return GroupNorm(num_groups=num_groups, epsilon=eps, name=name)
    return nn.GroupNorm(num_groups=num_groups, epsilon=eps, dtype=jnp.float32, name=name)


class TimestepEmbedding(nn.Module):
    """``linear_1 -> SiLU -> linear_2`` on the sinusoidal embedding (diffusers' naming)."""

    features: int

    @nn.compact
    def __call__(self, emb: jax.Array) -> jax.Array:
        emb = nn.Dense(self.features, dtype=jnp.float32, name="linear_1")(emb)
        return nn.Dense(self.features, dtype=jnp.float32, name="linear_2")(nn.silu(emb))


class ResnetBlock(nn.Module):
    """diffusers ``ResnetBlock2D``: GN-SiLU-conv, + time projection, GN-SiLU-dropout-conv, skip."""

    features: int
    groups: int = 32
    eps: float = 1e-5
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"
    deterministic: bool = True  # dropout off (a field, not an argument, so nn.remat needs no statics)

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        h = _group_norm(self.groups, self.eps, "norm1")(x)
        h = Conv2D(self.features, dtype=self.dtype, conv_impl=self.conv_impl, name="conv1")(nn.silu(h))
        t = nn.Dense(self.features, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
        h = h + t[:, None, None, :].astype(h.dtype)
        h = _group_norm(self.groups, self.eps, "norm2")(h)
        h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=self.deterministic)
        h = Conv2D(self.features, dtype=self.dtype, conv_impl=self.conv_impl, name="conv2")(h)
        if x.shape[-1] != self.features:
            x = Conv2D(self.features, kernel_size=1, dtype=self.dtype, conv_impl=self.conv_impl, name="conv_shortcut")(
                x
            )
        return (x.astype(self.dtype) + h).astype(self.dtype)


def num_heads(channels: int, head_dim: int, heads: int | None = None) -> int:
    """Heads of an attention block on ``channels``: ``heads`` if given (it must divide the channels),
    else ``max(1, channels // head_dim)`` (channels per head, the default of our configs)."""
    if heads is None:
        return max(1, channels // head_dim)
    if heads < 1 or channels % heads:
        raise ValueError(f"Attention with {heads} heads on {channels} channels: heads must divide the channels.")
    return heads


# How attention is computed (``UNet.attention_impl``); every choice has the same parameters:
#   "dot_product": ``jax.nn.dot_product_attention`` with ``implementation=None`` (in JAX 0.10.2
#                  that is always its XLA path; future JAX may pick cuDNN on GPU by itself);
#   "cudnn":       the same call with ``implementation="cudnn"`` (cuDNN flash attention: NVIDIA
#                  GPUs, bf16 / fp16 compute, head dim a multiple of 8 and <= 128, <= 256 on Hopper);
#   "einsum":      this module's explicit einsum-softmax-einsum (the original path).
ATTENTION_IMPLS = ("dot_product", "cudnn", "einsum")
HALF_DTYPES = (jnp.bfloat16, jnp.float16)


def _einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """(batch, tokens, heads, head_dim) attention with the full float32 score matrix materialised."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits / math.sqrt(q.shape[-1]), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, impl: str = "dot_product") -> jax.Array:
    """Multi-head attention over (batch, tokens, channels); ``impl`` is one of ``ATTENTION_IMPLS``.

    Logits and softmax are float32 whatever the compute dtype (diffusers' ``upcast_attention=True``
    behaviour, always on: a bf16 product of q and k is exact in float32); the weights are cast back
    to ``v``'s dtype for the value product, as diffusers does. ``jax.nn.dot_product_attention``'s
    XLA path does exactly this (float32 logits from bf16 inputs, float32 softmax, weights cast to
    the value dtype); cuDNN keeps its softmax statistics in float32 and never stores the scores.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r}; valid: {ATTENTION_IMPLS}.")
    if impl == "cudnn" and q.dtype not in HALF_DTYPES:
        raise ValueError(
            f"attention_impl='cudnn' needs model.dtype bfloat16 or float16; the compute dtype is {q.dtype}."
        )
    b, tq, c = q.shape
    tk = k.shape[1]
    head_dim = c // heads
    q = q.reshape(b, tq, heads, head_dim)
    k = k.reshape(b, tk, heads, head_dim)
    v = v.reshape(b, tk, heads, head_dim)
    if impl == "einsum":
        out = _einsum_attention(q, k, v)
    else:
        out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn" if impl == "cudnn" else None)
    return out.reshape(b, tq, c)


class SpatialSelfAttention(nn.Module):
    """diffusers ``Attention`` as used by ``UNet2DModel``: GN, q/k/v/out projections, residual."""

    head_dim: int = 32
    groups: int = 32
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    heads: int | None = None  # if set, the number of heads (``head_dim`` is then unused)
    attention_impl: str = "dot_product"  # see ``ATTENTION_IMPLS``

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        heads = num_heads(c, self.head_dim, self.heads)
        h = _group_norm(self.groups, self.eps, "group_norm")(x).reshape(b, hgt * wid, c)
        q = nn.Dense(c, dtype=self.dtype, name="to_q")(h)
        k = nn.Dense(c, dtype=self.dtype, name="to_k")(h)
        v = nn.Dense(c, dtype=self.dtype, name="to_v")(h)
        out = nn.Dense(c, dtype=self.dtype, name="to_out_0")(attention(q, k, v, heads, self.attention_impl))
        return (x + out.reshape(b, hgt, wid, c).astype(x.dtype)).astype(self.dtype)


class CrossAttention(nn.Module):
    """diffusers ``Attention`` inside a transformer block (no q/k/v bias, as in SD)."""

    heads: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "dot_product"  # see ``ATTENTION_IMPLS``

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        c = x.shape[-1]
        context = x if context is None else context.astype(self.dtype)
        q = nn.Dense(c, use_bias=False, dtype=self.dtype, name="to_q")(x)
        k = nn.Dense(c, use_bias=False, dtype=self.dtype, name="to_k")(context)
        v = nn.Dense(c, use_bias=False, dtype=self.dtype, name="to_v")(context)
        out = attention(q, k, v, self.heads, self.attention_impl)
        return nn.Dense(c, dtype=self.dtype, name="to_out_0")(out)


class GEGLUFeedForward(nn.Module):
    """diffusers ``FeedForward`` with GEGLU: ``net_0.proj`` -> gate -> ``net_2``."""

    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        hidden, gate = jnp.split(nn.Dense(2 * self.mult * c, dtype=self.dtype, name="net_0_proj")(x), 2, -1)
        return nn.Dense(c, dtype=self.dtype, name="net_2")(hidden * nn.gelu(gate, approximate=False))


class TransformerBlock(nn.Module):
    """diffusers ``BasicTransformerBlock``: self-attention, cross-attention, GEGLU feed-forward."""

    heads: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "dot_product"  # see ``ATTENTION_IMPLS``

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None) -> jax.Array:
        def norm(name):
            return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name)

        impl = self.attention_impl
        x = x + CrossAttention(self.heads, self.dtype, impl, name="attn1")(norm("norm1")(x).astype(self.dtype))
        if context is not None:
            attn2 = CrossAttention(self.heads, self.dtype, impl, name="attn2")
            x = x + attn2(norm("norm2")(x).astype(self.dtype), context)
        return x + GEGLUFeedForward(dtype=self.dtype, name="ff")(norm("norm3")(x).astype(self.dtype))


class Transformer2D(nn.Module):
    """diffusers ``Transformer2DModel``: ``norm``, ``proj_in``, ``num_layers`` ``BasicTransformerBlock`` s
    (``transformer_blocks_0`` ... ``transformer_blocks_{num_layers - 1}``; SD 1.x / 2.x: one, SDXL: up to
    10), ``proj_out``, residual.

    ``linear_projection``: ``proj_in`` / ``proj_out`` are linear layers (kernel ``(c, c)``, SD 2.x's
    ``use_linear_projection=True``) or 1x1 convs (kernel ``(1, 1, c, c)``, SD 1.x). The two compute
    the same per-pixel map; the flag keeps the parameter shapes those of the diffusers layout.
    """

    head_dim: int = 32
    groups: int = 32
    dtype: Dtype = jnp.float32
    heads: int | None = None  # if set, the number of heads (``head_dim`` is then unused)
    linear_projection: bool = True
    attention_impl: str = "dot_product"  # see ``ATTENTION_IMPLS``
    num_layers: int = 1  # diffusers' ``transformer_layers_per_block`` at this block's level

    def _projection(self, h: jax.Array, name: str) -> jax.Array:
        c = h.shape[-1]
        if self.linear_projection:
            return nn.Dense(c, dtype=self.dtype, name=name)(h)
        return Conv2D(c, kernel_size=1, dtype=self.dtype, name=name)(h[:, None])[:, 0]

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None) -> jax.Array:
        b, hgt, wid, c = x.shape
        heads = num_heads(c, self.head_dim, self.heads)
        h = _group_norm(self.groups, 1e-6, "norm")(x).reshape(b, hgt * wid, c)
        h = self._projection(h, "proj_in")
        for i in range(self.num_layers):
            h = TransformerBlock(heads, self.dtype, self.attention_impl, name=f"transformer_blocks_{i}")(h, context)
        h = self._projection(h, "proj_out")
        return (x + h.reshape(b, hgt, wid, c).astype(x.dtype)).astype(self.dtype)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (``downsamplers_0.conv``)."""

    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Conv2D(x.shape[-1], stride=2, dtype=self.dtype, conv_impl=self.conv_impl, name="conv")(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (``upsamplers_0.conv``)."""

    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return Conv2D(c, dtype=self.dtype, conv_impl=self.conv_impl, name="conv")(x)


def instruction_embedding(num_instructions: int, features: int, instruction: jax.Array | None) -> jax.Array:
    """The learned embedding (batch, features) of an adapter's instruction ids (module
    ``instruction_embedding``; call it from a compact method, whose child it becomes)."""
    if instruction is None:
        raise ValueError("This adapter was built for instructions (num_instructions > 0); none was given.")
    return nn.Embed(num_instructions, features, name="instruction_embedding")(instruction.astype(jnp.int32))
