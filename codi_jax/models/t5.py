"""The T5 text encoder of SD3 / SD3.5 (``text_encoder_3``) as a flax linen module, and its weights
from transformers.

``T5Encoder`` computes what transformers' ``T5EncoderModel`` returns as ``last_hidden_state``
(T5 v1.1 layout, as ``google/t5-v1_1-xxl``): token embeddings (``shared``), ``num_layers`` pre-norm
blocks of bidirectional self-attention (no 1/sqrt(d) scaling; a relative position bias computed
by the first block's ``relative_attention_bias`` from T5's log-spaced buckets and shared by all
blocks) and a feed-forward (``gated-gelu``: ``wo(gelu_tanh(wi_0 x) * wi_1 x)``; ``relu``:
``wo(relu(wi x))``), then ``final_layer_norm``. Norms are T5's RMS norm (no mean, no bias), computed
in float32. No dropout (a frozen encoder).

Precision: matmuls run in ``dtype``; the residual stream, norms, attention logits and softmax stay
float32. transformers in bfloat16 also ends with a float32 residual stream (its ``wo`` is kept in
float32, ``_keep_in_fp32_modules``); the output is cast to ``dtype``.

Modules are named like transformers' (``encoder/block_0/layer_0/SelfAttention/q`` <->
``encoder.block.0.layer.0.SelfAttention.q``), so conversion is a name mapping plus the linear
layout (``weight`` (out, in) -> ``kernel`` (in, out)); embeddings are ``embedding``, norm weights
``weight``. Weights are read with ``safetensors.numpy``; torch is never imported.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.interop import torch_state

FEED_FORWARD_PROJ = ("gated-gelu", "relu")
# feed_forward_proj -> (dense_act_fn, is_gated_act) as T5Config.__post_init__ derives them.
_DERIVED_ACTIVATION = {"gated-gelu": ("gelu_new", True), "relu": ("relu", False)}
_ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # transformers' NewGELUActivation (tanh)
    "relu": jax.nn.relu,
}
# T5 fields without effect on the encoder at inference: the decoder's, dropout, T5 1.0 leftovers.
_IGNORED_FIELDS = torch_state.TRANSFORMERS_INERT_CONFIG_FIELDS | {
    "num_decoder_layers",
    "dropout_rate",
    "classifier_dropout",
    "scale_decoder_outputs",
    "output_past",
    "n_positions",
    "gradient_checkpointing",
}
_SHARED = "shared.weight"
_TIED = "encoder.embed_tokens.weight"  # transformers ties it to shared.weight (_tied_weights_keys)

# Our parameter path -> the transformers state-dict name (block_3 -> block.3, layer_0 -> layer.0).
_torch_name = torch_state.torch_names(
    re.compile(r"^(block|layer)_(\d+)$"),
    {"kernel": "weight", "embedding": "weight", "weight": "weight"},
    "transformers",
)


class UnsupportedT5Config(ValueError):
    """The transformers T5 config uses a feature ``T5Encoder`` does not implement."""


def relative_position_bucket(
    query_length: int, key_length: int, num_buckets: int, max_distance: int, bidirectional: bool = True
) -> np.ndarray:
    """(query_length, key_length) int32 buckets of ``key - query``: transformers'
    ``T5Attention._relative_position_bucket`` (half the buckets per direction, exact below
    ``num_buckets // 4``, log-spaced up to ``max_distance``), in float32 arithmetic like torch's."""
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    buckets = np.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).astype(relative.dtype) * num_buckets
        relative = np.abs(relative)
    else:
        relative = -np.minimum(relative, 0)
    max_exact = num_buckets // 2
    scaled = np.log(np.maximum(relative, 1).astype(np.float32) / np.float32(max_exact))
    scaled = scaled / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    large = np.minimum(max_exact + scaled.astype(relative.dtype), num_buckets - 1)
    return (buckets + np.where(relative < max_exact, relative, large)).astype(np.int32)


class T5LayerNorm(nn.Module):
    """transformers' ``T5LayerNorm``: ``weight * x / sqrt(mean(x^2) + eps)``, statistics in float32;
    with a 16-bit ``dtype`` the normalised value is cast to it before the weight multiplies (as
    transformers does for half weights)."""

    d_model: int
    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (self.d_model,), jnp.float32)
        x = x.astype(jnp.float32)
        normed = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return weight.astype(self.dtype) * normed.astype(self.dtype)


class T5Attention(nn.Module):
    """transformers' ``T5Attention`` (encoder self-attention): bias-free q/k/v/o, logits ``q . k``
    (no scaling) + the relative position bias, float32 softmax."""

    d_model: int
    d_kv: int
    num_heads: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    has_relative_attention_bias: bool = False
    dtype: Any = jnp.float32

    def compute_bias(self, length: int) -> jax.Array:
        """(1, heads, length, length) float32 bias from ``relative_attention_bias`` (buckets, heads)."""
        buckets = relative_position_bucket(
            length, length, self.relative_attention_num_buckets, self.relative_attention_max_distance
        )
        table = nn.Embed(self.relative_attention_num_buckets, self.num_heads, name="relative_attention_bias")
        return jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None].astype(jnp.float32)

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None, position_bias: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """``x`` (batch, tokens, d_model), ``mask`` (batch, 1, 1, tokens) bool or None, ``position_bias``
        of the first block (None in the first block) -> (output, position_bias)."""
        b, t, _ = x.shape
        inner = self.num_heads * self.d_kv

        def project(name: str) -> jax.Array:
            return nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)(x).reshape(b, t, self.num_heads, -1)

        q, k, v = project("q"), project("k"), project("v")
        if position_bias is None:
            if not self.has_relative_attention_bias:
                raise ValueError("The first T5 block computes the position bias: it needs relative_attention_bias.")
            position_bias = self.compute_bias(t)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + position_bias
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v).reshape(b, t, inner)
        return nn.Dense(self.d_model, use_bias=False, dtype=self.dtype, name="o")(out), position_bias


class T5DenseReluDense(nn.Module):
    """transformers' ``T5DenseGatedActDense`` (``wo(act(wi_0 x) * wi_1 x)``, gated) or
    ``T5DenseActDense`` (``wo(act(wi x))``); all bias-free."""

    d_model: int
    d_ff: int
    feed_forward_proj: str = "gated-gelu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act_name, gated = _DERIVED_ACTIVATION[self.feed_forward_proj]
        act = _ACTIVATIONS[act_name]
        dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=self.dtype, name=name)
        if gated:
            hidden = act(dense(self.d_ff, "wi_0")(x)) * dense(self.d_ff, "wi_1")(x)
        else:
            hidden = act(dense(self.d_ff, "wi")(x))
        return dense(self.d_model, "wo")(hidden)


class _EncoderFields(nn.Module):
    """The fields of T5's encoder (config.json's names, T5Config's defaults); ``T5Block`` and
    ``T5Stack`` share them."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"
    layer_norm_epsilon: float = 1e-6
    dtype: Any = jnp.float32  # compute dtype; params stay float32

    def encoder_fields(self) -> dict[str, Any]:
        """These fields by name, to build a submodule that shares them."""
        return {name: getattr(self, name) for name in _ARCHITECTURE_DEFAULTS} | {"dtype": self.dtype}


# config.json fields that set the architecture (-> T5Encoder fields) and T5Config's defaults.
_ARCHITECTURE_DEFAULTS: dict[str, Any] = torch_state.architecture_defaults(_EncoderFields)


class T5LayerSelfAttention(_EncoderFields):
    """transformers' ``T5LayerSelfAttention``: ``x + SelfAttention(layer_norm(x))``."""

    has_relative_attention_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, bias: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        normed = T5LayerNorm(self.d_model, self.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        attention = T5Attention(
            self.d_model,
            self.d_kv,
            self.num_heads,
            self.relative_attention_num_buckets,
            self.relative_attention_max_distance,
            self.has_relative_attention_bias,
            self.dtype,
            name="SelfAttention",
        )
        out, bias = attention(normed, mask, bias)
        return x + out.astype(jnp.float32), bias


class T5LayerFF(_EncoderFields):
    """transformers' ``T5LayerFF``: ``x + DenseReluDense(layer_norm(x))``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        normed = T5LayerNorm(self.d_model, self.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        ff = T5DenseReluDense(self.d_model, self.d_ff, self.feed_forward_proj, self.dtype, name="DenseReluDense")
        return x + ff(normed).astype(jnp.float32)


class T5Block(_EncoderFields):
    """transformers' encoder ``T5Block``: ``layer.0`` self-attention, ``layer.1`` feed-forward."""

    has_relative_attention_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, bias: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        fields = self.encoder_fields()
        attention = T5LayerSelfAttention(
            **fields, has_relative_attention_bias=self.has_relative_attention_bias, name="layer_0"
        )
        x, bias = attention(x, mask, bias)
        return T5LayerFF(**fields, name="layer_1")(x), bias


class T5Stack(_EncoderFields):
    """transformers' encoder ``T5Stack`` after the embedding: the blocks, then ``final_layer_norm``."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        fields = self.encoder_fields()
        bias = None
        for i in range(self.num_layers):
            x, bias = T5Block(**fields, has_relative_attention_bias=i == 0, name=f"block_{i}")(x, mask, bias)
        return T5LayerNorm(self.d_model, self.layer_norm_epsilon, self.dtype, name="final_layer_norm")(x)


class T5Encoder(_EncoderFields):
    """transformers' ``T5EncoderModel`` (its ``last_hidden_state``); fields are config.json's names."""

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """``input_ids`` (batch, tokens) -> ``last_hidden_state`` (batch, tokens, d_model) in ``dtype``.

        ``attention_mask`` (batch, tokens; 1 = token, 0 = padding) hides padded keys, as transformers
        does when it is passed (SD3's pipeline passes none: padding is attended).
        """
        if self.feed_forward_proj not in _DERIVED_ACTIVATION:
            raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r}: supported {list(FEED_FORWARD_PROJ)}.")
        x = nn.Embed(self.vocab_size, self.d_model, name="shared")(jnp.asarray(input_ids, jnp.int32))
        mask = None if attention_mask is None else (jnp.asarray(attention_mask) > 0)[:, None, None, :]
        return T5Stack(**self.encoder_fields(), name="encoder")(x.astype(jnp.float32), mask)


def _unsupported(message: str) -> UnsupportedT5Config:
    return UnsupportedT5Config(f"Cannot convert transformers T5 config: {message}")


def _check_identity(config: Mapping[str, Any]) -> None:
    """``model_type`` t5, ``architectures`` T5EncoderModel (or absent), an encoder (``is_decoder`` false)."""
    if config.get("model_type", "t5") != "t5":
        raise _unsupported(f"model_type={config['model_type']!r} is not supported (supported: ['t5']).")
    for architecture in config.get("architectures") or ["T5EncoderModel"]:
        if architecture != "T5EncoderModel":
            raise _unsupported(
                f"architectures entry {architecture!r} (supported: ['T5EncoderModel']; save the encoder of an "
                "encoder-decoder checkpoint with transformers' T5EncoderModel first)."
            )
    if config.get("is_decoder", False):
        raise _unsupported("is_decoder=True: a T5 decoder is not an encoder.")


def _check_activation(config: Mapping[str, Any], proj: Any) -> None:
    """``feed_forward_proj`` one of ours; saved ``dense_act_fn`` / ``is_gated_act`` must agree with it."""
    if proj not in _DERIVED_ACTIVATION:
        raise _unsupported(f"feed_forward_proj={proj!r} is not supported (supported: {list(FEED_FORWARD_PROJ)}).")
    for field, derived in zip(("dense_act_fn", "is_gated_act"), _DERIVED_ACTIVATION[proj]):
        if field in config and config[field] != derived:
            raise _unsupported(
                f"{field}={config[field]!r} contradicts feed_forward_proj={proj!r} (which gives {derived!r})."
            )


def t5_config_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """A transformers ``T5Config`` dict (config.json) -> ``T5Encoder`` fields.

    Raises ``UnsupportedT5Config`` (a ``ValueError``, one line naming the field) for anything the
    module cannot reproduce exactly, including fields it does not know.
    """
    _check_identity(config)
    known = set(_ARCHITECTURE_DEFAULTS) | _IGNORED_FIELDS | {"model_type", "architectures", "dense_act_fn"}
    unknown = sorted(set(config) - known - {"is_gated_act"})
    if unknown:
        raise _unsupported(f"unknown field {unknown[0]!r} (all unknown: {unknown}).")
    fields = {name: config.get(name, default) for name, default in _ARCHITECTURE_DEFAULTS.items()}
    _check_activation(config, fields["feed_forward_proj"])
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
        if not isinstance(fields[name], int) or isinstance(fields[name], bool) or fields[name] < 1:
            raise _unsupported(f"{name}={fields[name]!r} (expected an int >= 1).")
    buckets, distance = fields["relative_attention_num_buckets"], fields["relative_attention_max_distance"]
    if not isinstance(buckets, int) or buckets < 4:
        raise _unsupported(f"relative_attention_num_buckets={buckets!r} (expected an int >= 4).")
    if not isinstance(distance, int) or distance <= buckets // 4:
        raise _unsupported(f"relative_attention_max_distance={distance!r} (expected an int > {buckets // 4}).")
    if not isinstance(fields["layer_norm_epsilon"], int | float) or fields["layer_norm_epsilon"] <= 0:
        raise _unsupported(f"layer_norm_epsilon={fields['layer_norm_epsilon']!r} (expected a number > 0).")
    fields["layer_norm_epsilon"] = float(fields["layer_norm_epsilon"])
    return fields


def t5_from_config(config: Mapping[str, Any], **model_overrides: Any) -> T5Encoder:
    """``T5Encoder`` for a transformers T5 ``config.json`` dict (``dtype`` may be overridden)."""
    return T5Encoder(**t5_config_fields(config), **model_overrides)


def t5_param_shapes(model: T5Encoder) -> Any:
    """The shapes of ``model``'s parameters (``jax.eval_shape``: nothing allocated, no random numbers)."""
    input_ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), input_ids)["params"]


def t5_param_memory(model: T5Encoder, bytes_per_param: int = 2) -> tuple[int, int]:
    """(parameter count, bytes at ``bytes_per_param``; 2 = bfloat16) of ``model``, from its shapes."""
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(t5_param_shapes(model)))
    return count, count * bytes_per_param


def _tied_embedding(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict with one ``shared.weight``: transformers ties ``encoder.embed_tokens.weight`` to
    it, and checkpoints hold either or both; both must then be equal."""
    state = dict(state_dict)
    shared, tied = state.pop(_SHARED, None), state.pop(_TIED, None)
    if shared is not None and tied is not None:
        a, b = torch_state.as_numpy(shared), torch_state.as_numpy(tied)
        if a.shape != b.shape or not np.array_equal(a, b):
            raise ValueError(f"{_SHARED} and {_TIED} differ: transformers ties them (one embedding).")
    embedding = shared if shared is not None else tied
    if embedding is not None:
        state[_SHARED] = embedding
    return state


def t5_encoder_params(state_dict: Mapping[str, Any], model: T5Encoder) -> dict[str, Any]:
    """Converts a transformers ``T5EncoderModel`` state dict (name -> numpy array or torch tensor) to
    ``model``'s params: ``shared.weight`` (or its tie ``encoder.embed_tokens.weight``; both consumed)
    -> ``shared/embedding``, linear ``weight`` -> ``kernel`` transposed, norm ``weight`` as is.

    Every parameter must be filled and every tensor used (else a ``ValueError`` naming the missing /
    leftover tensors), shapes must match. Returns float32 numpy arrays.
    """
    return torch_state.params_from_state_dict(
        _tied_embedding(state_dict),
        t5_param_shapes(model),
        _torch_name,
        torch_state.linear_tensor,
        missing_what="parameters missing from the T5 encoder state dict",
        unused_what="T5 tensors have no counterpart in our T5Encoder (a decoder, or a config mismatch?)",
    )


def load_t5_encoder(path: str, *, variant: str | None = None, **model_overrides: Any) -> tuple[T5Encoder, Any]:
    """Reads a local transformers ``T5EncoderModel``: the ``save_pretrained`` directory (``config.json``
    + ``model.safetensors`` or a sharded index), a pipeline directory with ``text_encoder_3/`` (SD3),
    or the ``.safetensors`` file with its ``config.json`` beside it; ``variant`` (``"fp16"``) reads
    variant files, upcast. ``model_overrides`` set ``dtype``. Returns ``(model, float32 params)``.
    """
    config_path, weight_files = torch_state.transformers_model_files(path, "text_encoder_3", "T5 encoder", variant)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"Missing T5 config {config_path} (needed beside {weight_files[0]}).")
    with open(config_path) as f:
        model = t5_from_config(json.load(f), **model_overrides)
    return model, t5_encoder_params(torch_state.read_safetensors(weight_files, "T5"), model)
