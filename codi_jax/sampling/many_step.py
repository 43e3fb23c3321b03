"""Many-step DDIM (flow-matching teachers: Euler) sampling of an unconditional teacher (or a
converted text-to-image teacher): the library behind ``python -m codi_jax.sample_teacher``
(``codi_jax.cli.sample_teacher``).

``check_request`` checks a request from the run's saved config alone; ``sample_images`` restores the
EMA parameters and samples; ``write_images`` writes one PNG per sample plus ``grid.png``, all or
nothing. Latent / text teachers sample latents without clipping and decode them with the VAE; a
prompt conditions them and a guidance scale > 1 applies classifier-free guidance against the
negative prompt. SDXL teachers (``encoders.is_sdxl``) encode both with the two text encoders
(``frozen.sdxl_text``; the negative "" is diffusers' None: zeros under the pipeline's
``force_zeros_for_empty_prompt``, as in runs) and add diffusers' default time ids
``(H, W, 0, 0, H, W)`` of ``data.image_size`` to both contexts (``tests/test_sdxl_pipeline_equality.py``:
equal to ``StableDiffusionXLPipeline``). SD3 teachers (a joint DiT on a flow schedule) encode both with
CLIP-L, CLIP-G and T5 (``frozen.sd3_text``; the negative "" is encoded, as diffusers does) and sample
with Euler on the scheduler's shifted grid (``tests/test_sd3_pipeline_equality.py``: equal to
``StableDiffusion3Pipeline``).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax import atomic, sharding
from codi_jax.frozen import batch_inputs, encoders, sd3_text, sdxl_text
from codi_jax.models import networks
from codi_jax.runs.pretrained import Pretrained, load_teacher, read_config
from codi_jax.sampling import few_step, guidance, samplers


def _context_apply(model: Any, params: Any, z_t: jax.Array, model_t: jax.Array, context: Any) -> jax.Array:
    return model.apply({"params": params}, z_t, model_t, context)


def _text_contexts(
    enc: encoders.Encoders, config: Any, prompt: str | None, negative_prompt: str | None, scale: float
) -> tuple[Any, Any]:
    """``(context, uncond_context or None)``, one row each: the one prompt's (None: no CFG)."""
    prompt = config.text.get("prompt", "") if prompt is None else prompt
    negative = config.text.get("negative_prompt", "") if negative_prompt is None else negative_prompt
    if enc.sd3 is not None:
        context = sd3_text.encode_sd3_prompts(enc.sd3, [prompt])
        return context, (None if scale == 1.0 else sd3_text.encode_sd3_prompts(enc.sd3, [negative]))
    if enc.sdxl is not None:
        return _sdxl_contexts(enc.sdxl, prompt, negative, scale, int(config.data.image_size))
    context = encoders.encode_prompts(enc, [prompt])
    return context, (None if scale == 1.0 else encoders.encode_prompts(enc, [negative]))


def _sdxl_contexts(
    text: sdxl_text.SDXLText, prompt: str, negative: str, scale: float, size: int
) -> tuple[dict[str, jax.Array], dict[str, jax.Array] | None]:
    """SDXL's ``{"tokens", "text_embeds", "time_ids"}`` rows: both encoders, the negative "" as
    diffusers' None (zeros under ``force_zeros_for_empty_prompt``, as in runs), and diffusers'
    default time ids ``(size, size, 0, 0, size, size)`` for the prompt and the negative alike."""
    time_ids = batch_inputs.pipeline_time_ids(1, size, size)
    context = {**sdxl_text.encode_sdxl_prompts(text, [prompt]), "time_ids": time_ids}
    if scale == 1.0:
        return context, None
    return context, {**sdxl_text.encode_sdxl_negative(text, negative or None, 1), "time_ids": time_ids}


def _repeat(row: Any, n: int) -> Any:
    """A context of (1, ...) rows (an array or a dict of them) as ``n`` rows (None stays None)."""
    return jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (n,) + leaf.shape[1:]), row)


@functools.lru_cache(maxsize=4)
def _jitted_ddim(model: Any, schedule: Any, parametrization: str, steps: int, clip: bool) -> Callable:
    """The jitted guided sampler ``(Guided, noise) -> z``, one per model and grid: later calls (another
    prompt, scale or request in the same process) reuse its compilations."""
    apply_fn = guidance.guided_apply(functools.partial(_context_apply, model))
    return jax.jit(samplers.many_step_sampler(apply_fn, schedule, parametrization, steps, clip_denoised=clip))


@functools.lru_cache(maxsize=4)
def _jitted_decode(vae: Any) -> Callable:
    return jax.jit(functools.partial(encoders.decode_latents, vae))


def _latent_text_sampler(pre: Pretrained, steps: int, mesh: jax.sharding.Mesh, text: dict[str, Any]) -> Callable:
    """``noise -> images`` for a latent and / or text teacher: guided DDIM (unclipped latents), VAE decode."""
    enc = encoders.load_encoders(pre.config)
    context, uncond = (None, None)
    if enc.has_text:
        context, uncond = _text_contexts(enc, pre.config, **text)
    params, vae_params, context, uncond = jax.device_put(
        (pre.params, enc.vae_params, context, uncond), sharding.replicated(mesh)
    )
    ddim = _jitted_ddim(pre.model, pre.schedule, pre.parametrization, steps, not enc.is_latent)
    decode = _jitted_decode(enc.vae) if enc.is_latent else None

    def sample(noise: jax.Array) -> np.ndarray:
        n = noise.shape[0]
        guided = guidance.Guided(params, _repeat(context, n), _repeat(uncond, n), jnp.float32(text["scale"]))
        out = ddim(guided, noise)
        if decode is not None:
            out = jnp.clip(decode(vae_params, out), -1.0, 1.0)
        return np.asarray(out)

    return sample


def _pixel_sampler(pre: Pretrained, steps: int, mesh: jax.sharding.Mesh) -> Callable:
    """``noise -> images`` for a pixel teacher without text: DDIM with x_hat clipped to [-1, 1] (a
    flow-matching teacher: Euler, the output clipped)."""

    def apply_fn(params, z_t, model_t):
        return pre.model.apply({"params": params}, z_t, model_t)

    sampler = jax.jit(samplers.many_step_sampler(apply_fn, pre.schedule, pre.parametrization, steps))
    params = jax.device_put(pre.params, sharding.replicated(mesh))
    return lambda noise: np.asarray(sampler(params, noise))


def sample_images(
    workdir: str,
    *,
    steps: int,
    num_images: int,
    batch_size: int,
    seed: int,
    step: int | None = None,
    use_ema: bool = True,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    guidance_scale: float = 1.0,
) -> np.ndarray:
    """``num_images`` samples in [-1, 1] (NHWC float32, pixels) from ``workdir``'s checkpoint.

    A latent teacher (``config.latent.vae``) samples latents at ``data.image_size`` over the VAE's
    downsampling and decodes them; a text teacher (``config.text.encoder``) is conditioned on
    ``prompt`` (default ``config.text.prompt``), with classifier-free guidance against
    ``negative_prompt`` when ``guidance_scale != 1`` (one network call on the doubled batch); an SDXL
    teacher's contexts are ``{"tokens", "text_embeds", "time_ids"}`` dicts (``_sdxl_contexts``).
    """
    pre = load_teacher(workdir, step=step, use_ema=use_ema)
    check_text_flags(pre.config, workdir, prompt, negative_prompt, guidance_scale)
    size = networks.model_input_size(pre.config)
    channels = pre.config.model.out_channels
    mesh = sharding.make_mesh(devices=jax.local_devices())  # each batch split over this process's devices
    if encoders.is_latent(pre.config) or encoders.has_text(pre.config):
        text = dict(prompt=prompt, negative_prompt=negative_prompt, scale=guidance_scale)
        sample = _latent_text_sampler(pre, steps, mesh, text)
    else:
        sample = _pixel_sampler(pre, steps, mesh)
    samples, _ = samplers.sample_in_batches(
        lambda _, z_init, __: sample(z_init),
        num_images,
        (size, size, channels),
        seed=seed,
        renoise=False,
        batch_size=batch_size,
        mesh=mesh,
        progress=True,
    )
    return samples


def check_text_flags(
    config: Any, workdir: str, prompt: str | None, negative_prompt: str | None, guidance_scale: float
) -> None:
    """``--prompt`` / ``--negative_prompt`` / ``--guidance_scale`` need a text teacher."""
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"--guidance_scale={guidance_scale}: must be a finite number >= 0 (1 = no guidance).")
    if encoders.has_text(config):
        return
    for flag, given in (("prompt", prompt is not None), ("negative_prompt", negative_prompt is not None)):
        if given:
            raise ValueError(f"--{flag}: the teacher in --run {workdir} has no text encoder (config.text.encoder).")
    if guidance_scale != 1.0:
        raise ValueError(
            f"--guidance_scale={guidance_scale}: the teacher in --run {workdir} has no text encoder "
            "(classifier-free guidance needs a text teacher; leave it at 1)."
        )


def sample_files(num_images: int, prefix: str = "sample") -> list[str]:
    """``prefix_00000.png``... and ``grid.png``."""
    return [f"{prefix}_{i:05d}.png" for i in range(num_images)] + ["grid.png"]


def check_request(
    workdir: str,
    out_dir: str,
    *,
    steps: int,
    num_images: int,
    batch_size: int,
    step: int | None = None,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    guidance_scale: float = 1.0,
    overwrite: bool = False,
) -> None:
    """Every check of a sampling request before any weight is read (the run's saved config only)."""
    for flag, value in (("steps", steps), ("num_images", num_images), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"--{flag}={value}: must be at least 1.")
    few_step.check_out_dir(out_dir, sample_files(num_images), overwrite=overwrite)
    config, _ = read_config(workdir, step, what="--run")
    if networks.is_conditional(config):
        raise ValueError(
            f"--run {workdir} holds a conditional {config.method!r} run; sample it with python -m codi_jax.sample."
        )
    check_text_flags(config, workdir, prompt, negative_prompt, guidance_scale)
    encoders.check_encoder_paths(config)


def write_images(images: np.ndarray, out_dir: str, prefix: str = "sample", overwrite: bool = False) -> list[str]:
    """Writes ``prefix_00000.png``... and ``grid.png`` as one all-or-nothing group; existing files
    are replaced only with ``overwrite``."""
    names = sample_files(len(images), prefix)
    few_step.check_out_dir(out_dir, names, overwrite=overwrite)
    pixels = samplers.to_uint8(images)
    grid = few_step.viewable_grid(pixels, int(np.ceil(np.sqrt(len(pixels)))))
    encoded = [atomic.png_bytes(image) for image in pixels] + [atomic.png_bytes(grid)]
    return atomic.write_files({os.path.join(out_dir, n): data for n, data in zip(names, encoded, strict=True)})
