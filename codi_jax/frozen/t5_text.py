"""SD3's frozen T5 text encoder (``text_encoder_3`` + ``tokenizer_3``): prompts -> its T5 context.

This is diffusers' ``StableDiffusion3Pipeline._get_t5_prompt_embeds`` (0.42): prompts are tokenised
to ``max_sequence_length`` (256 by default) with ``padding="max_length"`` and truncation (``</s>``
kept last), and the ``T5EncoderModel``'s ``last_hidden_state`` is taken **without** an attention
mask (pad tokens are attended), in the encoder's dtype. A pipeline without ``text_encoder_3`` gets
zeros of (batch, max_sequence_length, the transformer's ``joint_attention_dim``): ``zero_t5_context``.
SD3 then pads the CLIP embeddings to 4096 features and concatenates them before the T5 tokens;
that assembly is the caller's.

``t5_embeddings`` is pure (module static, params an argument); ``encode_t5_prompts`` jits it per model.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from codi_jax.models.t5 import T5Encoder, load_t5_encoder
from codi_jax.models.t5_tokenizer import T5Tokenizer, load_t5_tokenizer

MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length default
SUBFOLDERS = ("text_encoder_3", "tokenizer_3")  # of a diffusers SD3 pipeline folder


@dataclasses.dataclass(frozen=True)
class T5Text:
    """SD3's T5 encoder with its parameters and tokenizer."""

    model: T5Encoder
    params: Any
    tokenizer: T5Tokenizer


def load_t5_text(
    encoder_path: str, tokenizer_path: str | None = None, *, variant: str | None = None, **model_overrides: Any
) -> T5Text:
    """``T5Text`` from an SD3 pipeline folder (``text_encoder_3/``, ``tokenizer_3/``) or from an encoder
    folder and a tokenizer folder; ``variant`` / ``model_overrides`` (``dtype``) as for ``load_t5_encoder``."""
    if tokenizer_path is None:
        tokenizer_path = encoder_path
    model, params = load_t5_encoder(encoder_path, variant=variant, **model_overrides)
    if not os.path.isdir(tokenizer_path):
        raise FileNotFoundError(f"Missing {tokenizer_path} (the tokenizer of {encoder_path}).")
    return T5Text(model, params, load_t5_tokenizer(tokenizer_path))


def t5_embeddings(model: T5Encoder, params: Any, input_ids: jax.Array) -> jax.Array:
    """``last_hidden_state`` (B, L, d_model) of token ids, without an attention mask (as SD3 calls it)."""
    return model.apply({"params": params}, input_ids)


@functools.lru_cache(maxsize=8)
def _jitted_t5_embeddings(model: T5Encoder):
    return jax.jit(functools.partial(t5_embeddings, model))


def encode_t5_prompts(
    text: T5Text, prompts: str | Sequence[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH
) -> jax.Array:
    """Prompts -> SD3's T5 ``prompt_embeds`` (B, max_sequence_length, d_model) in the model's dtype."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not isinstance(max_sequence_length, int) or not 2 <= max_sequence_length <= 512:
        raise ValueError(f"max_sequence_length={max_sequence_length!r}: SD3 takes an int in [2, 512].")
    input_ids = text.tokenizer(prompts, max_length=max_sequence_length).input_ids
    return _jitted_t5_embeddings(text.model)(text.params, input_ids)


def zero_t5_context(
    batch_size: int, joint_attention_dim: int, max_sequence_length: int = MAX_SEQUENCE_LENGTH, dtype: Any = jnp.float32
) -> jax.Array:
    """The T5 context of a pipeline without ``text_encoder_3``: zeros (B, max_sequence_length, joint_attention_dim)."""
    return jnp.zeros((batch_size, max_sequence_length, joint_attention_dim), dtype)
