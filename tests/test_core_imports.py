"""The core imports no TensorFlow, tfds or clu: models, adapters, losses and steps, recipes,
samplers, checkpoints, convert and export run where TensorFlow is not installed (the GPU
machine). Only the input pipeline (``codi_jax.data.pipeline`` and the task modules) and the
training loop's TensorBoard writer need them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WITHOUT_TF = os.path.join(REPO, "tests", "scripts", "without_tensorflow.py")

CORE = (
    "codi_jax.models.networks",
    "codi_jax.models.dit",
    "codi_jax.flow_matching",
    "codi_jax.models.student",
    "codi_jax.models.adapters",
    "codi_jax.models.vae",
    "codi_jax.models.clip_text",
    "codi_jax.models.t5",
    "codi_jax.objectives.codi",
    "codi_jax.objectives.teacher",
    "codi_jax.training.recipes",
    "codi_jax.training.aot",
    "codi_jax.sampling.few_step",
    "codi_jax.sampling.many_step",
    "codi_jax.runs.checkpoint",
    "codi_jax.runs.config_resolution",
    "codi_jax.interop.convert",
    "codi_jax.interop.export",
    "codi_jax.frozen.batch_inputs",
    "codi_jax.metrics",
    "codi_jax.evaluation.scoring",
    "codi_jax.data.task_spec",
    "codi_jax.data.image_files",
    "codi_jax.configs.cpu.codi_sr4",
    "codi_jax.configs.sd.sd15_sr4",
)


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, WITHOUT_TF, *args], capture_output=True, text=True, env=env, timeout=300)


def test_core_imports_without_tensorflow():
    result = _run("--import", *CORE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"imported {len(CORE)} modules" in result.stdout


@pytest.mark.parametrize("command", ["sample", "sample_teacher", "export", "convert", "evaluate"])
def test_cli_modules_import_without_tensorflow(command):
    """Each inference / interop command's module (its flags and --help) loads without TensorFlow."""
    result = _run("--import", f"codi_jax.cli.{command}")
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_blocker_blocks():
    """The check could fail: the input pipeline does import TensorFlow, and is refused."""
    result = _run("--import", "codi_jax.data.pipeline")
    assert result.returncode != 0 and "blocked" in result.stderr
