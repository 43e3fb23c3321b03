"""Samplers. Pure functions of (params, noise, times); the network is bound by ``partial``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax import diffusion

# apply_fn(params, z_t, model_time) -> network output
ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


def uniform_times(num_steps: int) -> np.ndarray:
    """``num_steps + 1`` times from 1 down to 0, evenly spaced (many-step teacher sampling)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    return np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float32)


def ddim_sample(
    apply_fn: ApplyFn,
    params: Any,
    z_init: jax.Array,
    times: jax.Array,
    schedule: diffusion.Schedule,
    parametrization: diffusion.Parametrization,
) -> jax.Array:
    """Deterministic DDIM from ``z_init`` at ``times[0]`` down to ``times[-1]``; returns ``x_hat``.

    The last step returns the network's ``x_hat`` itself (equal to the DDIM move when the final
    time is 0), clipped to the data range.
    """
    times = jnp.asarray(times, jnp.float32)

    def step(z_t, t_pair):
        t, s = t_pair[0], t_pair[1]
        alpha_t, sigma_t = schedule.alpha_sigma(t)
        alpha_s, sigma_s = schedule.alpha_sigma(s)
        model_t = jnp.broadcast_to(schedule.model_time(t), (z_t.shape[0],))
        prediction = apply_fn(params, z_t, model_t)
        x_hat, eps_hat = diffusion.x_eps_from_prediction(z_t, prediction, alpha_t, sigma_t, parametrization)
        x_hat = jnp.clip(x_hat, -1.0, 1.0)
        return diffusion.ddim_step(x_hat, eps_hat, alpha_s, sigma_s), x_hat

    pairs = jnp.stack([times[:-1], times[1:]], axis=1)
    _, x_hats = jax.lax.scan(step, z_init, pairs)
    return x_hats[-1]


def to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
    """[-1, 1] floats to uint8 [0, 255]."""
    images = np.asarray(images, np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 1) -> np.ndarray:
    """Tiles NHWC images into one HWC image, ``columns`` per row (default: square-ish)."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    fill = 255 if images.dtype == np.uint8 else 1.0
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), fill, images.dtype)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = images[
            i
        ]
    return grid
