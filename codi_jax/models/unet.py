"""The UNet backbone, structured and named like diffusers' ``UNet2DModel`` /
``UNet2DConditionModel`` (``conv_in``, ``time_embedding``, ``down_blocks_i.resnets_j``,
``mid_block``, ``up_blocks_i``, ``conv_norm_out``, ``conv_out``) so that a converter from
PyTorch weights is a name mapping plus kernel transposes.

SDXL's extras: ``transformer_layers_per_block`` (several transformer blocks per attention) and
``addition_embed_type="text_time"`` (pooled text embedding and size / crop time ids added to the
time embedding). A text_time UNet takes ``context`` as a dict (``TEXT_TIME_KEYS``, see
``split_context``); every other conditional UNet takes the token array.

Hooks for adapters: ``__call__`` takes optional additive residuals for every skip connection
(``down_residuals``, in the order diffusers' ControlNet produces them) and for the middle block
(``mid_residual``), and can return the encoder features instead of / beside the output.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from codi_jax.models import layers

Dtype = Any
Context = Any  # a (batch, tokens, width) array, a ``TEXT_TIME_KEYS`` dict (text_time UNets) or None

# ``context`` of an ``addition_embed_type="text_time"`` UNet (SDXL): the token sequence the
# cross-attention reads, the pooled text embedding (batch, P) and the time ids (batch, n), SDXL's
# (original height, original width, crop top, crop left, target height, target width).
TEXT_TIME_KEYS = ("tokens", "text_embeds", "time_ids")
ADDITION_EMBED_TYPES = (None, "text_time")
SDXL_TIME_IDS = 6  # time ids per example of SDXL base (the refiner has 5)


def split_context(context: Context, addition_embed_type: str | None) -> tuple[jax.Array | None, dict | None]:
    """``(token sequence, added conditioning)`` of ``context``: for a text_time UNet the dict's
    ``"tokens"`` and ``{"text_embeds", "time_ids"}``, for any other UNet ``(context, None)``."""
    if addition_embed_type is None:
        if isinstance(context, Mapping):
            raise ValueError(
                f"This UNet has no addition_embed_type: context must be a token array, got a dict {sorted(context)}."
            )
        return context, None
    given = sorted(context) if isinstance(context, Mapping) else []
    missing = [key for key in TEXT_TIME_KEYS if key not in given]
    if missing:
        if isinstance(context, Mapping):
            what = f"a dict with keys {given}"
        else:
            what = f"an array of shape {context.shape}" if hasattr(context, "shape") else repr(context)
        raise ValueError(
            f"A text_time UNet needs context={{{', '.join(TEXT_TIME_KEYS)}}}; got {what}, missing {missing}."
        )
    return context["tokens"], {"text_embeds": context["text_embeds"], "time_ids": context["time_ids"]}


# ``UNet.remat_policy``: what a rematerialised block keeps from its forward pass (the rest is
# recomputed in the backward pass). "full" is ``jax.checkpoint``'s default (nothing but the block's
# inputs is kept, the same as "nothing_saveable"); "dots_saveable" keeps every matmul output (the
# attention scores among them); "dots_with_no_batch_dims_saveable" keeps the projections' and
# feed-forwards' outputs but not the per-head score products.
REMAT_POLICIES = {
    "full": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@functools.cache
def _block_classes(remat: bool, policy: str = "full"):
    """(res-block, self-attention, transformer) classes, wrapped in ``nn.remat`` with ``policy``."""
    classes = layers.ResnetBlock, layers.SpatialSelfAttention, layers.Transformer2D
    if not remat:
        return classes
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={policy!r}; valid: {sorted(REMAT_POLICIES)}.")
    return tuple(nn.remat(cls, policy=REMAT_POLICIES[policy]) for cls in classes)


class _Blocks(nn.Module):
    """Shared settings for the down / mid / up blocks."""

    features: int
    num_layers: int
    attention: bool
    groups: int
    eps: float
    head_dim: int
    heads: int | None  # if set, the number of heads of this block's attention (else channels // head_dim)
    linear_projection: bool
    dropout: float
    dtype: Dtype
    conv_impl: str
    remat: bool
    deterministic: bool
    cross_attention: bool
    attention_impl: str
    remat_policy: str
    transformer_layers: int = 1  # transformer blocks per attention (diffusers' transformer_layers_per_block)

    def resnet(self, name: str):
        resnet_cls, _, _ = _block_classes(self.remat, self.remat_policy)
        return resnet_cls(
            self.features,
            self.groups,
            self.eps,
            self.dropout,
            self.dtype,
            self.conv_impl,
            self.deterministic,
            name=name,
        )

    def attend(self, x: jax.Array, context: jax.Array | None, name: str) -> jax.Array:
        _, attn_cls, transformer_cls = _block_classes(self.remat, self.remat_policy)
        impl = self.attention_impl
        if self.cross_attention:
            return transformer_cls(
                self.head_dim,
                self.groups,
                self.dtype,
                self.heads,
                self.linear_projection,
                impl,
                self.transformer_layers,
                name=name,
            )(x, context)
        return attn_cls(self.head_dim, self.groups, self.eps, self.dtype, self.heads, impl, name=name)(x)


class DownBlock(_Blocks):
    add_downsample: bool = True

    @nn.compact
    def __call__(self, x, temb, context):
        skips = []
        for j in range(self.num_layers):
            x = self.resnet(f"resnets_{j}")(x, temb)
            if self.attention:
                x = self.attend(x, context, f"attentions_{j}")
            skips.append(x)
        if self.add_downsample:
            x = layers.Downsample(self.dtype, self.conv_impl, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class MidBlock(_Blocks):
    @nn.compact
    def __call__(self, x, temb, context):
        x = self.resnet("resnets_0")(x, temb)
        if self.attention:
            x = self.attend(x, context, "attentions_0")
        return self.resnet("resnets_1")(x, temb)


class UpBlock(_Blocks):
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context):
        # ``skips`` holds this block's skip tensors, consumed last-first as in diffusers.
        for j in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - j].astype(x.dtype)], axis=-1)
            x = self.resnet(f"resnets_{j}")(x, temb)
            if self.attention:
                x = self.attend(x, context, f"attentions_{j}")
        if self.add_upsample:
            x = layers.Upsample(self.dtype, self.conv_impl, name="upsamplers_0")(x)
        return x


class UNet(nn.Module):
    """Noise-prediction UNet.

    Attributes:
      in_channels / out_channels: image channels in and out.
      block_out_channels: channels per resolution level (level i works at size / 2**i).
      layers_per_block: res-blocks per down level (up levels have one more, as in diffusers).
      attention_levels: per level, whether its blocks carry attention (chooses the resolutions).
      mid_attention: attention in the middle block.
      attention_head_dim: channels per head (used when ``num_attention_heads`` is None).
      num_attention_heads: if set, the number of heads per level (the middle block uses the last
        level's), as diffusers' ``UNet2DConditionModel`` configs give them (SD 1.x: 8 at every level,
        i.e. 40 / 80 / 160 channels per head); heads do not change parameter shapes.
      cross_attention_dim: if set, attention blocks are SD-style transformers that attend to a
        ``context`` sequence of this width.
      use_linear_projection: the transformers' ``proj_in`` / ``proj_out`` are linear layers (SD 2.x)
        or 1x1 convs (SD 1.x); the same map, stored with diffusers' parameter shapes.
      transformer_layers_per_block: if set, transformer blocks per attention at each level (the
        middle block uses the last level's; SDXL: (1, 2, 10)); None is one everywhere (SD 1.x / 2.x).
      addition_embed_type: None, or "text_time" (SDXL): ``context`` is then a dict with
        ``TEXT_TIME_KEYS``; the time ids' sinusoidal embeddings (``addition_time_embed_dim`` each,
        the time embedding's flip_sin_to_cos / freq_shift), flattened per example after the pooled
        ``text_embeds``, go through ``add_embedding`` (linear, SiLU, linear: input width
        ``projection_class_embeddings_input_dim``) and are added to the time embedding.
      norm_num_groups / norm_eps: GroupNorm settings.
      flip_sin_to_cos / freq_shift: sinusoidal time-embedding convention (diffusers' defaults).
      dtype: compute dtype (params stay float32).
      remat: rematerialise each res / attention block in the backward pass.
      conv_impl: "auto" | "xla" | "im2col" (see ``codi_jax.models.conv``).
      attention_impl: "dot_product" (``jax.nn.dot_product_attention``, XLA) | "cudnn" (its cuDNN
        flash attention: NVIDIA GPUs with bf16 / fp16 compute) | "einsum" (explicit scores); see
        ``layers.ATTENTION_IMPLS``. Same parameters and float32 softmax in every case.
      remat_policy: with ``remat``, what each block keeps for the backward pass: "full" (nothing:
        recompute the block) | "nothing_saveable" (the same) | "dots_saveable" |
        "dots_with_no_batch_dims_saveable" (``jax.checkpoint_policies``; see ``REMAT_POLICIES``).
      The last four only choose how the network is computed (saved configs without
      ``attention_impl`` / ``remat_policy`` get the defaults).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (64, 128, 128)
    layers_per_block: int = 2
    attention_levels: Sequence[bool] = (False, False, True)
    mid_attention: bool = True
    attention_head_dim: int = 32
    num_attention_heads: Sequence[int] | None = None
    cross_attention_dim: int | None = None
    use_linear_projection: bool = True
    transformer_layers_per_block: Sequence[int] | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    dtype: Dtype = jnp.float32
    remat: bool = False
    conv_impl: str = "auto"
    attention_impl: str = "dot_product"
    remat_policy: str = "full"

    def _settings(self, level: int, attention: bool, num_layers: int, train: bool) -> dict:
        """Block settings at ``level`` (the middle block is at the last level)."""
        return dict(
            features=self.block_out_channels[level],
            num_layers=num_layers,
            attention=attention,
            groups=self.norm_num_groups,
            eps=self.norm_eps,
            head_dim=self.attention_head_dim,
            heads=None if self.num_attention_heads is None else int(self.num_attention_heads[level]),
            linear_projection=self.use_linear_projection,
            dropout=self.dropout,
            dtype=self.dtype,
            conv_impl=self.conv_impl,
            remat=self.remat,
            deterministic=not train,
            cross_attention=self.cross_attention_dim is not None,
            attention_impl=self.attention_impl,
            remat_policy=self.remat_policy,
            transformer_layers=self.transformer_layers(level),
        )

    def transformer_layers(self, level: int) -> int:
        """Transformer blocks per attention at ``level`` (diffusers' up blocks read the reversed list,
        i.e. the same count per level; the middle block the last level's)."""
        if self.transformer_layers_per_block is None:
            return 1
        return int(self.transformer_layers_per_block[level])

    def time_embed(self, timesteps: jax.Array, added: Mapping[str, jax.Array] | None = None) -> jax.Array:
        """The time embedding (batch, 4 * block_out_channels[0]), plus ``add_embedding`` of the
        text_time conditioning ``added`` (``split_context``'s) for a text_time UNet."""
        emb = layers.timestep_embedding(
            timesteps, self.block_out_channels[0], flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift
        )
        temb = layers.TimestepEmbedding(4 * self.block_out_channels[0], name="time_embedding")(emb)
        if self.addition_embed_type is None:
            return temb
        return temb + self._text_time_embedding(added, temb.shape[0], temb.shape[-1])

    def _text_time_embedding(self, added: Mapping[str, jax.Array], batch: int, features: int) -> jax.Array:
        """diffusers' ``add_time_proj`` (sinusoids of every time id) after ``text_embeds``, then ``add_embedding``."""
        text_embeds = jnp.asarray(added["text_embeds"], jnp.float32)
        time_ids = jnp.asarray(added["time_ids"], jnp.float32)
        if text_embeds.shape[0] != batch or time_ids.shape[0] != batch or text_embeds.ndim != 2 or time_ids.ndim != 2:
            raise ValueError(
                f"text_embeds {text_embeds.shape} / time_ids {time_ids.shape} must be (batch={batch}, n) arrays."
            )
        time_embeds = layers.timestep_embedding(
            time_ids.reshape(-1),
            self.addition_time_embed_dim,
            flip_sin_to_cos=self.flip_sin_to_cos,
            freq_shift=self.freq_shift,
        ).reshape(batch, -1)
        add_embeds = jnp.concatenate([text_embeds, time_embeds], axis=-1)
        if add_embeds.shape[-1] != self.projection_class_embeddings_input_dim:
            raise ValueError(
                f"text_embeds width {text_embeds.shape[-1]} + {time_ids.shape[-1]} time ids x "
                f"{self.addition_time_embed_dim} = {add_embeds.shape[-1]}; projection_class_embeddings_input_dim is "
                f"{self.projection_class_embeddings_input_dim}."
            )
        return layers.TimestepEmbedding(features, name="add_embedding")(add_embeds)

    def context_spec(self, batch: int = 1, tokens: int = 1) -> Context:
        """``ShapeDtypeStruct`` s of a ``context`` this UNet reads (None without cross-attention);
        for a text_time UNet SDXL's six time ids and the pooled width that fills ``add_embedding``."""
        if self.cross_attention_dim is None:
            return None
        token_spec = jax.ShapeDtypeStruct((batch, tokens, self.cross_attention_dim), jnp.float32)
        if self.addition_embed_type is None:
            return token_spec
        pooled = self.projection_class_embeddings_input_dim - SDXL_TIME_IDS * self.addition_time_embed_dim
        return {
            "tokens": token_spec,
            "text_embeds": jax.ShapeDtypeStruct((batch, pooled), jnp.float32),
            "time_ids": jax.ShapeDtypeStruct((batch, SDXL_TIME_IDS), jnp.float32),
        }

    def encode(
        self,
        sample: jax.Array,
        temb: jax.Array,
        context: jax.Array | None,
        *,
        train: bool,
        hint: jax.Array | None = None,
    ) -> tuple[list[jax.Array], jax.Array]:
        """The encoder: ``(skip tensors, middle-block output)``. ``hint`` is added after ``conv_in``
        (how a ControlNet, which reuses this method and these parameter names, reads its condition)."""
        levels = len(self.block_out_channels)
        h = layers.Conv2D(self.block_out_channels[0], dtype=self.dtype, conv_impl=self.conv_impl, name="conv_in")(
            sample
        )
        if hint is not None:
            h = h + hint.astype(h.dtype)
        skips = [h]
        for i in range(levels):
            h, block_skips = DownBlock(
                **self._settings(i, self.attention_levels[i], self.layers_per_block, train),
                add_downsample=i < levels - 1,
                name=f"down_blocks_{i}",
            )(h, temb, context)
            skips.extend(block_skips)
        h = MidBlock(**self._settings(levels - 1, self.mid_attention, 1, train), name="mid_block")(h, temb, context)
        return skips, h

    def skip_specs(self) -> list[tuple[int, int]]:
        """``(channels, level)`` of every skip tensor, in ``encode``'s order; level i is at size / 2**i."""
        specs = [(self.block_out_channels[0], 0)]
        for i, features in enumerate(self.block_out_channels):
            specs += [(features, i)] * self.layers_per_block
            if i < len(self.block_out_channels) - 1:
                specs.append((features, i + 1))
        return specs

    def _check_heads(self) -> None:
        levels = len(self.block_out_channels)
        if len(self.num_attention_heads) != levels:
            raise ValueError(
                f"num_attention_heads has {len(self.num_attention_heads)} entries but block_out_channels has {levels}."
            )
        attended = [i for i in range(levels) if self.attention_levels[i]] + ([levels - 1] if self.mid_attention else [])
        for i in attended:
            heads, channels = self.num_attention_heads[i], self.block_out_channels[i]
            if heads < 1 or channels % heads:
                raise ValueError(f"num_attention_heads[{i}]={heads} does not divide level {i}'s {channels} channels.")

    def _check_sdxl_fields(self) -> None:
        """``transformer_layers_per_block`` has one count per level; text_time has its widths."""
        levels = len(self.block_out_channels)
        counts = self.transformer_layers_per_block
        if counts is not None and (len(counts) != levels or min(counts) < 1):
            raise ValueError(
                f"transformer_layers_per_block={tuple(counts)} needs {levels} counts >= 1 (one per level)."
            )
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(f"addition_embed_type={self.addition_embed_type!r}; valid: {ADDITION_EMBED_TYPES}.")
        if self.addition_embed_type is not None and self.cross_attention_dim is None:
            raise ValueError(
                f"addition_embed_type={self.addition_embed_type!r} needs cross_attention_dim (a text UNet)."
            )
        widths = (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim)
        if self.addition_embed_type == "text_time" and None in widths:
            raise ValueError(
                "addition_embed_type='text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim."
            )

    def check_choices(self) -> None:
        """``attention_impl`` / ``remat_policy`` are known values (errors name the field)."""
        if self.attention_impl not in layers.ATTENTION_IMPLS:
            raise ValueError(f"model.attention_impl={self.attention_impl!r}; valid: {layers.ATTENTION_IMPLS}.")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"model.remat_policy={self.remat_policy!r}; valid: {sorted(REMAT_POLICIES)}.")

    def check_input(self, sample: jax.Array) -> None:
        self.check_choices()
        levels = len(self.block_out_channels)
        if len(self.attention_levels) != levels:
            raise ValueError(
                f"attention_levels has {len(self.attention_levels)} entries but block_out_channels has {levels}."
            )
        if self.num_attention_heads is not None:
            self._check_heads()
        self._check_sdxl_fields()
        if sample.ndim != 4 or sample.shape[-1] != self.in_channels:
            raise ValueError(f"UNet expects NHWC input with {self.in_channels} channels, got shape {sample.shape}.")
        factor = 2 ** (levels - 1)
        if sample.shape[1] % factor or sample.shape[2] % factor:
            raise ValueError(f"Image size {sample.shape[1:3]} must be divisible by {factor} for {levels} levels.")

    @staticmethod
    def _check_like(name: str, given: Sequence[jax.Array], expected: Sequence[jax.Array]) -> None:
        if len(given) != len(expected):
            raise ValueError(f"Expected {len(expected)} tensors in {name}, got {len(given)}.")
        for i, (g, e) in enumerate(zip(given, expected)):
            if g.shape != e.shape:
                raise ValueError(f"{name}[{i}] has shape {g.shape}; expected {e.shape}.")

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        context: Context = None,
        *,
        down_residuals: Sequence[jax.Array] | None = None,
        mid_residual: jax.Array | None = None,
        down_blend: Sequence[tuple[jax.Array, jax.Array]] | None = None,
        mid_blend: tuple[jax.Array, jax.Array] | None = None,
        return_features: bool = False,
        train: bool = False,
    ):
        """Predicts the network output for noisy ``sample`` (NHWC) at model times ``timesteps``, reading
        ``context`` (the token array; a ``TEXT_TIME_KEYS`` dict for a text_time UNet).

        Adapter hooks, applied to the skip tensors and the middle-block output before the decoder:
          down_residuals / mid_residual: ``h + r`` (ControlNet, T2I-Adapter).
          down_blend / mid_blend: pairs ``(f, mu)`` giving ``(1 - mu) h + mu f`` (full CoDi's fusion;
            written ``h + mu (f - h)`` so that ``mu = 0`` returns ``h`` bit for bit).
        Returns the output (NHWC, float32), or ``(output, features)`` if ``return_features``, where
        ``features = {"down": [skip tensors], "mid": middle-block output}`` (before the hooks).
        """
        self.check_input(sample)
        levels = len(self.block_out_channels)
        context, added = split_context(context, self.addition_embed_type)
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (sample.shape[0],))
        temb = self.time_embed(timesteps, added)
        skips, h = self.encode(sample, temb, context, train=train)
        features_out = {"down": list(skips), "mid": h}

        if down_residuals is not None:
            self._check_like("down_residuals", down_residuals, skips)
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_residuals)]
        if mid_residual is not None:
            self._check_like("mid_residual", [mid_residual], [h])
            h = h + mid_residual.astype(h.dtype)
        if down_blend is not None:
            self._check_like("down_blend", [f for f, _ in down_blend], skips)
            skips = [s + mu * (f.astype(s.dtype) - s) for s, (f, mu) in zip(skips, down_blend)]
        if mid_blend is not None:
            f, mu = mid_blend
            self._check_like("mid_blend", [f], [h])
            h = h + mu * (f.astype(h.dtype) - h)

        num_up_layers = self.layers_per_block + 1
        for i in range(levels):
            level = levels - 1 - i
            block_skips, skips = tuple(skips[-num_up_layers:]), skips[:-num_up_layers]
            h = UpBlock(
                **self._settings(level, self.attention_levels[level], num_up_layers, train),
                add_upsample=i < levels - 1,
                name=f"up_blocks_{i}",
            )(h, block_skips, temb, context)

        h = nn.GroupNorm(self.norm_num_groups, epsilon=self.norm_eps, dtype=jnp.float32, name="conv_norm_out")(h)
        out = layers.Conv2D(self.out_channels, dtype=self.dtype, conv_impl=self.conv_impl, name="conv_out")(
            nn.silu(h)
        ).astype(jnp.float32)
        return (out, features_out) if return_features else out


def unet_from_config(model_config) -> UNet:
    """Builds a ``UNet`` from a config section; unknown fields are an error naming them."""
    cfg = dict(model_config)
    cfg.pop("parametrization", None)  # a training choice, stored beside the architecture
    cfg.pop("kind", None)  # which backbone (``networks.backbone_from_config``)
    valid = set(UNet.__dataclass_fields__) - {"parent", "name"}
    unknown = set(cfg) - valid
    if unknown:
        raise ValueError(f"Unknown model config fields {sorted(unknown)}; valid: {sorted(valid)}.")
    if "dtype" in cfg and isinstance(cfg["dtype"], str):
        cfg["dtype"] = jnp.dtype(cfg["dtype"])
    for key in ("block_out_channels", "attention_levels", "num_attention_heads", "transformer_layers_per_block"):
        if cfg.get(key) is not None:
            cfg[key] = tuple(cfg[key])
    model = UNet(**cfg)
    model.check_choices()
    return model
