"""Kernel Inception distance (Binkowski et al. 2018): unbiased MMD^2 with a cubic polynomial kernel.

``k(x, y) = (x . y / D + 1)^3``. Per subset (``m`` features drawn without replacement from each
set) the unbiased estimator

    MMD^2 = sum_{i != j} [k(a_i, a_j) + k(b_i, b_j)] / (m (m - 1)) - 2 sum_{i, j} k(a_i, b_j) / m^2

is averaged over ``num_subsets`` subsets, as in the StyleGAN2-ADA / clean-fid implementations
(``m = min(subset_size, N_a, N_b)``, default 100 subsets of 1000). The value is returned as is
(papers often print KID x 1e3). Computed in float64 NumPy on the host for the same reason as
FID (``codi_jax.metrics.fid``); it is unbiased, so it can be slightly negative for equal
distributions.
"""

from __future__ import annotations

import numpy as np


def kid_subset_indices(
    num_a: int, num_b: int, *, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """((num_subsets, m), (num_subsets, m)) row indices into each set, m = min(subset_size, num_a, num_b)."""
    m = min(subset_size, num_a, num_b)
    if m < 2:
        raise ValueError(f"KID needs subsets of at least 2 features per set, got sets of {num_a} and {num_b}")
    rng = np.random.default_rng(seed)
    rows_a = np.stack([rng.choice(num_a, m, replace=False) for _ in range(num_subsets)])
    rows_b = np.stack([rng.choice(num_b, m, replace=False) for _ in range(num_subsets)])
    return rows_a, rows_b


def polynomial_mmd2_unbiased(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size (m, D) sets with the cubic polynomial kernel."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    m, dim = a.shape
    kernel_aa = (a @ a.T / dim + 1.0) ** 3
    kernel_bb = (b @ b.T / dim + 1.0) ** 3
    kernel_ab = (a @ b.T / dim + 1.0) ** 3
    within = (kernel_aa.sum() - np.trace(kernel_aa) + kernel_bb.sum() - np.trace(kernel_bb)) / (m * (m - 1))
    return float(within - 2.0 * kernel_ab.sum() / m**2)


def kid_from_features(
    features_a: np.ndarray, features_b: np.ndarray, *, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> float:
    """KID between two (N, D) feature sets: mean unbiased MMD^2 over random subsets."""
    features_a, features_b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if features_a.ndim != 2 or features_a.shape[1:] != features_b.shape[1:]:
        raise ValueError(f"KID needs (N, D) features of one D, got {features_a.shape} and {features_b.shape}")
    rows_a, rows_b = kid_subset_indices(
        len(features_a), len(features_b), num_subsets=num_subsets, subset_size=subset_size, seed=seed
    )
    return float(np.mean([polynomial_mmd2_unbiased(features_a[ra], features_b[rb]) for ra, rb in zip(rows_a, rows_b)]))
