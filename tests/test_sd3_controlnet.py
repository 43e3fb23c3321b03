"""diffusers' ``SD3ControlNetModel`` -> our ``DiTControlNet`` adapter: ``SD3Transformer2DModel`` with the
ControlNet's ``block_controlnet_hidden_states`` equals our ``ConditionalModel(backbone, DiTControlNet)`` on
random weights (SD3 medium's blocks, SD3.5's qk-norm / dual attention), ``controlnet_cond`` given as our
``cond`` (latent-sized, ``in_channels`` wide: in diffusers' pipeline the VAE-encoded control image);
``python -m codi_jax.convert --controlnet`` writes it as an ``adapter.init_from`` our adapter tree takes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from codi_jax.interop import torch_to_flax
from codi_jax.models import adapters, dit, student
from tests import tiny_sd3

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

BATCH, TEXT_TOKENS, TOL = 2, 7, 1e-5


def _inputs(seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    size, c = tiny_sd3.LATENT_SIZE, tiny_sd3.LATENT_CHANNELS
    return dict(
        hidden_states=rng.randn(BATCH, c, size, size).astype(np.float32),
        controlnet_cond=rng.randn(BATCH, c, size, size).astype(np.float32),
        encoder_hidden_states=rng.randn(BATCH, TEXT_TOKENS, tiny_sd3.JOINT_DIM).astype(np.float32),
        pooled_projections=rng.randn(BATCH, tiny_sd3.POOLED_DIM).astype(np.float32),
        timestep=np.array([12.0, 875.0], np.float32),
    )


def _theirs(transformer, controlnet, inputs: dict[str, np.ndarray]) -> np.ndarray:
    t = {key: torch.from_numpy(value) for key, value in inputs.items()}
    common = {k: t[k] for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")}
    with torch.no_grad():
        residuals = controlnet(**common, controlnet_cond=t["controlnet_cond"], return_dict=False)[0]
        out = transformer(**common, block_controlnet_hidden_states=residuals).sample
    return out.numpy().transpose(0, 2, 3, 1)


def _ours(model, params, inputs: dict[str, np.ndarray]) -> np.ndarray:
    nhwc = lambda x: x.transpose(0, 2, 3, 1)
    context = {key: inputs[key] for key in dit.SD3_CONTEXT_KEYS}
    out = model.apply(
        {"params": params},
        nhwc(inputs["hidden_states"]),
        inputs["timestep"],
        nhwc(inputs["controlnet_cond"]),
        None,
        context,
    )
    return np.asarray(out)


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_controlnet_matches_diffusers(variant: str, tmp_path) -> None:
    overrides = tiny_sd3.SD35 if variant == "sd35" else {}
    transformer = tiny_sd3.make_transformer(**overrides)
    controlnet = tiny_sd3.make_controlnet(transformer, num_layers=2)
    controlnet.save_pretrained(str(tmp_path / "controlnet"), safe_serialization=True)
    backbone = dit.DiT(**torch_to_flax.sd3_transformer_fields(dict(transformer.config)))
    backbone_params = torch_to_flax.sd3_transformer_params(transformer.state_dict(), backbone)
    adapter, adapter_params = torch_to_flax.load_diffusers_sd3_controlnet(str(tmp_path / "controlnet"))
    assert adapter.num_layers == 2 and adapter.cond_channels == tiny_sd3.LATENT_CHANNELS
    assert set(adapter_params) >= {"pos_embed_input", "controlnet_blocks_0", "controlnet_blocks_1", "context_embedder"}
    model = adapters.ConditionalModel(backbone=backbone, adapter=adapter)
    params = {"backbone": backbone_params, "adapter": adapter_params}
    inputs = _inputs()
    theirs, ours = _theirs(transformer, controlnet, inputs), _ours(model, params, inputs)
    error, scale = float(np.abs(ours - theirs).max()), max(1.0, float(np.abs(theirs).max()))
    print(f"SD3 transformer + SD3ControlNetModel ({variant}): max abs error {error:.3g}, max |ref| {scale:.3g}")
    assert error <= TOL * scale
    no_control = _ours(model, params, dict(inputs, controlnet_cond=0 * inputs["controlnet_cond"]))
    assert np.abs(no_control - ours).max() > 100 * TOL * scale  # the condition reaches the output
    # the adapter our runs build (adapter.dit_blocks=2, a 16-channel condition) has the converted tree
    config = ml_collections.ConfigDict(dict(adapters.default_adapter_config(), dit_blocks=2))
    built = student.build_adapted_model(backbone, config, cond_channels=tiny_sd3.LATENT_CHANNELS).module.adapter
    shapes = torch_to_flax.sd3_controlnet_param_shapes(built)
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(jnp.shape, adapter_params)


def test_controlnet_refusals() -> None:
    base = dict(tiny_sd3.TRANSFORMER, _class_name="SD3ControlNetModel")
    for field, value, message in (
        ("use_pos_embed", False, "use_pos_embed=False"),
        ("pos_embed_type", None, "pos_embed_type=None"),
        ("joint_attention_dim", None, "joint_attention_dim=None"),
    ):
        with pytest.raises(torch_to_flax.UnsupportedDiffusersConfig, match=message):
            torch_to_flax.sd3_controlnet_fields(dict(base, **{field: value}))
    fields, cond = torch_to_flax.sd3_controlnet_fields(dict(base, extra_conditioning_channels=1))
    assert cond == tiny_sd3.LATENT_CHANNELS + 1 and fields["num_layers"] == tiny_sd3.TRANSFORMER["num_layers"]


def test_convert_writes_the_controlnet_as_an_init_from(tmp_path) -> None:
    """``convert --controlnet``: ``adapter.json`` and params equal to the direct conversion; a ControlNet of
    another width is refused naming the field."""
    from codi_jax import sharding
    from codi_jax.interop import convert
    from codi_jax.runs import checkpoint

    pipe = tiny_sd3.make_pipeline(str(tmp_path / "pipeline"))
    controlnet_dir = str(tmp_path / "controlnet")
    tiny_sd3.make_controlnet(pipe.transformer, num_layers=2).save_pretrained(controlnet_dir)
    summary = convert.convert(
        convert.ConversionRequest(str(tmp_path / "pipeline"), str(tmp_path / "teacher"), controlnet=controlnet_dir)
    )
    assert any("SD3ControlNetModel" in line for line in convert.summary_lines(summary))
    fields = convert.controlnet_adapter_fields(str(tmp_path / "teacher"))
    assert fields == dict(dit_blocks=2, cond_channels=16, force_zeros_for_pooled_projection=True)
    adapter, direct = torch_to_flax.load_diffusers_sd3_controlnet(controlnet_dir)
    shapes = torch_to_flax.sd3_controlnet_param_shapes(adapter)
    mesh = sharding.make_mesh(devices=jax.local_devices()[:1])
    restored = convert.restore_controlnet(
        str(tmp_path / "teacher"), checkpoint.abstract_like(shapes, sharding.tree_shardings(shapes, mesh))
    )
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), direct)
    wide = tiny_sd3.make_controlnet(pipe.transformer, num_layers=2, caption_projection_dim=64, num_attention_heads=8)
    wide.save_pretrained(str(tmp_path / "wide"))
    request = convert.ConversionRequest(
        str(tmp_path / "pipeline"), str(tmp_path / "t2"), controlnet=str(tmp_path / "wide")
    )
    with pytest.raises(ValueError, match="the ControlNet's caption_projection_dim=64 differs"):
        convert.plan_conversion(request)
