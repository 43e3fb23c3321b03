"""The networks a (resolved) config describes, and their parameter shapes.

``method='teacher'``: the unconditional UNet. ``codi`` / ``finetune``: the adapted conditional
model (backbone = the teacher's UNet, plus adapter / LoRA; see ``codi_jax.adapted``). A config
is resolved (``codi_jax.config_resolution``) when its ``model`` / ``schedule`` hold the
teacher's. Shapes come from ``jax.eval_shape`` (no parameter is allocated), so restoring can
read each array straight into its target sharding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from codi_jax import adapted, diffusion
from codi_jax.data import tasks
from codi_jax.models.unet import UNet, unet_from_config

CONDITIONAL_METHODS = ("codi", "finetune")


def is_conditional(config: ml_collections.ConfigDict) -> bool:
    return config.get("method", "teacher") in CONDITIONAL_METHODS


def build_teacher(config: ml_collections.ConfigDict) -> tuple[UNet, diffusion.Schedule]:
    """The unconditional UNet and schedule of a teacher config."""
    return unet_from_config(config.model), diffusion.schedule_from_config(config.schedule)


def build_conditional(config: ml_collections.ConfigDict) -> tuple[adapted.AdaptedModel, diffusion.Schedule]:
    """The adapted model and schedule of a (resolved) codi / finetune config."""
    backbone = unet_from_config(config.model)
    model = adapted.build_adapted_model(
        backbone,
        config.adapter,
        cond_channels=tasks.cond_channels(config.task),
        num_instructions=tasks.num_instructions(config.task),
        keep_initial=config.method == "codi" and config.codi.predictor == "teacher",
    )
    return model, diffusion.schedule_from_config(config.schedule)


def init_teacher_params(model: UNet, image_size: int, rng: jax.Array) -> Any:
    """Fresh UNet parameters (pure: jit it, or ``eval_shape`` it for shapes)."""
    sample = jnp.zeros((1, image_size, image_size, model.in_channels), jnp.float32)
    return model.init(rng, sample, jnp.zeros((1,), jnp.float32))["params"]


def condition_placeholders(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array | None]:
    """A one-example zero condition (and instruction id) of the task's shape, for init."""
    size = int(config.data.image_size)
    cond = jnp.zeros((1, size, size, tasks.cond_channels(config.task)), jnp.float32)
    instruction = jnp.zeros((1,), jnp.int32) if tasks.num_instructions(config.task) else None
    return cond, instruction


def teacher_param_shapes(config: ml_collections.ConfigDict) -> Any:
    """Shapes of the (teacher's) UNet parameters; for a conditional config, its backbone's."""
    model = unet_from_config(config.model)
    return jax.eval_shape(lambda: init_teacher_params(model, int(config.data.image_size), jax.random.PRNGKey(0)))


def param_shapes(config: ml_collections.ConfigDict, *, with_initial: bool = False) -> Any:
    """Shapes of the full parameter tree a run's model applies (teacher: the UNet's; conditional:
    ``backbone`` / ``adapter`` [/ ``lora``], plus the frozen ``initial`` model if asked)."""
    if not is_conditional(config):
        return teacher_param_shapes(config)
    model, _ = build_conditional(config)
    cond, instruction = condition_placeholders(config)

    def init():
        backbone = init_teacher_params(model.backbone, int(config.data.image_size), jax.random.PRNGKey(0))
        return model.init(jax.random.PRNGKey(0), backbone, cond, instruction)

    shapes = jax.eval_shape(init)
    return shapes if with_initial else {key: sub for key, sub in shapes.items() if key != "initial"}
