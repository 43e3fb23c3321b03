"""End to end against diffusers: text-to-image (eps and v) and ControlNet sampling, ours == diffusers.

A tiny random Stable-Diffusion folder (``tests/tiny_sd.py``) is sampled by diffusers'
``StableDiffusionPipeline`` / ``StableDiffusionControlNetPipeline`` (DDIM, 4 steps, classifier-free
guidance 3.0, given latents) and by our path on the same latents: tokenizer -> CLIP text encoder
(``encoders.encode_prompts``) -> guided DDIM (``guidance.guided_apply`` in ``samplers.ddim_sample``
over ``diffusion.diffusers_ddim_times``, no clipping, ending at diffusers' final ``alpha_bar``) ->
VAE decode. Latents and images must agree to float32 rounding (relative to their scale).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from codi_jax import diffusion
from codi_jax.frozen import encoders
from codi_jax.interop.torch_to_flax import load_diffusers_controlnet, load_diffusers_unet
from codi_jax.models.adapters import ConditionalModel
from codi_jax.sampling import guidance, samplers
from tests import tiny_sd

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a photo of a cat sitting on the mat", "the sea at sunset, highly detailed"]
NEGATIVE = ["", "a dog"]
STEPS, SCALE = 4, 3.0
IMAGE_TOL = 1e-4  # images in [0, 1]
LATENT_TOL = 1e-4  # relative to the latents' max abs value
PARAMETRIZATION = {"epsilon": "eps", "v_prediction": "v"}


def _schedule(scheduler) -> diffusion.Schedule:
    c = scheduler.config
    return diffusion.Schedule(c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end)


def _encoders_config(directory: str) -> ml_collections.ConfigDict:
    """The ``latent`` / ``text`` sections of a converted teacher, naming the component folders."""
    return ml_collections.ConfigDict(
        dict(
            latent=dict(vae=os.path.join(directory, "vae"), encode="mean"),
            text=dict(
                encoder=os.path.join(directory, "text_encoder"),
                tokenizer=os.path.join(directory, "tokenizer"),
                prompt="",
                negative_prompt="",
                max_length=0,
            ),
        )
    )


def _initial_latents(batch: int, seed: int = 0):
    return torch.randn(
        batch, 4, tiny_sd.LATENT_SIZE, tiny_sd.LATENT_SIZE, generator=torch.Generator().manual_seed(seed)
    )


def _nhwc(tensor) -> jax.Array:
    return jnp.asarray(tensor.numpy().transpose(0, 2, 3, 1))


@functools.lru_cache(maxsize=4)
def _sampler(apply_fn, schedule: diffusion.Schedule, parametrization: str, times: tuple[float, ...]):
    """The jitted guided DDIM ``(Guided, z_init) -> z`` at the final time."""
    return jax.jit(
        functools.partial(
            samplers.ddim_sample,
            guidance.guided_apply(apply_fn),
            times=np.asarray(times, np.float32),
            schedule=schedule,
            parametrization=parametrization,
            clip_denoised=False,
            output="z",
        )
    )


def _unet_apply(unet, params, z, model_t, context):
    return unet.apply({"params": params}, z, model_t, context)


def _controlnet_apply(model, params, z, model_t, context):
    text, control = context
    return model.apply({"params": params}, z, model_t, control, None, text)


def _ours(enc, apply_fn, params, scheduler, latents, extra=None, scale=SCALE):
    """Our sampling of ``latents`` (NCHW torch): -> (final latents NHWC, images NHWC in [0, 1])."""
    schedule = _schedule(scheduler)
    c = scheduler.config
    times = diffusion.diffusers_ddim_times(schedule, STEPS, c.timestep_spacing, c.steps_offset, c.set_alpha_to_one)
    context, uncond = encoders.encode_prompts(enc, PROMPTS), encoders.encode_prompts(enc, NEGATIVE)
    if extra is not None:
        context, uncond = (context, extra), (uncond, extra)
    sampler = _sampler(apply_fn, schedule, PARAMETRIZATION[c.prediction_type], tuple(times.tolist()))
    z = sampler(guidance.Guided(params, context, uncond, jnp.float32(scale)), _nhwc(latents))
    images = jax.jit(functools.partial(encoders.decode_latents, enc.vae))(enc.vae_params, z)
    return np.asarray(z), np.clip(np.asarray(images) / 2 + 0.5, 0.0, 1.0)


def _compare(name: str, pipe, ours, **call) -> float:
    """Runs ``pipe`` for latents and for images and checks ``ours`` (latents, images) against both."""
    our_latents, our_images = ours
    common = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=SCALE, **call)
    assert pipe.scheduler.init_noise_sigma == 1.0  # DDIM: the given latents enter unscaled
    ref_latents = pipe(PROMPTS, output_type="latent", **common).images.numpy().transpose(0, 2, 3, 1)
    ref_images = pipe(PROMPTS, output_type="np", **common).images
    latent_err = float(np.abs(our_latents - ref_latents).max() / np.abs(ref_latents).max())
    image_err = float(np.abs(our_images - ref_images).max())
    print(f"{name}: max abs error images {image_err:.3g} (in [0, 1]); latents {latent_err:.3g} (relative)")
    assert latent_err <= LATENT_TOL
    assert image_err <= IMAGE_TOL
    return image_err


@pytest.fixture(scope="module")
def sd_eps(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tiny_sd_eps"))
    pipe = tiny_sd.make_pipeline(directory)
    controlnet = tiny_sd.make_controlnet(pipe.unet, os.path.join(directory, "controlnet"))
    return directory, pipe, controlnet


def test_diffusers_ddim_times_match_set_timesteps() -> None:
    schedule = diffusion.Schedule("scaled_linear", 1000, 0.00085, 0.012)
    for spacing in diffusion.TIMESTEP_SPACINGS:
        for steps, offset, to_one in ((4, 1, False), (50, 1, True), (7, 0, False)):
            scheduler = diffusers.DDIMScheduler(
                **dict(tiny_sd.SCHEDULER, timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=to_one)
            )
            scheduler.set_timesteps(steps)
            times = diffusion.diffusers_ddim_times(schedule, steps, spacing, offset, to_one)
            expected = (scheduler.timesteps.numpy() + 1) / 1000
            np.testing.assert_allclose(times[:-1], expected, rtol=0, atol=1e-7, err_msg=f"{spacing} {steps}")
            np.testing.assert_allclose(
                np.asarray(schedule.model_time(times[:-1])), scheduler.timesteps.numpy(), atol=1e-3
            )
            alpha, _ = schedule.alpha_sigma(times)
            np.testing.assert_allclose(
                np.asarray(alpha[:-1]) ** 2, scheduler.alphas_cumprod[scheduler.timesteps].numpy(), rtol=1e-5
            )
            np.testing.assert_allclose(float(alpha[-1]) ** 2, float(scheduler.final_alpha_cumprod), rtol=1e-5)
    with pytest.raises(ValueError, match="discrete schedule"):
        diffusion.diffusers_ddim_times(diffusion.Schedule("cosine"), 4)
    with pytest.raises(ValueError, match="timestep_spacing='nope'"):
        diffusion.diffusers_ddim_times(schedule, 4, "nope")


def test_text_to_image_eps_matches_diffusers(sd_eps) -> None:
    directory, pipe, _ = sd_eps
    enc = encoders.load_encoders(_encoders_config(directory))  # component folders (vae/, text_encoder/, ...)
    reference_ids = pipe.tokenizer(PROMPTS + NEGATIVE, padding="max_length", max_length=tiny_sd.MAX_LENGTH).input_ids
    np.testing.assert_array_equal(encoders.tokenize(enc, PROMPTS + NEGATIVE), np.asarray(reference_ids))
    with torch.no_grad():
        reference_embeddings = pipe.text_encoder(torch.tensor(reference_ids))[0].numpy()
    np.testing.assert_allclose(
        np.asarray(encoders.encode_prompts(enc, PROMPTS + NEGATIVE)), reference_embeddings, atol=1e-5
    )
    unet, params = load_diffusers_unet(directory)  # the pipeline folder
    apply_fn = functools.partial(_unet_apply, unet)
    latents = _initial_latents(len(PROMPTS))
    ours = _ours(enc, apply_fn, params, pipe.scheduler, latents)
    _compare("eps", pipe, ours, latents=latents)
    # Guidance matters here: the same compiled sampler at scale 1 (no guidance) is far away.
    _, unguided = _ours(enc, apply_fn, params, pipe.scheduler, latents, scale=1.0)
    assert np.abs(unguided - ours[1]).max() > 100 * IMAGE_TOL


def test_text_to_image_v_prediction_matches_diffusers(tmp_path) -> None:
    pipe = tiny_sd.make_pipeline(str(tmp_path), prediction_type="v_prediction", seed=1)
    enc = encoders.load_encoders(_encoders_config(str(tmp_path)))
    unet, params = load_diffusers_unet(os.path.join(str(tmp_path), "unet"))
    latents = _initial_latents(len(PROMPTS), seed=1)
    ours = _ours(enc, functools.partial(_unet_apply, unet), params, pipe.scheduler, latents)
    _compare("v", pipe, ours, latents=latents)


def test_controlnet_matches_diffusers(sd_eps) -> None:
    directory, pipe, controlnet = sd_eps
    components = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    cpipe = diffusers.StableDiffusionControlNetPipeline(**components, controlnet=controlnet)
    cpipe.set_progress_bar_config(disable=True)
    enc = encoders.load_encoders(_encoders_config(directory))
    unet, unet_params = load_diffusers_unet(directory)
    adapter, adapter_params = load_diffusers_controlnet(directory)  # finds controlnet/
    model = ConditionalModel(backbone=unet, adapter=adapter)
    params = {"backbone": unet_params, "adapter": adapter_params}
    size = tiny_sd.IMAGE_SIZE
    control = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(2))  # diffusers: [0, 1], NCHW
    latents = _initial_latents(len(PROMPTS), seed=3)
    extra = jnp.repeat(_nhwc(control), len(PROMPTS), axis=0)  # the same values, NHWC
    ours = _ours(enc, functools.partial(_controlnet_apply, model), params, pipe.scheduler, latents, extra=extra)
    _compare("controlnet", cpipe, ours, latents=latents, image=control)
    # The ControlNet matters here: without it the images are far away.
    plain = pipe(
        PROMPTS,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=SCALE,
        latents=latents,
        output_type="np",
    ).images
    assert np.abs(plain - ours[1]).max() > 100 * IMAGE_TOL


def test_sample_teacher_on_a_converted_pipeline_matches_diffusers(sd_eps, tmp_path) -> None:
    """``sample_teacher`` on the converted folder: its ``uniform_times`` grid (t = 1, 3/4, ..., 0) is
    diffusers' ``trailing`` spacing ending at ``alpha_bar = 1`` (``set_alpha_to_one``)."""
    from codi_jax.interop import convert
    from codi_jax.sampling import many_step

    directory, pipe, _ = sd_eps
    out = str(tmp_path / "teacher")
    convert.convert(convert.ConversionRequest(directory, out))
    prompt, negative, num_images, batch_size = PROMPTS[0], NEGATIVE[1], 2, 1  # two batches, one compile
    request = dict(steps=STEPS, num_images=num_images, batch_size=batch_size)
    text = dict(prompt=prompt, negative_prompt=negative, guidance_scale=SCALE)
    many_step.check_request(out, str(tmp_path / "samples"), **request, **text)
    ours = many_step.sample_images(out, seed=0, **request, **text)
    noise = [  # sample_teacher's initial latents
        jax.random.normal(
            jax.random.fold_in(jax.random.PRNGKey(0), start), (min(batch_size, num_images - start), 8, 8, 4)
        )
        for start in range(0, num_images, batch_size)
    ]
    latents = torch.from_numpy(np.concatenate(noise).transpose(0, 3, 1, 2).copy())
    scheduler = diffusers.DDIMScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True
    )
    components = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "scheduler")}
    reference = diffusers.StableDiffusionPipeline(**components, scheduler=scheduler)
    reference.set_progress_bar_config(disable=True)
    ref = reference(
        [prompt] * num_images,
        negative_prompt=[negative] * num_images,
        num_inference_steps=STEPS,
        guidance_scale=SCALE,
        latents=latents,
        output_type="np",
    ).images
    error = float(np.abs(ours / 2 + 0.5 - ref).max())
    print(f"sample_teacher (eps, guided, 2 batches): max abs error images {error:.3g} (in [0, 1])")
    assert error <= IMAGE_TOL
