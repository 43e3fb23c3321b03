"""End to end on tiny models: teacher checkpoint -> CoDi run (exact resume) -> few-step sampling CLI.

One tiny teacher is trained for the module; CoDi runs from it. XLA:CPU compiles dominate, so the
runs share programs (same shapes) through the persistent compilation cache.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from PIL import Image

from codi_jax import few_step, pretrained, train_loop
from configs import tiny_codi, tiny_teacher


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("teacher"))
    config = tiny_teacher.get_config()
    config.data.data_dir = os.path.join(workdir, "tfds")
    config.num_train_steps = 2
    config.checkpoint_every_steps = 2
    config.sample_every_steps = 1000
    train_loop.train_and_evaluate(config, workdir)
    return workdir


def _codi_config(teacher_dir: str, **overrides):
    config = tiny_codi.get_config()
    config.teacher_workdir = teacher_dir
    config.data.data_dir = os.path.join(teacher_dir, "tfds")  # the dataset the teacher fixture built
    config.update(overrides)
    return config


def _params(workdir: str):
    return pretrained.load_conditional(workdir, use_ema=False).params


def test_codi_run_resumes_exactly_and_samples(teacher_dir, tmp_path) -> None:
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train_loop.train_and_evaluate(_codi_config(teacher_dir), straight)
    train_loop.train_and_evaluate(_codi_config(teacher_dir, num_train_steps=2), resumed)
    train_loop.train_and_evaluate(_codi_config(teacher_dir), resumed)
    a, b = _params(straight), _params(resumed)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    # PE-CoDi: the backbone in the run's checkpoint is the teacher's EMA backbone, untouched.
    teacher = pretrained.load_pretrained(teacher_dir)
    for x, y in zip(jax.tree.leaves(a["backbone"]), jax.tree.leaves(teacher.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert os.path.exists(os.path.join(straight, "samples", "step_0000004.png"))

    # The few-step sampling binary on a folder of clean images.
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / f"im{i}.png")
    out = str(tmp_path / "out")
    paths = few_step.run(straight, str(images), out, steps=2, seed=1)
    assert sorted(os.path.basename(p) for p in paths) == ["grid.png", "im0.png", "im1.png", "im2.png"]
    first = np.asarray(Image.open(os.path.join(out, "im0.png")))
    assert first.shape == (16, 16, 3)
    # Deterministic given the seed; never overwrites.
    again = few_step.run(straight, str(images), str(tmp_path / "out2"), steps=2, seed=1)
    np.testing.assert_array_equal(first, np.asarray(Image.open(again[0])))
    with pytest.raises(FileExistsError, match="nothing was overwritten"):
        few_step.run(straight, str(images), out, steps=2, seed=1)
    assert np.array_equal(first, np.asarray(Image.open(os.path.join(out, "im0.png"))))
    # Stochastic multistep sampling differs from DDIM; too many steps is a clear error.
    stochastic = few_step.run(straight, str(images), str(tmp_path / "out3"), steps=2, seed=1, stochastic=True)
    assert not np.array_equal(first, np.asarray(Image.open(stochastic[0])))
    with pytest.raises(ValueError, match="exceed the 50-point training grid"):
        few_step.run(straight, str(images), str(tmp_path / "out4"), steps=51)
    # Conditions given directly (a low-resolution image for SR).
    direct = few_step.run(straight, str(images / "im0.png"), str(tmp_path / "out5"), steps=1, input_kind="condition")
    assert len(direct) == 2


def test_conditional_errors(teacher_dir, tmp_path) -> None:
    workdir = str(tmp_path / "codi")
    train_loop.train_and_evaluate(_codi_config(teacher_dir, num_train_steps=2), workdir)
    other = _codi_config(teacher_dir)
    other.adapter.kind = "t2i"
    with pytest.raises(ValueError, match="adapter.kind"):
        train_loop.train_and_evaluate(other, workdir)
    with pytest.raises(ValueError, match="not a conditional"):
        pretrained.load_conditional(teacher_dir)
    clash = _codi_config(teacher_dir)
    clash.model.block_out_channels = (8, 16)
    with pytest.raises(ValueError, match="model.block_out_channels"):
        train_loop.train_and_evaluate(clash, str(tmp_path / "clash"))
    missing = _codi_config(str(tmp_path / "no_teacher"))
    with pytest.raises(FileNotFoundError, match="No checkpoints directory"):
        train_loop.train_and_evaluate(missing, str(tmp_path / "missing"))
