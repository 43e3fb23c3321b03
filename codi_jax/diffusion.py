"""Variance-preserving diffusion: schedules, parametrizations, forward process, DDIM step.

The forward process is ``z_t = alpha_t * x + sigma_t * eps`` with ``alpha_t**2 + sigma_t**2 = 1``.
Time ``t`` is continuous in ``[0, 1]`` everywhere in this codebase (0 = data, 1 = noise).
A discrete schedule (Stable Diffusion's ``scaled_linear``) maps ``t`` onto its integer
timesteps with ``tau = t * T - 1`` so that ``t = 0`` is clean data (``alpha = 1``) and the
N-step training grid ``t_k = k / N`` lands on integer timesteps; ``Schedule.model_time``
gives what the network is fed (the integer timestep for discrete schedules, so converted
public weights see their own time convention).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax import flow_matching

Parametrization = Literal["v", "eps", "x", "flow"]
PARAMETRIZATIONS = ("v", "eps", "x")  # what a config's model.parametrization may say
# 'flow' is a flow-matching schedule's 'v' once resolved (``resolve_parametrization``): the
# rectified-flow velocity ``eps - x``, where the VP 'v' is ``alpha eps - sigma x``.
FLOW = "flow"
SCHEDULES = ("cosine", "scaled_linear", "linear")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A variance-preserving noise schedule.

    kind: ``cosine`` (continuous, log-SNR clipped to [logsnr_min, logsnr_max]) or a discrete
    DDPM beta schedule (``scaled_linear`` as in Stable Diffusion, ``linear`` as in DDPM).
    """

    kind: str = "cosine"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    logsnr_min: float = -15.0
    logsnr_max: float = 15.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            kinds = SCHEDULES + (flow_matching.KIND,)
            raise ValueError(f"Unknown schedule kind {self.kind!r}; expected one of {kinds}.")

    @property
    def is_discrete(self) -> bool:
        return self.kind != "cosine"

    def betas(self) -> np.ndarray:
        """The discrete schedule's betas (float64), as diffusers computes them."""
        n = self.num_train_timesteps
        if self.kind == "scaled_linear":
            return np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float64) ** 2
        if self.kind == "linear":
            return np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)
        raise ValueError("betas() exists only for discrete schedules.")

    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas())

    def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(alpha_t, sigma_t)`` in float32 for continuous ``t`` (clipped to [0, 1])."""
        t = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, 1.0)
        if self.kind == "cosine":
            # alpha = cos(a t + b) with a, b set so log-SNR spans [logsnr_max, logsnr_min].
            b = math.atan(math.exp(-0.5 * self.logsnr_max))
            a = math.atan(math.exp(-0.5 * self.logsnr_min)) - b
            angle = a * t + b
            return jnp.cos(angle), jnp.sin(angle)
        # Discrete: alpha_bar on the grid t = i / T, i = 0..T, with alpha_bar(0) = 1 (clean data);
        # linear interpolation in between, exact on the grid.
        # A jnp array so that traced t (under jit / scan) can index it.
        alpha_bar = jnp.asarray(np.concatenate([[1.0], self.alphas_cumprod()]).astype(np.float32))
        position = t * self.num_train_timesteps
        lo = jnp.clip(jnp.floor(position), 0, self.num_train_timesteps - 1).astype(jnp.int32)
        frac = position - lo
        alpha_bar_t = (1.0 - frac) * alpha_bar[lo] + frac * alpha_bar[lo + 1]
        return jnp.sqrt(alpha_bar_t), jnp.sqrt(1.0 - alpha_bar_t)

    def logsnr(self, t: jax.Array) -> jax.Array:
        alpha, sigma = self.alpha_sigma(t)
        return 2.0 * (jnp.log(alpha) - jnp.log(sigma))

    def model_time(self, t: jax.Array) -> jax.Array:
        """What the network's time embedding is fed: SD integer timesteps or ``1000 t``."""
        t = jnp.asarray(t, jnp.float32)
        if self.is_discrete:
            return t * self.num_train_timesteps - 1.0
        return 1000.0 * t

    def grid_time(self, u):
        """CoDi's grid point ``u = k / N`` as a time of this schedule: ``u`` itself (VP)."""
        return u

    def sample_train_time(self, rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Training times: uniform on (0, 1], or uniform over the integer timesteps."""
        if self.is_discrete:
            steps = jax.random.randint(rng, shape, 1, self.num_train_timesteps + 1)
            return steps.astype(jnp.float32) / self.num_train_timesteps
        return 1.0 - jax.random.uniform(rng, shape)  # (0, 1]


def schedule_from_config(config) -> Schedule | flow_matching.FlowSchedule:
    """Builds a schedule from a config section with the dataclass' field names: a variance-preserving
    ``Schedule``, or with ``kind='flow'`` a ``flow_matching.FlowSchedule``."""
    cls = flow_matching.FlowSchedule if dict(config).get("kind") == flow_matching.KIND else Schedule
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(config).items() if k in fields}
    unknown = set(dict(config)) - fields
    if unknown:
        raise ValueError(f"Unknown schedule config fields {sorted(unknown)}; valid: {sorted(fields)}.")
    return cls(**values)


def resolve_parametrization(
    schedule: Schedule | flow_matching.FlowSchedule, parametrization: Parametrization
) -> Parametrization:
    """What ``x_eps_from_prediction`` is told: a config's ``model.parametrization``, except that a
    flow-matching schedule's ``'v'`` is the rectified-flow velocity ``'flow'`` (``eps - x``)."""
    if isinstance(schedule, flow_matching.FlowSchedule):
        if parametrization not in ("v", FLOW):
            raise ValueError(
                f"model.parametrization={parametrization!r}: a flow-matching schedule predicts the velocity "
                "eps - x_0; set it to 'v'."
            )
        return FLOW
    if parametrization == FLOW:
        raise ValueError(f"parametrization 'flow' needs a flow-matching schedule, got kind={schedule.kind!r}.")
    return parametrization


def _bcast(coef: jax.Array, like: jax.Array) -> jax.Array:
    """Broadcasts a per-example (or scalar) coefficient over an NHWC batch."""
    coef = jnp.asarray(coef, like.dtype)
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


def q_sample(x: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
    """Forward process ``z_t = alpha_t x + sigma_t eps``."""
    return _bcast(alpha, x) * x + _bcast(sigma, x) * eps


def v_from_x_eps(x: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
    """The v-prediction target ``v = alpha eps - sigma x``."""
    return _bcast(alpha, x) * eps - _bcast(sigma, x) * x


def x_eps_from_prediction(
    z: jax.Array,
    prediction: jax.Array,
    alpha: jax.Array,
    sigma: jax.Array,
    parametrization: Parametrization,
) -> tuple[jax.Array, jax.Array]:
    """``(x_hat, eps_hat)`` from the network output under any parametrization (``'flow'``: see
    ``resolve_parametrization``)."""
    alpha = _bcast(alpha, z)
    sigma = _bcast(sigma, z)
    if parametrization == "v":
        return alpha * z - sigma * prediction, sigma * z + alpha * prediction
    if parametrization == "eps":
        # alpha > 0 on every schedule here (cosine is log-SNR clipped; discrete alpha_bar > 0).
        return (z - sigma * prediction) / alpha, prediction
    if parametrization == "x":
        # sigma = 0 only at t = 0, where eps is undefined; clamp to keep it finite.
        return prediction, (z - alpha * prediction) / jnp.maximum(sigma, 1e-8)
    if parametrization == FLOW:  # z = (1 - t) x + t eps, v = eps - x, with alpha = 1 - t, sigma = t
        return z - sigma * prediction, z + alpha * prediction
    raise ValueError(f"Unknown parametrization {parametrization!r}; expected one of {PARAMETRIZATIONS}.")


def prediction_from_x_eps(
    x: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array, parametrization: Parametrization
) -> jax.Array:
    """The network output that corresponds to ``(x, eps)``: inverse of ``x_eps_from_prediction``."""
    if parametrization == "v":
        return v_from_x_eps(x, eps, alpha, sigma)
    if parametrization == "eps":
        return eps
    if parametrization == "x":
        return x
    if parametrization == FLOW:
        return eps - x
    raise ValueError(f"Unknown parametrization {parametrization!r}; expected one of {PARAMETRIZATIONS}.")


def ddim_step(x_hat: jax.Array, eps_hat: jax.Array, alpha_s: jax.Array, sigma_s: jax.Array) -> jax.Array:
    """Deterministic DDIM move to time s: ``z_s = alpha_s x_hat + sigma_s eps_hat``."""
    return q_sample(x_hat, eps_hat, alpha_s, sigma_s)


def sampling_grid(num_steps: int, grid_size: int) -> np.ndarray:
    """Times for ``num_steps``-step sampling: evenly spaced points of the N-step grid from the top.

    The grid is ``t_k = k / N`` (k = 1..N). With stride ``ceil(N / num_steps)`` from ``t = 1``;
    e.g. N = 50, 4 steps -> k = 50, 37, 24, 11. Returns the ``num_steps`` start times followed
    by the final time 0, so step i moves from ``times[i]`` to ``times[i + 1]``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    if num_steps > grid_size:
        raise ValueError(
            f"{num_steps} sampling steps exceed the {grid_size}-point training grid; use at most {grid_size} steps."
        )
    stride = math.ceil(grid_size / num_steps)
    ks = grid_size - stride * np.arange(num_steps)
    ks = np.maximum(ks, 1)
    if len(np.unique(ks)) != num_steps:  # stride too large for the tail: fall back to even spacing
        ks = np.round(np.linspace(grid_size, 1, num_steps)).astype(int)
    return np.concatenate([ks / grid_size, [0.0]]).astype(np.float32)


TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _diffusers_timesteps(num_train_timesteps: int, num_steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """diffusers ``DDIMScheduler.set_timesteps``'s integer timesteps (diffusers 0.42), descending."""
    n, T = num_steps, num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing={spacing!r}; expected one of {TIMESTEP_SPACINGS}.")


def diffusers_ddim_times(
    schedule: Schedule,
    num_steps: int,
    timestep_spacing: str = "leading",
    steps_offset: int = 1,
    set_alpha_to_one: bool = False,
) -> np.ndarray:
    """diffusers ``DDIMScheduler``'s sampling times as our continuous times (float32).

    Returns the ``num_steps`` start times ``t = (tau + 1) / T`` of diffusers' integer timesteps
    ``tau`` (``set_timesteps``), then the final time: ``0`` (``alpha_bar = 1``) with
    ``set_alpha_to_one``, else ``1 / T`` (diffusers' ``final_alpha_cumprod = alphas_cumprod[0]``).
    Run ``sampling.ddim_sample(..., clip_denoised=False, output="z")`` over them to reproduce
    diffusers' DDIM (``eta=0``, ``clip_sample=False``), the latents it hands the VAE.

    diffusers' ``step`` moves from ``tau`` to ``tau - T // num_steps``, not to the next timestep
    of its list; the two agree for ``leading`` and for ``trailing`` when ``num_steps`` divides
    ``T`` (SD's configs). For ``linspace`` they do not (diffusers then re-enters each step at
    another timestep than it moved to); a DDIM over these times moves to the next start time.
    """
    if not schedule.is_discrete:
        raise ValueError(f"diffusers' DDIM timesteps need a discrete schedule, got kind={schedule.kind!r}.")
    T = schedule.num_train_timesteps
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps={num_steps}: must be in [1, {T}] (num_train_timesteps).")
    taus = _diffusers_timesteps(T, num_steps, timestep_spacing, steps_offset)
    if taus.min() < 0 or taus.max() > T - 1:
        raise ValueError(f"steps_offset={steps_offset} puts timesteps {taus.tolist()} outside [0, {T - 1}].")
    final = 0.0 if set_alpha_to_one else 1.0 / T
    return np.concatenate([(taus + 1) / T, [final]]).astype(np.float32)
