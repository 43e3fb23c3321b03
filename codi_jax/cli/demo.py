"""The demo: CoDi x4 super-resolution on the bundled photographs, CPU only.

``python -m codi_jax.demo --out=DIR``

1. Starts from the committed unconditional teacher (``checkpoints/teacher_patches32_color``) and
   runs CoDi for ``--codi_steps`` steps in ``DIR/codi`` (resumable: rerunning continues, it never
   starts over): full CoDi (``codi_jax/configs/cpu/codi_full_sr4.py``, adapter and backbone trained) or, with
   ``--variant=pe``, PE-CoDi (``codi_jax/configs/cpu/codi_sr4.py``, adapter only).
2. Restores the non-distilled conditional baseline (the same adapter trained with the plain
   diffusion loss by ``python -m codi_jax.train --config=codi_jax/configs/cpu/finetune_sr4.py``; committed in
   ``checkpoints/finetune_sr4_color``; trained here into ``DIR/finetune`` if absent).
3. Samples held-out patches (photos never seen in training) with CoDi at 1/2/4 steps (the run's
   move between steps, ``codi.renoise``: re-noising for the UNet, Euler moves for the DiT; at 4
   steps also with the other move, and with low-frequency consistency) and
   the baseline with DDIM at 4 and 50 steps, each row the mean over ``--num_seeds`` sampling seeds
   with its spread (± sd), printing a line per (model, step count) with an ETA; prints and writes
   (``DIR/results.md``, ``.json``; a rerun replaces them, atomically) PSNR, SSIM, SWD, LPIPS,
   LR-consistency, mean-colour error and ms per image, the bicubic upsampling of the input scored
   as a row, and ``DIR/demo_grid.png`` (tiles enlarged 4x): condition | CoDi 1 step | CoDi 4 steps
   | baseline 50 steps | ground truth.

``--backbone=dit`` does the same from the flow-matching DiT teacher (``checkpoints/dit_teacher_patches32``,
configs ``dit_codi_full_sr4`` / ``dit_codi_sr4`` / ``dit_finetune_sr4``; Euler moves where the UNet's
are DDIM). Its baseline is not committed: the demo fine-tunes it in ``DIR/finetune`` first
(``--baseline_steps``), so it takes longer than the UNet's demo.

The flags, the teacher, a CoDi run already in ``DIR/codi`` (same task and variant) and the
baseline (an x4 SR run) are checked before anything is trained; a bad input ends with one line
``error: ...`` and exit code 2. ``python -m codi_jax.evaluate`` makes the same table for any runs.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np
from absl import flags, logging

from codi_jax import atomic, configs, sharding
from codi_jax.cli import common
from codi_jax.evaluation import evaluate, held_out, report, scoring
from codi_jax.models import networks
from codi_jax.runs import config_diff
from codi_jax.runs.pretrained import load_conditional, read_config
from codi_jax.sampling import conditional, few_step, samplers
from codi_jax.sampling.options import SamplingOptions
from codi_jax.training import loop

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "out", None, "Where the demo writes its CoDi run (resumed if there), results.md / .json and demo_grid.png."
)
# Full CoDi, 2,400 at batch 8 (codi_jax/configs/cpu/codi_full_sr4.py): CoDi improves with training length on every
# metric (docs/smoothness.md), and at batch 8 a step costs about half a batch-16 one; 2,400 steps take
# about the time of 1,300 at batch 16, to keep the demo near 20 minutes on a 2-core host. PE-CoDi
# (codi_jax/configs/cpu/codi_sr4.py, batch 16): 1,500, as measured in docs/smoothness.md.
DEFAULT_CODI_STEPS = {"unet": {"full": 2400, "pe": 1500}, "dit": {"full": 6000, "pe": 6000}}
BACKBONES = ("unet", "dit")
DEFAULT_TEACHERS = {"unet": "checkpoints/teacher_patches32_color", "dit": "checkpoints/dit_teacher_patches32"}
# The DiT baseline is not committed (its frozen backbone alone is 39 MB): the demo trains it in DIR/finetune.
DEFAULT_BASELINES = {"unet": "checkpoints/finetune_sr4_color", "dit": "checkpoints/dit_finetune_sr4"}
flags.DEFINE_integer(
    "codi_steps",
    None,
    f"CoDi training steps; default by --backbone and --variant: {DEFAULT_CODI_STEPS} (~2 steps/s on 2 cores).",
)
flags.DEFINE_enum("variant", "full", ["full", "pe"], "full: adapter + backbone trained; pe: adapter only.")
flags.DEFINE_enum(
    "backbone",
    "unet",
    list(BACKBONES),
    "unet: the UNet teacher (VP, cosine); dit: the flow-matching DiT teacher (its own command: the baseline is "
    "not committed, so the demo fine-tunes it, --baseline_steps).",
)
flags.DEFINE_string("teacher", None, f"The unconditional teacher (a run); default by --backbone: {DEFAULT_TEACHERS}.")
flags.DEFINE_string(
    "baseline", None, f"The non-distilled conditional baseline (a run); default by --backbone: {DEFAULT_BASELINES}."
)
RENAMED_FLAGS = {"workdir": "out", "teacher_workdir": "teacher", "baseline_workdir": "baseline"}
DEFAULT_BASELINE_STEPS = {"unet": 1000, "dit": 2000}
flags.DEFINE_integer(
    "baseline_steps",
    None,
    f"Fine-tune steps if the baseline checkpoint is missing; default by --backbone: {DEFAULT_BASELINE_STEPS}.",
)
flags.DEFINE_integer("num_eval", 64, "Held-out patches to evaluate.")
flags.DEFINE_integer("grid_rows", 8, "Examples shown in the grid.")
flags.DEFINE_integer("num_seeds", 3, "Sampling seeds per row: each row is their mean, with its spread (± sd).")
flags.DEFINE_integer(
    "cpu_devices",
    None,
    "On CPU: devices the training batch and the evaluation batches are split over (default: one per usable "
    "core that divides the batch; 1: one device). Ignored on GPU / TPU and when XLA_FLAGS sets the count.",
)


def resolve(path: str) -> str:
    """``path`` as given if it exists, else relative to the repository (the committed checkpoints)."""
    if os.path.exists(path) or os.path.isabs(path):
        return path
    return str(configs.REPO_ROOT / path)


def demo_configs(teacher_workdir: str, codi_steps: int, variant: str = "full", backbone: str = "unet"):
    from codi_jax.configs.cpu import (
        codi_full_sr4,
        codi_sr4,
        dit_codi_full_sr4,
        dit_codi_sr4,
        dit_finetune_sr4,
        finetune_sr4,
    )

    if variant not in ("full", "pe"):
        raise ValueError(f"variant={variant!r}; valid: 'full', 'pe'.")
    if backbone not in BACKBONES:
        raise ValueError(f"backbone={backbone!r}; valid: {BACKBONES}.")
    if backbone == "dit":
        codi_config = (dit_codi_full_sr4 if variant == "full" else dit_codi_sr4).get_config()
        finetune_config = dit_finetune_sr4.get_config()
    else:
        codi_config = (codi_full_sr4 if variant == "full" else codi_sr4).get_config()
        finetune_config = finetune_sr4.get_config()
    for config in (codi_config, finetune_config):
        config.teacher_workdir = resolve(teacher_workdir)
    codi_config.num_train_steps = codi_steps
    return codi_config, finetune_config


# Fields a run in ``DIR/codi`` (resumed) and the baseline must share with the demo's config.
SHARED_FIELDS = ("task.name", "task.scale", "data.image_size")
CODI_FIELDS = SHARED_FIELDS + ("adapter.kind", "adapter.train_backbone")
GRID_COLUMNS = "condition | CoDi 1 step | CoDi 4 steps | baseline 50 steps | ground truth"


def _check_saved(
    workdir: str, config: ml_collections.ConfigDict, fields: tuple[str, ...], what: str, hint: str
) -> ml_collections.ConfigDict | None:
    """The saved config of the run at ``workdir`` (None if there is none yet), which must be
    conditional and agree with ``config`` on ``fields``."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    saved, _ = read_config(workdir, what=what)
    if not networks.is_conditional(saved):
        raise ValueError(f"{what}={workdir} holds a {saved.get('method', 'teacher')!r} run, not a conditional one.")
    diffs = config_diff.differences(saved, config, fields, names=(workdir, "the demo"))
    if diffs:
        raise ValueError(f"{what}={workdir} holds another run: {'; '.join(diffs)}; {hint}")
    return saved


def check_demo(
    workdir: str,
    codi_config: ml_collections.ConfigDict,
    finetune_config: ml_collections.ConfigDict,
    baseline_dir: str,
    *,
    num_eval: int,
    grid_rows: int,
    num_seeds: int = 1,
) -> None:
    """Every check of the demo's inputs before anything is trained, loaded or compiled."""
    for flag, value in (
        ("codi_steps", codi_config.num_train_steps),
        ("num_eval", num_eval),
        ("grid_rows", grid_rows),
        ("num_seeds", num_seeds),
    ):
        if value < 1:
            raise ValueError(f"--{flag}={value}: must be at least 1.")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise FileExistsError(f"--out {workdir} is a file, not a directory.")
    teacher = codi_config.teacher_workdir
    if not os.path.isdir(os.path.join(teacher, "checkpoints")):
        raise FileNotFoundError(f"--teacher {teacher}: no teacher checkpoint (no checkpoints/ directory).")
    saved, _ = read_config(teacher, what="--teacher")
    if networks.is_conditional(saved):
        raise ValueError(f"--teacher {teacher} holds a conditional {saved.method!r} run, not a teacher.")
    hint = "use a fresh --out (or the --variant / --backbone that wrote it)."
    codi = _check_saved(os.path.join(workdir, "codi"), codi_config, CODI_FIELDS, "--out", hint)
    baseline = _check_saved(baseline_dir, finetune_config, SHARED_FIELDS, "--baseline", "give an x4 SR one.")
    for what, run in (("--out", codi), ("--baseline", baseline)):
        if run is not None and run.model.kind != saved.model.kind:
            raise ValueError(
                f"{what} holds a run on a model.kind={run.model.kind!r} backbone; --teacher {teacher} is a "
                f"{saved.model.kind!r} (use the --backbone that wrote it, or a fresh --out)."
            )
    baseline_teacher = baseline.get("teacher_workdir") if baseline is not None else None
    if baseline_teacher and os.path.basename(os.path.normpath(baseline_teacher)) != os.path.basename(
        os.path.normpath(teacher)
    ):
        logging.warning("Baseline was fine-tuned from %s, CoDi from %s.", baseline_teacher, teacher)


def baseline_workdir_for(workdir: str, baseline_workdir: str) -> str:
    """The committed (or given) baseline if it has checkpoints, else ``DIR/finetune`` (trained here)."""
    baseline_dir = resolve(baseline_workdir)
    if os.path.isdir(os.path.join(baseline_dir, "checkpoints")):
        return baseline_dir
    return os.path.join(workdir, "finetune")


def baseline_name(move: str) -> str:
    return f"conditional, not distilled ({move})"


def evaluate_demo(
    codi_dir: str, baseline_dir: str, codi_name: str, num_eval: int, num_seeds: int = 1, move: str = "DDIM"
) -> tuple[list[scoring.Row], dict[str, np.ndarray], int | str]:
    """The demo's rows (CoDi 1/2/4 steps with the run's move between steps, 4 with the other one
    (``move`` moves or re-noising), 4 with low-frequency consistency, the baseline at 4 / 50,
    bicubic), each the mean over ``num_seeds`` sampling seeds, the held-out examples and the
    baseline's teacher step; a line per row as it finishes."""
    codi_model = load_conditional(codi_dir)
    examples = held_out.held_out_examples(codi_model.config, num_eval)
    renoise = conditional.renoise_between_steps(codi_model.config)
    other_name = f"{codi_name}, {move} moves" if renoise else f"{codi_name}, re-noising"
    base_name = baseline_name(move)
    jobs = [(codi_name, 1), (codi_name, 2), (codi_name, 4), (other_name, 4), (codi_name, 4)]
    jobs += [(base_name, 4), (base_name, 50)]
    progress = evaluate.Progress(jobs)
    print(f"Evaluating {len(jobs)} (model, step count) pairs on {len(examples['image'])} held-out patches.")
    shared = {"progress": progress, "num_seeds": num_seeds}
    rows = evaluate.evaluate_checkpoint(codi_model, examples, (1, 2, 4), codi_name, **shared)
    rows += evaluate.evaluate_checkpoint(
        codi_model, examples, (4,), other_name, SamplingOptions(renoise=not renoise), **shared
    )
    rows += evaluate.evaluate_checkpoint(
        codi_model, examples, (4,), codi_name, SamplingOptions(lowpass_consistency=True), **shared
    )
    del codi_model
    baseline = load_conditional(baseline_dir)
    rows += evaluate.evaluate_checkpoint(baseline, examples, (4, 50), base_name, **shared)
    rows.append(scoring.condition_row(examples, task=baseline.config.task))
    return rows, examples, baseline.config.get("teacher_step", "?")


def demo_grid(
    rows: list[scoring.Row], examples: dict[str, np.ndarray], codi_name: str, grid_rows: int, move: str = "DDIM"
) -> np.ndarray:
    """condition | CoDi 1 step | CoDi 4 steps | baseline 50 steps | ground truth, tiles enlarged."""
    by_key = {(r.method, r.steps): r.samples for r in rows if not r.lowpass_consistency}
    n = min(grid_rows, len(examples["image"]))
    columns = [
        samplers.cond_to_rgb(examples["cond"][:n]),
        by_key[(codi_name, 1)][:n],
        by_key[(codi_name, 4)][:n],
        by_key[(baseline_name(move), 50)][:n],
        examples["image"][:n],
    ]
    tiles = np.stack([samplers.to_uint8(c) for c in columns], axis=1).reshape((-1,) + examples["image"].shape[1:])
    return few_step.viewable_grid(tiles, len(columns))


def run_demo(
    workdir: str,
    *,
    codi_steps: int,
    teacher_workdir: str,
    baseline_workdir: str,
    baseline_steps: int,
    num_eval: int,
    grid_rows: int,
    variant: str = "full",
    num_seeds: int = 1,
    backbone: str = "unet",
) -> list[scoring.Row]:
    start = time.time()
    codi_config, finetune_config = demo_configs(teacher_workdir, codi_steps, variant, backbone)
    codi_name = "CoDi (full, ours)" if variant == "full" else "PE-CoDi (ours)"
    if backbone == "dit":
        codi_name = codi_name.replace("ours", "DiT, flow, ours")
    move = "Euler" if backbone == "dit" else "DDIM"  # the deterministic move between steps
    baseline_dir = baseline_workdir_for(workdir, baseline_workdir)
    check_demo(
        workdir, codi_config, finetune_config, baseline_dir, num_eval=num_eval, grid_rows=grid_rows, num_seeds=num_seeds
    )
    codi_dir = os.path.join(workdir, "codi")
    logging.info("Training CoDi for %d steps in %s.", codi_steps, codi_dir)
    loop.train_and_evaluate(codi_config, codi_dir)
    train_minutes = (time.time() - start) / 60
    if baseline_dir != resolve(baseline_workdir):
        logging.warning(
            "No baseline checkpoint at %s: fine-tuning one for %d steps in %s (slow).",
            baseline_workdir,
            baseline_steps,
            baseline_dir,
        )
        finetune_config.num_train_steps = baseline_steps
        loop.train_and_evaluate(finetune_config, baseline_dir)

    rows, examples, teacher_step = evaluate_demo(codi_dir, baseline_dir, codi_name, num_eval, num_seeds, move)
    total_minutes = (time.time() - start) / 60
    header = (
        f"CoDi x4 SR, {len(examples['image'])} held-out 32x32 patches (photos not in training); {codi_name} "
        f"trained {codi_steps} steps from teacher step {teacher_step}; "
        f"CoDi training {train_minutes:.1f} min, whole demo {total_minutes:.1f} min. "
        f"Each row: mean over {num_seeds} sampling seed{'s' if num_seeds > 1 else ''}"
        f"{' ± sample standard deviation' if num_seeds > 1 else ''} (training seed fixed)."
    )
    meta = {
        "codi_steps": codi_steps,
        "variant": variant,
        "backbone": backbone,
        "num_seeds": num_seeds,
        "train_minutes": train_minutes,
        "total_minutes": total_minutes,
        "devices": [str(d) for d in jax.devices()],
    }
    files = report.results_files(rows, workdir, header, meta)  # reruns replace them (atomically)
    grid_path = os.path.join(workdir, "demo_grid.png")
    files[grid_path] = atomic.png_bytes(demo_grid(rows, examples, codi_name, grid_rows, move))
    atomic.write_files(files)
    print(header)
    print(report.markdown_table(rows))
    print(f"Grid ({GRID_COLUMNS}): {grid_path}")
    return rows


def main(argv: list[str]) -> None:
    common.no_arguments(argv)
    common.require_flags("out")
    if FLAGS.cpu_devices is not None and FLAGS.cpu_devices < 1:
        raise common.UserError(f"--cpu_devices={FLAGS.cpu_devices}: must be at least 1.")
    teacher = FLAGS.teacher or DEFAULT_TEACHERS[FLAGS.backbone]
    batch_size = demo_configs(teacher, 1, FLAGS.variant, FLAGS.backbone)[0].batch_size
    cpu_devices = sharding.cpu_devices_for(batch_size) if FLAGS.cpu_devices is None else FLAGS.cpu_devices
    if batch_size % cpu_devices:
        raise common.UserError(f"--cpu_devices={cpu_devices} must divide the batch size {batch_size}.")
    sharding.use_cpu_devices(cpu_devices)  # before JAX starts its backends
    run_demo(
        FLAGS.out,
        codi_steps=DEFAULT_CODI_STEPS[FLAGS.backbone][FLAGS.variant] if FLAGS.codi_steps is None else FLAGS.codi_steps,
        teacher_workdir=teacher,
        baseline_workdir=FLAGS.baseline or DEFAULT_BASELINES[FLAGS.backbone],
        baseline_steps=FLAGS.baseline_steps or DEFAULT_BASELINE_STEPS[FLAGS.backbone],
        num_eval=FLAGS.num_eval,
        grid_rows=FLAGS.grid_rows,
        variant=FLAGS.variant,
        num_seeds=FLAGS.num_seeds,
        backbone=FLAGS.backbone,
    )


def console() -> None:
    """The ``codi-...`` console script."""
    common.run_main(main)


if __name__ == "__main__":
    console()
