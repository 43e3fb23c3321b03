"""``python -m codi_jax.export --workdir=RUN --out=DIR [--overwrite] [--steps=4]``: a trained run (EMA
weights) as a diffusers folder; see ``codi_jax.interop.export``."""

from __future__ import annotations

from absl import flags

from codi_jax.cli import common

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/): a CoDi / fine-tune or teacher run.")
flags.DEFINE_string("out", None, "Output folder (must not exist or be empty, unless --overwrite).")
flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
flags.DEFINE_integer("steps", 4, "Sampling steps whose timesteps the README lists.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_bool("use_ema", True, "Export the EMA parameters.")


def main(argv: list[str]) -> None:
    common.no_arguments(argv)
    common.require_flags("workdir", "out")
    from codi_jax.interop.export import export_workdir  # after the flag checks: heavy imports

    paths = export_workdir(
        FLAGS.workdir,
        FLAGS.out,
        steps=FLAGS.steps,
        overwrite=FLAGS.overwrite,
        step=FLAGS.step,
        use_ema=FLAGS.use_ema,
    )
    print(f"Wrote {len(paths)} files to {FLAGS.out}")


if __name__ == "__main__":
    common.run_main(main)
