"""A tiny SD3 CoDi run end to end: the condition through the VAE (as diffusers'
``StableDiffusion3ControlNetPipeline`` hands it to its ``SD3ControlNetModel``), train (exact resume),
sample.

The teacher is ``tests/tiny_sd3.make_pipeline`` (64-px images, 8x8x16 latents, CLIP-L / CLIP-G / T5, a
joint-attention DiT, shift 3), converted with a one-block ``SD3ControlNetModel`` as ``adapter.init_from``.
"""

from __future__ import annotations

import math
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from codi_jax.frozen import batch_inputs  # noqa: E402
from codi_jax.interop import convert  # noqa: E402
from codi_jax.models import networks  # noqa: E402
from codi_jax.runs import config_resolution, pretrained  # noqa: E402
from codi_jax.sampling import few_step  # noqa: E402
from codi_jax.sampling.options import SamplingOptions  # noqa: E402
from codi_jax.training import loop  # noqa: E402
from tests import tiny_sd3  # noqa: E402


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> dict:
    """The tiny SD3 pipeline (no T5: faster) and a one-block ControlNet, converted once."""
    root = tmp_path_factory.mktemp("sd3")
    pipe = tiny_sd3.make_pipeline(str(root / "pipeline"), t5=False)
    controlnet = tiny_sd3.make_controlnet(pipe.transformer, num_layers=1, force_zeros_for_pooled_projection=False)
    controlnet.save_pretrained(str(root / "controlnet"), safe_serialization=True)
    convert.convert(str(root / "pipeline"), str(root / "teacher"), controlnet=str(root / "controlnet"))
    return {"workdir": str(root / "teacher"), "root": root, "pipe": pipe, "controlnet": controlnet}


def _config(teacher: dict, **overrides) -> ml_collections.ConfigDict:
    """``tiny_codi`` as an SD3 PE-CoDi x4 SR run at 64 px, its adapter the converted ControlNet."""
    from codi_jax.configs.cpu import tiny_codi

    config = tiny_codi.get_config()
    config.teacher_workdir = teacher["workdir"]
    config.data.data_dir = str(teacher["root"] / "tfds")
    config.data.image_size = tiny_sd3.IMAGE_SIZE
    config.task.scale = 4
    config.adapter.init_from = teacher["workdir"]
    config.adapter.dit_blocks = 1
    config.codi.guidance_weight = 1.0
    config.text = ml_collections.ConfigDict({"prompt": "a photo of a cat", "negative_prompt": ""})
    config.update(batch_size=2, num_sample_images=2, sample_step_counts=(1, 2), sample_every_steps=4)
    config.update(overrides)
    return config


def _control_image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (tiny_sd3.IMAGE_SIZE, tiny_sd3.IMAGE_SIZE, 3), np.uint8)


def _diffusers_controlnet_cond(teacher: dict, image: np.ndarray, mean: bool) -> np.ndarray:
    """The ``controlnet_cond`` diffusers' pipeline hands its ControlNet for ``image`` (PIL, preprocessed
    by the pipeline), NHWC; ``mean``: ``latent_dist.sample()`` replaced by the posterior mean."""
    from diffusers.models.autoencoders import vae as vae_module

    pipe = diffusers.StableDiffusion3ControlNetPipeline(**teacher["pipe"].components, controlnet=teacher["controlnet"])
    pipe.set_progress_bar_config(disable=True)
    seen = []
    hook = pipe.controlnet.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["controlnet_cond"].detach().numpy()), with_kwargs=True
    )
    sample = vae_module.DiagonalGaussianDistribution.sample
    try:
        if mean:
            vae_module.DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean
        pipe("a photo of a cat", control_image=Image.fromarray(image), num_inference_steps=1, output_type="latent")
    finally:
        vae_module.DiagonalGaussianDistribution.sample = sample
        hook.remove()
    return np.transpose(seen[0], (0, 2, 3, 1))[:1]  # [negative; prompt]: the same image twice


def test_condition_latents_equal_diffusers_controlnet_cond(teacher) -> None:
    """Training's ``encode_batch`` and the samplers' ``condition_encoder`` hand the adapter
    ``(mean - shift) * scaling`` of the control image: diffusers' ``controlnet_cond`` with the posterior
    mean for its unseeded ``latent_dist.sample()`` (a ControlNet with
    ``force_zeros_for_pooled_projection=False``, which applies the VAE's shift)."""
    config = config_resolution.resolve(_config(teacher))
    assert batch_inputs.latent_condition(config) and networks.adapter_cond_channels(config) == 16
    enc, frozen = batch_inputs.load(config)
    image = _control_image()
    cond = jnp.asarray(image[None].astype(np.float32) / 127.5 - 1.0)
    sampled = np.asarray(batch_inputs.condition_encoder(config, enc)(frozen, cond))
    encode = batch_inputs.batch_encoder(config, enc)
    trained = np.asarray(jax.jit(encode)(frozen, {"image": cond, "cond": cond}, jax.random.PRNGKey(0))["cond"])
    theirs = _diffusers_controlnet_cond(teacher, image, mean=True)
    scale = max(1.0, float(np.abs(theirs).max()))
    err = float(np.abs(sampled - theirs).max())
    drawn = float(np.abs(_diffusers_controlnet_cond(teacher, image, mean=False) - theirs).max())
    print(
        f"condition latents vs diffusers' controlnet_cond: max abs err {err:.3g}, max |ref| {scale:.3g}; "
        f"diffusers' own unseeded draw differs from the mean by {drawn:.3g}"
    )
    assert sampled.shape == (1, tiny_sd3.LATENT_SIZE, tiny_sd3.LATENT_SIZE, 16)
    assert err <= 1e-5 * scale
    assert float(np.abs(trained - theirs).max()) <= 1e-5 * scale  # the training path (not jitted here)
    gray = np.asarray(batch_inputs.condition_encoder(config, enc)(frozen, cond[..., :1]))
    rgb = np.asarray(batch_inputs.condition_encoder(config, enc)(frozen, jnp.repeat(cond[..., :1], 3, axis=-1)))
    np.testing.assert_array_equal(gray, rgb)  # a one-channel condition (depth, edges) is repeated to RGB


def test_latent_condition_refuses_a_four_channel_task(teacher) -> None:
    config = config_resolution.resolve(_config(teacher))
    with config.unlocked():
        config.task.name = "inpaint"
    with pytest.raises(ValueError, match=r"^task\.name='inpaint': a latent DiT ControlNet reads its condition"):
        networks.adapter_cond_channels(config)


@pytest.fixture(scope="module")
def trained(teacher, tmp_path_factory) -> str:
    """The tiny SD3 CoDi run trained 4 steps (checkpoints at 2 and 4, samples at 4)."""
    workdir = str(tmp_path_factory.mktemp("sd3_run") / "straight")
    loop.train_and_evaluate(_config(teacher), workdir)
    return workdir


def test_sd3_run_resumes_exactly_and_samples(teacher, trained, tmp_path) -> None:
    """Step 2's checkpoint alone in a workdir, resumed to step 4: bitwise the uninterrupted run; the
    run's sample grid is written, and ``few_step`` (what ``python -m codi_jax.sample`` wraps) samples it."""
    resumed = str(tmp_path / "resumed")
    assert sorted(os.listdir(os.path.join(trained, "checkpoints"))) == ["2", "4"]
    shutil.copytree(os.path.join(trained, "checkpoints", "2"), os.path.join(resumed, "checkpoints", "2"))
    loop.train_and_evaluate(_config(teacher, sample_every_steps=100), resumed)
    a = pretrained.load_conditional(trained, use_ema=False).params
    b = pretrained.load_conditional(resumed, use_ema=False).params
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert os.path.exists(os.path.join(trained, "samples", "step_0000004.png"))
    pre = pretrained.load_conditional(trained)
    cond = np.stack([_control_image(i) for i in range(2)]).astype(np.float32) / 127.5 - 1.0
    samples = few_step.sample_conditional(pre, cond, None, 2, SamplingOptions(batch_size=2))
    assert samples.shape == cond.shape and all(math.isfinite(v) for v in samples.reshape(-1)[:8])
    assert np.abs(samples[0] - samples[1]).max() > 0
