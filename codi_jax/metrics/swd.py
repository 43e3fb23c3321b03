"""Sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al. 2018, ProGAN).

The definition follows ProGAN's ``metrics/sliced_wasserstein.py``:

1. each image is decomposed into a Laplacian pyramid (``cv2.pyrDown``-style 5x5 binomial filter,
   reflect-101 borders); levels run from the full resolution down to ``min_resolution``
   (ProGAN: 16; configurable because our images are 32x32), the last level being the Gaussian
   (low-pass) level itself;
2. per image and level, ``patches_per_image`` (ProGAN: 128) random ``patch_size`` x ``patch_size``
   (ProGAN: 7x7) neighbourhoods wholly inside the level are cut out;
3. per level, each set's descriptors are normalised per channel (mean 0, std 1 over all its
   patches and pixels) and flattened in (row, column, channel) order;
4. ``num_projections`` (ProGAN: 4 repeats x 128 = 512) random unit directions; per direction
   the 1-D Wasserstein-1 distance between the two sets' sorted projections (mean absolute
   difference); SWD of the level = mean over directions;
5. reported x 1e3 per level, plus their average (ProGAN's numbers).

Differences from ProGAN, both deliberate: the two sets are cut at the same (per image index)
positions and projected on the same directions, which makes the estimate exactly symmetric and
exactly zero for identical sets (ProGAN draws positions for each set independently, which has
the same distribution); and every draw is derived from ``seed`` (level, image index), so the
result does not depend on the batch size. The std in step 3 is floored at ``1e-8`` so that a
constant level gives finite numbers. The metric is invariant to an affine rescaling of the
pixel values (step 3), so the image value range does not matter; both sets must hold the
same number of images. Memory: ``N * patches_per_image * patch_size^2 * C`` floats per set.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SCALE = 1e3  # ProGAN reports SWD x 10^3
STD_FLOOR = 1e-8
PROJECTION_CHUNK = 128  # directions projected and sorted at a time (bounds memory)
_BINOMIAL_TAPS = np.array([1.0, 4.0, 6.0, 4.0, 1.0], np.float32) / 16.0  # separable cv2.pyrDown kernel


class SWDResult(NamedTuple):
    """SWD x 1e3 per pyramid level (keyed by the level's height) and their average."""

    per_level: dict[int, float]
    average: float


def pyramid_resolutions(height: int, width: int, min_resolution: int = 16) -> list[tuple[int, int]]:
    """(height, width) of each level: halving while the smaller side stays >= ``min_resolution``."""
    if min(height, width) < min_resolution:
        raise ValueError(f"images of {height}x{width} are smaller than swd's min_resolution={min_resolution}")
    sizes = [(height, width)]
    while min(sizes[-1]) // 2 >= min_resolution:
        h, w = sizes[-1]
        if h % 2 or w % 2:
            raise ValueError(f"swd's pyramid halves {height}x{width}: a {h}x{w} level cannot be halved exactly")
        sizes.append((h // 2, w // 2))
    return sizes


def _binomial_filter(images: jax.Array, gain: float) -> jax.Array:
    """5x5 binomial filter (times ``gain``) per channel with reflect-101 borders, NHWC."""
    channels = images.shape[-1]
    padded = jnp.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    dims = ("NHWC", "HWIO", "NHWC")
    out = padded
    for shape, taps in (((5, 1, 1, 1), _BINOMIAL_TAPS * gain), ((1, 5, 1, 1), _BINOMIAL_TAPS)):  # gain once
        kernel = jnp.broadcast_to(jnp.asarray(taps).reshape(shape), shape[:2] + (1, channels))
        out = lax.conv_general_dilated(
            out,
            kernel,
            (1, 1),
            "VALID",
            dimension_numbers=dims,
            feature_group_count=channels,
            precision=lax.Precision.HIGHEST,
        )
    return out


def pyramid_down(images: jax.Array) -> jax.Array:
    """``cv2.pyrDown``: binomial blur, keep every second row and column."""
    return _binomial_filter(images, 1.0)[:, ::2, ::2]


def pyramid_up(images: jax.Array) -> jax.Array:
    """``cv2.pyrUp``: zero-insertion upsampling x2, binomial blur with gain 4."""
    n, h, w, c = images.shape
    upsampled = jnp.zeros((n, 2 * h, 2 * w, c), images.dtype).at[:, ::2, ::2].set(images)
    return _binomial_filter(upsampled, 4.0)


def laplacian_pyramid(images: jax.Array, num_levels: int) -> list[jax.Array]:
    """Band-pass levels (finest first) and, last, the low-pass Gaussian level; NHWC float32."""
    gaussian = [jnp.asarray(images, jnp.float32)]
    for _ in range(num_levels - 1):
        gaussian.append(pyramid_down(gaussian[-1]))
    bands = [fine - pyramid_up(coarse) for fine, coarse in zip(gaussian[:-1], gaussian[1:])]
    return bands + [gaussian[-1]]


def _level_key(seed: int | jax.Array, level: int, purpose: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), level), purpose)


def sample_patch_positions(
    seed: int | jax.Array,
    level: int,
    image_indices: jax.Array,
    height: int,
    width: int,
    patch_size: int = 7,
    patches_per_image: int = 128,
) -> jax.Array:
    """(len(image_indices), patches_per_image, 2) top-left (row, col) of patches inside the level.

    Each image's positions depend only on (seed, level, its index in the set).
    """
    base = _level_key(seed, level, 0)

    def one_image(index: jax.Array) -> jax.Array:
        key = jax.random.fold_in(base, index)
        rows = jax.random.randint(jax.random.fold_in(key, 0), (patches_per_image,), 0, height - patch_size + 1)
        cols = jax.random.randint(jax.random.fold_in(key, 1), (patches_per_image,), 0, width - patch_size + 1)
        return jnp.stack([rows, cols], axis=-1)

    return jax.vmap(one_image)(jnp.asarray(image_indices, jnp.int32))


def sample_directions(seed: int | jax.Array, level: int, dim: int, num_projections: int = 512) -> jax.Array:
    """(dim, num_projections) random unit directions for one level."""
    directions = jax.random.normal(_level_key(seed, level, 1), (dim, num_projections), jnp.float32)
    return directions / jnp.linalg.norm(directions, axis=0, keepdims=True)


def extract_patches(level_images: jax.Array, positions: jax.Array, patch_size: int) -> jax.Array:
    """(N * P, patch_size, patch_size, C) patches of (N, H, W, C) at (N, P, 2) top-left positions."""
    channels = level_images.shape[-1]

    def one_image(image: jax.Array, corners: jax.Array) -> jax.Array:
        cut = lambda corner: lax.dynamic_slice(image, (corner[0], corner[1], 0), (patch_size, patch_size, channels))
        return jax.vmap(cut)(corners)

    patches = jax.vmap(one_image)(level_images, positions)
    return patches.reshape((-1, patch_size, patch_size, channels))


@functools.partial(jax.jit, static_argnames=("num_levels", "patch_size", "patches_per_image"))
def _descriptors(
    images: jax.Array,
    image_indices: jax.Array,
    seed: jax.Array,
    *,
    num_levels: int,
    patch_size: int,
    patches_per_image: int,
) -> list[jax.Array]:
    """Per level: raw (not yet normalised) patches of a chunk of images."""
    out = []
    for level, band in enumerate(laplacian_pyramid(images, num_levels)):
        positions = sample_patch_positions(
            seed, level, image_indices, band.shape[1], band.shape[2], patch_size, patches_per_image
        )
        out.append(extract_patches(band, positions, patch_size))
    return out


def normalize_descriptors(patches: jax.Array) -> jax.Array:
    """(M, k, k, C) patches -> (M, k*k*C) descriptors, each channel at mean 0 / std 1 over the set."""
    mean = jnp.mean(patches, axis=(0, 1, 2), keepdims=True)
    std = jnp.std(patches, axis=(0, 1, 2), keepdims=True)
    return ((patches - mean) / jnp.maximum(std, STD_FLOOR)).reshape(patches.shape[0], -1)


@jax.jit
def sliced_wasserstein(descriptors_a: jax.Array, descriptors_b: jax.Array, directions: jax.Array) -> jax.Array:
    """Mean over directions of the 1-D Wasserstein-1 distance between the sets' projections.

    ``descriptors_*``: (M, D) with equal M; ``directions``: (D, K) unit columns. Not scaled.
    """
    if descriptors_a.shape != descriptors_b.shape:
        raise ValueError(f"sliced_wasserstein needs equal-size sets, got {descriptors_a.shape}, {descriptors_b.shape}")
    num = directions.shape[1]
    chunk = min(PROJECTION_CHUNK, num)
    padded = -(-num // chunk) * chunk
    chunks = jnp.pad(directions, ((0, 0), (0, padded - num))).T.reshape(padded // chunk, chunk, -1)

    def chunk_distances(dirs: jax.Array) -> jax.Array:  # (chunk, D) -> (chunk,)
        proj_a = jnp.sort(jnp.dot(descriptors_a, dirs.T, precision=lax.Precision.HIGHEST), axis=0)
        proj_b = jnp.sort(jnp.dot(descriptors_b, dirs.T, precision=lax.Precision.HIGHEST), axis=0)
        return jnp.mean(jnp.abs(proj_a - proj_b), axis=0)

    return jnp.mean(lax.map(chunk_distances, chunks).reshape(-1)[:num])


@functools.partial(jax.jit, static_argnames=("level", "num_projections"))
def _level_distance(
    patches_a: jax.Array, patches_b: jax.Array, seed: jax.Array, *, level: int, num_projections: int
) -> jax.Array:
    """Unscaled SWD of one level from the two sets' raw patches."""
    desc_a, desc_b = normalize_descriptors(patches_a), normalize_descriptors(patches_b)
    return sliced_wasserstein(desc_a, desc_b, sample_directions(seed, level, desc_a.shape[1], num_projections))


def _set_descriptors(
    images: np.ndarray, *, num_levels: int, seed: int, patch_size: int, patches_per_image: int, batch_size: int
) -> list[jax.Array]:
    """Raw patches per level for a whole set, computed in fixed-size (padded) chunks."""
    n = images.shape[0]
    per_level: list[list[jax.Array]] = [[] for _ in range(num_levels)]
    for start in range(0, n, batch_size):
        chunk = images[start : start + batch_size]
        count = chunk.shape[0]
        if count < batch_size:  # keep one compiled shape; padded rows are dropped below
            chunk = np.concatenate([chunk, np.zeros((batch_size - count,) + chunk.shape[1:], chunk.dtype)])
        indices = np.arange(start, start + batch_size, dtype=np.int32)
        levels = _descriptors(
            jnp.asarray(chunk),
            indices,
            jnp.int32(seed),
            num_levels=num_levels,
            patch_size=patch_size,
            patches_per_image=patches_per_image,
        )
        for level, patches in enumerate(levels):
            per_level[level].append(patches[: count * patches_per_image])
    return [jnp.concatenate(chunks) for chunks in per_level]


def sliced_wasserstein_distance(
    images_a: np.ndarray | jax.Array,
    images_b: np.ndarray | jax.Array,
    *,
    seed: int = 0,
    min_resolution: int = 16,
    patch_size: int = 7,
    patches_per_image: int = 128,
    num_projections: int = 512,
    batch_size: int = 64,
) -> SWDResult:
    """SWD x 1e3 between two image sets (NHWC, same shape; any value range), see module doc."""
    images_a, images_b = np.asarray(images_a, np.float32), np.asarray(images_b, np.float32)
    if images_a.shape != images_b.shape or images_a.ndim != 4:
        raise ValueError(f"swd needs two NHWC sets of one shape, got {images_a.shape} and {images_b.shape}")
    if images_a.shape[0] == 0:
        raise ValueError("swd needs at least one image per set")
    sizes = pyramid_resolutions(images_a.shape[1], images_a.shape[2], min_resolution)
    if min(sizes[-1]) < patch_size:
        raise ValueError(f"swd's {patch_size}x{patch_size} patches do not fit the {sizes[-1]} pyramid level")
    options = dict(
        num_levels=len(sizes),
        seed=seed,
        patch_size=patch_size,
        patches_per_image=patches_per_image,
        batch_size=min(batch_size, images_a.shape[0]),
    )
    levels_a = _set_descriptors(images_a, **options)
    levels_b = _set_descriptors(images_b, **options)
    per_level = {}
    for level, ((height, _), patches_a, patches_b) in enumerate(zip(sizes, levels_a, levels_b)):
        distance = _level_distance(patches_a, patches_b, jnp.int32(seed), level=level, num_projections=num_projections)
        per_level[height] = float(distance) * SCALE
    return SWDResult(per_level=per_level, average=float(np.mean(list(per_level.values()))))
