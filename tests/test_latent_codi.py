"""A tiny latent, text-conditioned CoDi run end to end: diffusers folder -> convert -> train (exact
resume) -> few-step samples -> export -> diffusers loads the export and gives our samples.

The teacher is a tiny random ``StableDiffusionPipeline`` (``tests/tiny_sd.py``: 64-px images,
8x8 latents, CLIP text encoder); the adapter starts from a converted ``ControlNetModel`` with
SD's x8 hint network (``adapter.init_from``). Training images go through the VAE on the fly.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from codi_jax import sharding  # noqa: E402
from codi_jax.interop import convert  # noqa: E402
from codi_jax.runs import config_resolution, pretrained  # noqa: E402
from codi_jax.sampling import few_step  # noqa: E402
from codi_jax.sampling.options import SamplingOptions  # noqa: E402
from codi_jax.training import loop, recipes  # noqa: E402
from tests import export_check, tiny_sd  # noqa: E402


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sd")
    pipe = tiny_sd.make_pipeline(str(root / "pipeline"))
    tiny_sd.make_controlnet(pipe.unet, str(root / "controlnet"))
    workdir = str(root / "teacher")
    convert.convert(convert.ConversionRequest(str(root / "pipeline"), workdir, controlnet=str(root / "controlnet")))
    return {"workdir": workdir, "root": root}


_config = tiny_sd.latent_codi_config


def _leaves_close(a, b, what: str) -> None:
    scale = max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(a))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6 * max(1.0, scale), err_msg=what)


def test_init_from_converted_controlnet(teacher) -> None:
    config = config_resolution.resolve(_config(teacher))  # the initial state: what step 1 would start from
    mesh = sharding.mesh_from_config(config)
    state, _ = loop.create_sharded_state(recipes.make_recipe(config, mesh), mesh, config)
    shapes = jax.eval_shape(lambda: state.params["adapter"])
    converted = convert.restore_controlnet(teacher["workdir"], shapes)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(state.params["adapter"]), jax.tree.leaves(converted)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    backbone = pretrained.load_teacher(teacher["workdir"]).params
    _leaves_close(backbone, state.frozen["backbone"], "backbone = the converted UNet")


def test_latent_run_resumes_exactly_samples_and_exports(teacher, tmp_path) -> None:
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    loop.train_and_evaluate(_config(teacher), straight)
    loop.train_and_evaluate(_config(teacher, num_train_steps=2), resumed)
    loop.train_and_evaluate(_config(teacher), resumed)
    a = pretrained.load_conditional(straight, use_ema=False).params
    b = pretrained.load_conditional(resumed, use_ema=False).params
    _leaves_close(a, b, "resumed run = uninterrupted run")
    assert os.path.exists(os.path.join(straight, "samples", "step_0000004.png"))

    # Few-step sampling CLI path (decodes with the VAE), then export and load with diffusers.
    images = str(tmp_path / "inputs")
    os.makedirs(images)
    rng = np.random.default_rng(0)
    from PIL import Image

    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(os.path.join(images, f"{i}.png"))
    written = few_step.run(few_step.SampleRequest(straight, images, str(tmp_path / "samples"), (1,)))
    assert len(written) == 3 and all(os.path.getsize(p) > 0 for p in written)

    errors = export_check.exported_pipeline_errors(straight, str(tmp_path / "export"))
    print(f"export SD-1-like PE-CoDi: diffusers pipeline vs codi_jax.sample, max abs err {errors} on [0, 1] images")
    assert max(errors.values()) <= 1e-4


@pytest.fixture(scope="module")
def sd2_teacher(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sd2")
    pipe = tiny_sd.make_pipeline(str(root / "pipeline"), seed=1, **tiny_sd.SD2)
    tiny_sd.make_controlnet(pipe.unet, str(root / "controlnet"))
    workdir = str(root / "teacher")
    convert.convert(convert.ConversionRequest(str(root / "pipeline"), workdir, controlnet=str(root / "controlnet")))
    return {"workdir": workdir, "root": root}


def test_sd2_full_codi_export_reproduces_the_sampler(sd2_teacher, tmp_path) -> None:
    """SD-2-like (v-prediction, linear projections, heads per level), backbone trained too, in bfloat16
    as the shipped SD configs train: ``codi_jax.sample`` computes in float32 by default (the exported
    pipeline's precision), and ``--dtype=bfloat16`` gives other images."""
    workdir = str(tmp_path / "run")
    config = _config(sd2_teacher, num_train_steps=2, sample_every_steps=2)
    config.adapter.train_backbone = True
    config.model.dtype = "bfloat16"
    loop.train_and_evaluate(config, workdir)
    errors = export_check.exported_pipeline_errors(workdir, str(tmp_path / "export"))
    print(f"export SD-2-like full CoDi: diffusers pipeline vs codi_jax.sample, max abs err {errors} on [0, 1] images")
    assert max(errors.values()) <= 1e-4
    cond = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    images = [
        few_step.sample_conditional(pretrained.load_conditional(workdir, dtype=dtype), cond, None, 1, SamplingOptions())
        for dtype in ("float32", "bfloat16")
    ]
    assert pretrained.read_config(workdir)[0].model.dtype == "bfloat16"
    print(f"float32 vs bfloat16 compute, 1 step: max abs diff {np.max(np.abs(images[0] - images[1])):.3g} on [-1, 1]")
    assert np.max(np.abs(images[0] - images[1])) > 1e-3
