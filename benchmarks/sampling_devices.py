"""Few-step sampling throughput on N devices: ``few_step.conditional_sampler`` (what ``sample`` runs:
each batch split over every local device) on the committed fine-tuned x4 SR run, random
32x32 inputs made into x4 SR conditions.

Printed: images/s over ``--images`` inputs (median of ``--repeats`` calls after one warm-up call
that compiles), at ``--steps`` steps and ``--batch_size``.

  python benchmarks/sampling_devices.py --devices=1
  python benchmarks/sampling_devices.py --devices=8     # CPU: 8 simulated devices
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from train_throughput import _host_devices_from_argv

_host_devices_from_argv(sys.argv[1:])

import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_host import cpu_model, usable_cores  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

from codi_jax.runs.pretrained import load_conditional  # noqa: E402
from codi_jax.sampling import few_step  # noqa: E402
from codi_jax.sampling.options import SamplingOptions  # noqa: E402

RUN = os.path.join(REPO, "checkpoints", "finetune_sr4_color")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print(f"host: {cpu_model()}, {len(usable_cores())} usable cores; {jax.local_device_count()} device(s)")
    pre = load_conditional(RUN)
    size = int(pre.config.data.image_size)
    images = np.random.RandomState(0).uniform(-1.0, 1.0, (args.images, size, size, 3)).astype(np.float32)
    cond = few_step.conditions_from_images(pre.config.task, images)  # bicubic down and up again
    options = SamplingOptions(batch_size=args.batch_size)
    sample = few_step.conditional_sampler(pre, options)  # what sample runs: built once, compiled once per shape
    sample(cond[: args.batch_size], None, args.steps)  # compiles
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        sample(cond, None, args.steps)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(
        f"{args.images} images, {args.steps} steps, batch {args.batch_size} on {jax.local_device_count()} device(s): "
        f"{args.images / median:.1f} images/s (median of {args.repeats}: {median:.2f} s)"
    )


if __name__ == "__main__":
    main()
