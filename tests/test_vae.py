"""diffusers PyTorch ``AutoencoderKL`` -> our flax ``AutoencoderKL``: equal encoder / decoder outputs.

Tiny randomly initialised diffusers VAEs (every parameter perturbed, since diffusers initialises
some to zero / one) are saved with ``save_pretrained``, loaded with ``load_diffusers_vae`` and
compared on the same inputs (NCHW vs NHWC). Tolerances scale with each reference's magnitude.
"""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.interop.torch_to_flax import load_diffusers_vae, vae_params_from_diffusers
from codi_jax.models.vae import AutoencoderKL, vae_from_diffusers_config

# The references: every test but the config refusals goes through `converted`, which skips where
# torch or diffusers is not installed.
torch = pytest.importorskip("torch") if importlib.util.find_spec("torch") else None
diffusers = pytest.importorskip("diffusers") if importlib.util.find_spec("diffusers") else None

TINY = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[8, 16],
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
    sample_size=16,
)
CONFIGS = {
    "scaled": dict(TINY, scaling_factor=0.37),
    "shifted_no_quant_conv": dict(
        TINY, scaling_factor=1.5, shift_factor=0.12, use_quant_conv=False, use_post_quant_conv=False
    ),
}
RELATIVE_TOLERANCE = 1e-5


def _nhwc(tensor) -> np.ndarray:
    return tensor.detach().numpy().transpose(0, 2, 3, 1)


def _nchw(array: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(array).transpose(0, 3, 1, 2)))


def _assert_close(ours, reference: np.ndarray, what: str) -> float:
    """max |ours - reference| <= RELATIVE_TOLERANCE * max(1, max |reference|); returns the error."""
    ours = np.asarray(ours)
    assert ours.shape == reference.shape, f"{what}: shape {ours.shape} vs {reference.shape}"
    error = float(np.max(np.abs(ours - reference)))
    scale = max(1.0, float(np.max(np.abs(reference))))
    assert error <= RELATIVE_TOLERANCE * scale, f"{what}: max abs error {error:.3g} at reference scale {scale:.3g}"
    return error


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    """(torch vae, our model, our params, images NHWC, latents NHWC) for one config, built once."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**CONFIGS[request.param]).eval()
    with torch.no_grad():
        for p in vae.parameters():  # diffusers zero-inits some biases: make every tensor matter
            p.add_(0.1 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp(request.param)
    vae.save_pretrained(directory, safe_serialization=True)
    model, params = load_diffusers_vae(str(directory))
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    latents = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    return vae, model, params, images, latents


def _apply(model: AutoencoderKL, params, x: np.ndarray, method):
    return jax.jit(functools.partial(model.apply, method=method))({"params": params}, jnp.asarray(x))


def test_config_fields_reach_the_module(converted):
    vae, model, _, _, _ = converted
    assert model.scaling_factor == pytest.approx(vae.config.scaling_factor)
    assert model.shift_factor == (None if vae.config.shift_factor is None else pytest.approx(vae.config.shift_factor))
    assert model.use_quant_conv == (vae.quant_conv is not None)
    assert model.use_post_quant_conv == (vae.post_quant_conv is not None)
    assert model == vae_from_diffusers_config(dict(vae.config))


def test_encoder_matches_torch(converted):
    vae, model, params, images, _ = converted
    with torch.no_grad():
        posterior = vae.encode(_nchw(images)).latent_dist
    mean, logvar = _apply(model, params, images, AutoencoderKL.encode)
    errors = (
        _assert_close(mean, _nhwc(posterior.mean), "mean"),
        _assert_close(logvar, _nhwc(posterior.logvar), "logvar"),
    )
    print(
        f"encode max abs error: mean {errors[0]:.2e} (ref scale {np.abs(_nhwc(posterior.mean)).max():.3g}), "
        f"logvar {errors[1]:.2e} (ref scale {np.abs(_nhwc(posterior.logvar)).max():.3g})"
    )


def test_decoder_matches_torch(converted):
    vae, model, params, _, latents = converted
    with torch.no_grad():
        reference = _nhwc(vae.decode(_nchw(latents)).sample)
    error = _assert_close(_apply(model, params, latents, AutoencoderKL.decode), reference, "decode")
    print(f"decode max abs error {error:.2e} (ref scale {np.abs(reference).max():.3g})")


def test_scaled_latent_helpers_match_torch(converted):
    vae, model, params, images, latents = converted
    scaling, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    with torch.no_grad():
        mean = vae.encode(_nchw(images)).latent_dist.mean
        reference_latents = _nhwc((mean - shift) * scaling)
        reference_images = _nhwc(vae.decode(_nchw(latents) / scaling + shift).sample)
    ours_latents = jax.jit(model.latents_from_images)(params, jnp.asarray(images))
    _assert_close(ours_latents, reference_latents, "latents_from_images")
    _assert_close(
        jax.jit(model.images_from_latents)(params, jnp.asarray(latents)), reference_images, "images_from_latents"
    )


def test_sampled_latents_are_mean_plus_std_noise(converted):
    _, model, params, images, _ = converted
    rng = jax.random.PRNGKey(3)
    sampled = jax.jit(functools.partial(model.latents_from_images, sample=True))(params, jnp.asarray(images), rng)
    mean, logvar = _apply(model, params, images, AutoencoderKL.encode)
    expected = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape) - (model.shift_factor or 0.0)
    _assert_close(sampled, np.asarray(expected * model.scaling_factor), "sampled latents")
    with pytest.raises(ValueError, match="rng"):
        model.latents_from_images(params, jnp.asarray(images), sample=True)


def test_legacy_attention_names_and_mismatches(converted):
    vae, model, params, _, _ = converted
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state_dict = {}
    for name, tensor in vae.state_dict().items():
        for new, old in legacy.items():
            name = name.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        state_dict[name] = tensor
    assert any(".query." in name for name in state_dict)
    jax.tree_util.tree_map(np.testing.assert_array_equal, vae_params_from_diffusers(state_dict, model), params)

    with pytest.raises(ValueError, match=r"encoder\.conv_in\.bias"):
        vae_params_from_diffusers({k: v for k, v in state_dict.items() if k != "encoder.conv_in.bias"}, model)
    with pytest.raises(ValueError, match=r"decoder\.extra\.weight"):
        vae_params_from_diffusers({**state_dict, "decoder.extra.weight": np.zeros(3)}, model)
    with pytest.raises(ValueError, match=r"decoder\.conv_out\.bias"):
        vae_params_from_diffusers({**state_dict, "decoder.conv_out.bias": np.zeros(5)}, model)


@pytest.mark.parametrize(
    "field, value",
    [
        ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
        ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
        ("act_fn", "gelu"),
        ("layers_per_block", [1, 2]),
        ("norm_num_groups", 3),
        ("latents_mean", [0.0] * 4),
        ("_class_name", "AutoencoderTiny"),
        ("some_new_field", 1),
    ],
)
def test_unsupported_config_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        vae_from_diffusers_config(dict(TINY, **{field: value}))
