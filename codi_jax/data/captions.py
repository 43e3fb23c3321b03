"""Per-image captions of an image folder (``data.source='folder'``), read where a text-conditioned
run trains on them. JSON and the file system only (no TensorFlow): the input pipeline reads the
captions through ``folder_captions``, the run's frozen text parts ask ``has_captions``.

Two layouts, as diffusers' text-to-image training scripts read them:

- ``metadata.jsonl`` at the top of the folder (Hugging Face's image-folder convention): one JSON
  object per line with ``file_name`` (the image's path relative to the folder) and the caption in
  the column ``data.caption_key`` (default ``text``);
- ``.txt`` sidecars: ``cat.png`` captioned by ``cat.txt`` beside it (UTF-8, surrounding
  whitespace stripped).

``metadata.jsonl`` wins where both exist (the sidecars are then not read). A folder with neither
has no captions: the run uses its fixed ``text.prompt``. A folder with captions must caption every
image: the first uncaptioned one is named, with how many there are (an empty caption is a caption).
``data.caption_key=''`` turns captions off.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import ml_collections

from codi_jax.data.image_files import IMAGE_EXTENSIONS

METADATA = "metadata.jsonl"
SIDECAR = ".txt"


def has_captions(data_config: ml_collections.ConfigDict) -> bool:
    """Whether the data gives each example its own caption: a ``tfds`` source with
    ``data.caption_key`` (a feature of the dataset), or a folder with ``metadata.jsonl`` or ``.txt``
    sidecars (and a ``caption_key``)."""
    if not data_config.caption_key:
        return False
    if data_config.source == "tfds":
        return True
    if data_config.source != "folder" or not os.path.isdir(data_config.folder):
        return False
    return os.path.isfile(os.path.join(data_config.folder, METADATA)) or _has_sidecar(data_config.folder)


def _has_sidecar(folder: str) -> bool:
    for _, _, names in os.walk(folder, followlinks=True):
        stems = {os.path.splitext(n)[0] for n in names if n.lower().endswith(IMAGE_EXTENSIONS)}
        if any(n.endswith(SIDECAR) and n[: -len(SIDECAR)] in stems for n in names):
            return True
    return False


def folder_captions(folder: str, paths: Sequence[str], caption_key: str) -> list[str] | None:
    """The caption of each image of ``paths`` (``image_files.list_image_files(folder)``), or None
    when the folder has no captions (or ``caption_key`` is empty). Raises ``ValueError`` in one line
    naming the file (and line) for a malformed ``metadata.jsonl``, entries that are not images of
    the folder, or images without a caption."""
    if not caption_key:
        return None
    metadata = os.path.join(folder, METADATA)
    if os.path.isfile(metadata):
        by_path = read_metadata(metadata, caption_key)
        check_entries(metadata, by_path, paths)
        where = f"{metadata} (column {caption_key!r})"
    else:
        by_path = _sidecar_captions(paths)
        if not by_path:
            return None
        where = f"a {SIDECAR} sidecar"
    missing = [path for path in paths if os.path.normpath(path) not in by_path]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(paths)} images have no caption in {where}, the first: {missing[0]} "
            f"(caption every image, or set data.caption_key='' to train on the fixed text.prompt)"
        )
    return [by_path[os.path.normpath(path)] for path in paths]


def read_metadata(path: str, caption_key: str) -> dict[str, str]:
    """``{normalised image path: caption}`` of a ``metadata.jsonl``; a line that is not a JSON
    object with a string ``file_name`` and a string ``caption_key`` is refused naming it."""
    folder, captions, first_line = os.path.dirname(path), {}, {}
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of line 1
            lines = f.read().split("\n")  # JSON Lines ends lines at \n only
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    for number, line in enumerate(lines, start=1):
        if line.strip():
            where = f"{path} line {number}"
            name, caption = _entry_fields(_json_line(line, where), caption_key, where)
            image = os.path.normpath(os.path.join(folder, name))
            if image in first_line:
                raise ValueError(f"{where}: file_name {name!r} is already at line {first_line[image]}")
            captions[image], first_line[image] = caption, number
    return captions


def _json_line(line: str, where: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not JSON ({error.msg} at column {error.colno})") from None


def _entry_fields(entry: object, caption_key: str, where: str) -> tuple[str, str]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    for key in ("file_name", caption_key):
        if not isinstance(entry.get(key), str):
            found = "missing" if key not in entry else f"a {type(entry[key]).__name__}"
            raise ValueError(f"{where}: {key!r} must be a string, is {found} (keys: {sorted(entry)})")
    return entry["file_name"], entry[caption_key]


def check_entries(metadata: str, by_path: dict[str, str], paths: Sequence[str]) -> None:
    """Every ``file_name`` of ``metadata`` is one of the folder's images (``paths``)."""
    images = {os.path.normpath(path) for path in paths}
    strays = [path for path in by_path if path not in images]
    if not strays:
        return
    absent = [path for path in strays if not os.path.exists(path)]
    named = absent or strays
    listed = ", ".join(os.path.relpath(path, os.path.dirname(metadata)) for path in named[:3])
    more = f" and {len(named) - 3} more" if len(named) > 3 else ""
    what = "do not exist" if absent else "are not images the folder source reads"
    raise ValueError(f"{metadata}: {len(named)} file_name entries {what}: {listed}{more}")


def _sidecar_captions(paths: Sequence[str]) -> dict[str, str]:
    captions = {}
    for path in paths:
        sidecar = os.path.splitext(path)[0] + SIDECAR
        if os.path.isfile(sidecar):
            try:
                with open(sidecar, encoding="utf-8") as f:
                    captions[os.path.normpath(path)] = f.read().strip()
            except UnicodeDecodeError as error:
                raise ValueError(f"{sidecar}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    return captions
