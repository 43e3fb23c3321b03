"""SDXL's two frozen text encoders: prompts -> the UNet's ``tokens`` and ``text_embeds``.

This is diffusers' ``StableDiffusionXLPipeline.encode_prompt`` (0.42): each prompt is tokenised by
``tokenizer`` (eos padding) and ``tokenizer_2`` (``!`` padding) to their ``model_max_length``;
``text_encoder`` (``CLIPTextModel``) and ``text_encoder_2`` (``CLIPTextModelWithProjection``) each
give ``hidden_states[-2]`` (the penultimate layer, before the final LayerNorm; with ``clip_skip``
``hidden_states[-(clip_skip + 2)]``), concatenated along features into ``tokens`` (B, L, 768 + 1280
for SDXL base); ``text_embeds`` (B, projection_dim) is ``text_encoder_2``'s pooled projection.
A pipeline without ``text_encoder`` (the SDXL refiner) uses ``text_encoder_2`` alone.

Negative prompts follow diffusers: ``None`` with the pipeline's ``force_zeros_for_empty_prompt``
(``model_index.json``; True for SDXL base) gives zeros for both; otherwise ``None`` means ``""``,
which is encoded like any prompt (an explicit ``""`` is encoded even with the flag), ignoring
``clip_skip`` as diffusers does. The time ids the UNet also takes are added by the caller.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection, load_clip_text
from codi_jax.models.clip_tokenizer import CLIPTokenizer, load_clip_tokenizer

# (text encoder subfolder, tokenizer subfolder) of a diffusers SDXL pipeline folder, in order.
SUBFOLDERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


@dataclasses.dataclass(frozen=True)
class TextBranch:
    """One text encoder with its parameters and tokenizer."""

    model: CLIPTextModel
    params: Any
    tokenizer: CLIPTokenizer


@dataclasses.dataclass(frozen=True)
class SDXLText:
    """SDXL's text encoders in diffusers' order (``text_encoder``, ``text_encoder_2``; the refiner
    has ``text_encoder_2`` only) and the pipeline's ``force_zeros_for_empty_prompt``."""

    branches: tuple[TextBranch, ...]
    force_zeros_for_empty_prompt: bool = True

    def __post_init__(self) -> None:
        if not any(isinstance(b.model, CLIPTextModelWithProjection) for b in self.branches):
            raise ValueError("text_encoder_2: SDXL needs a CLIPTextModelWithProjection for the pooled text_embeds.")
        lengths = {b.tokenizer.model_max_length for b in self.branches}
        if len(lengths) != 1 or None in lengths:
            raise ValueError(
                f"model_max_length: the tokenizers need one common value, got {sorted(map(str, lengths))}."
            )

    @property
    def max_length(self) -> int:
        return int(self.branches[0].tokenizer.model_max_length)

    @property
    def pooled_branch(self) -> TextBranch:
        """The first encoder with a projection (diffusers takes the first 2-D output): ``text_encoder_2``."""
        return next(b for b in self.branches if isinstance(b.model, CLIPTextModelWithProjection))


def read_force_zeros(path: str) -> bool:
    """``force_zeros_for_empty_prompt`` of the folder's ``model_index.json`` (diffusers' default True)."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        return True
    with open(index) as f:
        value = json.load(f).get("force_zeros_for_empty_prompt", True)
    if not isinstance(value, bool):
        raise ValueError(f"{index}: force_zeros_for_empty_prompt={value!r}, expected true or false.")
    return value


def load_text_branches(
    folders: Sequence[tuple[str, str]],
    force_zeros_for_empty_prompt: bool,
    *,
    variant: str | None = None,
    **model_overrides: Any,
) -> SDXLText:
    """``SDXLText`` from ``(text encoder folder, tokenizer folder)`` pairs in diffusers' order
    (``text_encoder``'s, then ``text_encoder_2``'s); ``variant`` / ``model_overrides`` as for
    ``load_clip_text``."""
    branches = []
    for encoder_path, tokenizer_path in folders:
        model, params = load_clip_text(encoder_path, variant=variant, **model_overrides)
        if not os.path.isdir(tokenizer_path):
            raise FileNotFoundError(f"Missing {tokenizer_path} (the tokenizer of {encoder_path}).")
        branches.append(TextBranch(model, params, load_clip_tokenizer(tokenizer_path)))
    return SDXLText(tuple(branches), force_zeros_for_empty_prompt)


def load_sdxl_text(path: str, *, variant: str | None = None, **model_overrides: Any) -> SDXLText:
    """The text encoders and tokenizers of a diffusers SDXL pipeline folder (``text_encoder/``,
    ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``; ``text_encoder/`` may be absent, as in
    the refiner). ``variant`` (``"fp16"``) and ``model_overrides`` (``dtype``) as for ``load_clip_text``."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No SDXL pipeline folder at {path}.")
    folders = []
    for encoder_folder, tokenizer_folder in SUBFOLDERS:
        encoder_path = os.path.join(path, encoder_folder)
        if not os.path.isdir(encoder_path):
            if encoder_folder == "text_encoder":
                continue
            raise FileNotFoundError(f"Missing {encoder_path} (an SDXL pipeline folder has text_encoder_2/).")
        folders.append((encoder_path, os.path.join(path, tokenizer_folder)))
    return load_text_branches(folders, read_force_zeros(path), variant=variant, **model_overrides)


def branch_outputs(
    model: CLIPTextModel, hidden_index: int, params: Any, input_ids: jax.Array
) -> tuple[jax.Array, jax.Array | None]:
    """(``hidden_states[hidden_index]`` (B, L, D), ``text_embeds`` (B, P) or None without a projection)."""
    if isinstance(model, CLIPTextModelWithProjection):
        output = model.apply({"params": params}, input_ids, output_hidden_states=True)
        return output.hidden_states[hidden_index], output.text_embeds
    _, hidden_states = model.apply({"params": params}, input_ids, output_hidden_states=True)
    return hidden_states[hidden_index], None


@functools.lru_cache(maxsize=16)
def _jitted_branch(model: CLIPTextModel, hidden_index: int):
    return jax.jit(functools.partial(branch_outputs, model, hidden_index))


def _hidden_index(model: CLIPTextModel, clip_skip: int | None) -> int:
    """diffusers' ``hidden_states`` index: -2 (penultimate layer), or ``-(clip_skip + 2)``."""
    if clip_skip is None:
        return -2
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 0 <= clip_skip < model.num_hidden_layers:
        raise ValueError(f"clip_skip={clip_skip!r}: expected None or an int in [0, {model.num_hidden_layers - 1}].")
    return -(clip_skip + 2)


def encode_sdxl_prompts(text: SDXLText, prompts: str | Sequence[str], clip_skip: int | None = None) -> dict[str, Any]:
    """Prompts -> ``{"tokens": (B, L, sum of hidden sizes), "text_embeds": (B, projection_dim)}``
    (diffusers' ``prompt_embeds`` and ``pooled_prompt_embeds``)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    states, pooled = [], None
    for branch in text.branches:
        input_ids = branch.tokenizer(prompts, max_length=text.max_length).input_ids
        hidden, text_embeds = _jitted_branch(branch.model, _hidden_index(branch.model, clip_skip))(
            branch.params, input_ids
        )
        states.append(hidden)
        pooled = text_embeds if pooled is None else pooled
    return {"tokens": jnp.concatenate(states, axis=-1), "text_embeds": pooled}


def zero_sdxl_context(text: SDXLText, batch_size: int) -> dict[str, Any]:
    """Zeros shaped like ``encode_sdxl_prompts``' output (``force_zeros_for_empty_prompt``'s negative)."""
    width = sum(b.model.hidden_size for b in text.branches)
    pooled = text.pooled_branch.model
    dtype = text.branches[-1].model.dtype
    return {
        "tokens": jnp.zeros((batch_size, text.max_length, width), dtype),
        "text_embeds": jnp.zeros((batch_size, pooled.projection_dim), dtype),
    }


def negative_prompt_list(negative_prompts: str | Sequence[str] | None, batch_size: int) -> list[str]:
    """The negative prompts of ``batch_size`` prompts, as diffusers' ``encode_prompt`` takes them (SDXL, SD3):
    None (or empty) is ``""``, one string is repeated; any other count is refused (``ValueError``)."""
    negative_prompts = negative_prompts or ""
    negatives = [negative_prompts] * batch_size if isinstance(negative_prompts, str) else list(negative_prompts)
    if len(negatives) != batch_size:
        raise ValueError(f"negative_prompts: {len(negatives)} negative prompts for {batch_size} prompts.")
    return negatives


def encode_sdxl_negative(
    text: SDXLText, negative_prompts: str | Sequence[str] | None, batch_size: int
) -> dict[str, Any]:
    """The negative context of ``batch_size`` prompts, as diffusers computes it: zeros where
    ``negative_prompts`` is None and ``text.force_zeros_for_empty_prompt``, else the encoding of
    ``negative_prompts`` (``negative_prompt_list``) without ``clip_skip``."""
    if negative_prompts is None and text.force_zeros_for_empty_prompt:
        return zero_sdxl_context(text, batch_size)
    return encode_sdxl_prompts(text, negative_prompt_list(negative_prompts, batch_size))


def encode_sdxl_prompt_pair(
    text: SDXLText,
    prompts: str | Sequence[str],
    negative_prompts: str | Sequence[str] | None = None,
    clip_skip: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(positive, negative) contexts: diffusers' ``encode_prompt(prompt, negative_prompt=...,
    do_classifier_free_guidance=True, clip_skip=...)`` as two ``{"tokens", "text_embeds"}`` dicts."""
    positive = encode_sdxl_prompts(text, prompts, clip_skip)
    return positive, encode_sdxl_negative(text, negative_prompts, int(np.shape(positive["tokens"])[0]))
