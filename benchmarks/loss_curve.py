"""Prints a training run's loss curve from its TensorBoard events as a markdown table.

python benchmarks/loss_curve.py WORKDIR [--tag train/loss] [--rows 12]
"""

import argparse
import glob
import os

import numpy as np
import tensorflow as tf


def read_scalars(workdir: str, tag: str) -> dict[int, float]:
    values: dict[int, float] = {}
    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == tag:
                    number = value.simple_value if value.HasField("simple_value") else tf.make_ndarray(value.tensor)
                    values[event.step] = float(number)  # a resumed run's later value wins
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workdir")
    parser.add_argument("--tag", default="train/loss")
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    values = read_scalars(args.workdir, args.tag)
    if not values:
        raise SystemExit(f"No '{args.tag}' scalars in {args.workdir}.")
    steps = np.array(sorted(values))
    losses = np.array([values[s] for s in steps])
    edges = np.unique(np.linspace(0, len(steps), args.rows + 1).astype(int))
    print(f"| steps | mean {args.tag} |\n|---|---|")
    for lo, hi in zip(edges[:-1], edges[1:]):
        print(f"| {steps[lo]}–{steps[hi - 1]} | {losses[lo:hi].mean():.4f} |")


if __name__ == "__main__":
    main()
