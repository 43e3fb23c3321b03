"""Image files on disk: listing a folder of images or of InstructPix2Pix edit triples, and reading
one image as RGB. NumPy and PIL only (no TensorFlow): the input pipeline reads its ``folder`` and
``edit_triples`` sources through these, and ``sample --images=DIR`` reads its conditions with them.
"""

from __future__ import annotations

import json
import os

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def list_image_files(folder: str) -> list[str]:
    """Sorted image paths under `folder` (recursive); errors name the folder."""
    if not folder:
        raise ValueError("data_config.source='folder' needs data_config.folder")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder!r} does not exist or is not a directory")
    paths = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(folder, followlinks=True)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        raise FileNotFoundError(f"image folder {folder!r} contains no images with extensions {IMAGE_EXTENSIONS}")
    return paths


def check_image_headers(paths: list[str]) -> None:
    """Fails fast on files that are not images at all (reads only the headers)."""
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        try:
            with Image.open(path):  # Parses the header only; pixels are decoded later.
                pass
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ValueError(f"corrupt or unreadable image file {path!r}: {error}") from error


def load_image_rgb(path: str) -> np.ndarray:
    """Reads any PIL-readable image as uint8 HxWx3 (alpha over white, EXIF rotation applied)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I"):  # 16/32-bit grayscale: scale 16-bit range to 8 bits.
                gray = np.asarray(image, dtype=np.float32) / 257.0
                image = Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8))
            has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            if has_alpha:
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, rgba)
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Exception as error:  # Any decoder failure: name the file.
        raise ValueError(f"corrupt or unreadable image file {path!r}: {error}") from error
    return rgb


def list_edit_triples(folder: str) -> list[tuple[str, str, str]]:
    """``(source, edited, instruction)`` of every pair under ``folder`` (InstructPix2Pix layout,
    see ``codi_jax.data.pipeline``'s docstring), sorted; errors name the folder or file."""
    if not folder or not os.path.isdir(folder):
        raise FileNotFoundError(f"data_config.folder={folder!r}: not a directory (source='edit_triples')")
    triples = []
    for root, _, names in sorted(os.walk(folder, followlinks=True)):
        if "prompt.json" not in names:
            continue
        with open(os.path.join(root, "prompt.json")) as f:
            instruction = str(json.load(f).get("edit", ""))
        sources = sorted(
            n for n in names if os.path.splitext(n)[0].endswith("_0") and n.lower().endswith(IMAGE_EXTENSIONS)
        )
        for name in sources:
            stem, ext = os.path.splitext(name)
            edited = [n for n in names if os.path.splitext(n)[0] == stem[:-2] + "_1"]
            if not edited:
                raise FileNotFoundError(f"{os.path.join(root, name)}: no edited image {stem[:-2]}_1{ext} beside it")
            triples.append((os.path.join(root, name), os.path.join(root, edited[0]), instruction))
    if not triples:
        raise FileNotFoundError(f"data_config.folder={folder!r}: no prompt.json with <seed>_0 / <seed>_1 image pairs")
    return triples
