"""How a trained conditional run is sampled: its time grid, re-noising policy and jitted sampler."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from codi_jax import adapted, codi, diffusion, sampling

SOLVERS = ("ddim", "dpm++")


def sample_times(config: ml_collections.ConfigDict, num_steps: int) -> np.ndarray:
    """CoDi samples on its training grid; the non-distilled model on evenly spaced times."""
    if config.method == "codi":
        return diffusion.sampling_grid(num_steps, int(config.codi.grid_size))
    return sampling.uniform_times(num_steps)


def renoise_between_steps(config: ml_collections.ConfigDict) -> bool:
    """Whether multistep sampling re-noises between steps: CoDi runs per ``codi.renoise`` (runs
    saved before the field existed get its default), every other model moves by DDIM."""
    if config.get("method") != "codi":
        return False
    return bool(config.codi.get("renoise", codi.default_codi_config().renoise))


def renoise_key(
    config: ml_collections.ConfigDict, seed: int, batch_start: int = 0, renoise: bool | None = None
) -> jax.Array | None:
    """The re-noising key of the batch starting at ``batch_start``, or None for DDIM moves;
    ``renoise`` None takes the run's default (``renoise_between_steps``)."""
    if not (renoise_between_steps(config) if renoise is None else renoise):
        return None
    return jax.random.fold_in(jax.random.PRNGKey(seed + 1), batch_start)


def make_conditional_sampler(
    model: adapted.AdaptedModel, schedule: diffusion.Schedule, parametrization: str, solver: str = "ddim"
):
    """Jitted ``(params, cond, instruction, z_init, times, renoise_rng) -> x``.

    ``solver``: ``ddim`` (deterministic DDIM, or re-noising given ``renoise_rng``) or ``dpm++``
    (DPM-Solver++(2M), deterministic; for the non-distilled baselines)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}; valid: {SOLVERS}.")

    def sample(params, cond, instruction, z_init, times, renoise_rng):
        def apply_fn(p, z_t, model_t):
            return model.apply(p, z_t, model_t, cond, instruction)

        if solver == "dpm++":
            return sampling.dpm_solver_pp_sample(apply_fn, params, z_init, times, schedule, parametrization)
        return sampling.ddim_sample(apply_fn, params, z_init, times, schedule, parametrization, renoise_rng)

    return jax.jit(sample)
