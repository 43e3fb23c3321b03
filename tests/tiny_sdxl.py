"""Tiny random SDXL-shaped diffusers models, built locally (no download), for tests.

``UNET`` is a ``UNet2DConditionModel`` config with SDXL's extras: several transformer blocks per
attention (``transformer_layers_per_block``, per level; the middle block uses the last level's) and
``addition_embed_type="text_time"`` (the pooled text embedding of width ``POOLED_DIM`` and
``NUM_TIME_IDS`` time ids, each embedded to ``TIME_ID_DIM`` sinusoids, feed ``add_embedding``).
``CONTROLNET`` is the matching ``ControlNetModel`` config (what ``ControlNetModel.from_unet`` writes,
with ``HINT_CHANNELS``: the condition at 8x the latent size). ``make_unet`` / ``make_controlnet``
build them with every weight perturbed away from diffusers' zero / one initialisations
(``tiny_sd.perturbed``), so swapped or missing names cannot pass a comparison. ``context`` gives
inputs in our layout (the ``TEXT_TIME_KEYS`` dict) and ``added_cond_kwargs`` diffusers'.

``make_pipeline(directory)`` writes a whole tiny ``StableDiffusionXLPipeline`` folder around that
UNet: ``text_encoder`` (``CLIPTextModel``) and ``text_encoder_2`` (``CLIPTextModelWithProjection``)
whose hidden sizes sum to ``CROSS_ATTENTION_DIM`` and whose projection is ``POOLED_DIM`` wide,
``tokenizer`` / ``tokenizer_2`` (eos / ``!`` padding), a VAE with SDXL's scaling factor, SDXL base's
Euler scheduler and ``force_zeros_for_empty_prompt``; ``save_controlnet`` writes its ControlNet.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from tests import tiny_sd

CROSS_ATTENTION_DIM = 32
POOLED_DIM = 16  # SDXL: 1280 (the second text encoder's pooled projection)
TIME_ID_DIM = 8  # addition_time_embed_dim; SDXL: 256
NUM_TIME_IDS = 6  # (original h, w, crop top, left, target h, w)
LATENT_SIZE = 8
IMAGE_SIZE = 8 * LATENT_SIZE
HIDDEN_SIZES = (16, 16)  # text_encoder, text_encoder_2: summed, the UNet's cross_attention_dim
HINT_CHANNELS = tiny_sd.HINT_CHANNELS  # 3 stride-2 stages: the condition is at 8x the latent size
# Realistic time ids for 64x64 images (8x the latents): one uncropped, one cropped from a larger original.
TIME_IDS = ((64, 64, 0, 0, 64, 64), (96, 80, 16, 8, 64, 64))

UNET = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=2,
    norm_num_groups=8,
    # Attention at both levels (SDXL has none at its first) so that two different counts are read.
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    cross_attention_dim=CROSS_ATTENTION_DIM,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_ID_DIM,
    projection_class_embeddings_input_dim=POOLED_DIM + NUM_TIME_IDS * TIME_ID_DIM,
)
_CONTROLNET_FIELDS = (
    "in_channels",
    "block_out_channels",
    "layers_per_block",
    "norm_num_groups",
    "down_block_types",
    "transformer_layers_per_block",
    "attention_head_dim",
    "cross_attention_dim",
    "use_linear_projection",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
)
CONTROLNET = {**{k: UNET[k] for k in _CONTROLNET_FIELDS}, "conditioning_embedding_out_channels": HINT_CHANNELS}


def make_unet(seed: int = 0) -> Any:
    """The perturbed tiny SDXL-shaped ``UNet2DConditionModel`` (eval mode)."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    return tiny_sd.perturbed(diffusers.UNet2DConditionModel(**UNET), seed + 1, scale=0.05)


def make_controlnet(unet: Any, seed: int = 7) -> Any:
    """A perturbed ``ControlNetModel.from_unet(unet)`` (x8 hint network; the zero convs perturbed too)."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    controlnet = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS)
    return tiny_sd.perturbed(controlnet, seed, scale=0.05)


def inputs(batch: int = 2, tokens: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 NCHW latents, tokens, pooled text embeddings, ``TIME_IDS`` and an NCHW [0, 1] condition."""
    rng = np.random.RandomState(seed)
    size = LATENT_SIZE
    return dict(
        sample=rng.randn(batch, 4, size, size).astype(np.float32),
        tokens=rng.randn(batch, tokens, CROSS_ATTENTION_DIM).astype(np.float32),
        text_embeds=rng.randn(batch, POOLED_DIM).astype(np.float32),
        time_ids=np.array([TIME_IDS[i % len(TIME_IDS)] for i in range(batch)], np.float32),
        cond=rng.uniform(0, 1, (batch, 3, 8 * size, 8 * size)).astype(np.float32),
    )


def context(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our text_time ``context`` (``codi_jax.models.unet.TEXT_TIME_KEYS``) from ``inputs``."""
    return {key: data[key] for key in ("tokens", "text_embeds", "time_ids")}


def added_cond_kwargs(data: dict[str, np.ndarray]) -> dict[str, Any]:
    """diffusers' ``added_cond_kwargs`` (torch tensors) from ``inputs``."""
    import torch

    return {"text_embeds": torch.from_numpy(data["text_embeds"]), "time_ids": torch.from_numpy(data["time_ids"])}


# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (less _diffusers_version).
SCHEDULER = dict(
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    interpolation_type="linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    timestep_spacing="leading",
    trained_betas=None,
    use_karras_sigmas=False,
)
VAE = {**tiny_sd.VAE, "scaling_factor": 0.13025, "force_upcast": True}


def _text_encoder(vocab_size: int, second: bool, seed: int) -> Any:
    """``text_encoder`` (quick_gelu, eos padding ids) or ``text_encoder_2`` (gelu, projection, SDXL's ids)."""
    import transformers

    ids = (
        dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)
        if second
        else dict(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    )
    config = transformers.CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN_SIZES[int(second)],
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tiny_sd.MAX_LENGTH,
        hidden_act="gelu" if second else "quick_gelu",
        projection_dim=POOLED_DIM,
        **ids,
    )
    model = transformers.CLIPTextModelWithProjection(config) if second else transformers.CLIPTextModel(config)
    return tiny_sd.perturbed(model, seed, scale=0.05)


def make_components(directory: str, seed: int = 0) -> dict[str, Any]:
    """The PyTorch modules of a tiny SDXL pipeline (tokenizer files written under ``directory``)."""
    import diffusers
    import torch
    import transformers

    vocab_file, merges_file, vocab_size = tiny_sd.write_bpe_files(f"{directory}/_bpe")
    tokenizer = lambda pad: transformers.CLIPTokenizer(
        vocab_file, merges_file, pad_token=pad, model_max_length=tiny_sd.MAX_LENGTH
    )
    torch.manual_seed(seed)
    return dict(
        unet=make_unet(seed),
        vae=tiny_sd.perturbed(diffusers.AutoencoderKL(**VAE), seed + 2, scale=0.05),
        text_encoder=_text_encoder(vocab_size, False, seed + 3),
        text_encoder_2=_text_encoder(vocab_size, True, seed + 4),
        tokenizer=tokenizer("<|endoftext|>"),
        tokenizer_2=tokenizer("!"),
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SCHEDULER),
    )


def make_pipeline(directory: str, seed: int = 0) -> Any:
    """Writes a tiny ``StableDiffusionXLPipeline`` folder at ``directory`` and returns the pipeline."""
    import diffusers

    pipe = diffusers.StableDiffusionXLPipeline(
        **make_components(directory, seed), force_zeros_for_empty_prompt=True, add_watermarker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(directory, safe_serialization=True)
    with open(os.path.join(directory, "scheduler", "scheduler_config.json"), "w") as f:  # SDXL base's file, as is
        json.dump({"_class_name": "EulerDiscreteScheduler", **SCHEDULER}, f, indent=2)
    return pipe


def save_controlnet(unet: Any, directory: str, seed: int = 7) -> Any:
    """``make_controlnet(unet, seed)`` saved at ``directory`` (a diffusers ``ControlNetModel`` folder)."""
    controlnet = make_controlnet(unet, seed)
    controlnet.save_pretrained(directory, safe_serialization=True)
    return controlnet
