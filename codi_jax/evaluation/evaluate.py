"""Evaluating conditional checkpoints: sample a held-out set at each step count (``SamplingOptions``),
score each row (``scoring``), over several seeds and several runs on one set, with progress lines.

``check_runs`` checks a whole evaluation from the runs' saved configs before any weight is read;
``evaluate_runs`` then loads the runs one at a time."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from codi_jax import sharding
from codi_jax.evaluation.held_out import evaluation_examples
from codi_jax.evaluation.scoring import MetricWeights, Row, condition_row, mean_row, score_row
from codi_jax.frozen import encoders
from codi_jax.models import networks, student
from codi_jax.runs.pretrained import Pretrained, load_conditional, read_config
from codi_jax.sampling import conditional, few_step, samplers
from codi_jax.sampling.options import SamplingOptions, parse_step_counts


def needs_frozen_models(config: Any) -> bool:
    """Whether sampling the run needs its frozen VAE / text encoder (a latent or text run): then
    ``few_step.conditional_sampler`` samples it, decodes the latents and encodes the prompt."""
    return encoders.is_latent(config) or encoders.has_text(config)


def make_sampler(pre: Pretrained, options: SamplingOptions = SamplingOptions()) -> Callable:
    """The sampler of ``sample_all`` (built once, it compiles once per step count): jitted, or for
    a latent / text run ``few_step.conditional_sampler``'s."""
    if needs_frozen_models(pre.config):
        return few_step.conditional_sampler(pre, options)
    ops = conditional.lowpass_operators(pre.config) if options.lowpass_consistency else None
    return conditional.make_conditional_sampler(
        pre.model, pre.schedule, pre.parametrization, options.solver, lowpass_ops=ops
    )


def sample_all(
    pre: Pretrained,
    examples: dict[str, np.ndarray],
    num_steps: int,
    options: SamplingOptions = SamplingOptions(),
    *,
    times: np.ndarray | None = None,
    sampler: Callable | None = None,
    warm_up: bool = True,
) -> tuple[np.ndarray, float]:
    """Samples for every example and the mean wall time per image (ms, after warm-up); each batch
    is split over this process's devices.

    ``options.renoise`` None takes the run's own default (CoDi: ``codi.renoise``) for the DDIM solver
    and no re-noising for the others. ``sampler``: ``make_sampler``'s, to reuse its compilations
    (None: a new one). ``warm_up``: compile the first batch's shapes before timing it (nothing is
    run twice); False when ``sampler`` has already run these shapes.
    """
    if sampler is None:
        sampler = make_sampler(pre, options)
    cond, instruction = examples["cond"], examples.get("instruction")
    if needs_frozen_models(pre.config):
        if times is not None:
            raise ValueError("sample_all(times=...) is for pixel runs without text.")
        return sampler(cond, instruction, num_steps, seed=options.seed, timed=True)
    renoise = options.renoise
    if renoise is None:
        renoise = options.solver == "ddim" and conditional.renoise_between_steps(pre.config)
    times = jnp.asarray(conditional.sample_times(pre.config, num_steps) if times is None else times)
    mesh = sharding.make_mesh(devices=jax.local_devices())  # the batch split over this process's devices
    params = jax.device_put(pre.params, sharding.replicated(mesh))  # no copy where already there

    def inputs(batch: np.ndarray, z_init: jax.Array, renoise_keys: jax.Array | None) -> tuple:
        batch_instruction = None if instruction is None else instruction[batch]
        return params, cond[batch], batch_instruction, z_init, times, renoise_keys

    def sample_batch(*args) -> jax.Array:
        return sampler(*inputs(*args))

    def compile_batch(*args) -> None:
        sampler.lower(*inputs(*args)).compile()

    shape = examples["image"].shape[1:]
    return samplers.sample_in_batches(
        sample_batch,
        len(cond),
        shape,
        seed=options.seed,
        renoise=renoise,
        batch_size=options.batch_size,
        warm_up=compile_batch if warm_up else None,
        mesh=mesh,
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class Progress:
    """Prints one line per finished (run, step count): its time, the elapsed time and an ETA.

    The ETA models each job left as an overhead (compile, warm-up, metrics: what a finished job
    took beyond its timed sampling) plus its step count times the sampling time per step, both
    averaged over the jobs finished so far."""

    def __init__(self, jobs: Sequence[tuple[str, int]], out: Callable[[str], None] = print):
        self.jobs = list(jobs)
        self.out = out
        self.done = 0
        self.overheads: list[float] = []
        self.step_seconds: list[float] = []
        self.start = self.last = time.perf_counter()

    def finished(self, row: Row) -> None:
        now = time.perf_counter()
        took, self.last = now - self.last, now
        sampling = row.ms_per_image * len(row.samples) / 1000.0
        self.overheads.append(max(took - sampling, 0.0))
        self.step_seconds.append(sampling / max(row.steps, 1))
        self.done += 1
        overhead, per_step = float(np.mean(self.overheads)), float(np.mean(self.step_seconds))
        left = sum(overhead + per_step * steps for _, steps in self.jobs[self.done :])
        eta = f"ETA {_duration(left)}" if self.done < len(self.jobs) else "done"
        self.out(
            f"[{self.done}/{len(self.jobs)}] {row.method}, {row.steps} step{'s' if row.steps != 1 else ''}: "
            f"PSNR {row.psnr:.2f} dB in {_duration(took)}; elapsed {_duration(now - self.start)}, {eta}"
        )


def evaluate_checkpoint(
    pre: Pretrained,
    examples: dict[str, np.ndarray],
    step_counts: tuple[int, ...],
    method: str,
    options: SamplingOptions = SamplingOptions(),
    *,
    weights: MetricWeights = MetricWeights(),
    progress: Progress | None = None,
    num_seeds: int = 1,
) -> list[Row]:
    """One row per step count (``progress``: a line printed as each finishes); ``num_seeds``: the row
    is the mean over sampling seeds ``options.seed .. options.seed + num_seeds - 1``, with their
    spread. ``options.lowpass_consistency``: pixel-space super-resolution runs only."""
    if num_seeds < 1:
        raise ValueError(f"num_seeds={num_seeds}: must be at least 1.")
    trained = student.trainable_param_count(pre.model, pre.params)
    sampler = make_sampler(pre, options)  # compiled once per step count, not per seed
    rows = []
    for num_steps in step_counts:
        per_seed = []
        for row_seed in range(options.seed, options.seed + num_seeds):
            samples, ms = sample_all(
                pre,
                examples,
                num_steps,
                options.with_seed(row_seed),
                sampler=sampler,
                warm_up=row_seed == options.seed,  # later seeds reuse the first one's compilation
            )
            per_seed.append(
                score_row(
                    method,
                    num_steps,
                    samples,
                    examples["image"],
                    ms_per_image=ms,
                    params_trained=trained,
                    weights=weights,
                    seed=row_seed,
                    task=pre.config.task,
                    lowpass_consistency=options.lowpass_consistency,
                )
            )
        row = mean_row(per_seed)
        rows.append(row)
        if progress is not None:
            progress.finished(row)
    return rows


class RunSpec(NamedTuple):
    """A run to evaluate: its table name, workdir and step counts (None: the shared ``--steps``)."""

    name: str
    workdir: str
    steps: tuple[int, ...] | None = None


def parse_runs(specs: Sequence[str]) -> list[RunSpec]:
    """``--run`` values: ``NAME=WORKDIR`` or ``NAME=WORKDIR:1,2,4`` (that run's own step counts)."""
    runs = []
    for spec in specs:
        name, sep, rest = spec.partition("=")
        workdir, colon, counts = rest.rpartition(":")
        if not colon or not re.fullmatch(r"[0-9, ]+", counts):
            workdir, counts = rest, ""
        if not sep or not name or not workdir:
            raise ValueError(f"--run {spec!r} is not NAME=WORKDIR or NAME=WORKDIR:1,2,4.")
        runs.append(RunSpec(name, workdir, parse_step_counts(counts, f"--run {spec!r}") if counts else None))
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"--run names must differ (they label the table rows); got {names}.")
    return runs


def check_runs(
    runs: Sequence[RunSpec],
    step_counts: tuple[int, ...],
    options: SamplingOptions = SamplingOptions(),
) -> list[tuple[RunSpec, ml_collections.ConfigDict]]:
    """Every check of an evaluation from the runs' saved configs alone (no weights read): each run
    is a codi / finetune run of the first run's task and image size, and samples at its step counts
    (and, with ``options.lowpass_consistency``, is a pixel-space super-resolution run). Returns each
    run (its step counts filled in) with its config."""
    checked = []
    for spec in runs:
        run = RunSpec(*spec)
        config, _ = read_config(run.workdir, what=f"--run {run.name}={run.workdir}")
        if not networks.is_conditional(config):
            raise ValueError(
                f"--run {run.name}={run.workdir} is a {config.get('method', 'teacher')!r} run, "
                "not a conditional (codi / finetune) one."
            )
        run = run._replace(steps=tuple(run.steps or step_counts))
        if options.lowpass_consistency:
            try:
                conditional.check_lowpass_consistency(config)
            except ValueError as error:
                raise ValueError(f"--run {run.name}: {error}") from None
        for num_steps in run.steps:
            try:
                few_step.check_steps(config, num_steps)
            except ValueError as error:
                raise ValueError(f"--run {run.name}: {error}") from None
        if checked:
            first, reference = checked[0]
            if config.task.to_dict() != reference.task.to_dict() or config.data.image_size != reference.data.image_size:
                raise ValueError(f"Run {run.name!r} was trained on another task or image size than {first.name!r}.")
        checked.append((run, config))
    return checked


def evaluate_runs(
    runs: Sequence[RunSpec | tuple],
    step_counts: tuple[int, ...],
    options: SamplingOptions = SamplingOptions(),
    *,
    images: str | None = None,
    num_eval: int = 256,
    weights: MetricWeights = MetricWeights(),
    bicubic: bool = False,
    progress: Callable[[str], None] | None = print,
    num_seeds: int = 1,
) -> list[Row]:
    """Rows of every run at its step counts on one held-out set, then (``bicubic``; super-resolution
    only, other tasks skip it with a note) the condition's own row. Everything is checked
    (``check_runs``, the metric weights, the held-out images) before the first run is loaded; runs
    are loaded one at a time. ``progress``: where the line per (run, step count) goes (None: nowhere).
    ``options.seed`` also seeds the held-out degradations; ``options.lowpass_consistency`` leaves the
    bicubic row (the condition itself) unchanged. ``num_seeds``: each row the mean over that many
    sampling seeds."""
    checked = check_runs(runs, step_counts, options)
    weights.check()
    examples = evaluation_examples(checked[0][1], images=images, num_eval=num_eval, seed=options.seed)
    if bicubic and checked[0][1].task.name != "sr":
        bicubic = False
        if progress is not None:
            progress(f"No bicubic row: task {checked[0][1].task.name!r} is not super-resolution.")
    jobs = [(run.name, n) for run, _ in checked for n in run.steps]
    tracker = Progress(jobs, progress) if progress is not None else None
    if progress is not None:
        progress(f"Evaluating {len(jobs)} (run, step count) pairs on {len(examples['image'])} held-out images.")
    rows = []
    for run, _ in checked:
        pre = load_conditional(run.workdir, use_ema=options.ema, dtype=options.model_dtype)
        rows += evaluate_checkpoint(
            pre, examples, run.steps, run.name, options, weights=weights, progress=tracker, num_seeds=num_seeds
        )
        del pre
    if bicubic:
        rows.append(condition_row(examples, weights=weights, seed=options.seed, task=checked[0][1].task))
    return rows
