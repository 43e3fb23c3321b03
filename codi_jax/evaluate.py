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

import dataclasses
import json
import os

from absl import app, flags

from codi_jax import evaluation, sample
from codi_jax.data import tasks
from codi_jax.pretrained import load_conditional

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("run", None, "NAME=WORKDIR of a codi / finetune run; repeatable.")
flags.DEFINE_list("steps", ["1", "2", "4"], "Step counts to sample at (CoDi runs: at most the grid size).")
flags.DEFINE_string("images", None, "Folder of clean images to use instead of the eval split.")
flags.DEFINE_integer("num_eval", 256, "Held-out examples (eval split).")
flags.DEFINE_integer("seed", 0, "Seed of the degradations and the sampling noise.")
flags.DEFINE_integer("batch_size", 64, "Images per jitted sampling call.")
flags.DEFINE_string("out", None, "Output directory for results.json / results.md.")
flags.mark_flags_as_required(["run", "out"])


def parse_runs(specs: list[str]) -> list[tuple[str, str]]:
    runs = []
    for spec in specs:
        name, sep, workdir = spec.partition("=")
        if not sep or not name or not workdir:
            raise ValueError(f"--run {spec!r} is not NAME=WORKDIR.")
        runs.append((name, workdir))
    return runs


def evaluate_runs(
    runs: list[tuple[str, str]],
    step_counts: tuple[int, ...],
    *,
    images: str | None = None,
    num_eval: int = 256,
    seed: int = 0,
    batch_size: int = 64,
) -> list[evaluation.Row]:
    loaded = [(name, load_conditional(workdir)) for name, workdir in runs]
    reference = loaded[0][1].config
    for name, pre in loaded[1:]:
        if dict(pre.config.task) != dict(reference.task) or pre.config.data.image_size != reference.data.image_size:
            raise ValueError(f"Run {name!r} was trained on another task or image size than {loaded[0][0]!r}.")
    if images:
        _, clean = sample.load_images(images, int(reference.data.image_size))
        examples = tasks.degrade_images(reference.task, clean, seed)
    else:
        examples = evaluation.held_out_examples(reference, num_eval, seed=seed)
    rows = []
    for name, pre in loaded:
        rows += evaluation.evaluate_checkpoint(pre, examples, step_counts, name, seed=seed, batch_size=batch_size)
    return rows


def write_results(rows: list[evaluation.Row], out_dir: str, header: str = "") -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")
    clashes = [p for p in paths if os.path.exists(p)]
    if clashes:
        raise FileExistsError(f"{clashes} already exist; choose another --out (nothing was overwritten).")
    with open(paths[0], "w") as f:
        json.dump([{k: v for k, v in dataclasses.asdict(r).items() if k != "samples"} for r in rows], f, indent=2)
    with open(paths[1], "w") as f:
        f.write((header + "\n\n" if header else "") + evaluation.markdown_table(rows) + "\n")
    return paths


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    step_counts = tuple(int(s) for s in FLAGS.steps)
    rows = evaluate_runs(
        parse_runs(FLAGS.run),
        step_counts,
        images=FLAGS.images,
        num_eval=FLAGS.num_eval,
        seed=FLAGS.seed,
        batch_size=FLAGS.batch_size,
    )
    write_results(rows, FLAGS.out)
    print(evaluation.markdown_table(rows))
    print(f"Means over {len(rows[0].samples) if rows else 0} held-out images (seed {FLAGS.seed}); wrote {FLAGS.out}.")


if __name__ == "__main__":
    app.run(main)
