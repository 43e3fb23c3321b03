"""End to end against diffusers on SDXL: the teacher sampler and ControlNet sampling, ours == diffusers.

A tiny random SDXL pipeline (``tests/tiny_sdxl.make_pipeline``: two text encoders, a text_time UNet,
SDXL's VAE scaling) with its ControlNet is converted (``python -m codi_jax.convert``'s library) and
sampled by diffusers' ``StableDiffusionXLPipeline`` / ``StableDiffusionXLControlNetPipeline`` (a
``DDIMScheduler`` from the pipeline's scheduler config, 4 steps, classifier-free guidance 3.0, given
latents, ``output_type="np"``: VAE decoded) and by ours on the same latents: both encoders
(``frozen.sdxl_text``), the time ids ``(H, W, 0, 0, H, W)`` for prompt and negative alike, guided DDIM,
VAE decode. Images in [0, 1] must agree within 1e-4, latents within 1e-5 x max(1, max |ref|).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import diffusion, sharding
from codi_jax.frozen import batch_inputs, encoders, sdxl_text
from codi_jax.models.adapters import ConditionalModel
from codi_jax.sampling import guidance, samplers
from tests import tiny_sdxl

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a photo of a cat sitting on the mat", "the sea at sunset, highly detailed"]
NEGATIVE = ["", "a dog"]  # "" explicit: encoded (diffusers encodes an explicit "" despite force_zeros)
STEPS, SCALE = 4, 3.0
IMAGE_TOL = 1e-4  # images in [0, 1]
LATENT_TOL = 1e-5  # x max(1, max |ref|)
SIZE = tiny_sdxl.IMAGE_SIZE


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> dict:
    """The tiny SDXL pipeline and ControlNet (diffusers folders) and their conversion (a teacher workdir)."""
    from codi_jax.interop import convert

    root = tmp_path_factory.mktemp("tiny_sdxl_equality")
    directory, controlnet_dir, teacher = (str(root / name) for name in ("pipeline", "controlnet", "teacher"))
    pipe = tiny_sdxl.make_pipeline(directory)
    controlnet = tiny_sdxl.save_controlnet(pipe.unet, controlnet_dir)
    convert.convert(convert.ConversionRequest(directory, teacher, controlnet=controlnet_dir))
    return dict(pipe=pipe, controlnet=controlnet, controlnet_dir=controlnet_dir, teacher=teacher)


def _ddim(pipe, **overrides):
    return diffusers.DDIMScheduler.from_config(pipe.scheduler.config, **overrides)


def _reference(pipe_class, sdxl: dict, scheduler, prompts, negative, latents, **call) -> np.ndarray:
    """diffusers' images (NHWC in [0, 1], or latents NHWC with ``output_type="latent"``)."""
    components = {k: v for k, v in sdxl["pipe"].components.items() if k not in ("scheduler", "image_encoder")}
    if "image" in call:
        components["controlnet"] = sdxl["controlnet"]
    pipe = pipe_class(**components, scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.init_noise_sigma == 1.0  # DDIM: the given latents enter unscaled
    common = dict(negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=SCALE, latents=latents)
    out = pipe(prompts, height=SIZE, width=SIZE, **common, **call).images
    return out.numpy().transpose(0, 2, 3, 1) if call.get("output_type") == "latent" else out


def _image_error(name: str, ours: np.ndarray, ref: np.ndarray) -> float:
    error = float(np.abs(ours - ref).max())
    print(f"{name}: max abs error images {error:.3g} (in [0, 1]; max |ref| {np.abs(ref).max():.3g})")
    assert error <= IMAGE_TOL
    return error


def _teacher_noise(num_images: int, seed: int = 0):
    """``sample_teacher``'s initial latents (NCHW torch): example i's ``normal(fold_in(PRNGKey(seed), i))``."""
    shape = (tiny_sdxl.LATENT_SIZE, tiny_sdxl.LATENT_SIZE, 4)
    noise = samplers.example_noise(seed, range(num_images), shape)
    return torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2).copy())


def test_sample_teacher_on_sdxl_matches_diffusers(sdxl: dict, tmp_path) -> None:
    """``sample_teacher`` on the converted SDXL folder against ``StableDiffusionXLPipeline``: its
    ``uniform_times`` grid is DDIM's ``trailing`` spacing ending at ``alpha_bar = 1``. A negative
    prompt is encoded by both encoders; the run's default negative "" is diffusers' None (zeros)."""
    from codi_jax.sampling import many_step

    num_images = 2
    request = dict(steps=STEPS, num_images=num_images, batch_size=num_images)
    latents = _teacher_noise(num_images)
    scheduler = _ddim(sdxl["pipe"], timestep_spacing="trailing", set_alpha_to_one=True)
    cases = ((NEGATIVE[1], NEGATIVE[1]), (None, None))  # (our --negative_prompt, diffusers' negative_prompt)
    images = []
    for ours_negative, their_negative in cases:
        text = dict(prompt=PROMPTS[0], negative_prompt=ours_negative, guidance_scale=SCALE)
        many_step.check_request(sdxl["teacher"], str(tmp_path / "samples"), **request, **text)
        ours = many_step.sample_images(sdxl["teacher"], seed=0, **request, **text) / 2 + 0.5
        negative = None if their_negative is None else [their_negative] * num_images
        ref = _reference(
            diffusers.StableDiffusionXLPipeline, sdxl, scheduler, [PROMPTS[0]] * num_images, negative, latents,
            output_type="np",
        )  # fmt: skip
        _image_error(f"sample_teacher SDXL (negative {their_negative!r})", ours, ref)
        images.append(ours)
    assert np.abs(images[0] - images[1]).max() > 100 * IMAGE_TOL  # the negative prompt matters here


def _controlnet_apply(model: ConditionalModel, params, z, model_t, context):
    text, control = context
    return model.apply({"params": params}, z, model_t, control, None, text)


def _our_controlnet(sdxl: dict, scheduler, latents, control) -> tuple[np.ndarray, np.ndarray]:
    """Guided DDIM of the UNet + ControlNet over diffusers' timesteps, then the VAE: (latents, images)."""
    from codi_jax.interop import convert
    from codi_jax.interop.torch_to_flax import controlnet_param_shapes, load_diffusers_controlnet
    from codi_jax.runs import checkpoint
    from codi_jax.runs.pretrained import load_teacher

    pre = load_teacher(sdxl["teacher"])  # the converted UNet and its config's encoders
    enc = encoders.load_encoders(pre.config)
    adapter, _ = load_diffusers_controlnet(sdxl["controlnet_dir"])  # the module; its weights: converted
    shapes = controlnet_param_shapes(adapter)
    mesh = sharding.make_mesh(devices=jax.local_devices()[:1])
    abstract = checkpoint.abstract_like(shapes, sharding.tree_shardings(shapes, mesh))
    model = ConditionalModel(backbone=pre.model, adapter=adapter)
    params = {"backbone": pre.params, "adapter": convert.restore_controlnet(sdxl["teacher"], abstract)}
    c = scheduler.config
    times = diffusion.diffusers_ddim_times(pre.schedule, STEPS, c.timestep_spacing, c.steps_offset, c.set_alpha_to_one)
    positive, negative = sdxl_text.encode_sdxl_prompt_pair(enc.sdxl, PROMPTS, NEGATIVE)
    time_ids = batch_inputs.pipeline_time_ids(len(PROMPTS), SIZE, SIZE)
    hint = jnp.repeat(jnp.asarray(control.numpy().transpose(0, 2, 3, 1)), len(PROMPTS), axis=0)
    context, uncond = ({**positive, "time_ids": time_ids}, hint), ({**negative, "time_ids": time_ids}, hint)
    sample = functools.partial(
        samplers.ddim_sample,
        guidance.guided_apply(functools.partial(_controlnet_apply, model)),
        times=np.asarray(times, np.float32),
        schedule=pre.schedule,
        parametrization="eps",
        clip_denoised=False,
        output="z",
    )
    z_init = jnp.asarray(latents.numpy().transpose(0, 2, 3, 1))
    z = jax.jit(sample)(guidance.Guided(params, context, uncond, jnp.float32(SCALE)), z_init)
    images = jax.jit(functools.partial(encoders.decode_latents, enc.vae))(enc.vae_params, z)
    return np.asarray(z), np.clip(np.asarray(images) / 2 + 0.5, 0.0, 1.0)


def test_sdxl_controlnet_matches_diffusers(sdxl: dict) -> None:
    """The converted UNet + the SDXL ControlNet, guided DDIM at the pipeline's own spacing (SDXL base's
    ``leading``, ``steps_offset=1``) against ``StableDiffusionXLControlNetPipeline``."""
    scheduler = _ddim(sdxl["pipe"])
    control = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))  # diffusers: [0, 1]
    latents = torch.randn(
        len(PROMPTS), 4, tiny_sdxl.LATENT_SIZE, tiny_sdxl.LATENT_SIZE, generator=torch.Generator().manual_seed(3)
    )
    our_latents, our_images = _our_controlnet(sdxl, scheduler, latents, control)
    call = (diffusers.StableDiffusionXLControlNetPipeline, sdxl, scheduler, PROMPTS, NEGATIVE, latents)
    ref_latents = _reference(*call, image=control, output_type="latent")
    scale = max(1.0, float(np.abs(ref_latents).max()))
    latent_error = float(np.abs(our_latents - ref_latents).max())
    print(f"SDXL ControlNet: max abs error latents {latent_error:.3g} (max |ref| {np.abs(ref_latents).max():.3g})")
    assert latent_error <= LATENT_TOL * scale
    _image_error("SDXL ControlNet", our_images, _reference(*call, image=control, output_type="np"))
    # The ControlNet matters here: the plain SDXL pipeline's images are far away.
    plain = _reference(
        diffusers.StableDiffusionXLPipeline, sdxl, scheduler, PROMPTS, NEGATIVE, latents, output_type="np"
    )
    assert np.abs(plain - our_images).max() > 100 * IMAGE_TOL
