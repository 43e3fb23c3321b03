"""Many-step DDIM sampling from a trained unconditional model.

``python -m codi_jax.sample_teacher --workdir=DIR --steps=50 --num_images=64 --out=DIR``
restores the latest checkpoint's EMA parameters (the config is read from the checkpoint) and
writes one PNG per sample plus ``grid.png`` (tiles enlarged to at least 128 px), all together or
not at all. Existing files in ``--out`` are never overwritten. Flags, ``--out`` and the run's
saved config are checked before any weight is read; a bad input ends with one line
``error: ...`` and exit code 2.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from absl import flags

from codi_jax import atomic, cli, few_step, networks, sampling
from codi_jax.pretrained import load_teacher, read_config

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).")
flags.DEFINE_string("out", None, "Output directory for PNGs (must not contain earlier samples).")
flags.DEFINE_integer("steps", 50, "DDIM steps.")
flags.DEFINE_integer("num_images", 64, "Number of samples.")
flags.DEFINE_integer("batch_size", 64, "Samples per jitted call.")
flags.DEFINE_integer("seed", 0, "Noise seed.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_bool("use_ema", True, "Sample with the EMA parameters.")


def sample_images(
    workdir: str,
    *,
    steps: int,
    num_images: int,
    batch_size: int,
    seed: int,
    step: int | None = None,
    use_ema: bool = True,
) -> np.ndarray:
    """``num_images`` samples in [-1, 1] (NHWC float32) from ``workdir``'s checkpoint."""
    pre = load_teacher(workdir, step=step, use_ema=use_ema)
    size = pre.config.data.image_size
    channels = pre.config.model.out_channels
    times = sampling.uniform_times(steps)

    def apply_fn(params, z_t, model_t):
        return pre.model.apply({"params": params}, z_t, model_t)

    sampler = jax.jit(
        functools.partial(
            sampling.ddim_sample, apply_fn, times=times, schedule=pre.schedule, parametrization=pre.parametrization
        )
    )
    rng = jax.random.PRNGKey(seed)
    out = []
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        noise = jax.random.normal(jax.random.fold_in(rng, start), (n, size, size, channels))
        out.append(np.asarray(sampler(pre.params, noise)))
    return np.concatenate(out)


def sample_files(num_images: int, prefix: str = "sample") -> list[str]:
    """``prefix_00000.png``... and ``grid.png``."""
    return [f"{prefix}_{i:05d}.png" for i in range(num_images)] + ["grid.png"]


def check_request(
    workdir: str, out_dir: str, *, steps: int, num_images: int, batch_size: int, step: int | None = None
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


def write_images(images: np.ndarray, out_dir: str, prefix: str = "sample") -> list[str]:
    """Writes ``prefix_00000.png``... and ``grid.png`` as one all-or-nothing group; refuses to
    overwrite existing files."""
    names = sample_files(len(images), prefix)
    few_step.check_out_dir(out_dir, names)
    pixels = sampling.to_uint8(images)
    grid = few_step.viewable_grid(pixels, int(np.ceil(np.sqrt(len(pixels)))))
    encoded = [atomic.png_bytes(image) for image in pixels] + [atomic.png_bytes(grid)]
    return atomic.write_files({os.path.join(out_dir, n): data for n, data in zip(names, encoded, strict=True)})


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    cli.require_flags("workdir", "out")
    request = dict(steps=FLAGS.steps, num_images=FLAGS.num_images, batch_size=FLAGS.batch_size, step=FLAGS.step)
    check_request(FLAGS.workdir, FLAGS.out, **request)
    images = sample_images(FLAGS.workdir, seed=FLAGS.seed, use_ema=FLAGS.use_ema, **request)
    paths = write_images(images, FLAGS.out)
    print(f"Wrote {len(paths) - 1} samples and {paths[-1]}")


if __name__ == "__main__":
    cli.run_main(main)
