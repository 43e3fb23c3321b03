"""SDXL's text encoders, tokenizers, prompt encoding and VAE against transformers / diffusers (PyTorch).

A tiny ``CLIPTextModel`` (hidden 32, ``quick_gelu``) and ``CLIPTextModelWithProjection`` (hidden 48,
``gelu``, projection 24, ``eos_token_id=2`` as SDXL's ``text_encoder_2``), every weight perturbed, are
saved with two tokenizers (eos and ``!`` padding, vocabulary learned locally) into a diffusers-like
SDXL folder, read back with ``load_sdxl_text`` and compared with ``StableDiffusionXLPipeline.encode_prompt``.
Errors are bounded by 1e-5 * max(1, max |reference|).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from codi_jax.frozen import encoders, sdxl_text  # noqa: E402
from codi_jax.interop.torch_to_flax import load_diffusers_vae  # noqa: E402
from codi_jax.models.clip_text import (  # noqa: E402
    CLIPTextModel,
    CLIPTextModelWithProjection,
    UnsupportedCLIPConfig,
    clip_text_from_config,
    clip_text_param_shapes,
    load_clip_text,
)
from codi_jax.models.vae import AutoencoderKL  # noqa: E402
from tests import tiny_sd  # noqa: E402

MAX_LENGTH = 16  # both tokenizers' model_max_length and both encoders' max_position_embeddings
LONG_PROMPT = "the cat sat on the mat " * 6  # longer than MAX_LENGTH tokens: truncated
PROMPTS = ["a photo of a cat", "a painting of the sea at sunset, highly detailed", LONG_PROMPT, ""]
RELATIVE_TOLERANCE = 1e-5
# stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2/config.json (text_encoder/ is the same with
# architectures CLIPTextModel, hidden 768, 12 heads / layers, intermediate 3072, quick_gelu, projection 768).
SDXL_TEXT_ENCODER_2 = {
    "_name_or_path": "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
    "architectures": ["CLIPTextModelWithProjection"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "torch_dtype": "float16",
    "transformers_version": "4.32.0.dev0",
    "vocab_size": 49408,
}
SDXL_TEXT_ENCODER = {
    **SDXL_TEXT_ENCODER_2,
    "architectures": ["CLIPTextModel"],
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}


def _perturb(model, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn_like(parameter)
            parameter.copy_(1 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.3 * noise)
    return model.eval()


def _encoder_1(vocab_size: int):
    config = transformers.CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return _perturb(transformers.CLIPTextModel(config), 1)


def _encoder_2(vocab_size: int, eos_token_id: int = 2):
    """SDXL's text_encoder_2 config has eos_token_id=2 (transformers then pools at the largest id)."""
    config = transformers.CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="gelu",
        projection_dim=24,
        bos_token_id=0,
        eos_token_id=eos_token_id,
        pad_token_id=1,
    )
    return _perturb(transformers.CLIPTextModelWithProjection(config), 2)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(diffusers-like SDXL folder, torch components dict) with force_zeros_for_empty_prompt=True."""
    root = tmp_path_factory.mktemp("sdxl")
    vocab_file, merges_file, vocab_size = tiny_sd.write_bpe_files(str(root / "_bpe"), 80)
    parts = dict(
        text_encoder=_encoder_1(vocab_size),
        text_encoder_2=_encoder_2(vocab_size),
        tokenizer=transformers.CLIPTokenizer(
            vocab_file, merges_file, pad_token="<|endoftext|>", model_max_length=MAX_LENGTH
        ),
        tokenizer_2=transformers.CLIPTokenizer(vocab_file, merges_file, pad_token="!", model_max_length=MAX_LENGTH),
    )
    for name, part in parts.items():
        part.save_pretrained(str(root / name))
    with open(root / "model_index.json", "w") as f:
        json.dump({"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True}, f)
    return str(root), parts


@pytest.fixture(scope="module")
def ours(sdxl) -> sdxl_text.SDXLText:
    return sdxl_text.load_sdxl_text(sdxl[0])


def _pipeline(parts, force_zeros: bool):
    return diffusers.StableDiffusionXLPipeline(
        vae=None,
        unet=None,
        scheduler=None,
        **parts,
        force_zeros_for_empty_prompt=force_zeros,
        add_watermarker=False,
    )


def _assert_close(ours, reference, what: str) -> float:
    reference = np.asarray(reference, np.float64)
    ours = np.asarray(ours, np.float64)
    assert ours.shape == reference.shape, f"{what}: shape {ours.shape} vs {reference.shape}"
    error = float(np.max(np.abs(ours - reference))) if reference.size else 0.0
    scale = max(1.0, float(np.max(np.abs(reference)))) if reference.size else 1.0
    print(f"{what}: max abs err {error:.3g}, reference scale {scale:.3g}")
    assert error <= RELATIVE_TOLERANCE * scale, f"{what}: max abs err {error} > {RELATIVE_TOLERANCE} * {scale}"
    return error


# ---------------------------------------------------------------- tokenizers and encoders


def test_tokenizers_match_transformers(sdxl, ours) -> None:
    """Both tokenizers give transformers' ids (eos vs ``!`` padding, truncation of the long prompt)."""
    _, parts = sdxl
    assert [b.tokenizer.pad_token_id for b in ours.branches] == [parts["tokenizer"].eos_token_id, 0]
    for branch, name in zip(ours.branches, ("tokenizer", "tokenizer_2")):
        reference = parts[name](PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True)
        assert len(parts[name](LONG_PROMPT).input_ids) > MAX_LENGTH  # so the row below is truncated
        assert reference.input_ids[2][-1] == parts[name].eos_token_id
        np.testing.assert_array_equal(branch.tokenizer(PROMPTS).input_ids, np.asarray(reference.input_ids), name)


@pytest.mark.parametrize("eos", ["argmax", "eos_id"])
def test_projection_encoder_matches_transformers(sdxl, tmp_path, eos: str) -> None:
    """``text_embeds``, last and every hidden state, for both of transformers' pooling rules."""
    _, parts = sdxl
    reference = parts["text_encoder_2"]
    if eos == "eos_id":  # transformers' current configs: pool at the first eos_token_id
        reference = _encoder_2(reference.config.vocab_size, reference.config.vocab_size - 1)
    reference.save_pretrained(str(tmp_path))
    model, params = load_clip_text(str(tmp_path))
    assert isinstance(model, CLIPTextModelWithProjection) and model.projection_dim == 24
    assert model.eos_token_id == reference.config.eos_token_id
    rng = np.random.default_rng(0)
    tokens = parts["tokenizer_2"](PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    for i, ids in enumerate([np.asarray(tokens), rng.integers(0, model.vocab_size, (3, 7))]):
        with torch.no_grad():
            expected = reference(torch.from_numpy(np.asarray(ids, np.int64)), output_hidden_states=True)
        got = jax.jit(functools.partial(model.apply, output_hidden_states=True))({"params": params}, jnp.asarray(ids))
        _assert_close(got.text_embeds, expected.text_embeds.numpy(), f"{eos} batch {i} text_embeds")
        _assert_close(got.last_hidden_state, expected.last_hidden_state.numpy(), f"{eos} batch {i} last")
        for k, (a, b) in enumerate(zip(got.hidden_states, expected.hidden_states, strict=True)):
            _assert_close(a, b.numpy(), f"{eos} batch {i} hidden_states[{k}]")


def test_penultimate_states_match_transformers(sdxl, ours) -> None:
    _, parts = sdxl
    for branch, name in zip(ours.branches, ("text_encoder", "text_encoder_2")):
        ids = branch.tokenizer(PROMPTS).input_ids
        with torch.no_grad():
            expected = parts[name](torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
        hidden, _ = jax.jit(functools.partial(sdxl_text.branch_outputs, branch.model, -2))(branch.params, ids)
        _assert_close(hidden, expected.hidden_states[-2].numpy(), f"{name} hidden_states[-2]")


# ---------------------------------------------------------------- prompt encoding vs diffusers


def _compare(ours_pair, reference, what: str) -> None:
    positive, negative = ours_pair
    prompt_embeds, negative_embeds, pooled, negative_pooled = (t.numpy() for t in reference)
    assert positive["tokens"].shape[-1] == 32 + 48 and positive["text_embeds"].shape[-1] == 24
    _assert_close(positive["tokens"], prompt_embeds, f"{what} tokens")
    _assert_close(positive["text_embeds"], pooled, f"{what} text_embeds")
    _assert_close(negative["tokens"], negative_embeds, f"{what} negative tokens")
    _assert_close(negative["text_embeds"], negative_pooled, f"{what} negative text_embeds")


def _encode_prompt(pipe, prompts, negative, clip_skip=None):
    with torch.no_grad():
        return pipe.encode_prompt(
            prompts,
            device=torch.device("cpu"),
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative,
            clip_skip=clip_skip,
        )


@pytest.mark.parametrize(
    "case",
    ["negative", "batch_of_two", "clip_skip"],
)
def test_prompt_encoding_matches_diffusers(sdxl, ours, case: str) -> None:
    prompts, negative, clip_skip = {
        "negative": (["a photo of a cat"], ["a painting of the sea"], None),
        "batch_of_two": (["a photo of a cat", LONG_PROMPT], ["blurry", "a dog"], None),
        "clip_skip": (["a photo of a cat", "the lazy dog"], "blurry", 1),
    }[case]
    reference = _encode_prompt(_pipeline(sdxl[1], True), prompts, negative, clip_skip)
    _compare(sdxl_text.encode_sdxl_prompt_pair(ours, prompts, negative, clip_skip), reference, case)


@pytest.mark.parametrize("force_zeros", [True, False])
@pytest.mark.parametrize("negative", [None, ""])
def test_empty_negative_prompt_matches_diffusers(sdxl, ours, force_zeros: bool, negative) -> None:
    """``None`` with force_zeros_for_empty_prompt: zeros; without it, or an explicit "": encoded."""
    text = dataclasses.replace(ours, force_zeros_for_empty_prompt=force_zeros)
    prompts = ["a photo of a cat", "the quick brown fox"]
    reference = _encode_prompt(_pipeline(sdxl[1], force_zeros), prompts, negative)
    pair = sdxl_text.encode_sdxl_prompt_pair(text, prompts, negative)
    _compare(pair, reference, f"negative={negative!r} force_zeros={force_zeros}")
    zeros = force_zeros and negative is None
    assert (np.abs(np.asarray(pair[1]["tokens"])).max() == 0) == zeros
    assert (np.abs(np.asarray(pair[1]["text_embeds"])).max() == 0) == zeros


def test_loader_reads_the_pipeline_folder(sdxl, ours, tmp_path) -> None:
    root, _ = sdxl
    assert ours.force_zeros_for_empty_prompt and ours.max_length == MAX_LENGTH
    assert [type(b.model).__name__ for b in ours.branches] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    assert ours.pooled_branch is ours.branches[1]
    refiner = tmp_path / "refiner"  # text_encoder_2 / tokenizer_2 only, force_zeros false
    refiner.mkdir()
    for name in ("text_encoder_2", "tokenizer_2"):
        os.symlink(os.path.join(root, name), refiner / name)
    with open(refiner / "model_index.json", "w") as f:
        json.dump({"force_zeros_for_empty_prompt": False}, f)
    text = sdxl_text.load_sdxl_text(str(refiner))
    assert len(text.branches) == 1 and not text.force_zeros_for_empty_prompt
    context = sdxl_text.encode_sdxl_prompts(text, ["a cat"])
    assert context["tokens"].shape == (1, MAX_LENGTH, 48) and context["text_embeds"].shape == (1, 24)
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        sdxl_text.load_sdxl_text(str(tmp_path))
    with pytest.raises(ValueError, match="clip_skip"):
        sdxl_text.encode_sdxl_prompts(ours, ["a cat"], clip_skip=2)


def test_sdxl_text_configs_build_the_right_modules() -> None:
    """SDXL base's two config.json files: classes, pooling rule, projection shape; refusals name the field."""
    first, second = clip_text_from_config(SDXL_TEXT_ENCODER), clip_text_from_config(SDXL_TEXT_ENCODER_2)
    assert type(first) is CLIPTextModel and first.hidden_size == 768 and first.hidden_act == "quick_gelu"
    assert isinstance(second, CLIPTextModelWithProjection)
    assert (second.hidden_size, second.projection_dim, second.eos_token_id) == (1280, 1280, 2)
    one_layer = {"num_hidden_layers": 1}  # the shapes of interest without tracing 32 layers
    shapes = clip_text_param_shapes(clip_text_from_config({**SDXL_TEXT_ENCODER_2, **one_layer}))
    assert shapes["text_projection"]["kernel"].shape == (1280, 1280)
    assert "text_projection" not in clip_text_param_shapes(clip_text_from_config({**SDXL_TEXT_ENCODER, **one_layer}))
    without = {k: v for k, v in SDXL_TEXT_ENCODER_2.items() if k not in ("projection_dim", "eos_token_id")}
    assert (clip_text_from_config(without).projection_dim, clip_text_from_config(without).eos_token_id) == (512, 49407)
    for field in ("projection_dim", "eos_token_id"):
        with pytest.raises(UnsupportedCLIPConfig, match=field):
            clip_text_from_config({**SDXL_TEXT_ENCODER_2, field: None})


def test_load_encoders_refuses_text_encoder_2(sdxl) -> None:
    """SD 1.x / 2.x's ``config.text.encoder`` must be a plain CLIPTextModel, not SDXL's text_encoder_2."""
    root, _ = sdxl
    config = {"text": {"encoder": os.path.join(root, "text_encoder_2"), "tokenizer": os.path.join(root, "tokenizer")}}
    with pytest.raises(ValueError, match="config.text.encoder"):
        encoders.load_encoders(config)


# ---------------------------------------------------------------- SDXL VAE config


def test_sdxl_vae_config_converts_and_decodes(tmp_path) -> None:
    """SDXL's VAE config fields (scaling_factor 0.13025, force_upcast, latents_mean / std None)."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16],
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.13025,
        force_upcast=True,
        latents_mean=None,
        latents_std=None,
    )
    _perturb(vae, 3)
    vae.save_pretrained(str(tmp_path), safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["force_upcast"] is True and config["latents_mean"] is None and config["scaling_factor"] == 0.13025
    model, params = load_diffusers_vae(str(tmp_path))
    assert model.scaling_factor == pytest.approx(0.13025) and model.shift_factor is None
    latents = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        nchw = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2)))
        decoded = vae.decode(nchw).sample.numpy().transpose(0, 2, 3, 1)
        unscaled = vae.decode(nchw / vae.config.scaling_factor).sample.numpy().transpose(0, 2, 3, 1)
    decode = jax.jit(functools.partial(model.apply, method=AutoencoderKL.decode))
    _assert_close(decode({"params": params}, jnp.asarray(latents)), decoded, "SDXL VAE decode")
    _assert_close(model.images_from_latents(params, jnp.asarray(latents)), unscaled, "SDXL VAE images_from_latents")
