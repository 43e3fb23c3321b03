"""Many-step DDIM sampling from a trained unconditional model (or a converted text-to-image teacher).

``python -m codi_jax.sample_teacher --run=DIR --steps=50 --num_images=64 --out=DIR``
restores the latest checkpoint's EMA parameters (the config is read from the checkpoint) and
writes one PNG per sample plus ``grid.png`` (tiles enlarged to at least 128 px), all together or
not at all. Existing files in ``--out`` are replaced only with ``--overwrite``. Flags, ``--out`` and the run's
saved config are checked before any weight is read; a bad input ends with one line
``error: ...`` and exit code 2.

Latent / text teachers (a converted Stable Diffusion: ``config.latent`` / ``config.text``) sample
latents without clipping and decode them with the VAE; ``--prompt`` (default
``config.text.prompt``) conditions them, ``--guidance_scale`` (default 1: none) applies
classifier-free guidance against ``--negative_prompt``. These flags on a teacher without a text
encoder are a user error. An SDXL teacher encodes both prompts with its two text encoders (an
empty negative prompt is zeros where the pipeline has ``force_zeros_for_empty_prompt``, as diffusers'
default None) and samples at the time ids ``(H, W, 0, 0, H, W)``, as ``StableDiffusionXLPipeline`` does.
"""

from __future__ import annotations

from absl import flags

from codi_jax.cli import common

FLAGS = flags.FLAGS
common.define_run_flags("A teacher run (trained, or written by convert)")
common.define_out_flags("a PNG per sample and grid.png")
flags.DEFINE_integer("steps", 50, "DDIM steps (one count).")
flags.DEFINE_integer("num_images", 64, "Number of samples.")
flags.DEFINE_integer("batch_size", 64, "Samples per jitted call.")
flags.DEFINE_integer("seed", 0, "Noise seed.")
flags.DEFINE_string("prompt", None, "Text teachers: the prompt (default: the run's config.text.prompt).")
flags.DEFINE_string(
    "negative_prompt", None, "Text teachers: the unconditional prompt of CFG (default: config.text.negative_prompt)."
)
flags.DEFINE_float("guidance_scale", 1.0, "Text teachers: classifier-free guidance scale (1 = no guidance).")
common.define_distributed_flags()
RENAMED_FLAGS = {"workdir": "run", "use_ema": "ema", "step": "checkpoint_step"}


def main(argv: list[str]) -> None:
    common.no_arguments(argv)
    common.require_flags("run", "out")
    common.initialize_distributed()
    from codi_jax.sampling import many_step  # heavy (JAX, TF): imported once the flags are known good

    request = dict(
        steps=FLAGS.steps, num_images=FLAGS.num_images, batch_size=FLAGS.batch_size, step=FLAGS.checkpoint_step
    )
    text = dict(prompt=FLAGS.prompt, negative_prompt=FLAGS.negative_prompt, guidance_scale=FLAGS.guidance_scale)
    many_step.check_request(FLAGS.run, FLAGS.out, **request, **text, overwrite=FLAGS.overwrite)
    images = many_step.sample_images(FLAGS.run, seed=FLAGS.seed, use_ema=FLAGS.ema, **request, **text)
    import jax

    if jax.process_index() == 0:  # every process holds every sample; one writes them
        paths = many_step.write_images(images, FLAGS.out, overwrite=FLAGS.overwrite)
        print(f"Wrote {len(paths) - 1} samples and {paths[-1]}")


def console() -> None:
    """The ``codi-...`` console script."""
    common.run_main(main)


if __name__ == "__main__":
    console()
