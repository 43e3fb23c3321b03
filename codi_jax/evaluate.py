"""Evaluate conditional checkpoints on a held-out set.

``python -m codi_jax.evaluate --run=CoDi=DIR --run=baseline=DIR2 --steps=1,2,4 --out=DIR``

Each ``--run`` is ``NAME=WORKDIR`` of a ``codi`` or ``finetune`` run (latest EMA checkpoint).
The held-out set is the first ``--num_eval`` examples of the config's eval split, or the clean
images in ``--images=DIR`` (resized and centre-cropped), with the task's degradation applied
with ``--seed`` so every run sees identical conditions (the first run's task defines them; runs
of another task are an error). Writes ``results.json`` and ``results.md`` in ``--out`` (never
overwriting) and prints the table.
"""

from __future__ import annotations

from absl import app, flags, logging

from codi_jax import evaluation

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("run", None, "NAME=WORKDIR of a codi / finetune run; repeatable.")
flags.DEFINE_list("steps", ["1", "2", "4"], "Step counts to sample at (CoDi runs: at most the grid size).")
flags.DEFINE_string("images", None, "Folder of clean images to use instead of the eval split.")
flags.DEFINE_integer("num_eval", 256, "Held-out examples (eval split).")
flags.DEFINE_integer("seed", 0, "Seed of the degradations and the sampling noise.")
flags.DEFINE_integer("batch_size", 64, "Images per jitted sampling call.")
flags.DEFINE_enum("solver", "ddim", ["ddim", "dpm++"], "Sampler between steps (dpm++: DPM-Solver++(2M)).")
flags.DEFINE_bool(
    "renoise", None, "DDIM solver: re-noise between steps (true) or not (false); default: each run's config."
)
flags.DEFINE_string("out", None, "Output directory for results.json / results.md.")
flags.DEFINE_string("inception_weights", None, "Local pytorch-fid Inception weights (FID, KID); else skipped.")
flags.DEFINE_string("lpips_linear_weights", None, "Local LPIPS v0.1 AlexNet linear-head weights; else skipped.")
flags.DEFINE_string("lpips_backbone_weights", None, "Local AlexNet feature weights for LPIPS; else skipped.")
flags.mark_flags_as_required(["run", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    step_counts = tuple(int(s) for s in FLAGS.steps)
    weights = evaluation.MetricWeights(
        FLAGS.inception_weights, FLAGS.lpips_linear_weights, FLAGS.lpips_backbone_weights
    )
    for skipped in weights.skipped():
        logging.warning("Skipped: %s.", skipped)
    rows = evaluation.evaluate_runs(
        evaluation.parse_runs(FLAGS.run),
        step_counts,
        images=FLAGS.images,
        num_eval=FLAGS.num_eval,
        seed=FLAGS.seed,
        batch_size=FLAGS.batch_size,
        solver=FLAGS.solver,
        renoise=FLAGS.renoise,
        weights=weights,
    )
    evaluation.write_results(rows, FLAGS.out)
    print(evaluation.markdown_table(rows))
    print(f"Means over {len(rows[0].samples) if rows else 0} held-out images (seed {FLAGS.seed}); wrote {FLAGS.out}.")


if __name__ == "__main__":
    app.run(main)
