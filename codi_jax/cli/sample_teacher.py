"""Many-step DDIM sampling from a trained unconditional model (or a converted text-to-image teacher).

``python -m codi_jax.sample_teacher --workdir=DIR --steps=50 --num_images=64 --out=DIR``
restores the latest checkpoint's EMA parameters (the config is read from the checkpoint) and
writes one PNG per sample plus ``grid.png`` (tiles enlarged to at least 128 px), all together or
not at all. Existing files in ``--out`` are never overwritten. Flags, ``--out`` and the run's
saved config are checked before any weight is read; a bad input ends with one line
``error: ...`` and exit code 2.

Latent / text teachers (a converted Stable Diffusion: ``config.latent`` / ``config.text``) sample
latents without clipping and decode them with the VAE; ``--prompt`` (default
``config.text.prompt``) conditions them, ``--guidance_scale`` (default 1: none) applies
classifier-free guidance against ``--negative_prompt``. These flags on a teacher without a text
encoder are a user error.
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
from absl import flags

from codi_jax import atomic
from codi_jax.cli import common
from codi_jax.frozen import encoders
from codi_jax.models import networks
from codi_jax.runs.pretrained import Pretrained, load_teacher, read_config
from codi_jax.sampling import few_step, guidance, samplers

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).")
flags.DEFINE_string("out", None, "Output directory for PNGs (must not contain earlier samples).")
flags.DEFINE_integer("steps", 50, "DDIM steps.")
flags.DEFINE_integer("num_images", 64, "Number of samples.")
flags.DEFINE_integer("batch_size", 64, "Samples per jitted call.")
flags.DEFINE_integer("seed", 0, "Noise seed.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_bool("use_ema", True, "Sample with the EMA parameters.")
flags.DEFINE_string("prompt", None, "Text teachers: the prompt (default: the run's config.text.prompt).")
flags.DEFINE_string(
    "negative_prompt", None, "Text teachers: the unconditional prompt of CFG (default: config.text.negative_prompt)."
)
flags.DEFINE_float("guidance_scale", 1.0, "Text teachers: classifier-free guidance scale (1 = no guidance).")


def _context_apply(model: Any, params: Any, z_t: jax.Array, model_t: jax.Array, context: Any) -> jax.Array:
    return model.apply({"params": params}, z_t, model_t, context)


def _text_contexts(
    enc: encoders.Encoders, config: Any, batch: int, prompt: str | None, negative_prompt: str | None, scale: float
) -> tuple[jax.Array, jax.Array | None]:
    """``(context, uncond_context or None)`` for ``batch`` samples of one prompt (None: no CFG)."""
    prompt = config.text.get("prompt", "") if prompt is None else prompt
    negative = config.text.get("negative_prompt", "") if negative_prompt is None else negative_prompt
    context = encoders.encode_prompts(enc, [prompt] * batch)
    return context, (None if scale == 1.0 else encoders.encode_prompts(enc, [negative] * batch))


def _first(tree: Any, n: int) -> Any:
    """The first ``n`` examples of every leaf (None stays None)."""
    return None if tree is None else jax.tree_util.tree_map(lambda leaf: leaf[:n], tree)


def _latent_text_sampler(pre: Pretrained, steps: int, batch: int, text: dict[str, Any]) -> Callable:
    """``noise -> images`` for a latent and / or text teacher: guided DDIM (unclipped latents), VAE decode."""
    enc = encoders.load_encoders(pre.config)
    context, uncond = (None, None)
    if enc.has_text:
        context, uncond = _text_contexts(enc, pre.config, batch, **text)
    ddim = jax.jit(
        functools.partial(
            samplers.ddim_sample,
            guidance.guided_apply(functools.partial(_context_apply, pre.model)),
            times=samplers.uniform_times(steps),
            schedule=pre.schedule,
            parametrization=pre.parametrization,
            clip_denoised=not enc.is_latent,
        )
    )
    decode = jax.jit(functools.partial(encoders.decode_latents, enc.vae)) if enc.is_latent else None

    def sample(noise: jax.Array) -> np.ndarray:
        n = noise.shape[0]
        guided = guidance.Guided(pre.params, _first(context, n), _first(uncond, n), jnp.float32(text["scale"]))
        out = ddim(guided, noise)
        if decode is not None:
            out = jnp.clip(decode(enc.vae_params, out), -1.0, 1.0)
        return np.asarray(out)

    return sample


def _pixel_sampler(pre: Pretrained, steps: int) -> Callable:
    """``noise -> images`` for a pixel teacher without text: DDIM with x_hat clipped to [-1, 1]."""

    def apply_fn(params, z_t, model_t):
        return pre.model.apply({"params": params}, z_t, model_t)

    sampler = jax.jit(
        functools.partial(
            samplers.ddim_sample,
            apply_fn,
            times=samplers.uniform_times(steps),
            schedule=pre.schedule,
            parametrization=pre.parametrization,
        )
    )
    return lambda noise: np.asarray(sampler(pre.params, noise))


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
    ``negative_prompt`` when ``guidance_scale != 1`` (one network call on the doubled batch).
    """
    pre = load_teacher(workdir, step=step, use_ema=use_ema)
    check_text_flags(pre.config, workdir, prompt, negative_prompt, guidance_scale)
    size = networks.model_input_size(pre.config)
    channels = pre.config.model.out_channels
    if encoders.is_latent(pre.config) or encoders.has_text(pre.config):
        text = dict(prompt=prompt, negative_prompt=negative_prompt, scale=guidance_scale)
        sample = _latent_text_sampler(pre, steps, min(batch_size, num_images), text)
    else:
        sample = _pixel_sampler(pre, steps)
    samples, _ = samplers.sample_in_batches(
        lambda _, z_init, __: sample(z_init),
        num_images,
        (size, size, channels),
        seed=seed,
        renoise=False,
        batch_size=batch_size,
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
            raise ValueError(f"--{flag}: the teacher in --workdir {workdir} has no text encoder (config.text.encoder).")
    if guidance_scale != 1.0:
        raise ValueError(
            f"--guidance_scale={guidance_scale}: the teacher in --workdir {workdir} has no text encoder "
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
) -> None:
    """Every check of a sampling request before any weight is read (the run's saved config only)."""
    for flag, value in (("steps", steps), ("num_images", num_images), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"--{flag}={value}: must be at least 1.")
    few_step.check_out_dir(out_dir, sample_files(num_images))
    config, _ = read_config(workdir, step, what="--workdir")
    if networks.is_conditional(config):
        raise ValueError(
            f"--workdir {workdir} holds a conditional {config.method!r} run; sample it with python -m codi_jax.sample."
        )
    check_text_flags(config, workdir, prompt, negative_prompt, guidance_scale)
    encoders.check_encoder_paths(config)


def write_images(images: np.ndarray, out_dir: str, prefix: str = "sample") -> list[str]:
    """Writes ``prefix_00000.png``... and ``grid.png`` as one all-or-nothing group; refuses to
    overwrite existing files."""
    names = sample_files(len(images), prefix)
    few_step.check_out_dir(out_dir, names)
    pixels = samplers.to_uint8(images)
    grid = few_step.viewable_grid(pixels, int(np.ceil(np.sqrt(len(pixels)))))
    encoded = [atomic.png_bytes(image) for image in pixels] + [atomic.png_bytes(grid)]
    return atomic.write_files({os.path.join(out_dir, n): data for n, data in zip(names, encoded, strict=True)})


def main(argv: list[str]) -> None:
    common.no_arguments(argv)
    common.require_flags("workdir", "out")
    request = dict(steps=FLAGS.steps, num_images=FLAGS.num_images, batch_size=FLAGS.batch_size, step=FLAGS.step)
    text = dict(prompt=FLAGS.prompt, negative_prompt=FLAGS.negative_prompt, guidance_scale=FLAGS.guidance_scale)
    check_request(FLAGS.workdir, FLAGS.out, **request, **text)
    images = sample_images(FLAGS.workdir, seed=FLAGS.seed, use_ema=FLAGS.use_ema, **request, **text)
    paths = write_images(images, FLAGS.out)
    print(f"Wrote {len(paths) - 1} samples and {paths[-1]}")


if __name__ == "__main__":
    common.run_main(main)
