"""Unconditional teacher: the diffusion (or flow-matching) loss and its pure train step."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from codi_jax import diffusion, flow_matching
from codi_jax.training.train_state import TrainState, apply_gradients


def noised_example(
    schedule: diffusion.Schedule | flow_matching.FlowSchedule,
    x: jax.Array,
    rng: jax.Array,
    parametrization: diffusion.Parametrization,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """A random training time per example and the noised data there: ``(t, z_t, target,
    rng_dropout)``, ``target`` being the network output the diffusion loss regresses to. A flow
    schedule: ``z_t = (1 - t) x + t eps`` and the velocity ``eps - x`` (``parametrization`` is 'v')."""
    parametrization = diffusion.resolve_parametrization(schedule, parametrization)
    rng_t, rng_eps, rng_dropout = jax.random.split(rng, 3)
    t = schedule.sample_train_time(rng_t, (x.shape[0],))
    eps = jax.random.normal(rng_eps, x.shape, jnp.float32)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    z_t = diffusion.q_sample(x, eps, alpha_t, sigma_t)
    return t, z_t, diffusion.prediction_from_x_eps(x, eps, alpha_t, sigma_t, parametrization), rng_dropout


def diffusion_loss(
    params: Any,
    model: nn.Module,
    schedule: diffusion.Schedule | flow_matching.FlowSchedule,
    x: jax.Array,
    rng: jax.Array,
    parametrization: diffusion.Parametrization = "v",
) -> jax.Array:
    """Mean squared error of the network output against its target at a random time per example."""
    t, z_t, target, rng_dropout = noised_example(schedule, x, rng, parametrization)
    prediction = model.apply({"params": params}, z_t, schedule.model_time(t), train=True, rngs={"dropout": rng_dropout})
    return jnp.mean(jnp.square(prediction - target))


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    model: nn.Module,
    schedule: diffusion.Schedule | flow_matching.FlowSchedule,
    optimizer: optax.GradientTransformation,
    ema_decay: float,
    ema_warmup: bool = False,
    parametrization: diffusion.Parametrization = "v",
    max_param_norm_ratio: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One teacher update. Pure: bind the keyword arguments with ``functools.partial`` and jit.
    ``max_param_norm_ratio``: see ``train_state.update_is_sane`` (0: reject non-finite only)."""
    loss, grads = jax.value_and_grad(diffusion_loss)(
        state.params, model, schedule, batch["image"], rng, parametrization
    )
    new_state, skipped = apply_gradients(
        state, grads, optimizer, ema_decay, ema_warmup, loss=loss, max_param_norm_ratio=max_param_norm_ratio
    )
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "skipped_nonfinite": skipped}
    return new_state, metrics
