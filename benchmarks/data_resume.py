"""Time to the first training batch after resuming at step k: random access vs replaying.

A resumed run's input pipeline starts at its step directly (``build_dataset(start_batch=k)``:
record indices come from per-epoch permutations, so only the batches it yields are read and
augmented). Before, it rebuilt the stream and skipped the k batches already consumed, decoding
and augmenting every one of them; ``replay`` times exactly that on the same stream (build at 0,
``skip(k)``). Both print the seconds from building the dataset to holding batch k, and check
that the two batches are equal.

  python benchmarks/data_resume.py [--config=demo|folder] [--step=10000] [--replay_step=N]

``demo``: codi_jax/configs/cpu/codi_sr4.py's data and x4 SR task (skimage_patches/patches32, batch 16).
``folder``: the same task on a folder of 64 scikit-image photographs saved as PNGs (random
crops at native resolution), the layout of a user's own images. ``--replay_step`` (default
``--step``) bounds the replay, which takes minutes at 10,000 steps; the replay time at
``--step`` is then extrapolated linearly and printed as such.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from bench_host import cpu_model, usable_cores

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from codi_jax.configs.cpu import codi_sr4  # noqa: E402
from codi_jax.data import pipeline  # noqa: E402


def folder_of_photos(directory: str, count: int = 64) -> str:
    """``count`` PNGs cut from scikit-image's bundled colour photographs (96 to 256 px)."""
    import skimage.data
    from PIL import Image

    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    rng = np.random.default_rng(0)
    for index in range(count):
        photo = photos[index % len(photos)]
        size = int(rng.integers(96, 257))
        top = int(rng.integers(0, photo.shape[0] - size + 1))
        left = int(rng.integers(0, photo.shape[1] - size + 1))
        Image.fromarray(photo[top : top + size, left : left + size]).save(os.path.join(directory, f"{index}.png"))
    return directory


def first_batch(config, *, start: int, replay: bool) -> tuple[float, dict]:
    """Seconds from building the stream to holding batch ``start``, and that batch."""
    begin = time.perf_counter()
    dataset = pipeline.build_dataset(
        config.data,
        config.data.train_split,
        config.batch_size,
        seed=config.seed,
        train=True,
        task_config=config.task,
        start_batch=0 if replay else start,
    )
    if replay:
        dataset = dataset.skip(start)
    batch = next(pipeline.numpy_iterator(dataset))
    return time.perf_counter() - begin, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("demo", "folder"), default="demo")
    parser.add_argument("--step", type=int, default=10_000)
    parser.add_argument("--replay_step", type=int, default=None)
    args = parser.parse_args()
    replay_step = args.step if args.replay_step is None else min(args.replay_step, args.step)
    config = codi_sr4.get_config()
    with tempfile.TemporaryDirectory() as directory:
        if args.config == "folder":
            config.data.update(source="folder", folder=folder_of_photos(directory), random_crop=True)
        print(f"host: {cpu_model()}, {len(usable_cores())} cores; {args.config}: batch {config.batch_size}")
        first_batch(config, start=0, replay=False)  # Builds / warms the dataset's files.
        at_zero, _ = first_batch(config, start=0, replay=False)
        direct, batch = first_batch(config, start=replay_step, replay=False)
        replayed, reference = first_batch(config, start=replay_step, replay=True)
        equal = all(np.array_equal(batch[key], reference[key]) for key in batch)
        print(f"first batch at step 0:            {at_zero:8.2f} s")
        print(f"random access at step {replay_step:>6}:     {direct:8.2f} s")
        print(f"replay (skip) to step {replay_step:>6}:     {replayed:8.2f} s  (batches equal: {equal})")
        if replay_step != args.step:
            direct_at_step, _ = first_batch(config, start=args.step, replay=False)
            print(f"random access at step {args.step:>6}:     {direct_at_step:8.2f} s")
            print(f"replay to step {args.step}, linear:  {replayed * args.step / replay_step:8.1f} s (extrapolated)")


if __name__ == "__main__":
    main()
