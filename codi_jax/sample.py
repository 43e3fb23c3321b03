"""Few-step conditional sampling from a CoDi (or fine-tuned) checkpoint.

``python -m codi_jax.sample --workdir=DIR --steps=4 --cond=PATH_OR_DIR --out=DIR``

Restores the latest (EMA) checkpoint of ``--workdir`` (its saved config rebuilds the model and
names the task) and writes one PNG per input plus ``grid.png`` (condition | sample [| target]).

``--input=clean`` (default): the inputs are clean photographs; each is resized (shorter side)
and centre-cropped to the model's size and the task's degradation is applied with ``--seed``
(how held-out sets are made), so the grid can show the ground truth beside the sample.
``--input=condition``: the inputs are the conditions themselves: a low-resolution image for
``sr`` (resized to size / scale, then bicubic back up, as in training) or a single-channel map
(edges, depth; white = edge / near) for ``edge`` / ``depth``.

Steps: CoDi samples on its training grid, so ``--steps`` above the grid size is an error;
between steps the sample re-noises with fresh noise (``--stochastic``; CoDi's default, see
``codi.renoise``) or moves deterministically (DDIM, ``--nostochastic``). Existing files in
``--out`` are never overwritten.
"""

from __future__ import annotations

from absl import app, flags, logging

from codi_jax import few_step

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "CoDi / fine-tune training workdir (holds checkpoints/).")
flags.DEFINE_string("cond", None, "An image file or a directory of images (see --input).")
flags.DEFINE_string("out", None, "Output directory (must not contain earlier outputs).")
flags.DEFINE_integer("steps", 4, "Sampling steps (1, 2, 4, 8, ...; at most the training grid size for CoDi).")
flags.DEFINE_enum("input", "clean", ["clean", "condition"], "What --cond holds (see the module docstring).")
flags.DEFINE_bool(
    "stochastic",
    None,
    "Re-noise with fresh noise between steps (true) or move by DDIM (false); default: the run's "
    "config (CoDi runs: codi.renoise, true unless changed; fine-tuned models: DDIM).",
)
flags.DEFINE_integer("seed", 0, "Seed of the initial noise, re-noising and (--input=clean) the degradation.")
flags.DEFINE_integer("batch_size", 32, "Images per jitted call.")
flags.DEFINE_integer("instruction", 0, "Instruction id for the edit task.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_bool("use_ema", True, "Sample with the EMA parameters.")
flags.mark_flags_as_required(["workdir", "cond", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    paths = few_step.run(
        FLAGS.workdir,
        FLAGS.cond,
        FLAGS.out,
        steps=FLAGS.steps,
        input_kind=FLAGS.input,
        stochastic=FLAGS.stochastic,
        seed=FLAGS.seed,
        batch_size=FLAGS.batch_size,
        instruction=FLAGS.instruction,
        step=FLAGS.step,
        use_ema=FLAGS.use_ema,
    )
    logging.info("Wrote %d samples and %s.", len(paths) - 1, paths[-1])
    print(f"Wrote {len(paths) - 1} samples and {paths[-1]}")


if __name__ == "__main__":
    app.run(main)
