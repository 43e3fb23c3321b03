"""The frozen encoders of a latent, text-conditioned model: the VAE and the CLIP text encoder.

A run config describes them in two optional sections (absent, or an empty path: none):

- ``latent``: ``vae`` (a diffusers ``AutoencoderKL`` folder, or a pipeline folder with ``vae/``),
  ``encode`` (``"sample"``: a posterior sample, or ``"mean"``); without it the model is a pixel model.
- ``text``: ``encoder`` (a transformers ``CLIPTextModel`` folder, or a pipeline folder with
  ``text_encoder/``), ``tokenizer`` (a tokenizer folder, or a pipeline folder with ``tokenizer/``),
  ``prompt`` / ``negative_prompt`` (defaults for sampling), ``max_length`` (tokens; 0 or absent:
  the tokenizer's ``model_max_length``). SDXL teachers also name ``encoder_2`` (the
  ``CLIPTextModelWithProjection`` folder) and ``tokenizer_2``, and record the pipeline's
  ``force_zeros_for_empty_prompt`` (an empty negative prompt is then zeros); their prompts go
  through ``codi_jax.frozen.sdxl_text``. Every field and its default: ``default_text_config``.

``encode_images`` / ``decode_latents`` / ``text_embeddings`` are pure: parameters are arguments,
modules are static (bind them with ``functools.partial`` before ``jax.jit``). The model sees
latents ``(z - shift_factor) * scaling_factor`` (``AutoencoderKL.latents_from_images``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from codi_jax.frozen import sd3_text, sdxl_text, t5_text
from codi_jax.interop.torch_to_flax import load_diffusers_vae
from codi_jax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection, load_clip_text
from codi_jax.models.clip_tokenizer import CLIPTokenizer, load_clip_tokenizer
from codi_jax.models.vae import AutoencoderKL

ENCODE_MODES = ("sample", "mean")
# The ``text`` fields that describe the frozen models (written by ``python -m codi_jax.convert``);
# the others are a run's choices.
FROZEN_TEXT_FIELDS = (
    "encoder",
    "tokenizer",
    "encoder_2",
    "tokenizer_2",
    "encoder_3",
    "tokenizer_3",
    "max_length",
    "max_sequence_length",
    "force_zeros_for_empty_prompt",
)


def default_text_config() -> ml_collections.ConfigDict:
    """Every ``text`` field with the value its absence means (a run saved before a field existed,
    or a model without it): no encoders; SD 1.x / 2.x encode an empty negative prompt
    (``force_zeros_for_empty_prompt`` False); ``drop_prob`` the share of training examples whose own
    prompt (caption, instruction) is replaced by the empty prompt."""
    return ml_collections.ConfigDict(
        dict(
            encoder="",
            tokenizer="",
            encoder_2="",
            tokenizer_2="",
            encoder_3="",
            tokenizer_3="",
            max_length=0,
            max_sequence_length=t5_text.MAX_SEQUENCE_LENGTH,
            force_zeros_for_empty_prompt=False,
            prompt="",
            negative_prompt="",
            drop_prob=0.0,
        )
    )


@dataclasses.dataclass
class Encoders:
    """The loaded frozen encoders (``None`` where the config has none)."""

    vae: AutoencoderKL | None = None
    vae_params: Any = None
    text_model: CLIPTextModel | None = None
    text_params: Any = None
    tokenizer: CLIPTokenizer | None = None
    encode_mode: str = "sample"
    max_length: int | None = None  # None: the tokenizer's model_max_length
    sdxl: sdxl_text.SDXLText | None = None  # SDXL's two encoders (``text.encoder_2`` set) instead
    sd3: sd3_text.SD3Text | None = None  # SD3's three encoders (a joint DiT backbone) instead

    @property
    def is_latent(self) -> bool:
        return self.vae is not None

    @property
    def has_text(self) -> bool:
        return self.text_model is not None or self.sdxl is not None or self.sd3 is not None


def _section_value(config: Any, section: str, field: str, default: Any = "") -> Any:
    part = config.get(section) if hasattr(config, "get") else None
    if part is None:
        return default
    value = part.get(field, default)
    return default if value is None else value


def vae_path(config: Any) -> str:
    """``config.latent.vae`` ("" for a pixel model)."""
    return str(_section_value(config, "latent", "vae"))


def text_encoder_path(config: Any) -> str:
    """``config.text.encoder`` ("" for a model without text)."""
    return str(_section_value(config, "text", "encoder"))


def is_sdxl(config: Any) -> bool:
    """Whether the run's prompts go through SDXL's two encoders (``config.text.encoder_2`` set;
    ``convert`` writes it exactly for a text_time UNet), not SD3's three (``is_sd3``)."""
    return has_text(config) and bool(_section_value(config, "text", "encoder_2")) and not is_sd3(config)


def is_sd3(config: Any) -> bool:
    """Whether the run's prompts go through SD3's encoders (``frozen.sd3_text``): a text model whose
    backbone is a joint-attention DiT (``config.model.joint_attention_dim`` set)."""
    return has_text(config) and _section_value(config, "model", "joint_attention_dim", None) is not None


def is_latent(config: Any) -> bool:
    return bool(vae_path(config))


def has_text(config: Any) -> bool:
    return bool(text_encoder_path(config))


def check_encoder_paths(config: Any) -> None:
    """The cheap checks of the ``latent`` / ``text`` sections (paths exist, known values), no loading.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the config field.
    """
    paths = [("config.latent.vae", vae_path(config))]
    if is_latent(config):
        mode = _section_value(config, "latent", "encode", "sample")
        if mode not in ENCODE_MODES:
            raise ValueError(f"config.latent.encode={mode!r}: expected one of {ENCODE_MODES}.")
    if has_text(config):
        tokenizer = str(_section_value(config, "text", "tokenizer"))
        if not tokenizer:
            raise ValueError(
                "config.text.tokenizer is empty but config.text.encoder is set: name the tokenizer folder."
            )
        paths += [("config.text.encoder", text_encoder_path(config)), ("config.text.tokenizer", tokenizer)]
        if is_sdxl(config) or is_sd3(config):
            extra = ("encoder_2", "tokenizer_2", "encoder_3", "tokenizer_3") if is_sd3(config) else ()
            paths += [
                (f"config.text.{f}", str(_section_value(config, "text", f)))
                for f in ("encoder_2", "tokenizer_2", *extra)
            ]
        max_length = _section_value(config, "text", "max_length", 0)
        if not isinstance(max_length, int) or max_length < 0 or max_length == 1:
            raise ValueError(f"config.text.max_length={max_length!r}: expected 0 (the tokenizer's) or an int >= 2.")
    for field, path in paths:
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"{field}={path}: no such directory.")


def load_encoders(config: Any) -> Encoders:
    """The VAE and text encoder / tokenizer a config names (``Encoders()`` for a pixel model without text)."""
    check_encoder_paths(config)
    encoders = Encoders()
    if is_latent(config):
        encoders.vae, encoders.vae_params = load_diffusers_vae(vae_path(config))
        encoders.encode_mode = str(_section_value(config, "latent", "encode", "sample"))
    if is_sd3(config):
        encoders.sd3 = load_sd3_text(config)
    elif is_sdxl(config):
        encoders.sdxl = load_sdxl_text(config)
    elif has_text(config):
        encoders.text_model, encoders.text_params = load_clip_text(text_encoder_path(config))
        if isinstance(encoders.text_model, CLIPTextModelWithProjection):
            raise ValueError(
                f"config.text.encoder={text_encoder_path(config)}: a CLIPTextModelWithProjection (SDXL's "
                "text_encoder_2) is not an SD 1.x / 2.x text encoder; SDXL prompts go through frozen.sdxl_text."
            )
        encoders.tokenizer = load_clip_tokenizer(str(_section_value(config, "text", "tokenizer")))
        encoders.max_length = int(_section_value(config, "text", "max_length", 0)) or None
    return encoders


def load_sdxl_text(config: Any) -> sdxl_text.SDXLText:
    """SDXL's encoders and tokenizers from ``config.text`` (``encoder`` / ``tokenizer``,
    ``encoder_2`` / ``tokenizer_2``, ``force_zeros_for_empty_prompt``)."""
    text = config.text
    folders = [(text.encoder, text.tokenizer), (text.encoder_2, text.tokenizer_2)]
    return sdxl_text.load_text_branches(folders, bool(text.force_zeros_for_empty_prompt))


def load_sd3_text(config: Any) -> sd3_text.SD3Text:
    """SD3's encoders and tokenizers from ``config.text`` (``encoder`` / ``tokenizer``, ``encoder_2`` /
    ``tokenizer_2``, ``encoder_3`` / ``tokenizer_3`` (empty: zeros), ``max_sequence_length``) and the
    backbone's ``config.model.joint_attention_dim``."""
    text = config.text
    if not text.get("encoder_2"):
        raise ValueError("config.text.encoder_2 is empty: SD3 needs text_encoder_2 (CLIP-G) too.")
    encoder_3, tokenizer_3 = str(text.get("encoder_3", "")), str(text.get("tokenizer_3", ""))
    if bool(encoder_3) != bool(tokenizer_3):
        raise ValueError("config.text.encoder_3 and config.text.tokenizer_3 must both be set or both be empty.")
    clip = [(text.encoder, text.tokenizer), (text.encoder_2, text.tokenizer_2)]
    t5 = (encoder_3, tokenizer_3) if encoder_3 else None
    length = int(text.get("max_sequence_length", t5_text.MAX_SEQUENCE_LENGTH))
    return sd3_text.load_sd3_text(clip, t5, int(config.model.joint_attention_dim), length)


def encode_images(
    vae: AutoencoderKL, vae_params: Any, images: jax.Array, rng: jax.Array | None, mode: str
) -> jax.Array:
    """Images NHWC in [-1, 1] -> the model's latents ``(z - shift) * scaling_factor``.

    ``mode="sample"``: ``z = mean + exp(logvar / 2) * N(0, 1)`` drawn with ``rng``; ``"mean"``:
    ``z = mean`` (``rng`` unused). Jit with ``vae`` bound and ``mode`` static.
    """
    if mode not in ENCODE_MODES:
        raise ValueError(f"encode mode {mode!r}; expected one of {ENCODE_MODES}.")
    return vae.latents_from_images(vae_params, images, rng, sample=mode == "sample")


def decode_latents(vae: AutoencoderKL, vae_params: Any, z: jax.Array) -> jax.Array:
    """The model's latents -> images NHWC (in [-1, 1] for a trained VAE; not clipped)."""
    return vae.images_from_latents(vae_params, z)


def text_embeddings(text_model: CLIPTextModel, text_params: Any, input_ids: jax.Array) -> jax.Array:
    """CLIP's ``last_hidden_state`` (B, L, D) of token ids, without an attention mask (causal only).

    This is diffusers' ``StableDiffusionPipeline.encode_prompt`` with ``clip_skip=None``: SD's
    ``CLIPTextConfig`` has no ``use_attention_mask``, so padding tokens are attended causally.
    """
    return text_model.apply({"params": text_params}, input_ids)


@functools.lru_cache(maxsize=8)
def _jitted_text_embeddings(text_model: CLIPTextModel):
    return jax.jit(functools.partial(text_embeddings, text_model))


def tokenize(enc: Encoders, prompts: Sequence[str]) -> np.ndarray:
    """Token ids (B, max_length), padded / truncated as SD pipelines do (bos, text, eos, pad)."""
    if enc.tokenizer is None:
        raise ValueError("This model has no text encoder (config.text.encoder is empty); prompts cannot be encoded.")
    if isinstance(prompts, str):
        prompts = [prompts]
    return enc.tokenizer(list(prompts), max_length=enc.max_length).input_ids


def encode_prompts(enc: Encoders, prompts: Sequence[str]) -> jax.Array:
    """Prompts -> the UNet's context (B, L, D): tokenize to ``max_length``, CLIP last hidden state."""
    input_ids = tokenize(enc, prompts)
    return _jitted_text_embeddings(enc.text_model)(enc.text_params, input_ids)
