"""The demo: CoDi x4 super-resolution on the bundled photographs, CPU only.

``python -m codi_jax.demo --workdir=DIR``

1. Starts from the committed unconditional teacher (``checkpoints/teacher_patches32``) and
   runs CoDi for ``--codi_steps`` steps in ``DIR/codi`` (resumable: rerunning continues, it never
   starts over): full CoDi (``configs/codi_full_sr4.py``, adapter and backbone trained) or, with
   ``--variant=pe``, PE-CoDi (``configs/codi_sr4.py``, adapter only).
2. Restores the non-distilled conditional baseline (the same adapter trained with the plain
   diffusion loss by ``python -m codi_jax.train --config=configs/finetune_sr4.py``; committed in
   ``checkpoints/finetune_sr4``; trained here into ``DIR/finetune`` if absent).
3. Samples held-out patches (photos never seen in training) with CoDi at 1/2/4 steps (re-noising
   between steps, and at 4 steps also with DDIM moves) and the baseline with DDIM at 4 and 50
   steps; prints and writes (``DIR/results.md``, ``.json``) PSNR,
   SSIM and ms per image, and ``DIR/demo_grid.png``:
   condition | CoDi 1 step | CoDi 4 steps | baseline 50 steps | ground truth.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging
from PIL import Image

from codi_jax import evaluation, sampling, train_loop
from codi_jax.pretrained import load_conditional

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Where the demo writes its CoDi run, results and grid.")
flags.DEFINE_integer("codi_steps", 800, "CoDi training steps (~15 min on 2 CPU cores for full CoDi).")
flags.DEFINE_enum("variant", "full", ["full", "pe"], "full: adapter + backbone trained; pe: adapter only.")
flags.DEFINE_string("teacher_workdir", "checkpoints/teacher_patches32", "The unconditional teacher.")
flags.DEFINE_string("baseline_workdir", "checkpoints/finetune_sr4", "The non-distilled conditional baseline.")
flags.DEFINE_integer("baseline_steps", 1000, "Fine-tune steps if the baseline checkpoint is missing.")
flags.DEFINE_integer("num_eval", 64, "Held-out patches to evaluate.")
flags.DEFINE_integer("grid_rows", 8, "Examples shown in the grid.")
flags.mark_flags_as_required(["workdir"])

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve(path: str) -> str:
    """``path`` as given if it exists, else relative to the repository (the committed checkpoints)."""
    if os.path.exists(path) or os.path.isabs(path):
        return path
    return os.path.join(REPO_ROOT, path)


def demo_configs(teacher_workdir: str, codi_steps: int, variant: str = "full"):
    from configs import codi_full_sr4, codi_sr4, finetune_sr4

    if variant not in ("full", "pe"):
        raise ValueError(f"variant={variant!r}; valid: 'full', 'pe'.")
    codi_config = (codi_full_sr4 if variant == "full" else codi_sr4).get_config()
    finetune_config = finetune_sr4.get_config()
    for config in (codi_config, finetune_config):
        config.teacher_workdir = resolve(teacher_workdir)
    codi_config.num_train_steps = codi_steps
    return codi_config, finetune_config


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
) -> list[evaluation.Row]:
    start = time.time()
    codi_config, finetune_config = demo_configs(teacher_workdir, codi_steps, variant)
    codi_name = "CoDi (full, ours)" if variant == "full" else "PE-CoDi (ours)"
    if not os.path.isdir(os.path.join(codi_config.teacher_workdir, "checkpoints")):
        raise FileNotFoundError(f"No teacher checkpoint at {codi_config.teacher_workdir}.")
    codi_dir = os.path.join(workdir, "codi")
    logging.info("Training CoDi for %d steps in %s.", codi_steps, codi_dir)
    train_loop.train_and_evaluate(codi_config, codi_dir)
    train_minutes = (time.time() - start) / 60

    baseline_dir = resolve(baseline_workdir)
    if not os.path.isdir(os.path.join(baseline_dir, "checkpoints")):
        baseline_dir = os.path.join(workdir, "finetune")
        logging.warning(
            "No baseline checkpoint at %s: fine-tuning one for %d steps in %s (slow).",
            baseline_workdir,
            baseline_steps,
            baseline_dir,
        )
        finetune_config.num_train_steps = baseline_steps
        train_loop.train_and_evaluate(finetune_config, baseline_dir)

    codi_model = load_conditional(codi_dir)
    baseline = load_conditional(baseline_dir)
    if baseline.config.teacher_workdir and os.path.basename(
        os.path.normpath(baseline.config.teacher_workdir)
    ) != os.path.basename(os.path.normpath(codi_config.teacher_workdir)):
        logging.warning(
            "Baseline was fine-tuned from %s, CoDi from %s.",
            baseline.config.teacher_workdir,
            codi_config.teacher_workdir,
        )
    examples = evaluation.held_out_examples(codi_model.config, num_eval)
    rows = evaluation.evaluate_checkpoint(codi_model, examples, (1, 2, 4), codi_name)
    rows += evaluation.evaluate_checkpoint(codi_model, examples, (4,), f"{codi_name}, DDIM moves", renoise=False)
    rows += evaluation.evaluate_checkpoint(baseline, examples, (4, 50), "conditional, not distilled (DDIM)")
    bicubic = examples["cond"]
    rows.append(
        evaluation.Row(
            method="bicubic upsampling of the input",
            steps=0,
            psnr=float(np.mean(evaluation.psnr(bicubic, examples["image"]))),
            ssim=float(np.mean(evaluation.ssim(bicubic, examples["image"]))),
            swd=evaluation.swd(bicubic, examples["image"]),
            ms_per_image=0.0,
            params_trained=0,
            samples=bicubic,
        )
    )
    total_minutes = (time.time() - start) / 60

    os.makedirs(workdir, exist_ok=True)
    by_key = {(r.method, r.steps): r.samples for r in rows}
    n = min(grid_rows, len(bicubic))
    columns = [
        sampling.cond_to_rgb(bicubic[:n]),
        by_key[(codi_name, 1)][:n],
        by_key[(codi_name, 4)][:n],
        by_key[("conditional, not distilled (DDIM)", 50)][:n],
        examples["image"][:n],
    ]
    tiles = np.stack([sampling.to_uint8(c) for c in columns], axis=1).reshape((-1,) + bicubic.shape[1:])
    grid = sampling.make_grid(tiles, columns=len(columns))
    grid = np.repeat(np.repeat(grid, 3, axis=0), 3, axis=1)  # 32x32 tiles are tiny: show them at 3x
    Image.fromarray(grid).save(os.path.join(workdir, "demo_grid.png"))

    table = evaluation.markdown_table(rows)
    header = (
        f"CoDi x4 SR, {len(bicubic)} held-out 32x32 patches (photos not in training); {codi_name} trained "
        f"{codi_steps} steps from teacher step {baseline.config.get('teacher_step', '?')}; "
        f"CoDi training {train_minutes:.1f} min, whole demo {total_minutes:.1f} min."
    )
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(header + "\n\n" + table + "\n")
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(
            {
                "rows": [{k: v for k, v in dataclasses.asdict(r).items() if k != "samples"} for r in rows],
                "codi_steps": codi_steps,
                "variant": variant,
                "train_minutes": train_minutes,
                "total_minutes": total_minutes,
                "devices": [str(d) for d in jax.devices()],
            },
            f,
            indent=2,
        )
    print(header)
    print(table)
    print(
        f"Grid (condition | CoDi 1 step | CoDi 4 steps | baseline 50 steps | ground truth): "
        f"{os.path.join(workdir, 'demo_grid.png')}"
    )
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    run_demo(
        FLAGS.workdir,
        codi_steps=FLAGS.codi_steps,
        teacher_workdir=FLAGS.teacher_workdir,
        baseline_workdir=FLAGS.baseline_workdir,
        baseline_steps=FLAGS.baseline_steps,
        num_eval=FLAGS.num_eval,
        grid_rows=FLAGS.grid_rows,
        variant=FLAGS.variant,
    )


if __name__ == "__main__":
    app.run(main)
