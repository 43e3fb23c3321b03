"""``python -m codi_jax.convert --diffusers=DIR --workdir=OUT [--controlnet=DIR] [--overwrite]``: a local
diffusers pipeline (or UNet folder) as a teacher workdir that ``config.teacher_workdir=OUT`` and
``pretrained.load_teacher(OUT)`` read; see ``codi_jax.converting``."""

from __future__ import annotations

from absl import flags

from codi_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "diffusers",
    None,
    "A local diffusers pipeline folder (model_index.json) or a UNet2DModel / UNet2DConditionModel folder.",
)
flags.DEFINE_string("workdir", None, "Output teacher workdir (must not exist or be empty, unless --overwrite).")
flags.DEFINE_string(
    "controlnet", None, "A local diffusers ControlNetModel folder to convert too (into OUT/controlnet/)."
)
flags.DEFINE_bool("overwrite", False, "Replace an existing --workdir.")


def main(argv: list[str]) -> None:
    cli.no_arguments(argv)
    cli.require_flags("diffusers", "workdir")
    from codi_jax import converting  # after the flag checks; it checks every path before loading a model

    summary = converting.convert(
        FLAGS.diffusers, FLAGS.workdir, controlnet=FLAGS.controlnet or None, overwrite=FLAGS.overwrite
    )
    print("\n".join(converting.summary_lines(summary)))


if __name__ == "__main__":
    cli.run_main(main)
