"""``python -m codi_jax.export --run=RUN --out=DIR [--overwrite] [--steps=4]``: a trained run (EMA
weights) as a diffusers folder; see ``codi_jax.interop.export``."""

from __future__ import annotations

from absl import flags

from codi_jax.cli import common

FLAGS = flags.FLAGS
common.define_run_flags("A CoDi / fine-tune or teacher run")
common.define_out_flags("the diffusers folder (must not exist or be empty, unless --overwrite)")
flags.DEFINE_integer("steps", 4, "The step count whose timesteps the exported README and sampler use (one count).")
RENAMED_FLAGS = {"workdir": "run", "use_ema": "ema", "step": "checkpoint_step"}


def main(argv: list[str]) -> None:
    common.no_arguments(argv)
    common.require_flags("run", "out")
    from codi_jax.interop.export import export_workdir  # after the flag checks: heavy imports

    paths = export_workdir(FLAGS.run, FLAGS.out, **common.flag_values("steps", "overwrite", "checkpoint_step", "ema"))
    print(f"Wrote {len(paths)} files to {FLAGS.out}")


def console() -> None:
    """The ``codi-...`` console script."""
    common.run_main(main)


if __name__ == "__main__":
    console()
