"""Sampling a held-out set with a conditional checkpoint and scoring it against the targets.

``held_out_examples`` gives the task's fixed (seeded) conditions for the eval split or a folder;
``evaluate_checkpoint`` samples them at each requested step count and returns one row per
(method, steps) with PSNR / SSIM (and the mean time per image of the jitted sampler, measured
after a warm-up call, so compile time is excluded).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from codi_jax import adapted, metrics, recipes
from codi_jax.data import pipeline
from codi_jax.pretrained import ConditionalPretrained


@dataclasses.dataclass
class Row:
    method: str
    steps: int
    psnr: float
    ssim: float
    swd: float
    ms_per_image: float
    params_trained: int
    samples: np.ndarray = dataclasses.field(repr=False)


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


def psnr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) on the [0, 1] scale, predictions clipped to the data range."""
    return np.asarray(metrics.psnr(jnp.clip(jnp.asarray(x), -1.0, 1.0), jnp.asarray(y)))


def ssim(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-image SSIM (Wang et al.: Gaussian window sigma 1.5, RGB channels averaged)."""
    return np.asarray(metrics.ssim(jnp.clip(jnp.asarray(x), -1.0, 1.0), jnp.asarray(y)))


def swd(x: np.ndarray, y: np.ndarray) -> float:
    """Sliced Wasserstein distance (x1e3, averaged over Laplacian levels down to 16x16)."""
    return float(metrics.sliced_wasserstein_distance(np.clip(x, -1.0, 1.0), y, min_resolution=16).average)


def sample_all(
    pre: ConditionalPretrained,
    examples: dict[str, np.ndarray],
    num_steps: int,
    *,
    seed: int = 0,
    batch_size: int = 64,
    times: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """Samples for every example and the mean wall time per image (ms, after warm-up)."""
    times = jnp.asarray(recipes.sample_times(pre.config, num_steps) if times is None else times)
    sampler = recipes.make_conditional_sampler(pre.model, pre.schedule, pre.parametrization)
    cond, instruction = examples["cond"], examples.get("instruction")
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), examples["image"].shape, jnp.float32))
    outputs, elapsed = [], 0.0
    for start in range(0, len(cond), batch_size):
        sl = slice(start, start + batch_size)
        args = (pre.params, cond[sl], None if instruction is None else instruction[sl], noise[sl], times, None)
        if start == 0:
            jax.block_until_ready(sampler(*args))  # compile + warm-up, not timed
        t0 = time.perf_counter()
        outputs.append(np.asarray(jax.block_until_ready(sampler(*args))))
        elapsed += time.perf_counter() - t0
    return np.concatenate(outputs), 1000.0 * elapsed / len(cond)


def evaluate_checkpoint(
    pre: ConditionalPretrained,
    examples: dict[str, np.ndarray],
    step_counts: tuple[int, ...],
    method: str,
    *,
    seed: int = 0,
    batch_size: int = 64,
) -> list[Row]:
    trained = adapted.trainable_param_count(pre.model, pre.params)
    rows = []
    for num_steps in step_counts:
        samples, ms = sample_all(pre, examples, num_steps, seed=seed, batch_size=batch_size)
        rows.append(
            Row(
                method=method,
                steps=num_steps,
                psnr=float(np.mean(psnr(samples, examples["image"]))),
                ssim=float(np.mean(ssim(samples, examples["image"]))),
                swd=swd(samples, examples["image"]),
                ms_per_image=ms,
                params_trained=trained,
                samples=samples,
            )
        )
    return rows


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| method | steps | params trained | PSNR (dB) | SSIM | SWD x1e3 | ms / image |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.steps} | {r.params_trained:,} | {r.psnr:.2f} | {r.ssim:.4f} | {r.swd:.1f} "
            f"| {r.ms_per_image:.1f} |"
        )
    return "\n".join(lines)
