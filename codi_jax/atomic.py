"""The one atomic writer: every output file of the sampling / evaluation CLIs is written here.

A file (or a group of files, ``write_files``) is first written to a hidden temporary name in its
own directory (``.<name>.tmp-<pid>``), flushed to disk, and only then renamed into place with
``os.replace``, so a reader never sees a half-written file. On any failure (disk full, permission
denied, interrupt) every temporary made is removed, files of the group already renamed into place
are taken back out (unless they replaced an existing file), and an ``OSError`` is raised whose
message names the path and the cause; a rerun into the same directory then starts clean.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping

import numpy as np
from PIL import Image


def temporary_name(path: str) -> str:
    """The hidden temporary a write of ``path`` goes through: ``dir/.<name>.tmp-<pid>``."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}")


def _write(path: str, data: bytes) -> None:
    """The low-level write of one (temporary) file, flushed to disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _remove(paths: list[str]) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _failure(path: str, error: BaseException) -> OSError:
    cause = error.strerror if isinstance(error, OSError) and error.strerror else str(error) or type(error).__name__
    errno = getattr(error, "errno", None)
    prefix = f"[Errno {errno}] " if errno else ""
    failure = OSError(f"writing {path} failed: {prefix}{cause}; nothing was written")
    failure.errno = errno
    return failure


def write_files(files: Mapping[str, bytes]) -> list[str]:
    """Writes every ``path -> bytes`` of ``files`` all-or-nothing; returns the paths written.

    Parent directories are created. Raises ``OSError`` naming the failing path and the cause, with
    no temporary and no file of the group left behind (files that existed before are kept as they
    were, unless the failure came after they had been replaced)."""
    temporaries: dict[str, str] = {}
    placed: list[str] = []
    existed = {path for path in files if os.path.exists(path)}
    current = ""
    try:
        for path, data in files.items():
            current = path
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            temporaries[path] = temporary_name(path)
            _write(temporaries[path], data)
        for path, temporary in temporaries.items():
            current = path
            os.replace(temporary, path)
            placed.append(path)
    except BaseException as error:
        _remove([t for p, t in temporaries.items() if p not in placed])
        _remove([p for p in placed if p not in existed])
        if isinstance(error, OSError):
            raise _failure(current, error) from error
        raise
    return list(files)


def write_bytes(path: str, data: bytes) -> str:
    """Writes one file atomically (see ``write_files``)."""
    return write_files({path: data})[0]


def write_text(path: str, text: str) -> str:
    """Writes one UTF-8 text file atomically."""
    return write_bytes(path, text.encode("utf-8"))


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 HxW[xC] image encoded as PNG in memory."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"PNG images must be uint8, got {image.dtype} (convert with sampling.to_uint8).")
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image).save(buffer, "PNG")
    return buffer.getvalue()


def save_png(path: str, image: np.ndarray) -> str:
    """Encodes ``image`` (uint8) as PNG in memory, then writes it atomically."""
    return write_bytes(path, png_bytes(image))
