"""Restoring trained models from a workdir for sampling, evaluation or as CoDi's starting point.

A workdir holds ``checkpoints/<step>/{state,config}`` written by the training loop; the saved
config rebuilds the model, so callers need only the path.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from codi_jax import checkpoint, diffusion
from codi_jax.models.unet import UNet, unet_from_config
from codi_jax.train_state import create_train_state, make_optimizer


@dataclasses.dataclass
class Pretrained:
    """A restored model: module, schedule, parametrization, parameters and where they came from."""

    model: UNet
    schedule: diffusion.Schedule
    parametrization: diffusion.Parametrization
    params: Any
    config: ml_collections.ConfigDict
    step: int
    path: str


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


def load_pretrained(workdir: str, *, step: int | None = None, use_ema: bool = True) -> Pretrained:
    """Restores the (EMA) parameters of the latest (or given) checkpoint in ``workdir``."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No checkpoints directory at {directory} (is --workdir a training workdir?).")
    ckpt = checkpoint.Checkpointer(directory, read_only=True, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"No checkpoint steps in {directory}.")
    if step not in ckpt.all_steps():
        raise FileNotFoundError(f"No checkpoint for step {step} in {directory}; available: {ckpt.all_steps()}.")
    config = ml_collections.ConfigDict(ckpt.restore_config(step))
    model = unet_from_config(config.model)
    schedule = diffusion.schedule_from_config(config.schedule)
    optimizer = make_optimizer(config.optimizer)
    size = config.data.image_size

    def init_state():
        sample = jax.numpy.zeros((1, size, size, config.model.in_channels))
        params = model.init(jax.random.PRNGKey(0), sample, jax.numpy.zeros((1,)))["params"]
        return create_train_state(params, optimizer, jax.random.PRNGKey(0))

    abstract = jax.eval_shape(init_state)
    replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
    state = ckpt.restore(abstract, step=step)
    ckpt.close()
    return Pretrained(
        model=model,
        schedule=schedule,
        parametrization=config.model.parametrization,
        params=state.ema_params if use_ema else state.params,
        config=config,
        step=step,
        path=workdir,
    )


@dataclasses.dataclass
class ConditionalPretrained:
    """A restored CoDi / fine-tuned conditional model."""

    model: Any  # codi_jax.adapted.AdaptedModel
    schedule: diffusion.Schedule
    parametrization: diffusion.Parametrization
    params: Any
    config: ml_collections.ConfigDict
    step: int
    path: str


def load_conditional(workdir: str, *, step: int | None = None, use_ema: bool = True) -> ConditionalPretrained:
    """Restores a ``codi`` / ``finetune`` run's (EMA) parameters; the saved config rebuilds the model
    (the teacher checkpoint is not needed: the backbone is part of the saved state)."""
    from codi_jax import recipes  # recipes imports this module
    from codi_jax.data import tasks

    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No checkpoints directory at {directory} (is --workdir a training workdir?).")
    ckpt = checkpoint.Checkpointer(directory, read_only=True, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in ckpt.all_steps():
        raise FileNotFoundError(f"No checkpoint for step {step} in {directory}; available: {ckpt.all_steps()}.")
    config = ml_collections.ConfigDict(ckpt.restore_config(step))
    method = config.get("method", "teacher")
    if method not in ("codi", "finetune"):
        raise ValueError(f"{workdir} holds a {method!r} run, not a conditional (codi / finetune) one.")
    model, schedule = recipes.build_conditional(config)
    optimizer = model.optimizer(make_optimizer(config.optimizer))
    size = config.data.image_size
    cond = jax.numpy.zeros((1, size, size, tasks.cond_channels(config.task)))
    instruction = jax.numpy.zeros((1,), jax.numpy.int32) if tasks.num_instructions(config.task) else None

    def init_state():
        sample = jax.numpy.zeros((1, size, size, model.backbone.in_channels))
        backbone = model.backbone.init(jax.random.PRNGKey(0), sample, jax.numpy.zeros((1,)))["params"]
        params = model.init(jax.random.PRNGKey(0), backbone, cond, instruction)
        return create_train_state(params, optimizer, jax.random.PRNGKey(0))

    abstract = jax.eval_shape(init_state)
    replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
    state = ckpt.restore(abstract, step=step)
    ckpt.close()
    return ConditionalPretrained(
        model=model,
        schedule=schedule,
        parametrization=config.model.parametrization,
        params=state.ema_params if use_ema else state.params,
        config=config,
        step=step,
        path=workdir,
    )
