"""Samplers. Pure functions of (params, noise, times); the network is bound by ``partial``.

Also the one loop every sampling command runs (``sample_in_batches``): the noise of example i
(initial and re-noising) depends only on (seed, i), never on the batch size or the other examples.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from codi_jax import diffusion, flow_matching, sharding

# apply_fn(params, z_t, model_time) -> network output
ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


def uniform_times(num_steps: int) -> np.ndarray:
    """``num_steps + 1`` times from 1 down to 0, evenly spaced (many-step teacher sampling)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    return np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float32)


DDIM_OUTPUTS = ("x_hat", "z")


def ddim_sample(
    apply_fn: ApplyFn,
    params: Any,
    z_init: jax.Array,
    times: jax.Array,
    schedule: diffusion.Schedule | flow_matching.FlowSchedule,
    parametrization: diffusion.Parametrization,
    renoise_keys: jax.Array | None = None,
    clip_denoised: bool = True,
    output: str = "x_hat",
    project_x_hat: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """DDIM from ``z_init`` at ``times[0]`` down to ``times[-1]``; returns ``x_hat`` (default) or ``z``.

    Between steps the sample moves to the next time deterministically (``alpha_s x_hat +
    sigma_s eps_hat``) or, given ``renoise_keys`` (one key per example, ``example_keys``), with
    fresh noise (``alpha_s x_hat + sigma_s eps``, consistency-model style multistep sampling); the
    fresh noise of example b at step k is drawn from ``fold_in(renoise_keys[b], k)``.
    ``output="x_hat"``: the last step returns the network's ``x_hat`` itself (equal to the DDIM
    move when the final time is 0);
    ``output="z"``: the last DDIM move, the sample at ``times[-1]`` (diffusers' DDIM, which ends at
    ``alpha_bar = alphas_cumprod[0]``, i.e. ``t = 1 / T``, with ``set_alpha_to_one=False``).
    On a flow-matching schedule the deterministic move is the Euler step ``z_t + (s - t) v``.
    ``clip_denoised`` clips every ``x_hat`` to the data range [-1, 1]; latents must not be
    clipped (``False``: diffusers' DDIM with ``clip_sample=False``). ``project_x_hat`` (None: none)
    maps each step's (clipped) ``x_hat`` before it is used, e.g. ``codi_jax.lowpass.consistency_step``.

    ``params`` is whatever ``apply_fn`` takes first: a parameter tree, or a pytree bundling it with
    per-call inputs such as a text context (``guidance.Guided``).
    """
    if output not in DDIM_OUTPUTS:
        raise ValueError(f"output={output!r}; expected one of {DDIM_OUTPUTS}.")
    parametrization = diffusion.resolve_parametrization(schedule, parametrization)
    times = jnp.asarray(times, jnp.float32)
    num_steps = times.shape[0] - 1

    def step(z_t, inputs):
        t_pair, index = inputs
        t, s = t_pair[0], t_pair[1]
        alpha_t, sigma_t = schedule.alpha_sigma(t)
        alpha_s, sigma_s = schedule.alpha_sigma(s)
        model_t = jnp.broadcast_to(schedule.model_time(t), (z_t.shape[0],))
        prediction = apply_fn(params, z_t, model_t)
        x_hat, eps_hat = diffusion.x_eps_from_prediction(z_t, prediction, alpha_t, sigma_t, parametrization)
        if clip_denoised:
            x_hat = jnp.clip(x_hat, -1.0, 1.0)
        if project_x_hat is not None:
            x_hat = project_x_hat(x_hat)
        if renoise_keys is not None:
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(renoise_keys, index)
            eps_hat = jax.vmap(lambda key: jax.random.normal(key, z_t.shape[1:], z_t.dtype))(step_keys)
        return diffusion.ddim_step(x_hat, eps_hat, alpha_s, sigma_s), x_hat

    pairs = jnp.stack([times[:-1], times[1:]], axis=1)
    z_final, x_hats = jax.lax.scan(step, z_init, (pairs, jnp.arange(num_steps)))
    return z_final if output == "z" else x_hats[-1]


def euler_sample(
    apply_fn: ApplyFn,
    params: Any,
    z_init: jax.Array,
    times: jax.Array,
    schedule: flow_matching.FlowSchedule,
    clip_denoised: bool = False,
) -> jax.Array:
    """The Euler ODE sampler of a flow-matching model (``v`` prediction) from ``z_init`` at
    ``times[0]`` down to ``times[-1]``, as diffusers' ``FlowMatchEulerDiscreteScheduler.step``:
    ``x_{next} = x + (t_next - t) v`` with the network fed ``schedule.model_time(t)``. Returns the
    sample at ``times[-1]`` (the data when it is 0: ``flow_matching.euler_times``), clipped to
    [-1, 1] with ``clip_denoised`` (the trajectory itself is never clipped)."""
    times = jnp.asarray(times, jnp.float32)

    def step(x, t_pair):
        t, t_next = t_pair[0], t_pair[1]
        v = apply_fn(params, x, jnp.broadcast_to(schedule.model_time(t), (x.shape[0],)))
        return flow_matching.euler_step(x, v.astype(x.dtype), t, t_next), None

    x_final, _ = jax.lax.scan(step, z_init, jnp.stack([times[:-1], times[1:]], axis=1))
    return jnp.clip(x_final, -1.0, 1.0) if clip_denoised else x_final


def many_step_times(schedule: diffusion.Schedule | flow_matching.FlowSchedule, num_steps: int) -> np.ndarray:
    """A non-distilled model's ``num_steps``-step grid: the flow schedule's Euler grid
    (``FlowSchedule.sampling_times``, diffusers' sigmas) or, for VP, ``uniform_times``."""
    if isinstance(schedule, flow_matching.FlowSchedule):
        return schedule.sampling_times(num_steps)
    return uniform_times(num_steps)


def many_step_sampler(
    apply_fn: ApplyFn,
    schedule: diffusion.Schedule | flow_matching.FlowSchedule,
    parametrization: diffusion.Parametrization,
    num_steps: int,
    clip_denoised: bool = True,
) -> Callable[[Any, jax.Array], jax.Array]:
    """``(params, z_init) -> samples``: a teacher's many-step sampler (not jitted). A flow schedule
    samples with Euler on its shifted grid (``FlowSchedule.sampling_times``); a VP one with DDIM
    on ``uniform_times``. ``clip_denoised``: pixels are clipped to [-1, 1] (DDIM: every ``x_hat``)."""
    times = many_step_times(schedule, num_steps)
    if isinstance(schedule, flow_matching.FlowSchedule):
        return functools.partial(euler_sample, apply_fn, times=times, schedule=schedule, clip_denoised=clip_denoised)
    return functools.partial(
        ddim_sample,
        apply_fn,
        times=times,
        schedule=schedule,
        parametrization=parametrization,
        clip_denoised=clip_denoised,
    )


def example_keys(seed: int, indices: Sequence[int] | np.ndarray) -> jax.Array:
    """One key per example: ``fold_in(PRNGKey(seed), i)`` for each index ``i`` (raw uint32 keys)."""
    return _example_keys(jax.random.PRNGKey(seed), jnp.asarray(np.asarray(indices, np.uint32)))


@jax.jit
def _example_keys(key: jax.Array, indices: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, indices)


def example_noise(seed: int, indices: Sequence[int] | np.ndarray, shape: tuple[int, ...]) -> jax.Array:
    """Standard normal noise of shape ``(len(indices),) + shape``; row b is
    ``normal(fold_in(PRNGKey(seed), indices[b]), shape)``, whatever the other rows are."""
    return _noise_from_keys(example_keys(seed, indices), tuple(shape))


@functools.partial(jax.jit, static_argnums=1)
def _noise_from_keys(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.vmap(lambda key: jax.random.normal(key, shape, jnp.float32))(keys)


def example_inputs(
    seed: int, indices: Sequence[int] | np.ndarray, shape: tuple[int, ...], renoise: bool
) -> tuple[jax.Array, jax.Array | None]:
    """The initial noise (``example_noise(seed, ...)``) and, with ``renoise``, the re-noising keys
    (``example_keys(seed + 1, ...)``; else None) of the examples ``indices``."""
    return example_noise(seed, indices, shape), (example_keys(seed + 1, indices) if renoise else None)


# sample_fn(batch, z_init, renoise_keys) -> samples of the examples in ``batch`` (a slice)
BatchSampleFn = Callable[[slice, jax.Array, jax.Array | None], jax.Array]


def process_share(num: int, index: int, count: int) -> np.ndarray:
    """The examples process ``index`` of ``count`` samples: the ``index``-th contiguous block of
    ``ceil(num / count)``, padded to that length with example ``num - 1`` (so every process runs
    the same number of batches and the gathered blocks, in process order, are examples 0..num-1)."""
    per = -(-num // count)
    share = np.arange(index * per, min((index + 1) * per, num))
    return np.concatenate([share, np.full(per - len(share), num - 1)]).astype(np.int64)


def _gather_processes(samples: np.ndarray, num: int) -> np.ndarray:
    """Every process's block (``process_share``), concatenated in process order: examples 0..num-1."""
    if jax.process_count() == 1:
        return samples[:num]
    blocks = multihost_utils.process_allgather(samples, tiled=False)  # (processes, per, ...)
    return np.asarray(blocks).reshape((-1,) + samples.shape[1:])[:num]


def _batches(share: np.ndarray, batch_size: int, devices: int, plain: bool) -> list[tuple[Any, int]]:
    """``(batch, real)`` per batch of ``share``: a slice when ``plain`` (one process, one device),
    else the indices padded to a multiple of ``devices`` with the batch's last example."""
    out = []
    for start in range(0, len(share), batch_size):
        stop = min(start + batch_size, len(share))
        if plain:
            out.append((slice(start, stop), stop - start))
        else:
            indices = share[start:stop]
            out.append((np.concatenate([indices, np.full((start - stop) % devices, indices[-1])]), stop - start))
    return out


def sample_in_batches(
    sample_fn: BatchSampleFn,
    num: int,
    noise_shape: tuple[int, ...],
    *,
    seed: int,
    renoise: bool,
    batch_size: int,
    warm_up: BatchSampleFn | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = False,
    indices: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """The one sampling loop: ``sample_fn`` on each batch of ``num`` examples; returns the samples
    (numpy, concatenated, on every process) and the mean wall time per image in ms.

    Example i gets ``example_inputs(seed, [i], noise_shape, renoise)``, so its sample is the same
    at any batch size and beside any other examples (up to float rounding, which can depend on the
    batch shape). ``warm_up`` (same arguments as ``sample_fn``) is called once on the first batch,
    untimed, before it is timed: a function that only compiles (a jitted sampler's
    ``lower(...).compile()``, which the jitted call then reuses), or ``sample_fn`` itself.

    ``mesh`` (None: one device): this process's devices; each batch is split over them
    (``sharding.batch_sharding``), padded to a multiple of their number with copies of its last
    example (dropped from the output); ``sample_fn`` then gets the padded indices (an array), and
    its parameters must be on the mesh (``sharding.replicated``). With several processes
    (``jax.distributed``) each samples its ``process_share`` of the examples, ``batch_size`` at a
    time, and the blocks are gathered. ``progress``: a log line per batch with images/s and ETA.
    ``indices``: the examples' own indices (default ``0..num-1``), which their noise is drawn from,
    so a request sampled in pieces draws what it draws whole."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    share = process_share(num, jax.process_index(), jax.process_count())
    plain = mesh is None and jax.process_count() == 1
    batches = _batches(share, batch_size, 1 if mesh is None else mesh.size, plain)
    outputs, elapsed, done = [], 0.0, 0
    for i, (batch, real) in enumerate(batches):
        examples = np.arange(num)[batch]  # ``batch``: a slice of, or the (padded) indices of, the examples
        own = examples if indices is None else np.asarray(indices)[examples]
        z_init, keys = example_inputs(seed, own, noise_shape, renoise)
        if mesh is not None:
            z_init, keys = jax.device_put((z_init, keys), sharding.batch_sharding(mesh))
        if i == 0 and warm_up is not None:
            jax.block_until_ready(warm_up(batch, z_init, keys))
        t0 = time.perf_counter()
        samples = np.asarray(jax.block_until_ready(sample_fn(batch, z_init, keys)))
        elapsed += time.perf_counter() - t0
        outputs.append(samples[:real])
        done += real
        if progress:
            _log_progress(done, len(share), elapsed)
    samples = _gather_processes(np.concatenate(outputs), num)
    return samples, 1000.0 * elapsed / max(len(share), 1)


def _log_progress(done: int, total: int, elapsed: float) -> None:
    rate = done / max(elapsed, 1e-9)
    logging.info("Sampled %d/%d images: %.2f images/s, ETA %.0f s.", done, total, rate, (total - done) / rate)


def to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
    """[-1, 1] floats to uint8 [0, 255]."""
    images = np.asarray(images, np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def cond_to_rgb(cond: np.ndarray) -> np.ndarray:
    """A viewable 3-channel picture of a condition (first 3 channels, or gray replicated)."""
    cond = np.asarray(cond, np.float32)
    return cond[..., :3] if cond.shape[-1] >= 3 else np.repeat(cond[..., :1], 3, axis=-1)


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


def dpm_solver_pp_sample(
    apply_fn: ApplyFn,
    params: Any,
    z_init: jax.Array,
    times: jax.Array,
    schedule: diffusion.Schedule,
    parametrization: diffusion.Parametrization,
    clip_denoised: bool = True,
    project_x_hat: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """DPM-Solver++(2M) (Lu et al. 2022), the multistep second-order solver of the probability-flow
    ODE in data prediction, from ``times[0]`` to ``times[-1]``; first and last steps first order.

    With ``lambda = log(alpha / sigma)`` and ``h = lambda_s - lambda_t``:
    ``z_s = (sigma_s / sigma_t) z_t - alpha_s (exp(-h) - 1) D``, where ``D`` is ``x_hat`` on a
    first-order step and ``(1 + 1/(2r)) x_hat - 1/(2r) x_hat_prev`` (``r = h_prev / h``) otherwise.
    ``project_x_hat``: as in ``ddim_sample``, applied to each (clipped) ``x_hat``.
    """
    if isinstance(schedule, flow_matching.FlowSchedule):
        raise ValueError(
            "--solver=dpm++ is for VP schedules; a flow-matching model samples with Euler (--solver=ddim)."
        )
    times = jnp.asarray(times, jnp.float32)
    num_steps = times.shape[0] - 1

    def lam(alpha, sigma):
        return jnp.log(alpha) - jnp.log(sigma)

    def step(carry, inputs):
        z_t, x_prev, h_prev = carry
        (t, s), index = inputs
        alpha_t, sigma_t = schedule.alpha_sigma(t)
        alpha_s, sigma_s = schedule.alpha_sigma(s)
        model_t = jnp.broadcast_to(schedule.model_time(t), (z_t.shape[0],))
        x_hat, _ = diffusion.x_eps_from_prediction(
            z_t, apply_fn(params, z_t, model_t), alpha_t, sigma_t, parametrization
        )
        if clip_denoised:
            x_hat = jnp.clip(x_hat, -1.0, 1.0)
        if project_x_hat is not None:
            x_hat = project_x_hat(x_hat)
        h = lam(alpha_s, sigma_s) - lam(alpha_t, sigma_t)
        first_order = (index == 0) | (index == num_steps - 1)
        r = h_prev / h
        second = (1.0 + 0.5 / r) * x_hat - (0.5 / r) * x_prev
        d = jnp.where(first_order, x_hat, second)
        z_s = (sigma_s / sigma_t) * z_t - alpha_s * jnp.expm1(-h) * d
        return (z_s, x_hat, h), None

    pairs = jnp.stack([times[:-1], times[1:]], axis=1)
    init = (z_init, jnp.zeros_like(z_init), jnp.ones((), jnp.float32))
    (z_final, _, _), _ = jax.lax.scan(step, init, (pairs, jnp.arange(num_steps)))
    return jnp.clip(z_final, -1.0, 1.0) if clip_denoised else z_final
