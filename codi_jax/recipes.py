"""What differs between the training runs this codebase makes, behind one interface.

``config.method``:
  teacher    the unconditional diffusion model (``codi_jax.teacher``)
  codi       conditional distillation from a teacher checkpoint (``codi_jax.codi``, mode 'codi')
  finetune   the same adapted model trained with the plain diffusion loss: the non-distilled
             conditional model every comparison needs

A ``Recipe`` holds the state initialiser (traced under ``jit``; pre-trained weights come in as
``init_inputs``, jit arguments rather than baked-in constants), the pure train step with its
static arguments bound, and the periodic sample / quick-eval writer. ``train_loop`` runs any
recipe the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from codi_jax import adapted, codi, diffusion, metrics, pretrained, sampling, teacher
from codi_jax.data import pipeline, tasks
from codi_jax.models import adapters
from codi_jax.models.unet import unet_from_config
from codi_jax.train_state import TrainState, create_train_state, make_optimizer

METHODS = ("teacher", "codi", "finetune")


@dataclasses.dataclass
class Recipe:
    init_state: Callable[[Any], TrainState]  # (init_inputs) -> fresh state; pure, jitted by the loop
    init_inputs: Any  # arrays the initialiser needs (pre-trained params), or None
    train_step: Callable  # (state, batch, rng) -> (state, metrics)
    write_samples: Callable  # (writer, workdir, step, state) -> dict of eval scalars
    task_config: ml_collections.ConfigDict | None  # the data task, None for unconditional


def method_of(config: ml_collections.ConfigDict) -> str:
    method = config.get("method", "teacher")
    if method not in METHODS:
        raise ValueError(f"config.method={method!r}; valid methods: {METHODS}.")
    return method


def make_recipe(config: ml_collections.ConfigDict) -> Recipe:
    """The recipe for ``config.method``; for codi / finetune this loads the teacher checkpoint and
    fills ``config.model`` / ``config.schedule`` from it (so checkpoints record the backbone)."""
    if method_of(config) == "teacher":
        return _teacher_recipe(config)
    return _conditional_recipe(config)


# --------------------------------------------------------------------------- teacher


def _write_grid(writer, workdir: str, step: int, grid: np.ndarray, tag: str = "samples") -> str:
    writer.write_images(step, {tag: grid[None]})
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
    Image.fromarray(grid).save(path)
    return path


def _teacher_recipe(config: ml_collections.ConfigDict) -> Recipe:
    model = unet_from_config(config.model)
    schedule = diffusion.schedule_from_config(config.schedule)
    optimizer = make_optimizer(config.optimizer)
    parametrization = config.model.parametrization
    size = config.data.image_size
    init_rng, run_rng = jax.random.split(jax.random.PRNGKey(config.seed))

    def init_state(_):
        sample = jnp.zeros((1, size, size, config.model.in_channels), jnp.float32)
        params = model.init(init_rng, sample, jnp.zeros((1,), jnp.float32))["params"]
        return create_train_state(params, optimizer, run_rng)

    step = functools.partial(
        teacher.train_step,
        model=model,
        schedule=schedule,
        optimizer=optimizer,
        ema_decay=config.ema_decay,
        ema_warmup=config.get("ema_warmup", False),
        parametrization=parametrization,
    )
    times = sampling.uniform_times(config.sample_steps)
    sampler = jax.jit(
        functools.partial(
            sampling.ddim_sample,
            lambda params, z_t, model_t: model.apply({"params": params}, z_t, model_t),
            times=times,
            schedule=schedule,
            parametrization=parametrization,
        )
    )
    noise = jax.random.normal(
        jax.random.PRNGKey(config.seed + 1), (config.num_sample_images, size, size, config.model.out_channels)
    )

    def write_samples(writer, workdir: str, step: int, state: TrainState) -> dict:
        images = jax.device_get(sampler(state.ema_params, noise))
        path = _write_grid(writer, workdir, step, sampling.make_grid(sampling.to_uint8(images)))
        logging.info("Wrote samples (%d DDIM steps, EMA params) to %s.", config.sample_steps, path)
        return {}

    return Recipe(init_state, None, step, write_samples, None)


# --------------------------------------------------------------------------- conditional


def resolve_from_teacher(config: ml_collections.ConfigDict) -> pretrained.Pretrained:
    """Loads ``config.teacher_workdir`` and fills ``config.model`` / ``config.schedule`` from the
    teacher's saved config. Fields the user did set must agree with the teacher (else an error
    naming them): the backbone is the teacher's network, not a new one."""
    if not config.get("teacher_workdir"):
        raise ValueError(f"config.method={config.method!r} needs config.teacher_workdir (a teacher training workdir).")
    loaded = pretrained.load_pretrained(config.teacher_workdir)
    with config.unlocked():
        for section in ("model", "schedule"):
            given = dict(config.get(section) or {})
            saved = dict(loaded.config[section])
            clashes = [
                f"{section}.{key}: {given[key]!r} (config) vs {saved.get(key)!r} (teacher)"
                for key in given
                if _normalise(given[key]) != _normalise(saved.get(key))
            ]
            if clashes:
                raise ValueError(
                    f"Config disagrees with the teacher at {config.teacher_workdir}: " + "; ".join(clashes)
                )
            config[section] = ml_collections.ConfigDict(saved)
        config.teacher_step = loaded.step
    if int(config.data.image_size) % 2 ** (len(config.model.block_out_channels) - 1):
        raise ValueError(f"data.image_size={config.data.image_size} does not fit the teacher's UNet levels.")
    return loaded


def _normalise(value: Any) -> Any:
    """Tuples and lists compare equal (a restored config holds lists), recursively."""
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return value


def build_conditional(config: ml_collections.ConfigDict) -> tuple[adapted.AdaptedModel, diffusion.Schedule]:
    """The adapted model and schedule of a (resolved) codi / finetune config."""
    backbone = unet_from_config(config.model)
    num_instructions = tasks.num_instructions(config.task)
    model = adapted.build_adapted_model(
        backbone,
        config.adapter,
        cond_channels=tasks.cond_channels(config.task),
        num_instructions=num_instructions,
        keep_initial=config.method == "codi" and config.codi.predictor == "teacher",
    )
    return model, diffusion.schedule_from_config(config.schedule)


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


SOLVERS = ("ddim", "dpm++")


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


def cond_to_rgb(cond: np.ndarray) -> np.ndarray:
    """A viewable 3-channel picture of a condition (first 3 channels, or gray replicated)."""
    cond = np.asarray(cond, np.float32)
    return cond[..., :3] if cond.shape[-1] >= 3 else np.repeat(cond[..., :1], 3, axis=-1)


def eval_examples(config: ml_collections.ConfigDict, num: int) -> dict[str, np.ndarray]:
    """The first ``num`` held-out examples with the task applied (fixed degradations)."""
    ds = pipeline.build_dataset(
        config.data, config.data.eval_split, num, seed=config.seed, train=False, task_config=config.task
    )
    batch = next(pipeline.numpy_iterator(ds))
    return {key: value for key, value in batch.items() if key in ("image", "cond", "instruction")}


INIT_SECTIONS = ("model", "schedule", "adapter", "task")


def load_init_model(config: ml_collections.ConfigDict) -> Any:
    """The (EMA) parameters of ``config.init_workdir``, a conditional run this one starts from (the
    two-stage baseline: fine-tune first, then distil), or None. Its model, schedule, adapter and
    task must be this config's: a clash is an error naming the field."""
    workdir = config.get("init_workdir")
    if not workdir:
        return None
    loaded = pretrained.load_conditional(workdir)
    # A field added since that run was made holds its default there.
    defaults = {"adapter": adapters.default_adapter_config().to_dict(), "task": tasks.default_task_config().to_dict()}
    clashes = []
    for section in INIT_SECTIONS:
        ours = config[section].to_dict()
        theirs = {**defaults.get(section, {}), **loaded.config[section].to_dict()}
        for key in sorted(set(ours) | set(theirs)):
            if _normalise(ours.get(key)) != _normalise(theirs.get(key)):
                clashes.append(f"{section}.{key}: {ours.get(key)!r} (config) vs {theirs.get(key)!r} (init_workdir)")
    if clashes:
        raise ValueError(f"config.init_workdir={workdir} was trained with a different setup: " + "; ".join(clashes))
    logging.info("Starting from the %s run at %s, step %d.", loaded.config.method, workdir, loaded.step)
    return {key: sub for key, sub in loaded.params.items() if key != "initial"}


def _conditional_recipe(config: ml_collections.ConfigDict) -> Recipe:
    codi.check_codi_config(config.codi)
    loaded = resolve_from_teacher(config)
    init_params = load_init_model(config)
    model, schedule = build_conditional(config)
    parametrization = config.model.parametrization
    optimizer = model.optimizer(make_optimizer(config.optimizer))
    size = config.data.image_size
    cond_shape = (1, size, size, tasks.cond_channels(config.task))
    instruction = jnp.zeros((1,), jnp.int32) if tasks.num_instructions(config.task) else None
    init_rng, run_rng = jax.random.split(jax.random.PRNGKey(config.seed))

    def init_state(inputs):
        backbone_params, start_params = inputs
        if start_params is None:
            params = model.init(init_rng, backbone_params, jnp.zeros(cond_shape), instruction)
        else:
            params = model.with_initial(start_params)
        return create_train_state(params, optimizer, run_rng)

    step = functools.partial(
        codi.train_step,
        model=model,
        schedule=schedule,
        optimizer=optimizer,
        ema_decay=config.ema_decay,
        ema_warmup=config.get("ema_warmup", False),
        parametrization=parametrization,
        config=config.codi,
        objective=config.method,
    )
    sampler = make_conditional_sampler(model, schedule, parametrization)
    examples = eval_examples(config, config.num_sample_images)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(config.seed + 1), examples["image"].shape, jnp.float32))
    step_counts = tuple(config.sample_step_counts)

    def write_samples(writer, workdir: str, step: int, state: TrainState) -> dict:
        columns = [cond_to_rgb(examples["cond"])]
        scalars = {}
        for num_steps in step_counts:
            times = jnp.asarray(sample_times(config, num_steps))
            images = np.asarray(
                jax.device_get(
                    sampler(
                        state.ema_params,
                        examples["cond"],
                        examples.get("instruction"),
                        noise,
                        times,
                        renoise_key(config, config.seed),
                    )
                )
            )
            columns.append(images)
            scalars[f"eval/psnr_{num_steps}step"] = float(np.mean(metrics.psnr(images, examples["image"])))
        columns.append(examples["image"])
        # One row per example: condition | samples at each step count | target.
        tiles = np.stack(columns, axis=1).reshape((-1,) + examples["image"].shape[1:])
        grid = sampling.make_grid(sampling.to_uint8(tiles), columns=len(columns))
        path = _write_grid(writer, workdir, step, grid)
        logging.info("Wrote samples (steps %s, EMA params) to %s; %s", step_counts, path, scalars)
        return scalars

    return Recipe(init_state, (loaded.params, init_params), step, write_samples, config.task)
