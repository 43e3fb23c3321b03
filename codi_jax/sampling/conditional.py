"""How a trained conditional run is sampled: its time grid, re-noising policy and jitted sampler
(with, optionally, low-frequency consistency: ``codi_jax.lowpass``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from codi_jax import diffusion, lowpass
from codi_jax.frozen import encoders
from codi_jax.models import student
from codi_jax.sampling import guidance, samplers
from codi_jax.sampling.options import SOLVERS


def sample_times(config: ml_collections.ConfigDict, num_steps: int) -> np.ndarray:
    """CoDi samples on its training grid (``Schedule.grid_time`` of its points: shifted for a flow
    schedule); the non-distilled model on ``samplers.many_step_times`` (VP: evenly spaced times;
    flow: the Euler grid)."""
    schedule = diffusion.schedule_from_config(config.schedule)
    if config.method == "codi":
        grid = diffusion.sampling_grid(num_steps, int(config.codi.grid_size))
        return np.asarray(schedule.grid_time(grid), np.float32)
    return samplers.many_step_times(schedule, num_steps)


def renoise_between_steps(config: ml_collections.ConfigDict) -> bool:
    """Whether multistep sampling re-noises between steps: CoDi runs per ``codi.renoise`` (runs
    saved before the field existed get its default), every other model moves by DDIM."""
    if config.method != "codi":
        return False
    return bool(config.codi.renoise)


def check_lowpass_consistency(config: ml_collections.ConfigDict) -> None:
    """Low-frequency consistency needs a pixel-space super-resolution run (from its config alone)."""
    if encoders.vae_path(config):
        raise ValueError(
            "low-frequency consistency needs a pixel-space run; this run samples VAE latents "
            f"(latent.vae={encoders.vae_path(config)})."
        )
    if config.task.name != "sr":
        raise ValueError(
            f"low-frequency consistency needs a super-resolution run (task.name='sr'); this run's task is "
            f"{config.task.name!r}."
        )


def lowpass_operators(config: ml_collections.ConfigDict) -> lowpass.SrOperators:
    """The run's downscale operators for ``make_conditional_sampler(..., lowpass=...)`` (checked)."""
    check_lowpass_consistency(config)
    return lowpass.sr_operators(config.task, int(config.data.image_size))


def text_inputs(batch: dict, config: ml_collections.ConfigDict, guidance_scale: float | None = None) -> dict | None:
    """The sampler's ``text`` argument from a batch holding ``context`` / ``uncond_context``
    (``codi_jax.frozen.batch_inputs.add_text``): the guidance scale is ``guidance_scale`` or the run's
    ``sample_guidance_scale`` (default 1: no guidance). None for runs without text."""
    if batch.get("context") is None:
        return None
    scale = float(config.sample_guidance_scale if guidance_scale is None else guidance_scale)
    n = batch["cond"].shape[0]
    return {
        "context": batch["context"],
        "uncond_context": batch["uncond_context"],
        "guidance_scale": None if scale == 1.0 else jnp.full((n,), scale, jnp.float32),
    }


def _guided_apply(model: student.AdaptedModel, params, z_t, model_t, cond, instruction, text: dict | None):
    """The model's output with its text: a CFG-distilled student reads w itself (one call);
    another model with w != 1 is guided between the prompt and the negative prompt (two calls)."""
    if text is None:
        return model.apply(params, z_t, model_t, cond, instruction)
    w = text["guidance_scale"]
    if model.takes_guidance_scale:
        w = jnp.ones((z_t.shape[0],), jnp.float32) if w is None else w
        return model.apply(params, z_t, model_t, cond, instruction, text["context"], guidance_scale=w)
    with_text = model.apply(params, z_t, model_t, cond, instruction, text["context"])
    if w is None:
        return with_text
    without = model.apply(params, z_t, model_t, cond, instruction, text["uncond_context"])
    return guidance.combine(without, with_text, w)


def _clip_kwargs(clip: bool) -> dict:
    return {"clip_denoised": clip}


def make_conditional_sampler(
    model: student.AdaptedModel,
    schedule: diffusion.Schedule,
    parametrization: str,
    solver: str = "ddim",
    *,
    clip: bool = True,
    lowpass_ops: lowpass.SrOperators | None = None,
):
    """Jitted ``(params, cond, instruction, z_init, times, renoise_keys, text=None) -> x``.

    ``solver``: ``ddim`` (deterministic DDIM, or re-noising given per-example ``renoise_keys``:
    ``samplers.example_keys``) or ``dpm++``
    (DPM-Solver++(2M), deterministic; for the non-distilled baselines). ``text``: see
    ``text_inputs``. ``clip``: clip ``x_hat`` to the image range (False for latents).
    ``lowpass_ops`` (``lowpass_operators``; None: off): after each step's (clipped) ``x_hat``, its
    low frequencies are replaced by the condition's (``lowpass.consistency_step``, not re-clipped)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}; valid: {SOLVERS}.")

    def sample(params, cond, instruction, z_init, times, renoise_keys, text=None):
        def apply_fn(p, z_t, model_t):
            return _guided_apply(model, p, z_t, model_t, cond, instruction, text)

        project = None if lowpass_ops is None else functools.partial(lowpass.consistency_step, lowpass_ops, cond=cond)
        if solver == "dpm++":
            return samplers.dpm_solver_pp_sample(
                apply_fn, params, z_init, times, schedule, parametrization, project_x_hat=project
            )
        return samplers.ddim_sample(
            apply_fn,
            params,
            z_init,
            times,
            schedule,
            parametrization,
            renoise_keys,
            project_x_hat=project,
            **_clip_kwargs(clip),
        )

    return jax.jit(sample)
