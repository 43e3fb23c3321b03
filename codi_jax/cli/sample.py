"""Few-step conditional sampling from a CoDi (or fine-tuned) checkpoint.

``python -m codi_jax.sample --run=DIR --images=PATH_OR_DIR --out=DIR [--steps=1,2,4]``

Restores the latest (EMA) checkpoint of ``--run`` (its saved config rebuilds the model and
names the task) and writes one PNG per input plus ``grid.png`` (condition | sample [| target]).

``--input=clean`` (default): the inputs are clean photographs; each is resized (shorter side)
and centre-cropped to the model's size and the task's degradation is applied with ``--seed``
(how held-out sets are made), so the grid can show the ground truth beside the sample.
``--input=condition``: the inputs are the conditions themselves: a low-resolution image for
``sr`` (resized to size / scale, then bicubic back up, as in training) or a single-channel map
(edges, depth; white = edge / near) for ``edge`` / ``depth``.

Steps: CoDi samples on its training grid, so ``--steps`` above the grid size is an error;
between steps the sample re-noises with fresh noise (``--renoise``; CoDi's default, see
``codi.renoise``) or moves deterministically (DDIM, ``--norenoise``). Existing files in
``--out`` are replaced only with ``--overwrite``; all outputs are written together or not at all.
With several ``--steps`` each input gets ``<name>_<k>steps.png`` and the grid a column per count.

Large sets (e.g. 30k images for FID): ``--skip_existing`` keeps what ``--out`` already holds and
samples only the inputs whose files are missing, reading, sampling and writing ``--chunk_size``
inputs at a time (each file atomically; no grid), with a progress line (images/s, ETA) per batch;
rerun the same command after a stop and it resumes. Input i gets the same degradation and noise
as in one whole run. Each batch is split over every local device.
``--lowpass_consistency`` (off by default; beyond the paper, ILVR-style): after every step the
prediction's low frequencies (what the task's downscale sees) are replaced by the condition's, so the
sample's downscale equals the low-resolution input (``codi_jax.lowpass``); pixel-space
super-resolution runs only.

Every check (flags, ``--images`` and each image in it, ``--out``, ``--steps`` against the run's
saved config) runs before any weight is read or anything is compiled; a bad input ends with one
line ``error: ...`` and exit code 2 (``--verbose``: the traceback). Images not at the model's size
are resized with a note, or refused with ``--strict_size``. The library (JAX, TensorFlow) is
imported after the flags are checked, so ``--help`` and flag errors are immediate.
"""

from __future__ import annotations

from absl import flags

from codi_jax.cli import common

FLAGS = flags.FLAGS
common.define_run_flags("A CoDi / fine-tune run")
flags.DEFINE_string("images", None, "An image file or a directory of images (see --input).")
common.define_out_flags("a PNG per input and grid.png")
flags.DEFINE_list("steps", ["4"], "Step counts, e.g. 1,2,4 (each at most the training grid size for CoDi).")
flags.DEFINE_enum("input", "clean", ["clean", "condition"], "What --images holds (see the module docstring).")
flags.DEFINE_bool(
    "renoise",
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
common.define_dtype_flag()
flags.DEFINE_integer("instruction", 0, "Instruction id for the edit task.")
flags.DEFINE_bool("strict_size", False, "Refuse images not at the model's size instead of resizing them.")
flags.DEFINE_bool(
    "skip_existing",
    False,
    "Large sets: keep the samples --out already holds, sample the missing ones --chunk_size at a time (no grid).",
)
flags.DEFINE_integer("chunk_size", 256, "--skip_existing: inputs read, sampled and written at a time.")
flags.DEFINE_string("prompt", None, "Text prompt for a text-conditioned (Stable Diffusion) run; default: the run's.")
flags.DEFINE_float(
    "guidance_scale",
    None,
    "Classifier-free guidance scale w (text runs; 1 = none; default: the run's sample_guidance_scale). A "
    "CFG-distilled student (codi.cfg_range) reads w itself; other models are guided with two calls per step.",
)
common.define_distributed_flags()
RENAMED_FLAGS = {
    "workdir": "run",
    "cond": "images",
    "stochastic": "renoise",
    "use_ema": "ema",
    "step": "checkpoint_step",
}


def main(argv: list[str]) -> None:
    common.no_arguments(argv)
    common.require_flags("run", "images", "out")
    from codi_jax.sampling.options import parse_step_counts  # light: no JAX

    step_counts = parse_step_counts(",".join(FLAGS.steps))
    if FLAGS.chunk_size < 1:
        raise ValueError(f"--chunk_size={FLAGS.chunk_size}: must be at least 1.")
    common.initialize_distributed()
    from codi_jax.sampling import few_step  # heavy (JAX): imported once the flags are known good

    request = few_step.SampleRequest(
        FLAGS.run,
        FLAGS.images,
        FLAGS.out,
        step_counts,
        input_kind=FLAGS.input,
        overwrite=FLAGS.overwrite,
        skip_existing=FLAGS.skip_existing,
        **common.flag_values("instruction", "checkpoint_step", "strict_size"),
    )
    if FLAGS.skip_existing:
        paths = few_step.run_resumable(request, common.sampling_options(), FLAGS.chunk_size)
        if paths or _first_process():
            print(f"Wrote {len(paths)} samples to {FLAGS.out}")
        return
    paths = few_step.run(request, common.sampling_options())
    if paths:  # process 0 writes
        print(f"Wrote {len(paths) - 1} samples and {paths[-1]}")


def _first_process() -> bool:
    import jax

    return jax.process_index() == 0


def console() -> None:
    """The ``codi-...`` console script."""
    common.run_main(main)


if __name__ == "__main__":
    console()
