"""The teacher training loop: ``train_and_evaluate(config, workdir)``.

Order of events: mesh -> model / schedule / optimizer -> state created straight into its
shardings -> resume from the workdir's latest checkpoint if there is one -> data stream advanced
to the resumed step -> jitted pure train step in a loop with progress, TensorBoard scalars,
sample grids and checkpoints.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from PIL import Image

from codi_jax import checkpoint, diffusion, sampling, sharding, teacher
from codi_jax.data import pipeline
from codi_jax.models.unet import UNet, unet_from_config
from codi_jax.train_state import TrainState, create_train_state, make_optimizer


def build_model(config: ml_collections.ConfigDict) -> tuple[UNet, diffusion.Schedule]:
    return unet_from_config(config.model), diffusion.schedule_from_config(config.schedule)


def init_params(model: UNet, config: ml_collections.ConfigDict, rng: jax.Array) -> Any:
    size = config.data.image_size
    sample = jnp.zeros((1, size, size, config.model.in_channels), jnp.float32)
    return model.init(rng, sample, jnp.zeros((1,), jnp.float32))["params"]


def create_sharded_state(
    config: ml_collections.ConfigDict, model: UNet, optimizer, mesh: jax.sharding.Mesh
) -> tuple[TrainState, Any]:
    """Initial state created by a jitted init directly into its shardings (no host copy)."""
    rng = jax.random.PRNGKey(config.seed)
    init_rng, run_rng = jax.random.split(rng)

    def init_state():
        return create_train_state(init_params(model, config, init_rng), optimizer, run_rng)

    abstract_state = jax.eval_shape(init_state)
    state_shardings = sharding.tree_shardings(abstract_state, mesh, config.get("sharding_rules", ()))
    # Initialisation runs once: compile it without LLVM optimisation (threefry-heavy init graphs
    # otherwise take ~4x longer to compile on XLA:CPU than they take to run).
    init_fn = (
        jax.jit(init_state, out_shardings=state_shardings)
        .lower()
        .compile(compiler_options={"xla_backend_optimization_level": 0})
    )
    return init_fn(), state_shardings


def make_sampler(model: UNet, schedule: diffusion.Schedule, parametrization: str, num_steps: int):
    """Jitted many-step DDIM sampler ``(params, z_init) -> images``."""
    times = sampling.uniform_times(num_steps)

    def apply_fn(params, z_t, model_t):
        return model.apply({"params": params}, z_t, model_t)

    return jax.jit(
        functools.partial(
            sampling.ddim_sample, apply_fn, times=times, schedule=schedule, parametrization=parametrization
        )
    )


def write_sample_grid(writer, workdir: str, step: int, images: np.ndarray) -> str:
    grid = sampling.make_grid(sampling.to_uint8(images))
    writer.write_images(step, {"samples": grid[None]})
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
    Image.fromarray(grid).save(path)
    return path


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains the unconditional teacher in ``workdir``, resuming from its latest checkpoint."""
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(config.get("num_devices") or None)
    sharding.check_batch_divisible(config.batch_size, mesh)
    model, schedule = build_model(config)
    optimizer = make_optimizer(config.optimizer)
    parametrization = config.model.parametrization

    state, state_shardings = create_sharded_state(config, model, optimizer, mesh)
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_every_steps=config.checkpoint_every_steps,
        keep=config.keep_checkpoints,
    )
    if ckpt.latest_step() is not None:
        state = ckpt.restore(checkpoint.abstract_like(state, state_shardings), config)
        logging.info("Resumed from %s at step %d.", ckpt.directory, int(state.step))
    start_step = int(state.step)
    if start_step >= config.num_train_steps:
        logging.info("Checkpoint step %d >= num_train_steps %d: nothing to do.", start_step, config.num_train_steps)
        ckpt.close()
        return state

    batch_sharding = sharding.batch_sharding(mesh)
    repl = sharding.replicated(mesh)
    step_fn = jax.jit(
        functools.partial(
            teacher.train_step,
            model=model,
            schedule=schedule,
            optimizer=optimizer,
            ema_decay=config.ema_decay,
            ema_warmup=config.get("ema_warmup", False),
            parametrization=parametrization,
        ),
        in_shardings=(state_shardings, batch_sharding, repl),
        out_shardings=(state_shardings, repl),
        donate_argnums=(0,),
    )

    dataset = pipeline.build_dataset(
        config.data,
        config.data.train_split,
        config.batch_size,
        seed=config.seed,
        train=True,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    # The stream is a deterministic function of the seed; skipping the batches already consumed
    # makes a resumed run see exactly the data an uninterrupted one would.
    batches = pipeline.numpy_iterator(dataset.skip(start_step))

    sampler = make_sampler(model, schedule, parametrization, config.sample_steps)
    size = config.data.image_size
    sample_noise = jax.random.normal(
        jax.random.PRNGKey(config.seed + 1), (config.num_sample_images, size, size, config.model.out_channels)
    )

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if start_step == 0:
        writer.write_hparams({k: v for k, v in config.to_dict().items() if isinstance(v, int | float | str)})
    progress = periodic_actions.ReportProgress(
        num_train_steps=config.num_train_steps, writer=writer, every_steps=config.log_every_steps
    )
    pending: list[dict[str, jax.Array]] = []
    logging.info("Training from step %d to %d on %d device(s).", start_step, config.num_train_steps, mesh.size)
    t_last, step_last = time.time(), start_step
    for step in range(start_step + 1, config.num_train_steps + 1):
        batch = pipeline.to_global_batch(next(batches), batch_sharding)
        step_rng = jax.random.fold_in(state.rng, step - 1)
        state, metrics = step_fn(state, batch, step_rng)
        pending.append(metrics)
        progress(step)

        if step % config.log_every_steps == 0 or step == config.num_train_steps:
            summary = {f"train/{k}": float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
            pending = []
            now = time.time()
            steps_per_sec = (step - step_last) / max(now - t_last, 1e-9)
            t_last, step_last = now, step
            summary["train/steps_per_sec"] = steps_per_sec
            summary["train/images_per_sec"] = steps_per_sec * config.batch_size
            writer.write_scalars(step, summary)
            eta_min = (config.num_train_steps - step) / max(steps_per_sec, 1e-9) / 60
            logging.info(
                "step %d/%d loss %.4f  %.2f steps/s  ETA %.1f min",
                step,
                config.num_train_steps,
                summary["train/loss"],
                steps_per_sec,
                eta_min,
            )

        if step % config.sample_every_steps == 0 or step == config.num_train_steps:
            images = jax.device_get(sampler(state.ema_params, sample_noise))
            path = write_sample_grid(writer, workdir, step, images)
            logging.info("Wrote samples (%d DDIM steps, EMA params) to %s.", config.sample_steps, path)

        ckpt.save(step, state, config, force=step == config.num_train_steps)
        if ckpt.reached_preemption(step):
            logging.warning("Preemption signal at step %d: checkpoint saved, stopping.", step)
            break

    ckpt.wait()
    ckpt.close()
    writer.flush()
    return state
