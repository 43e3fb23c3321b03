"""Frechet distance between Gaussians fitted to feature sets (FID, Heusel et al. 2017).

``FID = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2})`` with the sample means and
the unbiased (``ddof=1``) covariances of the features, as pytorch-fid computes them. The
statistics run in float64 NumPy on the host rather than in jitted float32: FID is a small
difference of large traces of 2048x2048 matrices and float32 loses most of its digits there
(JAX computes in float32 unless x64 is enabled globally). The feature extraction, which is
where the time goes, is jitted (``codi_jax.metrics.inception``).

``tr((S_a S_b)^{1/2})`` is computed as the sum of square roots of the eigenvalues of the
symmetric PSD matrix ``S_a^{1/2} S_b S_a^{1/2}`` (which has the same eigenvalues as ``S_a S_b``),
via ``eigh``; this equals pytorch-fid's ``scipy.linalg.sqrtm(S_a @ S_b)`` trace and needs no
"add eps to the diagonal" retry for the singular covariances of small sets.
"""

from __future__ import annotations

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) in float64 of (N, D) features, N >= 2."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature statistics need (N >= 2, D) features, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Squared 2-Wasserstein distance between N(mean_a, cov_a) and N(mean_b, cov_b)."""
    mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    if mean_a.shape != mean_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != mean_a.shape * 2:
        raise ValueError(
            f"frechet_distance: shapes do not match: means {mean_a.shape} / {mean_b.shape}, "
            f"covariances {cov_a.shape} / {cov_b.shape}"
        )
    sqrt_a = _psd_sqrt(cov_a)
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt_product = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)))
    diff = mean_a - mean_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt_product)


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two (N, D) feature sets (sizes may differ). Biased upwards for small N.

    With fewer features than dimensions (small eval sets: N < 2048) the covariances are
    ``S = X^T X / (N - 1)`` of the centred features ``X`` and ``tr((S_a S_b)^{1/2})`` is the
    nuclear norm of ``X_a X_b^T / sqrt((N_a - 1)(N_b - 1))``: an (N_a, N_b) SVD instead of two
    (D, D) eigendecompositions, same number.
    """
    mean_a, cov_a = feature_statistics(features_a)
    mean_b, cov_b = feature_statistics(features_b)
    n_a, n_b = len(features_a), len(features_b)
    if min(n_a, n_b) >= cov_a.shape[0]:
        return frechet_distance(mean_a, cov_a, mean_b, cov_b)
    centred_a = np.asarray(features_a, np.float64) - mean_a
    centred_b = np.asarray(features_b, np.float64) - mean_b
    cross = centred_a @ centred_b.T / np.sqrt((n_a - 1) * (n_b - 1))
    trace_sqrt_product = np.sum(np.linalg.svd(cross, compute_uv=False))
    diff = mean_a - mean_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt_product)
