"""A generalisation set: 32x32 patches of bundled photographs of another kind than the training ones.

Every model of this project (teacher, baseline, CoDi) was trained on patches of six colour
photographs (``skimage_patches.TRAIN_PHOTOS``) and is scored on two more (chelsea, coffee). This
writes patches of scikit-image's other bundled images, held out from everything: grey-level
photographs (camera, brick, grass, gravel, moon, coins, clock; stored as RGB with R = G = B, so a
model that invents colour shows it in the mean-colour error) and one synthetic colour image
(colorwheel: saturated hues the training palettes lack). Patches are cut at downscales x1, x2
and x4 (block means), flat patches (sd < 8) dropped, evenly spaced over each image, the same number per
image, as PNGs into ``--out`` (refused if it exists). Evaluate with the clean-image route:

  python experiments/generalisation_set.py --out=/tmp/generalisation
  python -m codi_jax.evaluate --images=/tmp/generalisation --run=CoDi=DIR/codi:1,2,4 \\
      --run=baseline=checkpoints/finetune_sr4_color:4,50 --num_seeds=3 --out=/tmp/generalisation_results
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from codi_jax import atomic  # noqa: E402
from codi_jax.data import skimage_patches  # noqa: E402

GREY_PHOTOS = ("camera", "brick", "grass", "gravel", "moon", "coins", "clock")
COLOUR_IMAGES = ("colorwheel",)
MIN_STD = 8.0  # uint8 standard deviation: flat patches (sky, walls) are left out


def load(name: str) -> np.ndarray:
    """uint8 HxWx3 of a bundled scikit-image image (grey replicated to RGB)."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def patches(image: np.ndarray, size: int, count: int) -> list[np.ndarray]:
    """``count`` non-flat ``size`` patches evenly spaced over the image's downscales x1, x2, x4."""
    found = []
    for factor in (1, 2, 4):
        scaled = skimage_patches._downscale(image, factor)
        if min(scaled.shape[:2]) < size:
            break
        for top in range(0, scaled.shape[0] - size + 1, size):
            for left in range(0, scaled.shape[1] - size + 1, size):
                patch = scaled[top : top + size, left : left + size]
                if patch.std() >= MIN_STD:
                    found.append(patch)
    keep = np.linspace(0, len(found) - 1, min(count, len(found))).round().astype(int)
    return [found[i] for i in keep]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="New directory for the PNGs.")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--per_image", type=int, default=8)
    args = parser.parse_args()
    if os.path.exists(args.out):
        sys.exit(f"error: --out {args.out} exists; nothing was overwritten.")
    files = {}
    for name in GREY_PHOTOS + COLOUR_IMAGES:
        for index, patch in enumerate(patches(load(name), args.size, args.per_image)):
            files[os.path.join(args.out, f"{name}_{index:02d}.png")] = atomic.png_bytes(patch)
    os.makedirs(args.out)
    atomic.write_files(files)
    print(f"{len(files)} patches of {', '.join(GREY_PHOTOS + COLOUR_IMAGES)} in {args.out}")


if __name__ == "__main__":
    main()
