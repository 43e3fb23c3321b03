"""Many-step DDIM sampling from a trained unconditional model.

``python -m codi_jax.sample_teacher --workdir=DIR --steps=50 --num_images=64 --out=DIR``
restores the latest checkpoint's EMA parameters (the config is read from the checkpoint) and
writes one PNG per sample plus ``grid.png``. Existing files in ``--out`` are never overwritten.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from absl import app, flags, logging
from PIL import Image

from codi_jax import sampling
from codi_jax.pretrained import load_teacher

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).")
flags.DEFINE_string("out", None, "Output directory for PNGs (must not contain earlier samples).")
flags.DEFINE_integer("steps", 50, "DDIM steps.")
flags.DEFINE_integer("num_images", 64, "Number of samples.")
flags.DEFINE_integer("batch_size", 64, "Samples per jitted call.")
flags.DEFINE_integer("seed", 0, "Noise seed.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_bool("use_ema", True, "Sample with the EMA parameters.")
flags.mark_flags_as_required(["workdir", "out"])


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


def write_images(images: np.ndarray, out_dir: str, prefix: str = "sample") -> list[str]:
    """Writes ``prefix_00000.png``... and ``grid.png``; refuses to overwrite existing files."""
    os.makedirs(out_dir, exist_ok=True)
    names = [f"{prefix}_{i:05d}.png" for i in range(len(images))] + ["grid.png"]
    clashes = [n for n in names if os.path.exists(os.path.join(out_dir, n))]
    if clashes:
        raise FileExistsError(
            f"{out_dir} already holds {clashes[:3]}{'...' if len(clashes) > 3 else ''}; "
            "choose another --out (nothing was overwritten)."
        )
    pixels = sampling.to_uint8(images)
    paths = []
    for name, img in zip(names, pixels):
        paths.append(os.path.join(out_dir, name))
        Image.fromarray(img).save(paths[-1])
    grid_path = os.path.join(out_dir, "grid.png")
    Image.fromarray(sampling.make_grid(pixels)).save(grid_path)
    return paths + [grid_path]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    images = sample_images(
        FLAGS.workdir,
        steps=FLAGS.steps,
        num_images=FLAGS.num_images,
        batch_size=FLAGS.batch_size,
        seed=FLAGS.seed,
        step=FLAGS.step,
        use_ema=FLAGS.use_ema,
    )
    paths = write_images(images, FLAGS.out)
    logging.info("Wrote %d images and %s.", len(paths) - 1, paths[-1])
    print(f"Wrote {len(paths) - 1} samples and {paths[-1]}")


if __name__ == "__main__":
    app.run(main)
