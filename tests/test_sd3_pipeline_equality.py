"""End to end against diffusers on SD3: a converted ``StableDiffusion3Pipeline`` samples as diffusers does.

A tiny random SD3 pipeline (``tests/tiny_sd3.make_pipeline``: CLIP-L / CLIP-G with projections, T5, a
joint-attention transformer, a 16-channel VAE with SD3's scaling and shift factors, SD3's flow-matching
Euler scheduler with shift 3) is converted by ``python -m codi_jax.convert``'s library and sampled by
diffusers (4 steps, guidance 3.0, given latents) and by ours on the same latents: the three encoders
(``frozen.sd3_text``), guided Euler on the scheduler's grid, ``latents / scaling + shift`` decode.
Latents must agree within 1e-5 x max(1, max |ref|), images in [0, 1] within 1e-4. The pipeline
without ``text_encoder_3`` (T5 zeros) is checked the same way.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.frozen import encoders, sd3_text
from codi_jax.sampling import guidance, samplers
from tests import tiny_sd3

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("tokenizers")

PROMPTS = ["a photo of a cat sitting on the mat", "the sea at sunset, highly detailed"]
NEGATIVE = ["", "a dog"]
STEPS, SCALE = 4, 3.0
IMAGE_TOL = 1e-4  # images in [0, 1]
LATENT_TOL = 1e-5  # x max(1, max |ref|)
SIZE = tiny_sd3.IMAGE_SIZE
LENGTH = tiny_sd3.MAX_SEQUENCE_LENGTH


def _converted(root, name: str, **pipeline) -> dict:
    from codi_jax.interop import convert

    directory, teacher = str(root / name), str(root / f"{name}_teacher")
    pipe = tiny_sd3.make_pipeline(directory, **pipeline)
    summary = convert.convert(convert.ConversionRequest(directory, teacher))
    return dict(pipe=pipe, dir=directory, teacher=teacher, summary=summary)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> dict:
    return _converted(tmp_path_factory.mktemp("tiny_sd3_equality"), "pipeline")


@pytest.fixture(scope="module")
def sd3_no_t5(tmp_path_factory) -> dict:
    return _converted(tmp_path_factory.mktemp("tiny_sd3_no_t5"), "pipeline", t5=False, transformer=tiny_sd3.SD35)


def _error(name: str, ours: np.ndarray, ref: np.ndarray, tolerance: float) -> float:
    error, scale = float(np.abs(ours - ref).max()), max(1.0, float(np.abs(ref).max()))
    print(f"{name}: max abs error {error:.3g}, max |ref| {np.abs(ref).max():.3g}")
    assert error <= tolerance * scale, (name, error, scale)
    return error


def _latents(num_images: int, seed: int = 0) -> torch.Tensor:
    """``sample_teacher``'s initial latents (NCHW torch): example i's ``normal(fold_in(PRNGKey(seed), i))``."""
    shape = (tiny_sd3.LATENT_SIZE, tiny_sd3.LATENT_SIZE, tiny_sd3.LATENT_CHANNELS)
    noise = samplers.example_noise(seed, range(num_images), shape)
    return torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2).copy())


def _reference(pipe, prompts, negative, latents, output_type: str) -> np.ndarray:
    """diffusers' images (NHWC in [0, 1]) or latents (NHWC)."""
    out = pipe(
        prompts,
        negative_prompt=negative,
        num_inference_steps=STEPS,
        guidance_scale=SCALE,
        latents=latents.clone(),
        height=SIZE,
        width=SIZE,
        max_sequence_length=LENGTH,
        output_type=output_type,
    ).images
    return out.numpy().transpose(0, 2, 3, 1) if output_type == "latent" else out


def _text(config) -> sd3_text.SD3Text:
    """The converted encoders at ``LENGTH`` T5 tokens (the pipeline calls' ``max_sequence_length``)."""
    return dataclasses.replace(encoders.load_encoders(config).sd3, max_sequence_length=LENGTH)


def _context_apply(model, params, z, model_t, context):
    return model.apply({"params": params}, z, model_t, context)


def _our_latents(teacher: str, prompts, negative, latents) -> np.ndarray:
    """Guided Euler of the converted transformer from the converted encoders' contexts (the library path)."""
    from codi_jax.runs.pretrained import load_teacher

    pre = load_teacher(teacher)
    positive, uncond = sd3_text.encode_sd3_prompt_pair(_text(pre.config), prompts, negative)
    apply_fn = guidance.guided_apply(functools.partial(_context_apply, pre.model))
    sampler = samplers.many_step_sampler(apply_fn, pre.schedule, pre.parametrization, STEPS, clip_denoised=False)
    z_init = jnp.asarray(latents.numpy().transpose(0, 2, 3, 1))
    return np.asarray(jax.jit(sampler)(guidance.Guided(pre.params, positive, uncond, jnp.float32(SCALE)), z_init))


def test_converted_config(sd3: dict) -> None:
    from codi_jax.runs.pretrained import read_config

    config, _ = read_config(sd3["teacher"])
    assert config.model.kind == "dit" and config.model.parametrization == "v"
    assert config.model.joint_attention_dim == tiny_sd3.JOINT_DIM and config.model.in_channels == 16
    assert dict(config.schedule) == dict(kind="flow", shift=tiny_sd3.SHIFT, num_train_timesteps=1000)
    assert config.data.image_size == SIZE
    assert config.text.encoder_3.endswith("components/text_encoder_3") and config.text.tokenizer_3
    assert encoders.is_sd3(config) and not encoders.is_sdxl(config)
    counts = sd3["summary"].param_counts
    assert counts["unet"] == sum(p.numel() for p in sd3["pipe"].transformer.parameters())
    assert counts["text_encoder_3"] == sum(p.numel() for p in sd3["pipe"].text_encoder_3.parameters())


def test_transformer_output_matches_diffusers(sd3: dict) -> None:
    """The converted workdir's transformer against diffusers' on one guided batch of real contexts."""
    from codi_jax.runs.pretrained import load_teacher

    pre = load_teacher(sd3["teacher"])
    enc = encoders.load_encoders(pre.config)
    context = sd3_text.encode_sd3_prompts(enc.sd3, PROMPTS)
    rng = np.random.RandomState(0)
    sample = rng.randn(2, tiny_sd3.LATENT_SIZE, tiny_sd3.LATENT_SIZE, 16).astype(np.float32)
    timesteps = np.array([1000.0, 437.5], np.float32)
    ours = np.asarray(pre.model.apply({"params": pre.params}, sample, timesteps, context))
    with torch.no_grad():
        theirs = (
            sd3["pipe"]
            .transformer(
                hidden_states=torch.from_numpy(sample.transpose(0, 3, 1, 2).copy()),
                timestep=torch.from_numpy(timesteps),
                encoder_hidden_states=torch.from_numpy(np.asarray(context["encoder_hidden_states"])),
                pooled_projections=torch.from_numpy(np.asarray(context["pooled_projections"])),
            )
            .sample.numpy()
        )
    _error("SD3 transformer output (converted workdir)", ours, theirs.transpose(0, 2, 3, 1), LATENT_TOL)


def test_prompt_encoding_matches_diffusers(sd3: dict, sd3_no_t5: dict) -> None:
    """``encode_sd3_prompt_pair`` = ``StableDiffusion3Pipeline.encode_prompt`` (CFG), with and without T5."""
    from codi_jax.runs.pretrained import read_config

    for case in (sd3, sd3_no_t5):
        pipe = case["pipe"]
        text = _text(read_config(case["teacher"])[0])
        positive, negative = sd3_text.encode_sd3_prompt_pair(text, PROMPTS, NEGATIVE)
        with torch.no_grad():
            embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
                PROMPTS, None, None, negative_prompt=NEGATIVE, max_sequence_length=LENGTH
            )
        assert positive["encoder_hidden_states"].shape == (2, 16 + LENGTH, tiny_sd3.JOINT_DIM)
        pairs = (
            (positive["encoder_hidden_states"], embeds),
            (negative["encoder_hidden_states"], neg_embeds),
            (positive["pooled_projections"], pooled),
            (negative["pooled_projections"], neg_pooled),
        )
        for i, (ours, theirs) in enumerate(pairs):
            name = f"encode_prompt {i} (t5={pipe.text_encoder_3 is not None})"
            _error(name, np.asarray(ours), theirs.numpy(), LATENT_TOL)


@pytest.mark.parametrize("which", ["t5", "no_t5_sd35"])
def test_guided_euler_latents_match_diffusers(sd3: dict, sd3_no_t5: dict, which: str) -> None:
    """4 guided Euler steps (w = 3) on two prompts with negatives "" / "a dog": the latents."""
    case = sd3 if which == "t5" else sd3_no_t5
    latents = _latents(len(PROMPTS))
    ref = _reference(case["pipe"], PROMPTS, NEGATIVE, latents, "latent")
    ours = _our_latents(case["teacher"], PROMPTS, NEGATIVE, latents)
    _error(f"SD3 latents, 4 Euler steps, CFG 3 ({which})", ours, ref, LATENT_TOL)


def test_sample_teacher_matches_diffusers(sd3: dict, tmp_path) -> None:
    """``sample_teacher``'s library (the CLI's path) on the converted folder: decoded images."""
    from codi_jax.sampling import many_step

    num_images = 2
    request = dict(steps=STEPS, num_images=num_images, batch_size=num_images)
    text = dict(prompt=PROMPTS[0], negative_prompt=NEGATIVE[1], guidance_scale=SCALE)
    many_step.check_request(sd3["teacher"], str(tmp_path / "samples"), **request, **text)
    ours = many_step.sample_images(sd3["teacher"], seed=0, **request, **text) / 2 + 0.5
    # sample_teacher encodes text.max_sequence_length T5 tokens (the converted default, 256)
    pipe = sd3["pipe"]
    ref = pipe(
        [PROMPTS[0]] * num_images,
        negative_prompt=[NEGATIVE[1]] * num_images,
        num_inference_steps=STEPS,
        guidance_scale=SCALE,
        latents=_latents(num_images),
        height=SIZE,
        width=SIZE,
        output_type="np",
    ).images
    _error("sample_teacher SD3 images", ours, ref, IMAGE_TOL)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("use_dynamic_shifting", True, "use_dynamic_shifting=True is not supported"),
        ("shift_terminal", 0.02, "shift_terminal=0.02 is not supported"),
        ("invert_sigmas", True, "invert_sigmas=True is not supported"),
        ("new_field", 1, "field 'new_field' is not supported"),
        ("shift", 0, "shift=0 must be a number > 0"),
        ("_class_name", "DDIMScheduler", "_class_name='DDIMScheduler'"),
    ],
)
def test_flow_scheduler_refusals(field: str, value, message: str) -> None:
    from codi_jax.interop import convert

    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", **tiny_sd3.SCHEDULER, "base_shift": 0.5, field: value}
    with pytest.raises(ValueError, match=message):
        convert.flow_schedule_from_scheduler_config(config)
    sd35 = (
        dict(config, **{field: False if isinstance(value, bool) else None})
        if field.startswith(("use", "inv"))
        else None
    )
    if sd35 is not None:  # SD3.5's scheduler file (its fields at their defaults) converts
        assert convert.flow_schedule_from_scheduler_config(sd35)[0]["shift"] == tiny_sd3.SHIFT
