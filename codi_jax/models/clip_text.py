"""Stable Diffusion's CLIP text encoder as a flax linen module, and its weights from transformers.

``CLIPTextModel`` computes what transformers' ``CLIPTextModel`` returns as ``last_hidden_state``:
token + learned position embeddings, pre-LayerNorm encoder layers with causal self-attention
(``quick_gelu`` MLPs for SD 1.x, ``gelu`` for SD 2.x), then the final LayerNorm. With
``output_hidden_states=True`` it also returns every layer's input/output like transformers'
``hidden_states`` (``hidden_states[-2]`` is the penultimate layer's output, before the final
LayerNorm, as SD 2.x "clip skip" users take it). The pooled output and the projection of
``CLIPTextModelWithProjection`` are not implemented.

Modules are named like transformers' (``encoder/layers_0/self_attn/q_proj`` <->
``encoder.layers.0.self_attn.q_proj``), so conversion is a name mapping plus layouts: linear
``weight`` (out, in) -> ``kernel`` (in, out), embedding ``weight`` -> ``embedding``, LayerNorm
``weight`` -> ``scale``. State dicts in transformers 4.x layout (``text_model.`` prefix) and the
``position_ids`` buffer are accepted. Weights are read with ``safetensors.numpy``; torch is never
imported.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from codi_jax.interop import torch_state

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
# Fields that do not change last_hidden_state at inference (PretrainedConfig's generic ones and the
# projection size, which only CLIPTextModelWithProjection reads, from _PROJECTION_DEFAULTS).
_IGNORED_FIELDS = torch_state.TRANSFORMERS_INERT_CONFIG_FIELDS | {"projection_dim"}
# (field, values we can represent); a missing field gets the first value.
_REQUIRED_VALUES: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("model_type", ("clip_text_model",)),
    ("attention_dropout", (0.0, 0)),  # no dropout in this module (inference / frozen encoder)
    ("dropout", (0.0, 0)),
)
_SUPPORTED_ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")

# Our parameter path -> the transformers (5.x layout) state-dict name (layers_3 -> layers.3).
_torch_name = torch_state.torch_names(
    re.compile(r"^(layers)_(\d+)$"),
    {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"},
    "transformers",
)


class UnsupportedCLIPConfig(ValueError):
    """The transformers CLIP text config uses a feature ``CLIPTextModel`` does not implement."""


def _layer_norm(x: jax.Array, eps: float, name: str) -> jax.Array:
    """LayerNorm computed in float32 (statistics and affine), cast back to the input dtype."""
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, name=name)(x.astype(jnp.float32)).astype(x.dtype)


class CLIPAttention(nn.Module):
    """transformers' ``CLIPAttention``: q/k/v/out projections, scaled dot-product over heads."""

    hidden_size: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, t, c = x.shape
        head_dim = c // self.num_heads

        def project(name: str) -> jax.Array:
            return nn.Dense(c, dtype=self.dtype, name=name)(x).reshape(b, t, self.num_heads, head_dim)

        q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(head_dim)
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v).reshape(b, t, c)
        return nn.Dense(c, dtype=self.dtype, name="out_proj")(out)


class CLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
        x = _ACTIVATIONS[self.hidden_act](x)
        return nn.Dense(self.hidden_size, dtype=self.dtype, name="fc2")(x)


class _LayerFields(nn.Module):
    """The fields of one encoder layer; ``CLIPEncoder`` has them too and passes them on."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Any = jnp.float32


class CLIPEncoderLayer(_LayerFields):
    """Pre-LN residual block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        attention = CLIPAttention(self.hidden_size, self.num_heads, self.dtype, name="self_attn")
        x = x + attention(_layer_norm(x, self.layer_norm_eps, "layer_norm1"), mask)
        mlp = CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, self.dtype, name="mlp")
        return x + mlp(_layer_norm(x, self.layer_norm_eps, "layer_norm2"))


class CLIPTextEmbeddings(nn.Module):
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        tokens = nn.Embed(self.vocab_size, self.hidden_size, name="token_embedding")(input_ids)
        positions = nn.Embed(self.max_position_embeddings, self.hidden_size, name="position_embedding")
        return tokens + positions(jnp.arange(input_ids.shape[-1]))[None]


class CLIPEncoder(_LayerFields):
    num_hidden_layers: int = 12

    def setup(self) -> None:
        fields = (self.hidden_size, self.intermediate_size, self.num_heads, self.hidden_act, self.layer_norm_eps)
        self.layers = [CLIPEncoderLayer(*fields, dtype=self.dtype) for _ in range(self.num_hidden_layers)]

    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        """Returns the encoder's input and every layer's output (transformers' ``hidden_states``)."""
        states = [x]
        for layer in self.layers:
            states.append(layer(states[-1], mask))
        return tuple(states)


class CLIPTextModel(nn.Module):
    """transformers' ``CLIPTextModel`` (its ``last_hidden_state``); fields are config.json's names."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32  # compute dtype; params stay float32

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, output_hidden_states: bool = False
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, ...]]:
        """``input_ids`` (batch, tokens) -> ``last_hidden_state`` (batch, tokens, hidden_size).

        ``attention_mask`` (batch, tokens; 1 = token, 0 = padding) additionally hides padded keys,
        as transformers does when it is passed (SD pipelines pass none). With
        ``output_hidden_states`` returns ``(last_hidden_state, hidden_states)``: the embeddings and
        each layer's output, before the final LayerNorm (``hidden_states[-2]``: penultimate layer).
        """
        last_hidden_state, hidden_states = _text_transformer(self, input_ids, attention_mask)
        return (last_hidden_state, hidden_states) if output_hidden_states else last_hidden_state


def _text_transformer(
    model: CLIPTextModel, input_ids: jax.Array, attention_mask: jax.Array | None
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """(last_hidden_state, hidden_states) of transformers' ``CLIPTextTransformer``; called from
    ``model``'s compact ``__call__``, so the submodules are ``model``'s (``embeddings``, ``encoder``,
    ``final_layer_norm``)."""
    if model.hidden_act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act={model.hidden_act!r} is not supported; supported: {sorted(_ACTIVATIONS)}.")
    tokens = input_ids.shape[-1]
    if tokens > model.max_position_embeddings:
        raise ValueError(f"{tokens} tokens exceed max_position_embeddings={model.max_position_embeddings}.")
    x = CLIPTextEmbeddings(model.vocab_size, model.hidden_size, model.max_position_embeddings, name="embeddings")(
        input_ids
    ).astype(model.dtype)
    mask = jnp.tril(jnp.ones((tokens, tokens), bool))[None, None]
    if attention_mask is not None:
        mask = mask & (jnp.asarray(attention_mask) > 0)[:, None, None, :]
    encoder = CLIPEncoder(
        model.hidden_size,
        model.intermediate_size,
        model.num_attention_heads,
        model.hidden_act,
        model.layer_norm_eps,
        model.dtype,
        num_hidden_layers=model.num_hidden_layers,
        name="encoder",
    )
    hidden_states = encoder(x, mask)
    return _layer_norm(hidden_states[-1], model.layer_norm_eps, "final_layer_norm"), hidden_states


class CLIPTextModelOutput(NamedTuple):
    """What ``CLIPTextModelWithProjection`` returns (transformers' ``CLIPTextModelOutput`` fields)."""

    text_embeds: jax.Array  # (batch, projection_dim)
    last_hidden_state: jax.Array  # (batch, tokens, hidden_size), after the final LayerNorm
    hidden_states: tuple[jax.Array, ...] | None  # embeddings and every layer's output; None unless asked


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """The token index transformers pools at (batch,): with ``eos_token_id == 2`` (configs from before
    transformers PR #24773, SDXL's ``text_encoder_2``) the first largest id, else the first
    ``eos_token_id`` (0 where there is none)."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers' ``CLIPTextModelWithProjection`` (SDXL's ``text_encoder_2``): ``CLIPTextModel``
    plus ``text_embeds = text_projection(last_hidden_state[b, eos_positions[b]])`` (no bias)."""

    projection_dim: int = 512
    eos_token_id: int = 49407  # transformers' CLIPTextConfig default; 2 selects the argmax pooling

    @nn.compact
    def __call__(  # type: ignore[override]
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, output_hidden_states: bool = False
    ) -> CLIPTextModelOutput:
        """``input_ids`` (batch, tokens) -> ``CLIPTextModelOutput`` (``hidden_states`` with
        ``output_hidden_states``); ``attention_mask`` as for ``CLIPTextModel``."""
        last_hidden_state, hidden_states = _text_transformer(self, input_ids, attention_mask)
        positions = eos_positions(input_ids, self.eos_token_id)
        pooled = last_hidden_state[jnp.arange(last_hidden_state.shape[0]), positions]
        text_embeds = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")(pooled)
        return CLIPTextModelOutput(text_embeds, last_hidden_state, hidden_states if output_hidden_states else None)


# config.json fields that set the architecture (-> CLIPTextModel fields) and transformers' defaults:
# CLIPTextModel's, but for the width (its defaults are CLIP ViT-L/14's, SD 1.x's text encoder).
_ARCHITECTURE_DEFAULTS = torch_state.architecture_defaults(CLIPTextModel) | dict(
    hidden_size=512, intermediate_size=2048, num_attention_heads=8
)
# CLIPTextModelWithProjection's extra config.json fields (-> its module fields) and transformers' defaults.
_PROJECTION_DEFAULTS = torch_state.architecture_defaults(CLIPTextModelWithProjection, CLIPTextModel)


def _unsupported(message: str) -> UnsupportedCLIPConfig:
    return UnsupportedCLIPConfig(f"Cannot convert transformers CLIP text config: {message}")


def clip_text_config_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """A transformers ``CLIPTextConfig`` dict (config.json) -> ``CLIPTextModel`` fields (plus
    ``projection_dim`` and ``eos_token_id`` for ``architectures: ["CLIPTextModelWithProjection"]``).

    Raises ``UnsupportedCLIPConfig`` (a ``ValueError``) naming the field for anything the module
    cannot reproduce exactly, including fields it does not know.
    """
    for field, supported in _REQUIRED_VALUES:
        value = config.get(field, supported[0])
        if value not in supported:
            hint = " (a full CLIPConfig: use its text_config)" if field == "model_type" and value == "clip" else ""
            raise _unsupported(f"{field}={value!r} is not supported (supported: {list(supported)}){hint}.")
    architecture = clip_text_architecture(config)
    known = set(_ARCHITECTURE_DEFAULTS) | _IGNORED_FIELDS | {f for f, _ in _REQUIRED_VALUES} | {"architectures"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise _unsupported(f"unknown field {unknown[0]!r} (all unknown: {unknown}).")
    fields = {name: config.get(name, default) for name, default in _ARCHITECTURE_DEFAULTS.items()}
    if fields["hidden_act"] not in _ACTIVATIONS:
        raise _unsupported(f"hidden_act={fields['hidden_act']!r} (supported: {sorted(_ACTIVATIONS)}).")
    if fields["layer_norm_eps"] is None:
        raise _unsupported("layer_norm_eps=None.")
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise _unsupported(
            f"hidden_size={fields['hidden_size']} is not a multiple of num_attention_heads="
            f"{fields['num_attention_heads']}."
        )
    fields["layer_norm_eps"] = float(fields["layer_norm_eps"])
    if architecture == "CLIPTextModelWithProjection":
        for name, default in _PROJECTION_DEFAULTS.items():
            value = config.get(name, default)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _unsupported(f"{name}={value!r} (CLIPTextModelWithProjection needs an int >= 0).")
            fields[name] = value
    return fields


def clip_text_architecture(config: Mapping[str, Any]) -> str:
    """``"CLIPTextModel"`` or ``"CLIPTextModelWithProjection"``: config.json's ``architectures``
    (absent or empty: ``CLIPTextModel``). Raises ``UnsupportedCLIPConfig`` for other or mixed entries."""
    architectures = config.get("architectures") or [_SUPPORTED_ARCHITECTURES[0]]
    for architecture in architectures:
        if architecture not in _SUPPORTED_ARCHITECTURES:
            raise _unsupported(f"architectures entry {architecture!r} (supported: {list(_SUPPORTED_ARCHITECTURES)}).")
    if len(set(architectures)) > 1:
        raise _unsupported(f"architectures={list(architectures)!r} names more than one model class.")
    return architectures[0]


def clip_text_from_config(config: Mapping[str, Any], **model_overrides: Any) -> CLIPTextModel:
    """``CLIPTextModel``, or ``CLIPTextModelWithProjection`` where ``architectures`` says so, for a
    transformers CLIP text ``config.json`` dict (``dtype`` may be overridden)."""
    fields = clip_text_config_fields(config)
    if clip_text_architecture(config) == "CLIPTextModelWithProjection":
        return CLIPTextModelWithProjection(**fields, **model_overrides)
    return CLIPTextModel(**fields, **model_overrides)


def clip_text_param_shapes(model: CLIPTextModel) -> Any:
    """The shapes of ``model``'s parameters (no compilation, no random numbers drawn)."""
    input_ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), input_ids)["params"]


def _normalise_names(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drops ``position_ids`` buffers and the ``text_model.`` prefix of transformers 4.x checkpoints."""
    renamed = {}
    for name, value in state_dict.items():
        short = name.removeprefix("text_model.")
        if short == "embeddings.position_ids":
            continue
        if short in renamed:
            raise ValueError(f"State dict has {short!r} both with and without the 'text_model.' prefix.")
        renamed[short] = value
    return renamed


def clip_text_params_from_state_dict(state_dict: Mapping[str, Any], model: CLIPTextModel) -> dict[str, Any]:
    """Converts a transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` state dict (name ->
    numpy array or torch tensor) to params (``text_projection.weight`` -> ``text_projection/kernel``).

    Every parameter of ``model`` must be filled and every tensor used (``position_ids`` buffers
    aside), with matching shapes; a mismatch raises ``ValueError`` naming the tensors. Returns
    float32 numpy arrays, for ``model.apply({"params": params}, input_ids)``.
    """
    return torch_state.params_from_state_dict(
        _normalise_names(state_dict),
        clip_text_param_shapes(model),
        _torch_name,
        torch_state.linear_tensor,
        missing_what="parameters missing from the CLIP text state dict",
        unused_what=(
            "CLIP text tensors have no counterpart in our CLIPTextModel (config mismatch or a projection head?)"
        ),
    )


def load_clip_text(
    path: str, *, variant: str | None = None, **model_overrides: Any
) -> tuple[CLIPTextModel, dict[str, Any]]:
    """Reads a local transformers ``CLIPTextModel`` or ``CLIPTextModelWithProjection`` (``config.json`` +
    ``model.safetensors``; the class follows the config's ``architectures``).

    ``path`` is the directory ``save_pretrained`` writes (or a pipeline directory with a
    ``text_encoder/`` subfolder, or a sharded checkpoint with a safetensors index) or the
    ``.safetensors`` file with its ``config.json`` beside it; ``variant`` (``"fp16"``) reads
    transformers' variant files (``model.fp16.safetensors``), upcast. ``model_overrides`` set
    ``dtype``. Returns ``(model, params)`` with float32 params.
    """
    config_path, weight_files = torch_state.transformers_model_files(path, "text_encoder", "CLIP text", variant)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"Missing CLIP text config {config_path} (needed beside {weight_files[0]}).")
    with open(config_path) as f:
        model = clip_text_from_config(json.load(f), **model_overrides)
    return model, clip_text_params_from_state_dict(torch_state.read_safetensors(weight_files, "CLIP"), model)
