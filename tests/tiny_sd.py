"""Tiny random Stable-Diffusion-shaped diffusers folders, built locally (no download), for tests.

``make_pipeline(directory)`` writes a ``StableDiffusionPipeline`` folder (``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``) with every weight
perturbed away from diffusers' zero / one initialisations, so swapped or missing names cannot
pass a comparison. ``make_controlnet(unet, directory)`` writes a matching ``ControlNetModel``
whose hint network downsamples x8 like SD's (the condition is at the VAE's pixel size).
The tokenizer's vocabulary and merges are learned from a small corpus here.
"""

from __future__ import annotations

import collections
import json
import os
import re
from typing import Any

CORPUS = (
    "a photo of a cat sitting on the mat, the cat is happy. a painting of the sea at sunset, "
    "there is a dog and another dog, the quick brown fox jumps over the lazy dog; photograph "
    "of mountains, highly detailed, trending on artstation. café naïve résumé straße"
)
MAX_LENGTH = 16  # tokenizer model_max_length = text encoder max_position_embeddings
CROSS_ATTENTION_DIM = 32
LATENT_SIZE = 8  # the UNet's sample_size; images are 8x that (the VAE downsamples x8)
IMAGE_SIZE = 8 * LATENT_SIZE
HINT_CHANNELS = (8, 8, 16, 16)  # 3 stride-2 stages: x8, as SD's (16, 32, 96, 256)

UNET = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4,
    cross_attention_dim=CROSS_ATTENTION_DIM,
)
SD2_UNET = dict(use_linear_projection=True, attention_head_dim=(2, 4))  # SD 2.x: linear proj, heads per level
SD2 = dict(prediction_type="v_prediction", hidden_act="gelu", unet=SD2_UNET)  # make_pipeline(dir, **SD2)
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
    sample_size=IMAGE_SIZE,
    scaling_factor=0.18215,
)
SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    num_train_timesteps=1000,
)


def bytes_to_unicode() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def _merge(symbols: tuple[str, ...], best: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if symbols[i : i + 2] == best:
            out.append(best[0] + best[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def learn_bpe(corpus: str, num_merges: int) -> tuple[list[str], list[tuple[str, str]]]:
    """CLIP-shaped vocabulary (bytes, bytes + </w>, merges, specials) and greedily learned merges."""
    table = bytes_to_unicode()
    byte_chars = list(table.values())  # CLIP's order: printable bytes first, so '!' is id 0
    words = collections.Counter(re.findall(r"[^\W\d_]+", corpus.lower()))
    encoded = {}
    for word, count in words.items():
        chars = [table[b] for b in word.encode("utf-8")]
        encoded[tuple(chars[:-1] + [chars[-1] + "</w>"])] = count
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for symbols, count in encoded.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        encoded = {_merge(symbols, best): count for symbols, count in encoded.items()}
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    return vocab + ["<|startoftext|>", "<|endoftext|>"], merges


def write_bpe_files(directory: str, num_merges: int = 80) -> tuple[str, str, int]:
    """``vocab.json`` and ``merges.txt`` learned from ``CORPUS``; returns their paths and the vocab size."""
    vocab, merges = learn_bpe(CORPUS, num_merges)
    os.makedirs(directory, exist_ok=True)
    vocab_file, merges_file = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab_file, merges_file, len(vocab)


def perturbed(module: Any, seed: int, scale: float = 0.1) -> Any:
    """Adds ``scale`` * N(0, 1) to every parameter (norm scales / biases and zero convs too)."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn_like(parameter))
    return module.eval()


def make_components(
    directory: str,
    *,
    prediction_type: str = "epsilon",
    hidden_act: str = "quick_gelu",
    seed: int = 0,
    unet: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The PyTorch modules of a tiny SD pipeline (tokenizer files written under ``directory``);
    ``unet``: fields replacing ``UNET``'s (e.g. ``SD2_UNET``)."""
    import diffusers
    import torch
    import transformers

    vocab_file, merges_file, vocab_size = write_bpe_files(os.path.join(directory, "_bpe"))
    tokenizer = transformers.CLIPTokenizer(
        vocab_file, merges_file, pad_token="<|endoftext|>", model_max_length=MAX_LENGTH
    )
    text_config = transformers.CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=CROSS_ATTENTION_DIM,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act=hidden_act,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    torch.manual_seed(seed)
    unet = perturbed(diffusers.UNet2DConditionModel(**{**UNET, **(unet or {})}), seed + 1, scale=0.05)
    vae = perturbed(diffusers.AutoencoderKL(**VAE), seed + 2, scale=0.05)
    text_encoder = perturbed(transformers.CLIPTextModel(text_config), seed + 3, scale=0.05)
    scheduler = diffusers.DDIMScheduler(**SCHEDULER, prediction_type=prediction_type)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def latent_codi_config(teacher: dict, **overrides: Any) -> Any:
    """A tiny PE-CoDi x4 SR run on a converted tiny teacher (``teacher``: its ``workdir`` and ``root``):
    ``tiny_codi`` with 64-px images (8x8 latents), the x8 hint network, the ControlNet from the
    teacher's conversion, batch 2, one 1-step sample; then ``overrides``."""
    from codi_jax.configs.cpu import tiny_codi

    config = tiny_codi.get_config()
    config.teacher_workdir = teacher["workdir"]
    config.data.data_dir = str(teacher["root"] / "tfds")
    config.data.image_size = IMAGE_SIZE  # pixels; the UNet sees 8x8 latents
    config.task.scale = 4
    config.adapter.hint_channels = HINT_CHANNELS
    config.adapter.hint_downsamples = 3
    config.adapter.hint_zero_init = True
    config.adapter.hint_unit_range = True
    config.adapter.init_from = teacher["workdir"]
    config.codi.guidance_weight = 1.0
    config.batch_size = 2
    config.num_sample_images = 2
    config.sample_step_counts = (1,)
    config.update(overrides)
    return config


def make_pipeline(directory: str, **kwargs: Any) -> Any:
    """Writes a tiny ``StableDiffusionPipeline`` folder at ``directory`` and returns the pipeline."""
    import diffusers

    parts = make_components(directory, **kwargs)
    pipe = diffusers.StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(directory, safe_serialization=True)
    return pipe


def make_controlnet(unet: Any, directory: str, seed: int = 7) -> Any:
    """A perturbed ``ControlNetModel`` copied from ``unet`` (x8 hint network), saved at ``directory``."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    controlnet = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS)
    controlnet = perturbed(controlnet, seed, scale=0.05)
    controlnet.save_pretrained(directory, safe_serialization=True)
    return controlnet
