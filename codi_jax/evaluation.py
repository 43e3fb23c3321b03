"""Sampling a held-out set with a conditional checkpoint and scoring it against the targets.

``held_out_examples`` gives the task's fixed (seeded) conditions for the eval split or a folder;
``evaluate_checkpoint`` samples them at each requested step count and returns one row per
(method, steps) with PSNR / SSIM / SWD, plus FID / KID and LPIPS when their weights are given as
local files (``MetricWeights``; otherwise they are skipped with a message, never faked), and the
mean time per image of the jitted sampler, measured after a warm-up call (compile excluded).
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

from codi_jax import adapted, few_step, inference, metrics
from codi_jax.data import pipeline, tasks
from codi_jax.pretrained import Pretrained, load_conditional


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
    extra: dict = dataclasses.field(default_factory=dict)  # fid / kid / lpips when their weights were given


@dataclasses.dataclass(frozen=True)
class MetricWeights:
    """Local weight files of the metrics that need a pretrained network (None: metric skipped)."""

    inception: str | None = None  # pytorch-fid Inception (FID, KID)
    lpips_linear: str | None = None  # LPIPS v0.1 AlexNet linear heads
    lpips_backbone: str | None = None  # torchvision AlexNet features

    def names(self) -> list[str]:
        wanted = []
        if self.inception:
            wanted += ["fid", "kid"]
        if self.lpips_linear and self.lpips_backbone:
            wanted.append("lpips")
        return wanted

    def skipped(self) -> list[str]:
        missing = []
        if not self.inception:
            missing.append("FID/KID (no Inception weights given)")
        if not (self.lpips_linear and self.lpips_backbone):
            missing.append("LPIPS (no LPIPS weights given)")
        return missing


def weighted_metrics(samples: np.ndarray, targets: np.ndarray, weights: MetricWeights, seed: int = 0) -> dict:
    names = weights.names()
    if not names:
        return {}
    for path in (weights.inception, weights.lpips_linear, weights.lpips_backbone):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"Metric weights file {path} does not exist.")
    values = metrics.compute_metrics(
        samples,
        targets,
        names,
        seed=seed,
        inception_weights=weights.inception,
        kid_subset_size=min(1000, len(samples)),
        lpips_linear_weights=weights.lpips_linear,
        lpips_backbone_weights=weights.lpips_backbone,
    )
    return {name: values[name] for name in names if name in values}


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
    pre: Pretrained,
    examples: dict[str, np.ndarray],
    num_steps: int,
    *,
    seed: int = 0,
    batch_size: int = 64,
    times: np.ndarray | None = None,
    solver: str = "ddim",
    renoise: bool | None = None,
) -> tuple[np.ndarray, float]:
    """Samples for every example and the mean wall time per image (ms, after warm-up).

    ``renoise``: re-noise between DDIM steps; None takes the run's own default (CoDi: ``codi.renoise``)
    for the DDIM solver and no re-noising for the others.
    """
    if renoise is None:
        renoise = solver == "ddim" and inference.renoise_between_steps(pre.config)
    if renoise and solver != "ddim":
        raise ValueError(f"Re-noising between steps needs solver='ddim', not {solver!r}.")
    times = jnp.asarray(inference.sample_times(pre.config, num_steps) if times is None else times)
    sampler = inference.make_conditional_sampler(pre.model, pre.schedule, pre.parametrization, solver)
    cond, instruction = examples["cond"], examples.get("instruction")
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), examples["image"].shape, jnp.float32))
    outputs, elapsed = [], 0.0
    for start in range(0, len(cond), batch_size):
        sl = slice(start, start + batch_size)
        renoise_rng = inference.renoise_key(pre.config, seed, start, renoise)
        args = (pre.params, cond[sl], None if instruction is None else instruction[sl], noise[sl], times, renoise_rng)
        if start == 0:
            jax.block_until_ready(sampler(*args))  # compile + warm-up, not timed
        t0 = time.perf_counter()
        outputs.append(np.asarray(jax.block_until_ready(sampler(*args))))
        elapsed += time.perf_counter() - t0
    return np.concatenate(outputs), 1000.0 * elapsed / len(cond)


def evaluate_checkpoint(
    pre: Pretrained,
    examples: dict[str, np.ndarray],
    step_counts: tuple[int, ...],
    method: str,
    *,
    seed: int = 0,
    batch_size: int = 64,
    solver: str = "ddim",
    renoise: bool | None = None,
    weights: MetricWeights = MetricWeights(),
) -> list[Row]:
    trained = adapted.trainable_param_count(pre.model, pre.params)
    rows = []
    for num_steps in step_counts:
        samples, ms = sample_all(
            pre, examples, num_steps, seed=seed, batch_size=batch_size, solver=solver, renoise=renoise
        )
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
                extra=weighted_metrics(samples, examples["image"], weights, seed),
            )
        )
    return rows


EXTRA_COLUMNS = {"fid": ("FID", ".2f"), "kid": ("KID", ".4f"), "lpips": ("LPIPS", ".4f")}


def markdown_table(rows: list[Row]) -> str:
    extras = [name for name in EXTRA_COLUMNS if any(name in r.extra for r in rows)]
    head = ["method", "steps", "params trained", "PSNR (dB)", "SSIM", "SWD x1e3"]
    head += [EXTRA_COLUMNS[name][0] for name in extras] + ["ms / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.method, str(r.steps), f"{r.params_trained:,}", f"{r.psnr:.2f}", f"{r.ssim:.4f}", f"{r.swd:.1f}"]
        cells += [format(r.extra[n], EXTRA_COLUMNS[n][1]) if n in r.extra else "–" for n in extras]
        cells.append(f"{r.ms_per_image:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
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
    renoise: bool | None = None,
    weights: MetricWeights = MetricWeights(),
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
        rows += evaluate_checkpoint(
            pre,
            examples,
            step_counts,
            name,
            seed=seed,
            batch_size=batch_size,
            solver=solver,
            renoise=renoise,
            weights=weights,
        )
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
