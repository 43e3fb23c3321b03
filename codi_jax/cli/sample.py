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
``--out`` are never overwritten; all outputs are written together or not at all.
``--lowpass_consistency`` (off by default; beyond the paper, ILVR-style): after every step the
prediction's low frequencies (what the task's downscale sees) are replaced by the condition's, so the
sample's downscale equals the low-resolution input (``codi_jax.lowpass``); pixel-space
super-resolution runs only.

Every check (flags, ``--cond`` and each image in it, ``--out``, ``--steps`` against the run's
saved config) runs before any weight is read or anything is compiled; a bad input ends with one
line ``error: ...`` and exit code 2 (``--verbose``: the traceback). Images not at the model's size
are resized with a note, or refused with ``--strict_size``. The library (JAX, TensorFlow) is
imported after the flags are checked, so ``--help`` and flag errors are immediate.
"""

from __future__ import annotations

from absl import flags

from codi_jax.cli import common

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
flags.DEFINE_bool(
    "lowpass_consistency",
    False,
    "Super-resolution, pixel space: replace each step's low frequencies by the input's (ILVR-style, codi_jax.lowpass).",
)
flags.DEFINE_integer("seed", 0, "Seed of the initial noise, re-noising and (--input=clean) the degradation.")
flags.DEFINE_integer("batch_size", 32, "Images per jitted call.")
flags.DEFINE_integer("instruction", 0, "Instruction id for the edit task.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_bool("use_ema", True, "Sample with the EMA parameters.")
flags.DEFINE_bool("strict_size", False, "Refuse images not at the model's size instead of resizing them.")
flags.DEFINE_string("prompt", None, "Text prompt for a text-conditioned (Stable Diffusion) run; default: the run's.")
flags.DEFINE_float(
    "guidance_scale",
    None,
    "Classifier-free guidance scale w (text runs; 1 = none; default: the run's sample_guidance_scale). A "
    "CFG-distilled student (codi.cfg_range) reads w itself; other models are guided with two calls per step.",
)


def main(argv: list[str]) -> None:
    common.no_arguments(argv)
    common.require_flags("workdir", "cond", "out")
    common.require_positive(steps=FLAGS.steps, batch_size=FLAGS.batch_size)
    from codi_jax.sampling import few_step  # heavy (JAX, TF): imported once the flags are known good

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
        strict_size=FLAGS.strict_size,
        guidance_scale=FLAGS.guidance_scale,
        prompt=FLAGS.prompt,
        lowpass_consistency=FLAGS.lowpass_consistency,
    )
    print(f"Wrote {len(paths) - 1} samples and {paths[-1]}")


if __name__ == "__main__":
    common.run_main(main)
