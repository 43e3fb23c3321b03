"""Tiny random Stable-Diffusion-3-shaped diffusers pipelines, built locally (no download), for tests.

``make_pipeline(directory)`` writes a ``StableDiffusion3Pipeline`` folder: an ``SD3Transformer2DModel``
(16 latent channels, joint attention ``JOINT_DIM`` wide, pooled ``POOLED_DIM``), a 16-channel x8 VAE with
SD3's ``scaling_factor`` / ``shift_factor`` and no quant convs, ``text_encoder`` / ``text_encoder_2``
(``CLIPTextModelWithProjection`` of widths ``HIDDEN_SIZES``, summing to less than ``JOINT_DIM`` so the
zero padding is exercised; projections summing to ``POOLED_DIM``), their BPE tokenizers (eos / ``!``
padding), ``text_encoder_3`` (a ``T5EncoderModel`` of width ``JOINT_DIM``; ``t5=False``: none, as SD3
allows) with a Unigram ``tokenizer_3`` trained here, and SD3's ``FlowMatchEulerDiscreteScheduler``
(shift 3). Every weight is perturbed away from diffusers' zero / one initialisations
(``tiny_sd.perturbed``). ``make_controlnet`` writes a matching ``SD3ControlNetModel``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tests import tiny_sd

LATENT_CHANNELS = 16
LATENT_SIZE = 8  # the transformer's sample_size; images are 8x that (the VAE downsamples x8)
IMAGE_SIZE = 8 * LATENT_SIZE
JOINT_DIM = 32  # joint_attention_dim = T5's d_model (SD3: 4096)
HIDDEN_SIZES = (16, 8)  # CLIP-L, CLIP-G widths (SD3: 768, 1280): zero-padded to JOINT_DIM
PROJECTION_DIMS = (12, 8)  # their text_projection widths: concatenated, POOLED_DIM
POOLED_DIM = sum(PROJECTION_DIMS)
MAX_SEQUENCE_LENGTH = 12  # T5 tokens (SD3's default 256)
SHIFT = 3.0
TRANSFORMER = dict(
    sample_size=LATENT_SIZE,
    patch_size=2,
    in_channels=LATENT_CHANNELS,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=JOINT_DIM,
    caption_projection_dim=32,
    pooled_projection_dim=POOLED_DIM,
    out_channels=LATENT_CHANNELS,
    pos_embed_max_size=16,
)
SD35 = dict(qk_norm="rms_norm", dual_attention_layers=(0,))  # make_pipeline(dir, transformer=SD35)
VAE = {
    **tiny_sd.VAE,
    "latent_channels": LATENT_CHANNELS,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
SCHEDULER = dict(num_train_timesteps=1000, shift=SHIFT)  # stabilityai/stable-diffusion-3-medium's
T5_CORPUS = [
    "a photo of a cat sitting on the mat",
    "the quick brown fox jumps over the lazy dog",
    "the sea at sunset, highly detailed",
    "a watercolor painting of a lighthouse at dusk",
]


def make_transformer(seed: int = 0, **overrides: Any) -> Any:
    import diffusers
    import torch

    torch.manual_seed(seed)
    return tiny_sd.perturbed(diffusers.SD3Transformer2DModel(**{**TRANSFORMER, **overrides}), seed + 1, scale=0.05)


def make_controlnet(transformer: Any, num_layers: int = 2, seed: int = 7, **overrides: Any) -> Any:
    """A perturbed ``SD3ControlNetModel`` with the transformer's architecture and ``num_layers`` blocks
    (its zero linears and ``pos_embed_input`` perturbed too)."""
    import diffusers
    import torch

    config = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    config = {k: v for k, v in config.items() if k in TRANSFORMER or k in ("qk_norm", "dual_attention_layers")}
    torch.manual_seed(seed)
    controlnet = diffusers.SD3ControlNetModel(**{**config, "num_layers": num_layers, **overrides})
    return tiny_sd.perturbed(controlnet, seed, scale=0.05)


def _clip(vocab_size: int, index: int, seed: int) -> Any:
    import transformers

    ids = (
        dict(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
        if index == 0
        else dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    )
    config = transformers.CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN_SIZES[index],
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tiny_sd.MAX_LENGTH,
        hidden_act="quick_gelu" if index == 0 else "gelu",
        projection_dim=PROJECTION_DIMS[index],
        **ids,
    )
    return tiny_sd.perturbed(transformers.CLIPTextModelWithProjection(config), seed, scale=0.05)


def t5_tokenizer(directory: str) -> Any:
    """A Unigram T5 tokenizer trained on ``T5_CORPUS`` (as tests/test_t5_encoder.py), saved at ``directory``."""
    import tokenizers
    import transformers

    backend = tokenizers.Tokenizer(tokenizers.models.Unigram())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    trainer = tokenizers.trainers.UnigramTrainer(
        vocab_size=100, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    backend.train_from_iterator(T5_CORPUS * 20, trainer)
    vocab = [tuple(piece) for piece in json.loads(backend.to_str())["model"]["vocab"]]
    tokenizer = transformers.T5TokenizerFast(vocab=vocab, extra_ids=4, model_max_length=MAX_SEQUENCE_LENGTH)
    tokenizer.save_pretrained(directory)
    return transformers.AutoTokenizer.from_pretrained(directory)


def _t5(seed: int) -> Any:
    import torch
    import transformers

    config = transformers.T5Config(
        vocab_size=128,
        d_model=JOINT_DIM,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
    )
    torch.manual_seed(seed)
    return tiny_sd.perturbed(transformers.T5EncoderModel(config).eval(), seed, scale=0.05)


def make_components(directory: str, seed: int = 0, t5: bool = True, transformer: dict | None = None) -> dict:
    """The PyTorch modules of a tiny SD3 pipeline (tokenizer files written under ``directory``)."""
    import diffusers
    import torch
    import transformers

    vocab_file, merges_file, vocab_size = tiny_sd.write_bpe_files(f"{directory}/_bpe")
    clip_tokenizer = lambda pad: transformers.CLIPTokenizer(
        vocab_file, merges_file, pad_token=pad, model_max_length=tiny_sd.MAX_LENGTH
    )
    torch.manual_seed(seed)
    return dict(
        transformer=make_transformer(seed, **(transformer or {})),
        vae=tiny_sd.perturbed(diffusers.AutoencoderKL(**VAE), seed + 2, scale=0.05),
        text_encoder=_clip(vocab_size, 0, seed + 3),
        text_encoder_2=_clip(vocab_size, 1, seed + 4),
        text_encoder_3=_t5(seed + 5) if t5 else None,
        tokenizer=clip_tokenizer("<|endoftext|>"),
        tokenizer_2=clip_tokenizer("!"),
        tokenizer_3=t5_tokenizer(f"{directory}/_t5_tokenizer") if t5 else None,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER),
    )


def make_pipeline(directory: str, seed: int = 0, t5: bool = True, transformer: dict | None = None) -> Any:
    """Writes a tiny ``StableDiffusion3Pipeline`` folder at ``directory`` and returns the pipeline."""
    import diffusers

    pipe = diffusers.StableDiffusion3Pipeline(**make_components(directory, seed, t5, transformer))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(directory, safe_serialization=True)
    for scratch in ("_bpe", "_t5_tokenizer"):  # the tokenizers' own folders are written by save_pretrained
        path = os.path.join(directory, scratch)
        if os.path.isdir(path):
            for name in os.listdir(path):
                os.remove(os.path.join(path, name))
            os.rmdir(path)
    return pipe
