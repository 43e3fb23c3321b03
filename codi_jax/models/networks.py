"""The networks a (resolved) config describes, and their parameter shapes.

``model.kind``: the backbone, a ``unet`` (``codi_jax.models.unet``) or a ``dit``
(``codi_jax.models.dit``, whose adapter is ``codi_jax.models.dit_controlnet``). ``method='teacher'``: the unconditional
backbone. ``codi`` / ``finetune``: the adapted conditional model (backbone = the teacher's,
plus adapter / LoRA; see ``codi_jax.models.student``). A config
is resolved (``codi_jax.runs.config_resolution``) when its ``model`` / ``schedule`` hold the
teacher's. Shapes come from ``jax.eval_shape`` (no parameter is allocated), so restoring can
read each array straight into its target sharding.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from codi_jax import diffusion, flow_matching
from codi_jax.data import task_spec
from codi_jax.frozen import batch_inputs, encoders
from codi_jax.models import student
from codi_jax.models.dit import DiT, dit_from_config
from codi_jax.models.unet import UNet, unet_from_config
from codi_jax.objectives import codi

CONDITIONAL_METHODS = ("codi", "finetune")
MODEL_KINDS = ("unet", "dit")
Backbone = UNet | DiT


def backbone_from_config(model_config: ml_collections.ConfigDict) -> Backbone:
    """The backbone a ``model`` section describes (``kind``: one of ``MODEL_KINDS``)."""
    kind = model_config["kind"]
    if kind == "unet":
        return unet_from_config(model_config)
    if kind == "dit":
        return dit_from_config(model_config)
    raise ValueError(f"model.kind={kind!r}; valid: {MODEL_KINDS}.")


def is_conditional(config: ml_collections.ConfigDict) -> bool:
    return config.get("method", "teacher") in CONDITIONAL_METHODS


def build_teacher(
    config: ml_collections.ConfigDict,
) -> tuple[Backbone, diffusion.Schedule | flow_matching.FlowSchedule]:
    """The unconditional backbone and schedule of a teacher config."""
    return backbone_from_config(config.model), diffusion.schedule_from_config(config.schedule)


def build_conditional(
    config: ml_collections.ConfigDict,
) -> tuple[student.AdaptedModel, diffusion.Schedule | flow_matching.FlowSchedule]:
    """The adapted model and schedule of a (resolved) codi / finetune config."""
    backbone = backbone_from_config(config.model)
    model = student.build_adapted_model(
        backbone,
        config.adapter,
        cond_channels=adapter_cond_channels(config),
        num_instructions=task_spec.num_instructions(config.task),
        keep_initial=config.method == "codi" and config.codi.predictor == "teacher",
        guidance_embedding=uses_cfg_distillation(config),
    )
    return model, diffusion.schedule_from_config(config.schedule)


def adapter_cond_channels(config: ml_collections.ConfigDict) -> int:
    """Channels of the condition the adapter reads: the task's (pixels), or the latent's for a latent
    DiT run (``batch_inputs.latent_condition``: the condition goes through the VAE first)."""
    if batch_inputs.latent_condition(config):
        batch_inputs.check_latent_condition(config)
        return int(config.model.in_channels)
    return task_spec.cond_channels(config.task)


def check_conditional(config: ml_collections.ConfigDict) -> None:
    """A resolved codi / finetune config builds (adapter choices that fit the backbone) and its
    input size fits the backbone (the UNet's levels, the DiT's patches); no weight is read."""
    model, _ = build_conditional(config)
    size, backbone = model_input_size(config), model.backbone
    if isinstance(backbone, DiT):
        if size % backbone.patch_size:
            raise ValueError(f"data.image_size={config.data.image_size} is not a multiple of the DiT's patch_size.")
    elif size % 2 ** (len(backbone.block_out_channels) - 1):
        raise ValueError(f"data.image_size={config.data.image_size} does not fit the teacher's UNet levels.")


def uses_cfg_distillation(config: ml_collections.ConfigDict) -> bool:
    """Whether the student takes a guidance scale w (``codi.cfg_range`` set on a codi run)."""
    return config.get("method") == "codi" and codi.cfg_range(config.codi) is not None


def latent_factor(config: ml_collections.ConfigDict) -> int:
    """How much smaller the backbone's input is than the data: the VAE's downsampling (1 in pixels)."""
    directory = encoders.vae_path(config)
    if not directory:
        return 1
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"config.latent.vae={directory}: no config.json there (a diffusers AutoencoderKL folder)."
        )
    with open(path) as f:
        return 2 ** (len(json.load(f)["block_out_channels"]) - 1)


def model_input_size(config: ml_collections.ConfigDict) -> int:
    """The backbone's input size: ``data.image_size`` (pixels) over the latent factor."""
    size, factor = int(config.data.image_size), latent_factor(config)
    if size % factor:
        raise ValueError(f"data.image_size={size} is not a multiple of the VAE's downsampling {factor}.")
    return size // factor


def init_teacher_params(model: Backbone, input_size: int, rng: jax.Array) -> Any:
    """Fresh backbone parameters (pure: jit it, or ``eval_shape`` it for shapes); a text backbone gets
    a one-token placeholder context (parameter shapes do not depend on the sequence length)."""
    sample = jnp.zeros((1, input_size, input_size, model.in_channels), jnp.float32)
    return model.init(rng, sample, jnp.zeros((1,), jnp.float32), placeholder_context(model))["params"]


def placeholder_context(model: Backbone) -> Any:
    """A one-example, one-token zero ``context`` of the backbone's structure (None without text; a
    text_time UNet's ``TEXT_TIME_KEYS`` dict)."""
    if model.cross_attention_dim is None:
        return None
    return jax.tree.map(lambda spec: jnp.zeros(spec.shape, spec.dtype), model.context_spec())


def condition_placeholders(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array | None]:
    """A one-example zero condition as the adapter reads it (pixel size; a latent DiT run's: the
    latent's size and channels) and instruction id of the task's shape, for init."""
    size = model_input_size(config) if batch_inputs.latent_condition(config) else int(config.data.image_size)
    cond = jnp.zeros((1, size, size, adapter_cond_channels(config)), jnp.float32)
    instruction = jnp.zeros((1,), jnp.int32) if task_spec.num_instructions(config.task) else None
    return cond, instruction


def init_placeholders(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The keyword inputs ``AdaptedModel.init`` needs beyond the condition: the backbone's input
    shape, a placeholder context (text backbones) and guidance scale (CFG-aware distillation)."""
    size, channels = model_input_size(config), int(config.model.in_channels)
    return dict(
        sample_shape=(1, size, size, channels),
        context=placeholder_context(backbone_from_config(config.model)),
        guidance_scale=jnp.ones((1,), jnp.float32) if uses_cfg_distillation(config) else None,
    )


def teacher_param_shapes(config: ml_collections.ConfigDict) -> Any:
    """Shapes of the (teacher's) backbone parameters; for a conditional config, its backbone's."""
    model = backbone_from_config(config.model)
    return jax.eval_shape(lambda: init_teacher_params(model, model_input_size(config), jax.random.PRNGKey(0)))


def param_shapes(config: ml_collections.ConfigDict, *, with_initial: bool = False) -> Any:
    """Shapes of the full parameter tree a run's model applies (teacher: the UNet's; conditional:
    ``backbone`` / ``adapter`` [/ ``lora``], plus the frozen ``initial`` model if asked)."""
    if not is_conditional(config):
        return teacher_param_shapes(config)
    model, _ = build_conditional(config)
    cond, instruction = condition_placeholders(config)
    placeholders = init_placeholders(config)

    def init():
        backbone = init_teacher_params(model.backbone, model_input_size(config), jax.random.PRNGKey(0))
        return model.init(jax.random.PRNGKey(0), backbone, cond, instruction, **placeholders)

    shapes = jax.eval_shape(init)
    return shapes if with_initial else {key: sub for key, sub in shapes.items() if key != "initial"}
