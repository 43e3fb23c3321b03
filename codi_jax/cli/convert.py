"""``python -m codi_jax.convert --diffusers=DIR --out=OUT [--controlnet=DIR] [--variant=fp16] [--overwrite]``: a local
diffusers pipeline (or UNet folder) as a teacher workdir that ``config.teacher_workdir=OUT`` and
``pretrained.load_teacher(OUT)`` read; see ``codi_jax.interop.convert``."""

from __future__ import annotations

from absl import flags

from codi_jax.cli import common

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "diffusers",
    None,
    "A local diffusers pipeline folder (model_index.json) or a UNet2DModel / UNet2DConditionModel folder.",
)
common.define_out_flags("the teacher workdir (must not exist or be empty, unless --overwrite)")
flags.DEFINE_string(
    "controlnet", None, "A local diffusers ControlNetModel folder to convert too (into OUT/controlnet/)."
)
flags.DEFINE_string(
    "variant",
    None,
    "Read the weights of this diffusers variant (diffusion_pytorch_model.fp16.safetensors, model.fp16.safetensors), "
    "upcast to float32; every part must hold it. Without it a part holding no plain weights but exactly one variant "
    "uses that variant.",
)
RENAMED_FLAGS = {"workdir": "out"}


def main(argv: list[str]) -> None:
    common.no_arguments(argv)
    common.require_flags("diffusers", "out")
    from codi_jax.interop import convert  # after the flag checks; it checks every path before loading a model

    request = convert.ConversionRequest(
        FLAGS.diffusers,
        FLAGS.out,
        controlnet=FLAGS.controlnet or None,
        overwrite=FLAGS.overwrite,
        variant=FLAGS.variant or None,
    )
    print("\n".join(convert.summary_lines(convert.convert(request))))


def console() -> None:
    """The ``codi-...`` console script."""
    common.run_main(main)


if __name__ == "__main__":
    console()
