"""Sampling a held-out set with a conditional checkpoint and scoring it against the targets.

``held_out_examples`` gives the task's fixed (seeded) conditions for the eval split or a folder;
``evaluate_checkpoint`` samples them at each requested step count and returns one row per
(method, steps) with PSNR / SSIM (and the mean time per image of the jitted sampler, measured
after a warm-up call, so compile time is excluded).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from codi_jax import adapted, few_step, metrics, recipes
from codi_jax.data import pipeline, tasks
from codi_jax.pretrained import ConditionalPretrained, load_conditional


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
    solver: str = "ddim",
) -> tuple[np.ndarray, float]:
    """Samples for every example and the mean wall time per image (ms, after warm-up)."""
    times = jnp.asarray(recipes.sample_times(pre.config, num_steps) if times is None else times)
    sampler = recipes.make_conditional_sampler(pre.model, pre.schedule, pre.parametrization, solver)
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
    solver: str = "ddim",
) -> list[Row]:
    trained = adapted.trainable_param_count(pre.model, pre.params)
    rows = []
    for num_steps in step_counts:
        samples, ms = sample_all(pre, examples, num_steps, seed=seed, batch_size=batch_size, solver=solver)
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
    solver: str = "ddim",
) -> list[Row]:
    loaded = [(name, load_conditional(workdir)) for name, workdir in runs]
    reference = loaded[0][1].config
    for name, pre in loaded[1:]:
        if dict(pre.config.task) != dict(reference.task) or pre.config.data.image_size != reference.data.image_size:
            raise ValueError(f"Run {name!r} was trained on another task or image size than {loaded[0][0]!r}.")
    if images:
        _, clean = few_step.load_images(images, int(reference.data.image_size))
        examples = tasks.degrade_images(reference.task, clean, seed)
    else:
        examples = held_out_examples(reference, num_eval, seed=seed)
    rows = []
    for name, pre in loaded:
        rows += evaluate_checkpoint(pre, examples, step_counts, name, seed=seed, batch_size=batch_size, solver=solver)
    return rows


def write_results(rows: list[Row], out_dir: str, header: str = "") -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")
    clashes = [p for p in paths if os.path.exists(p)]
    if clashes:
        raise FileExistsError(f"{clashes} already exist; choose another --out (nothing was overwritten).")
    with open(paths[0], "w") as f:
        json.dump([{k: v for k, v in dataclasses.asdict(r).items() if k != "samples"} for r in rows], f, indent=2)
    with open(paths[1], "w") as f:
        f.write((header + "\n\n" if header else "") + markdown_table(rows) + "\n")
    return paths
