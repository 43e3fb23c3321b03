"""The held-out examples an evaluation scores: the eval split's first examples, or a folder of clean
images, degraded by the run's task with a fixed seed (the same conditions for every run and seed)."""

from __future__ import annotations

import ml_collections
import numpy as np

from codi_jax.data import pipeline, tasks
from codi_jax.sampling import few_step


def held_out_examples(config: ml_collections.ConfigDict, num: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The first ``num`` examples of the eval split with the task applied (padding removed)."""
    ds = pipeline.build_dataset(
        config.data, config.data.eval_split, min(num, 256), seed=seed, train=False, task_config=config.task
    )
    parts: dict[str, list] = {}
    count = 0
    for batch in pipeline.numpy_iterator(ds):
        keep = batch["mask"]
        for key in ("image", "cond", "instruction"):
            if key in batch:
                parts.setdefault(key, []).append(batch[key][keep])
        count += int(keep.sum())
        if count >= num:
            break
    return {key: np.concatenate(value)[:num] for key, value in parts.items()}


def evaluation_examples(
    config: ml_collections.ConfigDict, *, images: str | None = None, num_eval: int = 256, seed: int = 0
) -> dict[str, np.ndarray]:
    """The held-out set: the clean images of folder ``images`` degraded with ``seed``, else the
    first ``num_eval`` examples of the eval split."""
    if images:
        _, clean = few_step.load_images(images, int(config.data.image_size), flag="--images")
        return tasks.degrade_images(config.task, clean, seed)
    if num_eval < 1:
        raise ValueError(f"--num_eval={num_eval}: must be at least 1.")
    return held_out_examples(config, num_eval, seed=seed)
