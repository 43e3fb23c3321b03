"""SD3's three frozen text encoders: prompts -> the joint transformer's ``context``.

This is diffusers' ``StableDiffusion3Pipeline.encode_prompt`` (0.42) with one prompt for all three
encoders (``prompt_2 = prompt_3 = prompt``): ``text_encoder`` (CLIP-L) and ``text_encoder_2`` (CLIP-G),
both ``CLIPTextModelWithProjection``, tokenised to the first tokenizer's ``model_max_length`` (77)
each give ``hidden_states[-2]`` (``clip_skip`` None; else ``hidden_states[-(clip_skip + 2)]``),
concatenated along features (768 + 1280 = 2048) and zero-padded to the T5 states' width
(``joint_attention_dim``, 4096); the T5 states (``frozen.t5_text``: ``max_sequence_length`` tokens,
or zeros of ``joint_attention_dim`` without ``text_encoder_3``) follow on the sequence axis:
``encoder_hidden_states`` (B, 77 + max_sequence_length, joint_attention_dim). ``pooled_projections``
is both CLIPs' ``text_embeds`` concatenated (768 + 1280). The negative prompt (None: ``""``) is
encoded the same way, without ``clip_skip``; there is no ``force_zeros_for_empty_prompt`` in SD3.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from codi_jax.frozen import sdxl_text, t5_text
from codi_jax.models.clip_text import CLIPTextModelWithProjection

CLIP_SUBFOLDERS = sdxl_text.SUBFOLDERS  # (text_encoder, tokenizer), (text_encoder_2, tokenizer_2)


@dataclasses.dataclass(frozen=True)
class SD3Text:
    """The two CLIP branches (``sdxl_text.SDXLText``'s container, both with projections), the T5
    branch (None: zeros) and the widths the transformer reads."""

    clip: sdxl_text.SDXLText
    t5: t5_text.T5Text | None
    joint_attention_dim: int
    max_sequence_length: int = t5_text.MAX_SEQUENCE_LENGTH

    def __post_init__(self) -> None:
        if len(self.clip.branches) != 2 or not all(
            isinstance(b.model, CLIPTextModelWithProjection) for b in self.clip.branches
        ):
            raise ValueError("SD3 needs text_encoder and text_encoder_2, both CLIPTextModelWithProjection.")
        width = sum(b.model.hidden_size for b in self.clip.branches)
        if width > self.joint_attention_dim:
            raise ValueError(
                f"SD3: the CLIP hidden sizes sum to {width}, more than joint_attention_dim={self.joint_attention_dim}."
            )
        if self.t5 is not None and self.t5.model.d_model != self.joint_attention_dim:
            raise ValueError(
                f"SD3: text_encoder_3's d_model={self.t5.model.d_model} differs from the transformer's "
                f"joint_attention_dim={self.joint_attention_dim}."
            )


def load_sd3_text(
    clip_folders: Sequence[tuple[str, str]],
    t5_folders: tuple[str, str] | None,
    joint_attention_dim: int,
    max_sequence_length: int = t5_text.MAX_SEQUENCE_LENGTH,
) -> SD3Text:
    """``SD3Text`` from the two CLIP ``(encoder, tokenizer)`` folders in diffusers' order and the T5
    ``(encoder, tokenizer)`` folders (None: a pipeline without ``text_encoder_3``)."""
    clip = sdxl_text.load_text_branches(clip_folders, force_zeros_for_empty_prompt=False)
    t5 = None if t5_folders is None else t5_text.load_t5_text(*t5_folders)
    return SD3Text(clip, t5, int(joint_attention_dim), int(max_sequence_length))


def _clip_states(text: SD3Text, prompts: list[str], clip_skip: int | None) -> tuple[Any, Any]:
    """(both CLIPs' hidden states concatenated on features, their ``text_embeds`` concatenated)."""
    states, pooled = [], []
    for branch in text.clip.branches:
        input_ids = branch.tokenizer(prompts, max_length=text.clip.max_length).input_ids
        index = sdxl_text._hidden_index(branch.model, clip_skip)
        hidden, text_embeds = sdxl_text._jitted_branch(branch.model, index)(branch.params, input_ids)
        states.append(hidden)
        pooled.append(text_embeds)
    return jnp.concatenate(states, axis=-1), jnp.concatenate(pooled, axis=-1)


def encode_sd3_prompts(text: SD3Text, prompts: str | Sequence[str], clip_skip: int | None = None) -> dict[str, Any]:
    """Prompts -> ``{"encoder_hidden_states", "pooled_projections"}`` (diffusers' ``prompt_embeds``,
    ``pooled_prompt_embeds``), the joint DiT's ``context`` (``dit.SD3_CONTEXT_KEYS``)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    clip, pooled = _clip_states(text, prompts, clip_skip)
    if text.t5 is None:
        t5 = t5_text.zero_t5_context(len(prompts), text.joint_attention_dim, text.max_sequence_length, clip.dtype)
    else:
        t5 = t5_text.encode_t5_prompts(text.t5, prompts, text.max_sequence_length)
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
    return {
        "encoder_hidden_states": jnp.concatenate([clip, t5.astype(clip.dtype)], axis=1),
        "pooled_projections": pooled,
    }


def encode_sd3_prompt_pair(
    text: SD3Text,
    prompts: str | Sequence[str],
    negative_prompts: str | Sequence[str] | None = None,
    clip_skip: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(positive, negative) contexts: diffusers' ``encode_prompt(..., do_classifier_free_guidance=True)``;
    a negative None is ``""``, one string is repeated for every prompt (``sdxl_text.negative_prompt_list``);
    no ``clip_skip`` on the negative."""
    positive = encode_sd3_prompts(text, prompts, clip_skip)
    batch = positive["pooled_projections"].shape[0]
    return positive, encode_sd3_prompts(text, sdxl_text.negative_prompt_list(negative_prompts, batch))
