"""Classifier-free guidance (``codi_jax.sampling.guidance``) and the frozen encoders' pure functions
(``codi_jax.frozen.encoders``)."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from codi_jax import diffusion
from codi_jax.frozen import encoders
from codi_jax.models.vae import AutoencoderKL, vae_param_shapes
from codi_jax.sampling import guidance, samplers


def _pair(seed: int = 0, shape=(3, 4, 4, 2)) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=shape), jnp.float32), jnp.asarray(rng.normal(size=shape), jnp.float32)


def test_combine_scale_one_is_cond_bitwise_and_zero_is_uncond() -> None:
    uncond, cond = _pair()
    assert np.array_equal(np.asarray(guidance.combine(uncond, cond, 1.0)), np.asarray(cond))
    np.testing.assert_allclose(np.asarray(guidance.combine(uncond, cond, 0.0)), np.asarray(uncond), atol=1e-6)
    # diffusers' form, algebraically equal
    np.testing.assert_allclose(
        np.asarray(guidance.combine(uncond, cond, 7.5)), np.asarray(uncond + 7.5 * (cond - uncond)), atol=1e-5
    )
    # one scale per example, broadcast over NHWC; rows at scale 1 stay bitwise cond (also under jit)
    scales = jnp.asarray([1.0, 0.0, 3.0])
    mixed = np.asarray(jax.jit(guidance.combine)(uncond, cond, scales))
    assert np.array_equal(mixed[0], np.asarray(cond[0]))
    np.testing.assert_allclose(mixed[1], np.asarray(uncond[1]), atol=1e-6)
    np.testing.assert_allclose(mixed[2], np.asarray(uncond[2] + 3.0 * (cond[2] - uncond[2])), atol=1e-5)
    with pytest.raises(ValueError, match="Guidance scale of shape"):
        guidance.combine(uncond, cond, jnp.ones((2,)))


def _toy_apply(params, z, model_t, context):
    """A network that depends nonlinearly on every input, the context a (text, control) pair."""
    text, control = context
    return (
        jnp.tanh(params["w"] * z + 1e-3 * model_t[:, None, None, None])
        + text.mean(axis=(1, 2))[:, None, None, None] * control
    )


def test_guided_apply_is_one_doubled_call_equal_to_two_calls() -> None:
    z, control = _pair(1)
    text, negative = (jnp.asarray(np.random.default_rng(s).normal(size=(3, 5, 6)), jnp.float32) for s in (2, 3))
    params, model_t = {"w": jnp.float32(0.7)}, jnp.asarray([999.0, 500.0, 1.0])
    calls = []

    def counting_apply(params, z, model_t, context):
        calls.append(z.shape[0])
        return _toy_apply(params, z, model_t, context)

    scale = jnp.asarray([2.0, 1.0, 0.5])
    guided = guidance.Guided(params, (text, control), (negative, control), scale)
    out = guidance.guided_apply(counting_apply)(guided, z, model_t)
    assert calls == [6]  # one network call on [uncond; cond]
    cond = _toy_apply(params, z, model_t, (text, control))
    uncond = _toy_apply(params, z, model_t, (negative, control))
    np.testing.assert_allclose(np.asarray(out), np.asarray(guidance.combine(uncond, cond, scale)), atol=1e-6)
    assert np.array_equal(np.asarray(out[1]), np.asarray(cond[1]))
    # no unconditional context: a plain conditional call
    plain = guidance.guided_apply(_toy_apply)(guidance.Guided(params, (text, control)), z, model_t)
    assert np.array_equal(np.asarray(plain), np.asarray(cond))
    with pytest.raises(ValueError, match="same structure|structure"):
        guidance.guided_apply(_toy_apply)(guidance.Guided(params, (text, control), negative, 2.0), z, model_t)


def test_guided_ddim_compiles_once_for_every_scale_and_matches_the_unguided_sampler() -> None:
    schedule = diffusion.Schedule("scaled_linear")
    times = diffusion.diffusers_ddim_times(schedule, 3)
    z, control = _pair(4)
    text, negative = (jnp.asarray(np.random.default_rng(s).normal(size=(3, 5, 6)), jnp.float32) for s in (5, 6))
    params = {"w": jnp.float32(0.3)}
    run = functools.partial(
        samplers.ddim_sample, times=times, schedule=schedule, parametrization="eps", clip_denoised=False, output="z"
    )
    guided = jax.jit(functools.partial(run, guidance.guided_apply(_toy_apply)))
    at_one = guided(guidance.Guided(params, (text, control), (negative, control), jnp.float32(1.0)), z)
    at_three = guided(guidance.Guided(params, (text, control), (negative, control), jnp.float32(3.0)), z)
    assert guided._cache_size() == 1
    # at scale 1 the guided sampler is the conditional one (another compiled batch size: rounding only)
    unguided = guided(guidance.Guided(params, (text, control)), z)
    np.testing.assert_allclose(np.asarray(at_one), np.asarray(unguided), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(at_three) - np.asarray(at_one)).max() > 1e-3


def test_ddim_sample_options() -> None:
    """Defaults clip and return the last ``x_hat``; ``clip_denoised=False`` / ``output='z'`` do neither."""
    schedule = diffusion.Schedule("scaled_linear")
    times = np.asarray([0.8, 0.4, 0.001], np.float32)
    z = 3.0 * _pair(7)[0]

    def big_x(params, z_t, model_t):  # x prediction far outside [-1, 1]
        return 5.0 * z_t

    default = np.asarray(samplers.ddim_sample(big_x, None, z, times, schedule, "x"))
    assert np.abs(default).max() <= 1.0
    unclipped = np.asarray(samplers.ddim_sample(big_x, None, z, times, schedule, "x", clip_denoised=False))
    assert np.abs(unclipped).max() > 1.0
    final = np.asarray(samplers.ddim_sample(big_x, None, z, times, schedule, "x", clip_denoised=False, output="z"))
    # the last move: alpha_s x_hat + sigma_s eps_hat at s = times[-1] from the same last x_hat
    t, s = times[-2], times[-1]
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    alpha_s, sigma_s = schedule.alpha_sigma(s)
    steps = samplers.ddim_sample(big_x, None, z, times[:-1], schedule, "x", clip_denoised=False, output="z")
    x_hat, eps_hat = diffusion.x_eps_from_prediction(steps, big_x(None, steps, None), alpha_t, sigma_t, "x")
    np.testing.assert_allclose(final, np.asarray(alpha_s * x_hat + sigma_s * eps_hat), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(unclipped, np.asarray(x_hat), rtol=1e-6)
    with pytest.raises(ValueError, match="output='eps'"):
        samplers.ddim_sample(big_x, None, z, times, schedule, "x", output="eps")


TINY_VAE = dict(block_out_channels=(8, 8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)


@pytest.fixture(scope="module")
def tiny_vae() -> tuple[AutoencoderKL, dict]:
    vae = AutoencoderKL(**TINY_VAE, scaling_factor=0.5, shift_factor=0.25)
    rng = np.random.default_rng(0)
    shapes = vae_param_shapes(vae)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), jnp.float32), shapes)
    return vae, params


def test_encode_images_mean_and_sample_statistics(tiny_vae) -> None:
    vae, params = tiny_vae
    image = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, size=(1, 16, 16, 3)), jnp.float32)
    mean, logvar = vae.apply({"params": params}, image, method=AutoencoderKL.encode)
    encode = jax.jit(functools.partial(encoders.encode_images, vae), static_argnames="mode")
    latents = encode(params, image, None, mode="mean")
    np.testing.assert_allclose(np.asarray(latents), np.asarray((mean - 0.25) * 0.5), rtol=1e-5, atol=1e-6)
    decode = jax.jit(functools.partial(encoders.decode_latents, vae))
    np.testing.assert_allclose(
        np.asarray(decode(params, latents)),
        np.asarray(vae.apply({"params": params}, mean, method=AutoencoderKL.decode)),
        rtol=1e-4,
        atol=1e-5,
    )
    batch = jnp.repeat(image, 256, axis=0)
    samples = np.asarray(encode(params, batch, jax.random.PRNGKey(3), mode="sample"))
    std = np.exp(0.5 * np.asarray(logvar))
    standardized = (samples / 0.5 + 0.25 - np.asarray(mean)) / std  # N(0, 1) per entry
    assert standardized.shape == (256, 4, 4, 4)
    assert abs(standardized.mean()) < 0.03 and abs(standardized.std() - 1.0) < 0.03
    per_entry = standardized.mean(axis=0)  # each entry's mean, se 1/16
    assert np.abs(per_entry).max() < 5 / 16
    assert np.abs(standardized.std(axis=0) - 1.0).max() < 0.3
    with pytest.raises(ValueError, match="needs an rng key"):
        encoders.encode_images(vae, params, image, None, "sample")
    with pytest.raises(ValueError, match="encode mode 'mode'"):
        encoders.encode_images(vae, params, image, None, "mode")


def test_encoder_config_checks(tmp_path) -> None:
    empty = encoders.load_encoders(ml_collections.ConfigDict({"model": {}}))
    assert not empty.is_latent and not empty.has_text
    pixel = ml_collections.ConfigDict({"latent": {"vae": "", "encode": "sample"}, "text": {"encoder": ""}})
    assert not encoders.is_latent(pixel) and not encoders.has_text(pixel)
    encoders.check_encoder_paths(pixel)
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=f"config.latent.vae={missing}: no such directory"):
        encoders.check_encoder_paths(ml_collections.ConfigDict({"latent": {"vae": missing, "encode": "sample"}}))
    with pytest.raises(ValueError, match="config.latent.encode='mode'"):
        encoders.check_encoder_paths(ml_collections.ConfigDict({"latent": {"vae": str(tmp_path), "encode": "mode"}}))
    text = {"encoder": str(tmp_path), "tokenizer": missing, "max_length": 0}
    with pytest.raises(FileNotFoundError, match=f"config.text.tokenizer={missing}: no such directory"):
        encoders.check_encoder_paths(ml_collections.ConfigDict({"text": text}))
    with pytest.raises(ValueError, match="config.text.tokenizer is empty"):
        encoders.check_encoder_paths(ml_collections.ConfigDict({"text": {"encoder": str(tmp_path), "tokenizer": ""}}))
    with pytest.raises(ValueError, match="has no text encoder"):
        encoders.encode_prompts(empty, ["a cat"])


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIXEL_TEACHER = os.path.join(REPO, "checkpoints", "teacher_patches32_color")  # committed pixel teacher, no text


def test_text_flags_on_a_pixel_teacher_are_one_line_user_errors(tmp_path, capsys) -> None:
    from codi_jax.cli import sample_teacher
    from codi_jax.sampling import many_step

    pixel = ml_collections.ConfigDict({"latent": {"vae": ""}, "text": {"encoder": ""}})
    many_step.check_text_flags(pixel, "w", None, None, 1.0)  # the defaults are fine
    with pytest.raises(ValueError, match="--prompt: the teacher in --run w has no text encoder"):
        many_step.check_text_flags(pixel, "w", "a cat", None, 1.0)
    with pytest.raises(ValueError, match="--negative_prompt: the teacher"):
        many_step.check_text_flags(ml_collections.ConfigDict(), "w", None, "", 1.0)
    with pytest.raises(ValueError, match="--guidance_scale=7.5: the teacher in --run w has no text encoder"):
        many_step.check_text_flags(pixel, "w", None, None, 7.5)
    text = ml_collections.ConfigDict({"text": {"encoder": "/x", "tokenizer": "/y"}})
    many_step.check_text_flags(text, "w", "a cat", "", 7.5)
    with pytest.raises(ValueError, match="--guidance_scale=-1.0: must be a finite number >= 0"):
        many_step.check_text_flags(text, "w", "a cat", "", -1.0)
    out = str(tmp_path / "samples")
    from codi_jax.cli import common

    argv = ["sample_teacher", f"--run={PIXEL_TEACHER}", f"--out={out}", "--prompt=a cat"]
    try:
        with pytest.raises(SystemExit) as exit_info:
            common.run_main(sample_teacher.main, argv=argv)
    finally:
        for name in ("run", "out", "prompt"):
            common.FLAGS[name].value = common.FLAGS[name].default
    assert exit_info.value.code == common.EXIT_USER_ERROR
    assert capsys.readouterr().err == (
        f"error: --prompt: the teacher in --run {PIXEL_TEACHER} has no text encoder (config.text.encoder).\n"
    )
    assert not os.path.exists(out)


def test_sampling_dtype_option() -> None:
    from codi_jax.sampling.options import SamplingOptions

    assert SamplingOptions().model_dtype == "float32"  # the exported pipeline's precision
    assert SamplingOptions(dtype="bfloat16").model_dtype == "bfloat16"
    assert SamplingOptions(dtype="run").model_dtype is None  # the run's model.dtype
    with pytest.raises(ValueError, match=r"^--dtype='fp8'; valid: float32, bfloat16, run\.$"):
        SamplingOptions(dtype="fp8")
