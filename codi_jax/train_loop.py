"""The training loop for every method (teacher, CoDi, fine-tune): ``train_and_evaluate``.

Order of events: mesh -> recipe (model, optimizer, pure step; see ``recipes``) -> state
created straight into its shardings -> resume from the workdir's latest checkpoint if there is
one -> data stream advanced to the resumed step -> jitted pure train step in a loop with
progress, TensorBoard scalars, sample grids (and quick eval scalars) and checkpoints.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from codi_jax import checkpoint, diffusion, recipes, sharding
from codi_jax.data import pipeline
from codi_jax.models.unet import UNet, unet_from_config
from codi_jax.train_state import TrainState


def build_model(config: ml_collections.ConfigDict) -> tuple[UNet, diffusion.Schedule]:
    """The teacher's UNet and schedule from its config."""
    return unet_from_config(config.model), diffusion.schedule_from_config(config.schedule)


def create_sharded_state(recipe: recipes.Recipe, mesh: jax.sharding.Mesh, sharding_rules=()) -> tuple[TrainState, Any]:
    """Initial state created by a jitted init directly into its shardings (no host copy)."""
    abstract_state = jax.eval_shape(recipe.init_state, recipe.init_inputs)
    state_shardings = sharding.tree_shardings(abstract_state, mesh, sharding_rules)
    # Initialisation runs once: compile it without LLVM optimisation (threefry-heavy init graphs
    # otherwise take ~4x longer to compile on XLA:CPU than they take to run).
    init_fn = (
        jax.jit(recipe.init_state, out_shardings=state_shardings)
        .lower(recipe.init_inputs)
        .compile(compiler_options={"xla_backend_optimization_level": 0})
    )
    return init_fn(recipe.init_inputs), state_shardings


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains the unconditional teacher in ``workdir``, resuming from its latest checkpoint."""
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(config.get("num_devices") or None)
    sharding.check_batch_divisible(config.batch_size, mesh)
    recipe = recipes.make_recipe(config)  # codi / finetune: loads the teacher, fills config.model
    state, state_shardings = create_sharded_state(recipe, mesh, config.get("sharding_rules", ()))
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
        recipe.train_step,
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
        task_config=recipe.task_config,
    )
    # The stream is a deterministic function of the seed; skipping the batches already consumed
    # makes a resumed run see exactly the data an uninterrupted one would.
    batches = pipeline.numpy_iterator(dataset.skip(start_step))

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
            eval_scalars = recipe.write_samples(writer, workdir, step, state)
            if eval_scalars:
                writer.write_scalars(step, eval_scalars)

        ckpt.save(step, state, config, force=step == config.num_train_steps)
        if ckpt.reached_preemption(step):
            logging.warning("Preemption signal at step %d: checkpoint saved, stopping.", step)
            break

    ckpt.wait()
    ckpt.close()
    writer.flush()
    return state
