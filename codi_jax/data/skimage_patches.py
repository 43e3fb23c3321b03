"""`skimage_patches`: fixed-size RGB patches cut from scikit-image's bundled photographs.

A small, fully offline tfds dataset for tests and tiny training runs. Every image comes from a
file shipped inside the scikit-image wheel, read through `skimage.data`; nothing is downloaded
(the download manager is never used). Photos that need `pooch` (kidney, lily, skin, eagle, ...)
and synthetic images (chessboard, logo, color, colorwheel) are not used; `cat()` is skipped
because it is the same picture as `chelsea()`, and only the left view of the stereo pair is used
because the right one nearly duplicates it.

Patches: each photograph is downscaled by 1, 2, 4, ... (anti-aliased: means of factor x factor
blocks) as long as its shorter side is at least 2 patch sizes, and at every scale patches are cut
on a regular grid with stride patch_size // 2. Coarser scales make small patches contain whole
objects, not only texture. Near-constant patches (std of the uint8 values < 2, e.g. the black
border of `retina`) are dropped. Everything is deterministic.

Split, by source photograph (no photo contributes to both splits):
  train: astronaut, rocket, retina, hubble_deep_field, immunohistochemistry, motorcycle
  test:  chelsea, coffee

Features:
  image      uint8 (S, S, 3)
  source     the photo name (see the split above)
  scale      int32 downscale factor of the photo the patch was cut from (1, 2, 4, ...)
  depth      float32 (S, S, 1): for `motorcycle`, the disparity map shipped with the stereo pair,
             normalised per photo to [0, 1] (near = 1, like MiDaS / ControlNet depth maps;
             pixels without a disparity are 0); zeros for the other photos
  has_depth  bool, True only for `motorcycle`

Sizes (patches per split, as built with scikit-image 0.26; build time on one shared core):
  patches32: train 9_574, test 1_672   (~6 s)
  patches64: train 3_718, test   349   (~3 s)
  Per photo (patches32): retina 2_532, hubble_deep_field 1_978, motorcycle 1_368, rocket 1_248,
  immunohistochemistry 1_241, astronaut 1_207 | coffee 1_091, chelsea 581. At most
  MAX_PATCHES_PER_SCALE patches per (photo, scale) keep the two large photos from dominating
  (uncapped they were ~70% of train, mostly full-resolution texture).

Build: `python -m codi_jax.data.skimage_patches --data_dir DIR [--config patches32 ...]`, or
`SkimagePatches(config="patches32", data_dir=DIR).download_and_prepare(file_format=FILE_FORMAT)`
(ArrayRecord, for random access); the input pipeline builds it on first use.
(`tfds build` on this file needs apache_beam, which is not installed.)
Add a patch size by adding it to `PATCH_SIZES`.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

# Builder configs are `patches{size}`; add a size here to get a new config.
PATCH_SIZES: tuple[int, ...] = (16, 32, 64)

TRAIN_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "rocket",
    "retina",
    "hubble_deep_field",
    "immunohistochemistry",
    "motorcycle",
)
TEST_PHOTOS: tuple[str, ...] = ("chelsea", "coffee")

# Patches whose uint8 standard deviation is below this are flat (black borders) and dropped.
MIN_PATCH_STD = 2.0
# At most this many patches per (photo, scale), so that the large photos (retina, hubble) do
# not make up most of the data with full-resolution texture.
MAX_PATCHES_PER_SCALE = 1000


def _load_photo(name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Returns (rgb uint8 HxWx3, depth float32 HxW in [0, 1] or None) for a photo name."""
    import skimage.data  # Imported lazily: only needed while building.

    if name == "motorcycle":
        left, _, disparity = skimage.data.stereo_motorcycle()
        # Occluded pixels have disparity inf: mark them as unknown (0 = far) and normalise so
        # the map does not depend on the photo's resolution.
        disparity = np.where(np.isfinite(disparity), disparity, 0.0).astype(np.float32)
        disparity /= max(float(disparity.max()), 1e-6)
        return left, disparity
    loaders: dict[str, Callable[[], np.ndarray]] = {
        "astronaut": skimage.data.astronaut,
        "chelsea": skimage.data.chelsea,
        "coffee": skimage.data.coffee,
        "hubble_deep_field": skimage.data.hubble_deep_field,
        "immunohistochemistry": skimage.data.immunohistochemistry,
        "retina": skimage.data.retina,
        "rocket": skimage.data.rocket,
    }
    if name not in loaders:
        known = sorted([*loaders, "motorcycle"])
        raise ValueError(f"unknown photo {name!r}; expected one of {known}")
    return loaders[name](), None


def _downscale(array: np.ndarray, factor: int) -> np.ndarray:
    """Anti-aliased downscale by an integer factor: the mean of each factor x factor block
    (PIL's `reduce`, much faster than a Gaussian pre-filter on the 1411 px retina)."""
    if factor == 1:
        return array
    from PIL import Image

    if array.dtype == np.uint8:
        return np.asarray(Image.fromarray(array).reduce(factor))
    # Float maps (depth): PIL mode "F" holds one float32 channel.
    return np.asarray(Image.fromarray(array.astype(np.float32)).reduce(factor))


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _encode_png(rgb: np.ndarray) -> bytes:
    """Minimal 8-bit RGB PNG (no row filters, zlib level 1). About 3x faster than PIL's and
    10x faster than tfds' per-example eager TF encode, which would dominate the build time."""
    height, width, _ = rgb.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, width * 3)], 1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bit, truecolour.
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 1))
        + _png_chunk(b"IEND", b"")
    )


def iter_patches(name: str, patch_size: int) -> Iterator[tuple[str, dict[str, np.ndarray | str | int | bool]]]:
    """Yields (key, example) for every patch of one photo, in a fixed order."""
    rgb, depth = _load_photo(name)
    stride = patch_size // 2
    factor = 1
    # Keep downscaling while the shorter side still holds ~2 patches.
    while min(rgb.shape[:2]) / factor >= 2 * patch_size:
        rgb_scaled = _downscale(rgb, factor)
        depth_scaled = None if depth is None else _downscale(depth, factor)
        # All grid windows as a strided view (no copy): shape (rows, cols, S, S, 3).
        windows = np.lib.stride_tricks.sliding_window_view(rgb_scaled, (patch_size, patch_size, 3))[
            ::stride, ::stride, 0
        ]
        positions = []
        for row in range(windows.shape[0]):
            # One vectorised std per row of windows instead of one call per patch.
            row_std = windows[row].reshape(windows.shape[1], -1).std(axis=1, dtype=np.float32)
            positions.extend((row, int(col)) for col in np.flatnonzero(row_std >= MIN_PATCH_STD))
        if len(positions) > MAX_PATCHES_PER_SCALE:
            # Evenly spaced subset: large photos would otherwise dominate with full-res texture.
            keep = np.linspace(0, len(positions) - 1, MAX_PATCHES_PER_SCALE).round().astype(int)
            positions = [positions[i] for i in keep]
        for row, col in positions:
            top, left = row * stride, col * stride
            patch = windows[row, col]
            if depth_scaled is None:
                depth_patch = np.zeros((patch_size, patch_size, 1), np.float32)
            else:
                window = depth_scaled[top : top + patch_size, left : left + patch_size]
                depth_patch = window[..., None].astype(np.float32)
            yield (
                f"{name}/x{factor}/{top:05d}_{left:05d}",
                {
                    "image": _encode_png(patch),
                    "source": name,
                    "scale": factor,
                    "depth": depth_patch,
                    "has_depth": depth is not None,
                },
            )
        factor *= 2


@dataclasses.dataclass
class SkimagePatchesConfig(tfds.core.BuilderConfig):
    """Config for one patch size."""

    patch_size: int = 32


def _config(patch_size: int) -> SkimagePatchesConfig:
    return SkimagePatchesConfig(
        name=f"patches{patch_size}",
        description=f"{patch_size}x{patch_size} RGB patches, stride {patch_size // 2}.",
        patch_size=patch_size,
    )


# ArrayRecord: random access, so a resumed run reads its batch directly (codi_jax.data.pipeline).
FILE_FORMAT = "array_record"
OFFLINE = tfds.download.DownloadConfig(try_download_gcs=False)


# Run as `python -m`, this file executes a second time (as __main__) after the package import
# registered the class: skip registering the duplicate.
class SkimagePatches(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == "__main__"):
    """Patches of scikit-image's bundled colour photographs (built offline)."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release.",
        "1.1.0": "At most MAX_PATCHES_PER_SCALE patches per (photo, scale).",
        "1.2.0": "Stored as ArrayRecord (random access: a resumed run starts at its batch directly).",
    }
    BUILDER_CONFIGS: ClassVar[list[SkimagePatchesConfig]] = [_config(s) for s in PATCH_SIZES]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.patch_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), dtype=np.uint8, encoding_format="png"),
                    "source": tfds.features.Text(),
                    "scale": tfds.features.Scalar(dtype=np.int32),
                    # zlib: most depth maps are all zeros.
                    "depth": tfds.features.Tensor(
                        shape=(size, size, 1),
                        dtype=np.float32,
                        encoding=tfds.features.Encoding.ZLIB,
                    ),
                    "has_depth": tfds.features.Scalar(dtype=np.bool_),
                }
            ),
            supervised_keys=None,
            homepage="https://scikit-image.org/docs/stable/api/skimage.data.html",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # Everything is inside the scikit-image package.
        return {
            "train": self._generate_examples(TRAIN_PHOTOS),
            "test": self._generate_examples(TEST_PHOTOS),
        }

    def _generate_examples(self, photos: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
        for name in photos:
            yield from iter_patches(name, self.builder_config.patch_size)


def main(argv: list[str] | None = None) -> None:
    """Builds the configs named on the command line (default: all) into --data_dir."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=None, help="tfds data_dir (default: tfds')")
    parser.add_argument(
        "--config",
        action="append",
        choices=[config.name for config in SkimagePatches.BUILDER_CONFIGS],
        help="config to build; repeatable (default: all)",
    )
    args = parser.parse_args(argv)
    for name in args.config or [config.name for config in SkimagePatches.BUILDER_CONFIGS]:
        builder = SkimagePatches(config=name, data_dir=args.data_dir)
        builder.download_and_prepare(file_format=FILE_FORMAT, download_config=OFFLINE)
        sizes = {split: info.num_examples for split, info in builder.info.splits.items()}
        print(f"{builder.info.full_name}: {sizes} in {builder.data_dir}")


if __name__ == "__main__":
    # Use the registered (package) copy of the builder; tfds cannot locate code of `__main__`.
    import importlib

    importlib.import_module("codi_jax.data.skimage_patches").main()
