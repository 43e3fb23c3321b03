"""Flow matching (rectified flow): the path, its velocity, shifted times, training times, Euler steps.

The convention is SD3's and diffusers' ``FlowMatchEulerDiscreteScheduler``'s: time ``t`` in
``[0, 1]`` (0 = data, 1 = noise, as everywhere in this codebase; diffusers calls it ``sigma``),

    x_t = (1 - t) x_0 + t eps,        v = dx_t / dt = eps - x_0,

and the network predicts ``v``. From ``(x_t, v)``: ``x_0 = x_t - t v``, ``eps = x_t + (1 - t) v``.
The network is fed ``1000 t`` (``FlowSchedule.model_time``), what diffusers' SD3 / Flux pipelines
feed their transformers (``scheduler.timesteps = sigmas * num_train_timesteps``).

This is the VP form of ``codi_jax.diffusion`` with ``alpha_t = 1 - t`` and ``sigma_t = t`` (not
variance-preserving): the Euler step ``x_t + (s - t) v`` equals the DDIM move
``alpha_s x_0 + sigma_s eps`` with the ``(x_0, eps)`` the velocity gives. ``docs/flow_matching.md``
has the formulas and the checks.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

KIND = "flow"
TIME_SAMPLINGS = ("uniform", "logit_normal")


def time_shift(t, shift: float):
    """SD3's shift of times towards noise: ``shift t / (1 + (shift - 1) t)`` (1: no shift).

    diffusers ``FlowMatchEulerDiscreteScheduler`` (0.42) applies it to its sigmas in ``__init__``
    and ``set_timesteps`` when ``use_dynamic_shifting=False``. Works on NumPy and JAX arrays.
    """
    return shift * t / (1.0 + (shift - 1.0) * t)


def exponential_time_shift(t, mu: float, sigma: float = 1.0):
    """The resolution-dependent shift of Flux (and SD3 configs with ``use_dynamic_shifting``):
    ``exp(mu) / (exp(mu) + (1 / t - 1) ** sigma)``, diffusers' ``FlowMatchEulerDiscreteScheduler.
    _time_shift_exponential`` (0.42; ``set_timesteps(..., mu=mu)`` calls it with ``sigma = 1``).
    With ``sigma = 1`` it is ``time_shift(t, exp(mu))``. ``t`` must be > 0."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0) ** sigma)


def resolution_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """``mu`` for ``exponential_time_shift`` from the image-token count, linear in it through
    ``(base_seq_len, base_shift)`` and ``(max_seq_len, max_shift)``: diffusers' ``calculate_shift``
    (``pipelines/flux/pipeline_flux.py``, copied into the SD3 pipeline; 0.42), whose defaults these are."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def euler_times(
    num_steps: int, shift: float = 1.0, mu: float | None = None, num_train_timesteps: int = 1000
) -> np.ndarray:
    """diffusers ``FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps[, mu=mu])``'s sigmas
    (0.42): ``num_steps`` start times followed by 0, float32, descending.

    Without ``mu`` (``use_dynamic_shifting=False``): ``linspace(1, sigma_min, n)`` shifted by ``shift``,
    where ``sigma_min`` is the scheduler's smallest training sigma, ``time_shift(1 / T, shift)``, so
    the last start time is shifted twice, as diffusers does. With ``mu`` (``use_dynamic_shifting=True``,
    whose training sigmas are unshifted): ``linspace(1, 1 / T, n)`` through ``exponential_time_shift``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: must be at least 1.")
    T = num_train_timesteps
    # The scheduler's training sigmas are float32 (torch); its sigma_min is read back from them.
    smallest = np.float32(1.0) / np.float32(T)
    sigma_min = float(smallest if mu is not None else time_shift(smallest, np.float32(shift)))
    sigmas = np.linspace(T, sigma_min * T, num_steps) / T
    sigmas = exponential_time_shift(sigmas, mu) if mu is not None else time_shift(sigmas, shift)
    return np.concatenate([sigmas, [0.0]]).astype(np.float32)


def interpolate(x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """The path ``x_t = (1 - t) x_0 + t eps`` (``t`` scalar or one per example)."""
    t = _bcast(t, x0)
    return (1.0 - t) * x0 + t * eps


def velocity(x0: jax.Array, eps: jax.Array) -> jax.Array:
    """The velocity target ``v = eps - x_0`` (the path's time derivative)."""
    return eps - x0


def x0_eps_from_velocity(x_t: jax.Array, v: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x_0, eps) = (x_t - t v, x_t + (1 - t) v)``: the data and noise a velocity points at."""
    t = _bcast(t, x_t)
    return x_t - t * v, x_t + (1.0 - t) * v


def euler_step(x_t: jax.Array, v: jax.Array, t: jax.Array, t_next: jax.Array) -> jax.Array:
    """One Euler step of the ODE ``dx/dt = v``: ``x_t + (t_next - t) v`` (diffusers' ``step``)."""
    return x_t + _bcast(jnp.asarray(t_next) - jnp.asarray(t), x_t) * v


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
    """The flow-matching schedule of a run (``config.schedule`` with ``kind='flow'``).

    shift: SD3's time shift (``time_shift``), applied to training times and to the Euler grid
      (diffusers' SD3 training scripts draw their times from the shifted scheduler sigmas).
    time_sampling: training times before the shift: ``uniform`` on (0, 1] or SD3's
      ``logit_normal`` (``sigmoid(logit_mean + logit_std n)``, n standard normal).
    num_train_timesteps: the network is fed ``num_train_timesteps * t`` (diffusers: 1000).
    """

    kind: str = KIND
    shift: float = 1.0
    time_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    num_train_timesteps: int = 1000

    def __post_init__(self):
        if self.kind != KIND:
            raise ValueError(f"FlowSchedule: kind={self.kind!r}; expected {KIND!r}.")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"schedule.shift={self.shift}: must be a finite number > 0 (1: no shift).")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"schedule.time_sampling={self.time_sampling!r}; valid values: {TIME_SAMPLINGS}.")
        if not (math.isfinite(self.logit_std) and self.logit_std > 0):
            raise ValueError(f"schedule.logit_std={self.logit_std}: must be a finite number > 0.")

    def model_time(self, t: jax.Array) -> jax.Array:
        """What the network's time embedding is fed: ``num_train_timesteps * t``."""
        return self.num_train_timesteps * jnp.asarray(t, jnp.float32)

    def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The path's coefficients ``(1 - t, t)`` (float32, ``t`` clipped to [0, 1]): the form
        ``z_t = alpha_t x + sigma_t eps`` that CoDi's loss and the few-step samplers work in."""
        t = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, 1.0)
        return 1.0 - t, t

    def grid_time(self, u):
        """CoDi's grid point ``u = k / N`` as a time: shifted as the Euler grid is (``time_shift``)."""
        return time_shift(u, self.shift)

    def sample_train_time(self, rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Training times in (0, 1]: ``time_sampling`` draws, then ``shift``."""
        if self.time_sampling == "logit_normal":
            u = jax.nn.sigmoid(self.logit_mean + self.logit_std * jax.random.normal(rng, shape, jnp.float32))
        else:
            u = 1.0 - jax.random.uniform(rng, shape, jnp.float32)
        return time_shift(u, self.shift)

    def sampling_times(self, num_steps: int) -> np.ndarray:
        """The Euler grid of ``num_steps`` steps (``euler_times``), ending at 0."""
        return euler_times(num_steps, self.shift, num_train_timesteps=self.num_train_timesteps)


def _bcast(coef: jax.Array, like: jax.Array) -> jax.Array:
    """A scalar or per-example coefficient, shaped to broadcast over an NHWC batch."""
    coef = jnp.asarray(coef, like.dtype)
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))
