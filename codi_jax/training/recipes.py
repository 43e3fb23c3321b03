"""What differs between the training runs this codebase makes, behind one interface.

``config.method``:
  teacher    the unconditional diffusion model (``codi_jax.objectives.teacher``)
  codi       conditional distillation from a teacher checkpoint (``codi_jax.objectives.codi``, mode 'codi')
  finetune   the same adapted model trained with the plain diffusion loss: the non-distilled
             conditional model every comparison needs

A ``Recipe`` holds the state initialiser (pure, traced under ``jit``; pre-trained weights come
in as its argument, never as baked-in constants), the shapes of that argument and how to
restore it into given shardings, the pure train step with its static arguments bound, and the
periodic sample / quick-eval writer. ``train_loop`` runs any recipe the same way. Recipes take
resolved configs (``codi_jax.runs.config_resolution.resolve``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from codi_jax import atomic, metrics
from codi_jax import sharding as sharding_lib
from codi_jax.frozen import batch_inputs, encoders
from codi_jax.interop import convert
from codi_jax.models import networks
from codi_jax.objectives import codi, teacher
from codi_jax.runs import checkpoint, config_resolution, pretrained
from codi_jax.sampling import conditional, samplers
from codi_jax.training.train_state import (
    TrainState,
    create_train_state,
    make_optimizer,
    model_params,
)


@dataclasses.dataclass
class Recipe:
    init_state: Callable[[Any], TrainState]  # (init_inputs) -> fresh state; pure, jitted by the loop
    init_shapes: Any  # abstract tree of the initialiser's input (pre-trained params), or None
    load_init_inputs: Callable[[Any], Any]  # (shardings of init_shapes) -> the restored inputs
    train_step: Callable  # (state, batch, rng) -> (state, metrics)
    write_samples: Callable  # (writer, workdir, step, state) -> dict of eval scalars
    task_config: ml_collections.ConfigDict | None  # the data task, None for unconditional
    # (frozen_data, batch, rng) -> the batch the step trains on (VAE latents, prompt embeddings);
    # None when the data goes in as it is. ``frozen_data`` is never trained or checkpointed.
    encode_batch: Callable | None = None
    frozen_data: Any = None
    tokenize: Callable | None = None  # text -> ids, for data with free-text instructions


def make_recipe(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Recipe:
    """The recipe for a resolved config's ``method`` on ``mesh``."""
    if config_resolution.method_of(config) == "teacher":
        return _teacher_recipe(config, mesh)
    return _conditional_recipe(config, mesh)


def _write_grid(writer, workdir: str, step: int, grid: np.ndarray, tag: str = "samples") -> str | None:
    """TensorBoard image and ``samples/step_N.png``, from process 0 only."""
    if jax.process_index() != 0:
        return None
    writer.write_images(step, {tag: grid[None]})
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
    atomic.save_png(path, grid)
    return path


def bind_train_step(config: ml_collections.ConfigDict, model: Any, schedule: Any, optimizer: Any) -> Callable:
    """The run's pure train step ``(state, batch, rng) -> (state, metrics)`` with its static parts
    (model, schedule, optimizer, EMA and update policy; CoDi's options) bound, as every run, test
    and benchmark binds it."""
    static = dict(
        model=model,
        schedule=schedule,
        optimizer=optimizer,
        ema_decay=config.ema_decay,
        ema_warmup=config.ema_warmup,
        parametrization=config.model.parametrization,
        max_param_norm_ratio=config.nonfinite.max_param_norm_ratio,
    )
    if not networks.is_conditional(config):
        return functools.partial(teacher.train_step, **static)
    return functools.partial(codi.train_step, **static, config=config.codi, objective=config.method)


# fold_in tag of the batch encoder's key (the step's own key is used as is)
ENCODE_KEY = 1 << 20


def encoded_train_step(
    encode_batch: Callable, train_step: Callable, state: TrainState, frozen_data: Any, batch: dict, rng: jax.Array
) -> tuple[TrainState, dict]:
    """``train_step`` on a raw batch: the frozen encoders (VAE latents, prompt embeddings) run in the
    same program, with the key ``fold_in(rng, ENCODE_KEY)`` (``config.encode_in_step``; bound with
    ``partial`` by ``training.aot``)."""
    return train_step(state, encode_batch(frozen_data, batch, jax.random.fold_in(rng, ENCODE_KEY)), rng)


# --------------------------------------------------------------------------- teacher


def _teacher_recipe(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Recipe:
    if batch_inputs.is_latent(config) or batch_inputs.has_text(config):
        raise ValueError(
            "Training a latent / text-conditioned teacher is not supported here: convert a pre-trained one "
            "(python -m codi_jax.convert) and distil it (config.method='codi', config.teacher_workdir)."
        )
    model, schedule = networks.build_teacher(config)
    optimizer = make_optimizer(config.optimizer, config.num_train_steps)
    parametrization = config.model.parametrization
    size = int(config.data.image_size)
    init_rng, run_rng = jax.random.split(jax.random.PRNGKey(config.seed))

    def init_state(_):
        return create_train_state(networks.init_teacher_params(model, size, init_rng), optimizer, run_rng)

    step = bind_train_step(config, model, schedule, optimizer)
    sampler = jax.jit(
        samplers.many_step_sampler(  # DDIM, or Euler for a flow-matching teacher
            lambda params, z_t, model_t: model.apply({"params": params}, z_t, model_t),
            schedule,
            parametrization,
            config.sample_steps,
        )
    )
    shape = (size, size, config.model.out_channels)
    noise = samplers.example_noise(config.seed + 1, np.arange(config.num_sample_images), shape)
    noise = sharding_lib.put_replicated(noise, mesh)

    def write_samples(writer, workdir: str, step: int, state: TrainState) -> dict:
        images = sharding_lib.to_host(sampler(state.ema_params, noise))
        path = _write_grid(writer, workdir, step, samplers.make_grid(samplers.to_uint8(images)))
        logging.info("Wrote samples (%d steps, EMA params) to %s.", config.sample_steps, path)
        return {}

    return Recipe(init_state, None, lambda _: None, step, write_samples, None)


# --------------------------------------------------------------------------- conditional


def eval_examples(config: ml_collections.ConfigDict, num: int, tokenize: Callable | None = None) -> dict:
    """The first ``num`` held-out examples with the task applied (fixed degradations)."""
    from codi_jax.data import pipeline  # TensorFlow: imported where data is read

    ds = pipeline.build_dataset(
        config.data,
        config.data.eval_split,
        num,
        seed=config.seed,
        train=False,
        task_config=config.task,
        tokenize=tokenize,
    )
    batch = next(pipeline.numpy_iterator(ds))
    return {key: value for key, value in batch.items() if key in ("image", "cond", "instruction", "prompt_ids")}


# Adapter sub-trees a converted diffusers ControlNet does not have (this codebase's additions).
NOT_IN_DIFFUSERS_CONTROLNET = ("instruction_embedding", "guidance_embedding")


def _conditional_init(config: ml_collections.ConfigDict, model, optimizer) -> tuple[Callable, Any, Callable]:
    """``(init_state, init_shapes, load_init_inputs)``: a fresh adapter around the teacher's EMA
    backbone (with ``adapter.init_from``: a converted public ControlNet as the adapter), or
    (``init_workdir``) another conditional run's EMA params."""
    init_rng, run_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    cond, instruction = networks.condition_placeholders(config)
    placeholders = networks.init_placeholders(config)
    start_from, controlnet = config.get("init_workdir"), config.adapter.init_from

    def init_state(inputs):
        if start_from:
            params = model.with_initial(inputs)
        else:
            backbone, adapter = (inputs["backbone"], inputs["controlnet"]) if controlnet else (inputs, None)
            params = model.init(init_rng, backbone, cond, instruction, adapter_params=adapter, **placeholders)
        trained, frozen = model.split(params)
        return create_train_state(trained, optimizer, run_rng, frozen)

    if start_from:
        shapes, source, what = networks.param_shapes(config), start_from, "config.init_workdir"
    else:
        shapes, source, what = networks.teacher_param_shapes(config), config.teacher_workdir, "config.teacher_workdir"
    if controlnet and not start_from:
        adapter = networks.param_shapes(config)["adapter"]
        converted = {k: v for k, v in adapter.items() if not k.startswith(NOT_IN_DIFFUSERS_CONTROLNET)}
        shapes = {"backbone": shapes, "controlnet": converted}

    def load_init_inputs(shardings):
        if controlnet and not start_from:
            backbone = load_init_inputs_from(source, shapes["backbone"], shardings["backbone"], what)
            abstract = checkpoint.abstract_like(shapes["controlnet"], shardings["controlnet"])
            logging.info("Initial adapter: the converted ControlNet at %s.", controlnet)
            return {"backbone": backbone, "controlnet": convert.restore_controlnet(controlnet, abstract)}
        return load_init_inputs_from(source, shapes, shardings, what)

    return init_state, shapes, load_init_inputs


def load_init_inputs_from(source: str, shapes: Any, shardings: Any, what: str) -> Any:
    """The EMA params of the workdir ``source`` read into ``shapes`` on ``shardings``."""
    params, step = pretrained.restore_params(source, checkpoint.abstract_like(shapes, shardings), what=what)
    logging.info("Initial weights: EMA params of %s at step %d.", source, step)
    return params


def _conditional_recipe(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Recipe:
    model, schedule = networks.build_conditional(config)
    optimizer = make_optimizer(config.optimizer, config.num_train_steps)
    init_state, init_shapes, load_init_inputs = _conditional_init(config, model, optimizer)
    step = bind_train_step(config, model, schedule, optimizer)
    enc, frozen_data = batch_inputs.load(config)
    frozen_data = sharding_lib.put_replicated(frozen_data, mesh)
    write_samples = _conditional_sample_writer(config, mesh, model, schedule, enc, frozen_data)
    encode = batch_inputs.batch_encoder(config, enc)
    tokenize = batch_inputs.tokenizer_of(config, enc)
    return Recipe(
        init_state, init_shapes, load_init_inputs, step, write_samples, config.task, encode, frozen_data, tokenize
    )


def _conditional_sample_writer(config, mesh, model, schedule, enc, frozen_data) -> Callable:
    """Periodic samples at each of ``config.sample_step_counts`` on held-out examples (decoded
    with the VAE for latent runs), with their PSNR against the targets."""
    latent = enc.vae is not None
    sampler = conditional.make_conditional_sampler(model, schedule, config.model.parametrization, clip=not latent)
    examples = eval_examples(config, config.num_sample_images, batch_inputs.tokenizer_of(config, enc))
    size = networks.model_input_size(config)
    noise, renoise = samplers.example_inputs(  # the per-example noise every sampling command draws
        config.seed + 1,
        np.arange(len(examples["image"])),
        (size, size, int(config.model.in_channels)),
        conditional.renoise_between_steps(config),
    )
    on_mesh = sharding_lib.put_replicated({**examples, "noise": noise}, mesh)
    renoise = None if renoise is None else sharding_lib.put_replicated(renoise, mesh)
    text = conditional.text_inputs(batch_inputs.add_text(frozen_data, on_mesh, enc.text_model), config)
    cond = batch_inputs.condition_encoder(config, enc)(frozen_data, on_mesh["cond"])  # the adapter's condition
    decode = jax.jit(functools.partial(encoders.decode_latents, enc.vae)) if latent else None
    step_counts = tuple(config.sample_step_counts)

    def write_samples(writer, workdir: str, step: int, state: TrainState) -> dict:
        columns, scalars = [samplers.cond_to_rgb(examples["cond"])], {}
        params = model_params(state, ema=True)
        for num_steps in step_counts:
            times = sharding_lib.put_replicated(conditional.sample_times(config, num_steps).astype(np.float32), mesh)
            out = sampler(params, cond, on_mesh.get("instruction"), on_mesh["noise"], times, renoise, text)
            images = sharding_lib.to_host(decode(frozen_data.vae_params, out) if latent else out)
            columns.append(images)
            scalars[f"eval/psnr_{num_steps}step"] = float(np.mean(metrics.psnr(images, examples["image"])))
        columns.append(examples["image"])
        # One row per example: condition | samples at each step count | target.
        tiles = np.stack(columns, axis=1).reshape((-1,) + examples["image"].shape[1:])
        path = _write_grid(writer, workdir, step, samplers.make_grid(samplers.to_uint8(tiles), columns=len(columns)))
        logging.info("Wrote samples (steps %s, EMA params) to %s; %s", step_counts, path, scalars)
        return scalars

    return write_samples
