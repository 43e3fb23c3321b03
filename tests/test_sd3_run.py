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

LATENT_SHAPE = (tiny_sd3.LATENT_SIZE, tiny_sd3.LATENT_SIZE, tiny_sd3.LATENT_CHANNELS)  # HWC


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> dict:
    """The tiny SD3 pipeline (no T5: faster) and a one-block ControlNet, converted once."""
    root = tmp_path_factory.mktemp("sd3")
    pipe = tiny_sd3.make_pipeline(str(root / "pipeline"), t5=False)
    controlnet = tiny_sd3.make_controlnet(pipe.transformer, num_layers=1, force_zeros_for_pooled_projection=False)
    controlnet.save_pretrained(str(root / "controlnet"), safe_serialization=True)
    convert.convert(
        convert.ConversionRequest(str(root / "pipeline"), str(root / "teacher"), controlnet=str(root / "controlnet"))
    )
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


def test_sd3_weights_round_trip_to_diffusers(teacher) -> None:
    """The converted transformer and ControlNet, written back by ``flax_to_torch``: diffusers' own state
    dicts, tensor for tensor, and configs that rebuild the same architecture."""
    from codi_jax.interop import flax_to_torch, torch_to_flax

    root = teacher["root"]
    model, params = torch_to_flax.load_diffusers_sd3_transformer(str(root / "pipeline"))
    adapter, adapter_params = torch_to_flax.load_diffusers_sd3_controlnet(str(root / "controlnet"))
    for ours, theirs, config in (
        (
            flax_to_torch.sd3_transformer_state_dict(model, params),
            teacher["pipe"].transformer.state_dict(),
            flax_to_torch.sd3_transformer_diffusers_config(model),
        ),
        (
            flax_to_torch.sd3_controlnet_state_dict(adapter, adapter_params),
            teacher["controlnet"].state_dict(),
            flax_to_torch.sd3_controlnet_diffusers_config(adapter),
        ),
    ):
        assert sorted(ours) == sorted(theirs)
        for name, value in theirs.items():
            np.testing.assert_array_equal(ours[name], value.detach().numpy(), err_msg=name)
        module = teacher["pipe"].transformer if "extra_conditioning_channels" not in config else teacher["controlnet"]
        rebuilt = type(module).from_config(config)
        assert _fields(rebuilt.config) == _fields(module.config)


def _fields(config) -> dict:
    """A diffusers config's fields, tuples as lists (a config read from JSON has lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}


def _pipeline_latents(sample, image: np.ndarray, latents: np.ndarray, steps: int, renoise: bool) -> np.ndarray:
    """The README's ``sample`` (``output_type='latent'``) with ``latents``, our re-noising noise and the
    control image's posterior mean (diffusers' unseeded ``latent_dist.sample()`` replaced)."""
    from diffusers.models.autoencoders import vae as vae_module
    from diffusers.schedulers import scheduling_flow_match_euler_discrete as flow_module

    from tests import export_check

    noise = export_check.OurRenoisingNoise(0, 1, LATENT_SHAPE)
    originals = vae_module.DiagonalGaussianDistribution.sample, flow_module.randn_tensor
    vae_module.DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean
    flow_module.randn_tensor = noise
    try:
        out = sample(Image.fromarray(image), steps=steps, latents=torch.from_numpy(latents), output_type="latent")
    finally:
        vae_module.DiagonalGaussianDistribution.sample, flow_module.randn_tensor = originals
    assert noise.calls == (steps if renoise else 0)
    return out.numpy().transpose(0, 2, 3, 1)


def _our_latents(pre, image: np.ndarray, steps: int) -> np.ndarray:
    """Our few-step sampler's latents (before decoding) for one control image, seed 0."""
    from codi_jax.sampling import conditional, samplers

    enc, frozen = batch_inputs.load(pre.config)
    cond = batch_inputs.condition_encoder(pre.config, enc)(frozen, jnp.asarray(image[None] / 127.5 - 1.0, jnp.float32))
    text = conditional.text_inputs(batch_inputs.add_text(frozen, {"cond": cond}), pre.config)
    renoise = conditional.renoise_between_steps(pre.config)
    z_init, keys = samplers.example_inputs(0, np.arange(1), LATENT_SHAPE, renoise)
    sampler = conditional.make_conditional_sampler(pre.model, pre.schedule, pre.parametrization, clip=False)
    times = jnp.asarray(conditional.sample_times(pre.config, steps))
    return np.asarray(sampler(pre.params, cond, None, z_init, times, keys, text))


def test_sd3_codi_export_reproduces_the_sampler(trained, tmp_path) -> None:
    """The trained run -> ``export`` -> the README's ``StableDiffusion3ControlNetPipeline`` call, with
    our initial latents and re-noising noise, gives our sampler's latents at 1 / 2 / 4 steps."""
    import json

    from codi_jax.interop import export
    from tests import export_check

    out = str(tmp_path / "export")
    export.export_workdir(trained, out, steps=4)
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert index["_class_name"] == "StableDiffusion3ControlNetPipeline" and index["text_encoder_3"] == [None, None]
    scheduler = json.load(open(os.path.join(out, "scheduler", "scheduler_config.json")))
    assert scheduler["shift"] == tiny_sd3.SHIFT and scheduler["stochastic_sampling"] is True
    sample = export_check.readme_namespace(out)["sample"]
    pre = pretrained.load_conditional(trained, dtype="float32")
    image = _control_image(5)
    errors, theirs = {}, {}
    for steps in (1, 2, 4):
        ours = _our_latents(pre, image, steps)
        theirs[steps] = _pipeline_latents(sample, image, _initial_latents(), steps, renoise=True)
        errors[steps] = (float(np.abs(ours - theirs[steps]).max()), float(np.abs(theirs[steps]).max()))
    other = _pipeline_latents(sample, _control_image(6), _initial_latents(), 1, renoise=True)
    assert float(np.abs(other - theirs[1]).max()) > 1e-3  # the control image (ControlNet) is in the comparison
    print(f"SD3 CoDi export: pipeline latents vs our sampler (max abs err, max |ref|) by steps: {errors}")
    assert all(err <= 1e-5 * max(1.0, ref) for err, ref in errors.values()), errors


def _initial_latents() -> np.ndarray:
    """The initial latents of example 0, seed 0 (NCHW), as our sampler draws them."""
    from codi_jax.sampling import samplers

    noise = samplers.example_noise(0, np.arange(1), LATENT_SHAPE)
    return np.array(noise).transpose(0, 3, 1, 2).copy()


def test_sd3_export_grid_and_refusals(teacher) -> None:
    """CoDi passes its unshifted grid points as ``sigmas`` (the scheduler shifts them to our times); a
    fine-tune run samples on the scheduler's own Euler grid, deterministically; a DiT teacher is refused."""
    from codi_jax import flow_matching
    from codi_jax.interop import export_sd3
    from codi_jax.sampling import conditional

    codi = config_resolution.resolve(_config(teacher))
    sigmas = export_sd3.pipeline_sigmas(codi, 4)
    shifted = flow_matching.time_shift(np.asarray(sigmas, np.float32), tiny_sd3.SHIFT)
    np.testing.assert_allclose(shifted, conditional.sample_times(codi, 4)[:-1], rtol=1e-6)
    finetune = config_resolution.resolve(_config(teacher, method="finetune"))
    assert export_sd3.pipeline_sigmas(finetune, 4) is None
    assert export_sd3.scheduler_config(finetune)["stochastic_sampling"] is False
    teacher_config, _ = pretrained.read_config(teacher["workdir"])
    with pytest.raises(ValueError, match=r"^--run=T: a DiT teacher run; export writes SD3 CoDi / fine-tune runs"):
        export_sd3.check_sd3_exportable(teacher_config, "T")
