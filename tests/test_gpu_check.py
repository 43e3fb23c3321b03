"""benchmarks/gpu_check.py --dry_run: the GPU check's code paths at tiny shapes on the CPU, with
TensorFlow, tfds and clu unimportable in the check and in every process it starts (as on the GPU
machine). The table comes last, gpu.json holds one row per case, cuDNN attention is an error row
on the CPU (not a crash) and the exit status is 0."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WITHOUT_TF = os.path.join(REPO, "tests", "scripts", "without_tensorflow.py")
GPU_CHECK = os.path.join(REPO, "benchmarks", "gpu_check.py")
BLOCKED = ("tensorflow", "tensorflow_datasets", "clu")

sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import gpu_check  # noqa: E402  (light: imports no JAX)


def _blocking_path(tmp_path) -> str:
    """A folder whose ``tensorflow`` / ``tensorflow_datasets`` / ``clu`` packages raise ImportError:
    first on PYTHONPATH, it blocks them in the check's child processes too."""
    folder = tmp_path / "without_tensorflow"
    for name in BLOCKED:
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked: no TensorFlow here')\n")
    return str(folder)


def test_dry_run_without_tensorflow(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_blocking_path(tmp_path), REPO]), PYTHONUNBUFFERED="1")
    command = [sys.executable, WITHOUT_TF, GPU_CHECK, "--dry_run", f"--out={out}"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]  # exit 3: TensorFlow was loaded

    lines = proc.stdout.rstrip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| case |"))
    assert all(line.startswith("|") for line in lines[header:]), "the table is printed last"
    for column in ("step ms", "sample ms", "images/s", "TFLOP/s", "MFU", "AOT GiB", "peak GiB"):
        assert f"| {column} |" in lines[header]

    record = json.loads((out / "gpu.json").read_text())
    rows = {row["case"]: row for row in record["rows"]}
    expected = [
        case["case"] for group in gpu_check.case_groups(gpu_check.parse_args(["--dry_run"])) for case in group["cases"]
    ]
    assert list(rows) == expected and len(lines) - header - 2 == len(expected)
    assert record["platform"] == "cpu" and record["jax_version"] and record["date"] and "--dry_run" in record["command"]
    assert not record["tensorflow_imported"] and not any(row["tensorflow_imported"] for row in rows.values())

    train = [row for row in rows.values() if row["kind"] == "train"]
    assert {row["attention_impl"] for row in train} == {"cudnn", "dot_product"}
    for row in train:
        if row["attention_impl"] == "cudnn":  # no cuDNN on the CPU: recorded, and the check went on
            assert row["status"] == "error" and row["error"], row
            continue
        assert row["status"] == "ok", row
        assert math.isfinite(row["step_ms"]) and row["step_ms"] > 0
        assert row["images_per_s"] > 0 and row["model_tflop_per_step"] > 0 and row["mfu"] > 0
        assert row["aot_gib"] > 0 and row["peak_gib"] is None  # no memory_stats on the CPU: n/a
        assert row["compile_s"] > 0 and len(row["step_ms_all"]) == 5
    sampling = [row for row in rows.values() if row["kind"] in ("codi", "teacher")]
    assert {(row["kind"], row["steps"]) for row in sampling} == {("codi", 1), ("codi", 4), ("teacher", 50)}
    assert all(row["status"] == "ok" and row["sample_ms"] > 0 for row in sampling), sampling
    assert record["ratios"] and all(ratio > 0 for ratio in record["ratios"].values())
    vae = [row for row in rows.values() if row["kind"] == "vae_encode"]
    assert len(vae) == 1 and vae[0]["status"] == "ok" and vae[0]["ms_per_image"] > 0
    for model, position in (("sdxl", -2), ("sd3", -1)):  # the SDXL then the SD3 step: last, tiny, one batch
        large = [row for row in train if row.get("model") == model]
        assert len(large) == 1 and large[0]["case"] == expected[position] and large[0]["status"] == "ok", large
        assert large[0]["batch"] == 2 and [t["batch"] for t in large[0]["batch_search"]] == [2]
        assert large[0]["step_ms"] > 0 and large[0]["aot_gib"] > 0 and large[0]["model_tflop_per_step"] > 0
        assert lines[position].startswith(f"| {expected[position]} | 2 |")


def test_budget_skips_cases(tmp_path):
    """Past the time budget the remaining cases are recorded as skipped (no child process starts)."""
    args = gpu_check.parse_args(["--dry_run", f"--out={tmp_path}", "--budget_s=0"])
    rows, _ = gpu_check.collect(args, ["--dry_run", "--budget_s=0"])
    assert rows and all(row["status"] == "skipped" for row in rows)
    assert "skipped" in gpu_check.table(rows).splitlines()[-1]


def test_group_stopped_at_its_budget(tmp_path):
    """A case group still running after --group_budget_s is stopped and recorded as an error."""
    argv = ["--dry_run", f"--out={tmp_path}", "--group_budget_s=1", "--no_sampling", "--attention_impls=dot_product"]
    argv += ["--sdxl_batch=0", "--sd3_batch=0"]
    rows, _ = gpu_check.collect(gpu_check.parse_args(argv), argv)
    assert len(rows) == 1 and rows[0]["status"] == "error" and "stopped after 1 s" in rows[0]["error"]


def test_large_cases_come_last_in_their_own_groups():
    """SDXL then SD3: one PE-CoDi case each, at their own batch and attention (GPU default 4), last; 0 drops one."""
    groups = gpu_check.case_groups(gpu_check.parse_args(["--sd3_attention_impl=cudnn"]))
    assert [len(group["cases"]) for group in groups[-2:]] == [1, 1]
    sdxl, sd3 = (group["cases"][0] for group in groups[-2:])
    assert (sdxl["model"], sd3["model"]) == ("sdxl", "sd3") and sd3["case"] == "train sd3 pe cudnn remat=full b4"
    assert sd3["fixed_batch"] == 4 and sd3["method"] == "pe" and sd3["remat_policy"] == "full"
    groups = gpu_check.case_groups(gpu_check.parse_args(["--sd3_batch=0"]))
    assert groups[-1]["cases"][0]["model"] == "sdxl" and all(
        c.get("model") != "sd3" for g in groups for c in g["cases"]
    )


def test_sd3_case_has_sd3_medium_shapes():
    """The GPU case's config, from shapes alone: SD3 medium's transformer (diffusers' parameter count), frozen,
    and its 12-block ControlNet; 128x128x16 latents, the condition as latents, SD3's 333-token context."""
    import jax
    import numpy as np
    from sd3_shapes import SD3_MEDIUM_PARAMS
    from train_throughput import run_config, step_and_inputs

    config, latent, context = run_config("sd3", "pe")
    _, init, batch, _ = step_and_inputs(config, latent, context, 4)
    state = jax.eval_shape(init)
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))  # noqa: E731
    assert count(state.frozen) == SD3_MEDIUM_PARAMS and count(state.params) > 0
    blocks = {name for name in state.params["adapter"] if name.startswith("transformer_blocks")}
    assert len(blocks) == 12, sorted(state.params["adapter"])
    assert batch["image"].shape == batch["cond"].shape == (4, 128, 128, 16)
    assert batch["context"]["encoder_hidden_states"].shape == (4, 333, 4096)
    assert batch["context"]["pooled_projections"].shape == (4, 2048)
