"""The training loop for every method (teacher, CoDi, fine-tune): ``train_and_evaluate``.

Order of events: config resolved -> ``(data, fsdp)`` mesh -> recipe (model, optimizer, pure
step; see ``recipes``) -> state restored from the workdir's latest checkpoint, else created by a
jitted init straight into its shardings (the teacher's weights restored into their shards
first) -> this process's data stream advanced to the resumed step -> jitted pure train step in
a loop with progress, TensorBoard scalars, sample grids (and quick eval scalars) and checkpoints.
Every process runs the loop; only process 0 writes logs, images and summaries.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers

from codi_jax import diffusion, flow_matching, sharding
from codi_jax.data import captions, image_files, pipeline
from codi_jax.frozen import batch_inputs, encoders
from codi_jax.models import networks
from codi_jax.runs import checkpoint, config_resolution, workdir_lock
from codi_jax.training import aot, recipes, run_log
from codi_jax.training.run_status import CheckpointWriteFailed, Diverged, Preempted
from codi_jax.training.stop_signals import StopSignals
from codi_jax.training.train_state import TrainState


def build_model(
    config: ml_collections.ConfigDict,
) -> tuple[networks.Backbone, diffusion.Schedule | flow_matching.FlowSchedule]:
    """The teacher's backbone (UNet or DiT) and schedule from its config."""
    return networks.build_teacher(config)


def state_shardings(recipe: recipes.Recipe, mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict) -> Any:
    """``(abstract state, its shardings)`` from the config's sharding rules; nothing is allocated."""
    rules, min_size = sharding.rules_from_config(config)
    abstract = jax.eval_shape(recipe.init_state, recipe.init_shapes)
    return abstract, sharding.tree_shardings(abstract, mesh, rules, min_size)


def create_sharded_state(
    recipe: recipes.Recipe, mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict
) -> tuple[TrainState, Any]:
    """Initial state created by a jitted init directly into its shardings; pre-trained inputs
    (the teacher's EMA params) are restored straight into their shards first."""
    _, shardings = state_shardings(recipe, mesh, config)
    rules, min_size = sharding.rules_from_config(config)
    input_shardings = sharding.tree_shardings(recipe.init_shapes, mesh, rules, min_size)
    inputs = recipe.load_init_inputs(input_shardings)
    # Initialisation runs once: compile it without LLVM optimisation (threefry-heavy init graphs
    # otherwise take ~4x longer to compile on XLA:CPU than they take to run).
    init_fn = (
        jax.jit(recipe.init_state, in_shardings=(input_shardings,), out_shardings=shardings)
        .lower(inputs)
        .compile(compiler_options={"xla_backend_optimization_level": 0})
    )
    return init_fn(inputs), shardings


def local_batches(config: ml_collections.ConfigDict, task_config, start_step: int, tokenize=None) -> Iterator[dict]:
    """This process's share of every global batch from ``start_step`` on; with ``tokenize`` (data
    with prompts of its own), ``text.drop_prob`` of them replaced by the empty prompt."""
    dataset = pipeline.build_dataset(
        config.data,
        config.data.train_split,
        config.batch_size,
        seed=config.seed,
        train=True,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        task_config=task_config,
        tokenize=tokenize,
        drop_prob=0.0 if tokenize is None else float(config.text.drop_prob),
        start_batch=start_step,
        micro_conditioning=batch_inputs.is_sdxl(config),  # SDXL's text_time UNet reads the crop's size ids
    )
    # The stream is a deterministic function of the seed and the step: a resumed run reads the
    # batches an uninterrupted one would, starting at its step directly (random access).
    return pipeline.numpy_iterator(dataset)


def check_input_paths(config: ml_collections.ConfigDict) -> None:
    """The local paths a run reads (image folder and its captions, VAE / text encoder folders),
    checked before any weight is loaded or anything is compiled; errors name the config field."""
    encoders.check_encoder_paths(config)
    conditional = networks.is_conditional(config)
    if conditional:
        batch_inputs.check_sdxl_text(config)
    if config.data.source == "folder":
        paths = image_files.list_image_files(config.data.folder)
        if conditional and batch_inputs.example_prompts(config):  # a malformed metadata.jsonl, uncaptioned images
            captions.folder_captions(config.data.folder, paths, config.data.caption_key)
    if config.data.source == "edit_triples":
        image_files.list_edit_triples(config.data.folder)
    drops = conditional and batch_inputs.has_text(config) and config.text.drop_prob > 0
    if drops and not batch_inputs.example_prompts(config):
        raise ValueError(
            f"text.drop_prob={config.text.drop_prob}: the data has no captions or instructions of its own to drop "
            "(the fixed text.prompt is never dropped); set it to 0 or train on captioned data"
        )


def restore_or_init(
    recipe: recipes.Recipe, mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict, ckpt: checkpoint.Checkpointer
) -> tuple[TrainState, Any]:
    """The run's latest checkpoint (pre-trained weights are then not read at all), else a fresh state."""
    if ckpt.latest_step() is None:
        aside = ckpt.set_aside_steps()
        if aside:  # never silently from step 0 where a run has been
            raise FileNotFoundError(
                f"{ckpt.directory} holds no checkpoint that restores, only ones an earlier run set aside as "
                f"damaged ({', '.join(aside)}); move back what you trust, or use a fresh --workdir."
            )
        return create_sharded_state(recipe, mesh, config)
    abstract, shardings = state_shardings(recipe, mesh, config)
    state = ckpt.restore_latest_intact(checkpoint.abstract_like(abstract, shardings), config)
    logging.info("Resumed from %s at step %d.", ckpt.directory, int(sharding.to_host(state.step)))
    return state, shardings


def check_workdir(workdir: str) -> None:
    """The workdir is a directory this process can write in (created if absent): checked before
    anything is loaded or compiled, on every process (each writes its checkpoint shards)."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise NotADirectoryError(f"--workdir {workdir} is a file, not a directory.")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{socket.gethostname()}-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as error:
        raise OSError(f"--workdir {workdir} is not writable: {error.strerror or error}.") from None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains ``config.method`` in ``workdir``, resuming from its latest checkpoint; ``config``
    is resolved first (codi / finetune: the teacher's model and schedule) and left unchanged.

    Everything that can be checked without loading a model is, first: the config's fields, the
    workdir, the input paths, the mesh. Then the run holds the workdir's lock (a second run on it
    is refused) and logs to ``<workdir>/train.log`` (the resolved config goes there only)."""
    config = config_resolution.resolve(config)
    check_workdir(workdir)
    check_input_paths(config)
    mesh = sharding.mesh_from_config(config)
    sharding.check_batch_divisible(config.batch_size, mesh)
    with workdir_lock.held_by_run(workdir), run_log.file_log(workdir):
        logging.info("Config (resolved):\n%s", config, extra=run_log.FILE_ONLY)
        return _train(config, workdir, mesh)


def _train(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh) -> TrainState:
    """The run itself, once checked and locked (``train_and_evaluate``)."""
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_every_steps=config.checkpoint_every_steps,
        keep=config.keep_checkpoints,
    )
    ckpt.check_resume_config(config)  # a refused resume loads nothing
    logging.info(
        "Data: %s (config.data.data_dir); XLA compilation cache: %s (--compilation_cache).",
        config.data.data_dir or os.path.expanduser("~/tensorflow_datasets"),
        jax.config.jax_compilation_cache_dir or "off",
    )
    recipe = recipes.make_recipe(config, mesh)
    state, shardings = restore_or_init(recipe, mesh, config, ckpt)
    start_step = int(sharding.to_host(state.step))
    if start_step >= config.num_train_steps:
        logging.info("Checkpoint step %d >= num_train_steps %d: nothing to do.", start_step, config.num_train_steps)
        ckpt.close()
        return state

    batch_sharding = sharding.batch_sharding(mesh)
    repl = sharding.replicated(mesh)
    batches = local_batches(config, recipe.task_config, start_step, recipe.tokenize)
    global_batches = (pipeline.to_global_batch(local, batch_sharding) for local in batches)
    first_batch = next(global_batches)
    global_batches = itertools.chain([first_batch], global_batches)
    encode = None  # the batch encoder as its own program, when the step does not run it (encode_in_step)
    if recipe.encode_batch is not None and not aot.encodes_in_step(recipe, config):
        encode = jax.jit(recipe.encode_batch, out_shardings=batch_sharding)
    try:  # ahead of time, so a step that cannot fit fails here, with the fields to change
        step_fn = aot.compile_train_step(recipe, config, (shardings, batch_sharding, repl), state, first_batch)
    except aot.StepMemoryError:
        ckpt.close()
        raise

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if start_step == 0:
        writer.write_hparams({k: v for k, v in config.to_dict().items() if isinstance(v, int | float | str)})
    logging.info(
        "Training from step %d to %d on a %s mesh (%d process(es)).",
        start_step,
        config.num_train_steps,
        dict(mesh.shape),
        jax.process_count(),
    )
    with StopSignals() as stop:
        loop_state = _LoopState(config, start_step, writer, recipe, workdir, ckpt, stop)
        for step in range(start_step + 1, config.num_train_steps + 1):
            batch = next(global_batches)
            step_rng = jax.random.fold_in(state.rng, step - 1)  # state.rng is replicated
            if encode is not None:  # VAE latents / prompt embeddings (frozen models), own key
                batch = encode(recipe.frozen_data, batch, jax.random.fold_in(step_rng, recipes.ENCODE_KEY))
            state, metrics = step_fn(state, batch, step_rng)
            _after_step(loop_state, step, state, metrics)
        _wait_for_checkpoint(ckpt)  # still under the handlers: a signal now changes nothing
        if stop.requested:
            logging.warning("%s received after the last step: the run finished.", stop.requested)
    ckpt.close()
    writer.flush()
    return state


class _LoopState:
    """What each step's bookkeeping uses besides the train state: the run's writer, recipe, workdir,
    checkpointer and stop signals, and what it carries from step to step: the metrics of the steps
    since this process's last log line (``pending``; a log line covers exactly those), the time and
    step the next line's rate counts from (``t_rate`` / ``step_rate``: the end of the first step,
    which holds the first call's overheads, then each log line), the rejection streak."""

    def __init__(self, config, start_step: int, writer, recipe, workdir: str, ckpt, stop: StopSignals):
        self.config, self.start_step, self.writer, self.recipe = config, start_step, writer, recipe
        self.workdir, self.ckpt, self.stop = workdir, ckpt, stop
        self.pending, self.t_rate, self.step_rate = [], time.time(), start_step
        self.streak = _RejectionStreak(config.nonfinite)


def _after_step(loop: _LoopState, step: int, state: TrainState, metrics: dict) -> None:
    """Everything after one train step: progress, divergence, samples, checkpoint, stop request."""
    ckpt, stop = loop.ckpt, loop.stop
    config, last = loop.config, step == loop.config.num_train_steps
    loop.pending.append(metrics)
    loop.streak.add(metrics["skipped_nonfinite"])  # on device: nothing is read back here
    if step == loop.start_step + 1:  # rates and ETA leave the first call out (not the loss)
        jax.block_until_ready(metrics)
        logging.info("Step %d (first call; the step was compiled before) took %.1f s.", step, time.time() - loop.t_rate)
        loop.t_rate, loop.step_rate = time.time(), step
    stopping = stop.agreed() and not last  # a signal at the last step: the run just finishes
    if stopping or _reads_streak(config, ckpt, step):  # the one host read of the counters
        _, worst = loop.streak.read()
        if loop.streak.policy.max_consecutive and worst >= loop.streak.policy.max_consecutive:
            ckpt.wait()
            raise Diverged(_diverged_message(step, worst, loop.streak.policy, ckpt))
    if step % config.log_every_steps == 0 or last:
        loop.t_rate, loop.step_rate = _log_progress(
            loop.writer, config, loop.pending, step, loop.t_rate, loop.step_rate
        )
        loop.pending = []
    if step % config.sample_every_steps == 0 or last:
        eval_scalars = loop.recipe.write_samples(loop.writer, loop.workdir, step, state)
        if eval_scalars:
            loop.writer.write_scalars(step, eval_scalars)
    _check_checkpoint_writes(ckpt)
    # While updates are being rejected no checkpoint is written: the last one stays the last good one.
    if stopping or not loop.streak.rejected:
        _save(ckpt, step, state, config, force=stopping or last)
    if stopping:
        _wait_for_checkpoint(ckpt)
        logging.warning(
            "Stopped by %s at step %d: checkpoint written to %s/%d. Rerun the same command to resume.",
            stop.requested or "another process's signal",
            step,
            ckpt.directory,
            step,
        )
        raise Preempted(f"stopped at step {step}; checkpoint {ckpt.directory}/{step}")


class _RejectionStreak:
    """Rejected updates in a row, counted on the device (``current``, and ``worst`` since the last
    read), so the loop reads them back only when it must decide something: a log line, a step that
    may save a checkpoint, a stop request."""

    def __init__(self, policy: ml_collections.ConfigDict):
        self.policy, self.counts, self.rejected = policy, np.zeros(2, np.int32), 0

    def add(self, skipped: jax.Array) -> None:
        self.counts = _count_rejection(self.counts, skipped)

    def read(self) -> tuple[int, int]:
        """``(current, worst)``: the streak at the last step and the longest one since the last read."""
        current, worst = (int(v) for v in sharding.to_host(self.counts))
        self.counts, self.rejected = np.array([current, current], np.int32), current
        return current, worst


@jax.jit
def _count_rejection(counts: jax.Array, skipped: jax.Array) -> jax.Array:
    current = jnp.where(skipped > 0, counts[0] + 1, 0)
    return jnp.stack([current, jnp.maximum(counts[1], current)])


def _reads_streak(config: ml_collections.ConfigDict, ckpt: checkpoint.Checkpointer, step: int) -> bool:
    """Steps at which the rejection counters are read: log steps, checkpoint steps (a checkpoint is
    written only after an accepted update), the last step, and a preemption sync point."""
    due = (config.log_every_steps, config.checkpoint_every_steps)
    return any(step % every == 0 for every in due) or step == config.num_train_steps or ckpt.reached_preemption(step)


def _log_progress(writer, config, pending: list, step: int, t_rate: float, step_rate: int) -> tuple[float, int]:
    """TensorBoard scalars and one log line: the metrics' means over ``pending`` (the steps since the
    last line), steps/s and ETA over the steps since ``step_rate`` (none on a line that ends at the
    first step, whose time is the first call's). Returns the next line's ``(t_rate, step_rate)``."""
    summary = {f"train/{k}": float(np.mean([sharding.to_host(m[k]) for m in pending])) for k in pending[0]}
    now = time.time()
    rate = ""
    if step > step_rate:
        steps_per_sec = (step - step_rate) / max(now - t_rate, 1e-9)
        summary["train/steps_per_sec"] = steps_per_sec
        summary["train/images_per_sec"] = steps_per_sec * config.batch_size
        eta_min = (config.num_train_steps - step) / max(steps_per_sec, 1e-9) / 60
        rate = f"  {steps_per_sec:.2f} steps/s  ETA {eta_min:.1f} min"
    writer.write_scalars(step, summary)
    logging.info("step %d/%d loss %.4f%s", step, config.num_train_steps, summary["train/loss"], rate)
    return now, step


def _last_complete(ckpt: checkpoint.Checkpointer) -> str:
    steps = [int(name) for name in os.listdir(ckpt.directory) if name.isdigit()]  # on disk, finalised
    return f"{ckpt.directory}/{max(steps)}" if steps else f"none in {ckpt.directory}"


def _diverged_message(step: int, rejected: int, policy, ckpt: checkpoint.Checkpointer) -> str:
    return (
        f"{rejected} consecutive updates rejected up to step {step} (non-finite loss / gradients / params, or the "
        f"parameter norm moved by more than x{policy.max_param_norm_ratio}); no checkpoint was written for them. "
        f"Last good checkpoint: {_last_complete(ckpt)}. Lower optimizer.learning_rate or check the data, then "
        "rerun to resume from it."
    )


def _write_failed(ckpt: checkpoint.Checkpointer, error: Exception) -> CheckpointWriteFailed:
    logging.error("Checkpoint write failed:", exc_info=error, extra=run_log.FILE_ONLY)
    cause = checkpoint.short_cause(error)
    return CheckpointWriteFailed(
        f"writing a checkpoint to {ckpt.directory} failed ({type(error).__name__}: {cause}); "
        f"last complete checkpoint: {_last_complete(ckpt)}. Free the space or fix the permission, then rerun "
        "the same command to resume from it."
    )


def _save(ckpt: checkpoint.Checkpointer, step: int, state: TrainState, config, *, force: bool) -> None:
    """``ckpt.save``; any failure (a write, or the previous background write found failed) stops the run."""
    try:
        ckpt.save(step, state, config, force=force)
    except Exception as error:
        raise _write_failed(ckpt, error) from error


def _check_checkpoint_writes(ckpt: checkpoint.Checkpointer) -> None:
    """A failed background checkpoint write stops the run at this step boundary."""
    try:
        ckpt.check_for_errors()
    except Exception as error:
        raise _write_failed(ckpt, error) from error


def _wait_for_checkpoint(ckpt: checkpoint.Checkpointer) -> None:
    try:
        ckpt.wait()
    except Exception as error:
        raise _write_failed(ckpt, error) from error
    _check_checkpoint_writes(ckpt)
