"""Bad input to the sampling / evaluation CLIs: one line ``error: ...``, exit code 2, nothing loaded.

The subprocess cases all fail before any model is loaded, so they only pay for imports (JAX and
TensorFlow: ~10 s of CPU each; flag errors come before those imports); they run concurrently (two
at a time) from one fixture. The other checks are tested in-process on the same functions.
Cases that need a conditional run use the committed ``checkpoints/finetune_sr4_color`` or a copy of
its config alone, edited into a CoDi run (``_fake_codi_workdir``: no weights at all, so reaching
the load would fail differently).
Writes go through ``codi_jax.atomic``; a full disk midway leaves nothing behind.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from codi_jax import atomic
from codi_jax.cli import common
from tests.optional_deps import skip_if_subprocess_lacks_optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = os.path.join(REPO, "checkpoints", "finetune_sr4_color")  # committed conditional run (32x32, x4 SR)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli_errors")
    paths = {name: str(root / name) for name in ("images", "empty", "corrupt", "taken", "fake")}
    for name in ("images", "empty", "corrupt", "taken"):
        os.makedirs(paths[name])
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(os.path.join(paths["images"], "im0.png"))
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(os.path.join(paths["corrupt"], "ok.png"))
    with open(os.path.join(paths["corrupt"], "bad.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    with open(os.path.join(paths["taken"], "im0.png"), "wb") as f:
        f.write(b"an earlier output")
    _fake_codi_workdir(paths["fake"])
    paths["missing"] = str(root / "no_such_dir")
    return paths


def _fake_codi_workdir(workdir: str, grid_size: int = 8) -> None:
    """The committed run's config (no state) edited into a CoDi run with a ``grid_size`` grid."""
    source = os.path.join(FINETUNE, "checkpoints")
    step = str(max(int(name) for name in os.listdir(source) if name.isdigit()))
    shutil.copytree(
        os.path.join(source, step), os.path.join(workdir, "checkpoints", step), ignore=shutil.ignore_patterns("state")
    )
    metadata = os.path.join(workdir, "checkpoints", step, "config", "metadata")
    with open(metadata) as f:
        config = json.load(f)
    config["method"] = "codi"
    config["codi"] = {**config.get("codi", {}), "grid_size": grid_size}
    with open(metadata, "w") as f:
        json.dump(config, f)


def _cases(p: dict[str, str]) -> dict[str, tuple[list[str], str]]:
    """name -> (command line, the exact stderr line expected)."""
    sample = ["-m", "codi_jax.sample", f"--out={p['taken']}/../out"]
    train = ["-m", "codi_jax.train", "--config=codi_jax/configs/cpu/tiny_teacher.py", "--workdir=x"]
    return {
        "missing_cond": (
            ["-m", "codi_jax.sample", f"--run={FINETUNE}", "--out=x"],
            "error: missing required flag: --images (An image file or a directory of images (see --input))",
        ),
        "unknown_flag": (
            ["-m", "codi_jax.sample", "--no_such_flag=1"],
            "error: Unknown command line flag 'no_such_flag' (see --helpshort)",
        ),
        "steps_zero": (
            sample + [f"--run={FINETUNE}", f"--images={p['images']}", "--steps=0"],
            "error: --steps=0: every step count must be at least 1.",
        ),
        "missing_input": (
            sample + [f"--run={FINETUNE}", f"--images={p['missing']}"],
            f"error: --images {p['missing']}: no such file or directory.",
        ),
        "empty_folder": (
            sample + [f"--run={FINETUNE}", f"--images={p['empty']}"],
            f"error: --images {p['empty']}: the folder holds no images (.png, .jpg, .jpeg, .bmp, .webp).",
        ),
        "corrupt_image": (
            sample + [f"--run={p['fake']}", f"--images={p['corrupt']}"],
            "error: corrupt or unreadable image file '{bad}': cannot identify image file '{bad}'".format(
                bad=os.path.join(p["corrupt"], "bad.png")
            ),
        ),
        "existing_out": (
            ["-m", "codi_jax.sample", f"--run={p['fake']}", f"--images={p['images']}", f"--out={p['taken']}"],
            f"error: {p['taken']} already holds ['im0.png']; choose another --out or pass --overwrite "
            "(nothing was overwritten).",
        ),
        "train_unknown_config_field": (
            train + ["--config.optimizer.lr=1"],
            "error: --config.optimizer.lr: no such config field; nearest valid: optimizer.learning_rate "
            "(see --helpshort)",
        ),
        "train_out_of_range_field": (
            train + ["--config.keep_checkpoints=0"],
            "error: keep_checkpoints=0: must be at least 1 (0 would delete every checkpoint).",
        ),
        "train_workdir_is_a_file": (
            [
                "-m",
                "codi_jax.train",
                "--config=codi_jax/configs/cpu/tiny_teacher.py",
                f"--workdir={p['images']}/im0.png",
            ],
            f"error: --workdir {p['images']}/im0.png is a file, not a directory.",
        ),
        "train_missing_teacher": (
            ["-m", "codi_jax.train", "--config=codi_jax/configs/cpu/tiny_codi.py", f"--workdir={p['missing']}"],
            "error: config.method='codi' needs config.teacher_workdir (a teacher training workdir).",
        ),
        "unknown_workdir": (
            sample + [f"--run={p['missing']}", f"--images={p['images']}"],
            f"error: --run={p['missing']}: no checkpoints directory at {p['missing']}/checkpoints "
            "(not a training workdir).",
        ),
    }


def _run(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    return proc, time.perf_counter() - start


@pytest.fixture(scope="module")
def results(inputs) -> dict[str, tuple[subprocess.CompletedProcess, float, str]]:
    cases = _cases(inputs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, args) for name, (args, _) in cases.items()}
    return {name: (*futures[name].result(), cases[name][1]) for name in cases}


CASES = [
    "train_unknown_config_field",
    "train_out_of_range_field",
    "train_missing_teacher",
    "train_workdir_is_a_file",
    "missing_cond",
    "unknown_flag",
    "steps_zero",
    "missing_input",
    "empty_folder",
    "corrupt_image",
    "existing_out",
    "unknown_workdir",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_2(results, case) -> None:
    proc, _, expected = results[case]
    skip_if_subprocess_lacks_optional(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [expected]
    assert "Traceback" not in proc.stderr


def test_every_case_is_listed(inputs) -> None:
    assert sorted(_cases(inputs)) == sorted(CASES)


@pytest.mark.parametrize(
    "field, nearest",
    [
        ("optimizer.lr", "optimizer.learning_rate"),  # an abbreviation, in the field's section
        ("batch_sise", "batch_size"),
        ("optimiser.learning_rate", "optimizer.learning_rate, optimizer.decay_steps, optimizer.warmup_steps"),
        ("nonfinite.max_ratio", "nonfinite.max_param_norm_ratio, nonfinite.max_consecutive"),
    ],
)
def test_unknown_config_field_suggests_the_nearest_names(field: str, nearest: str) -> None:
    argv = ["prog", f"--config={REPO}/codi_jax/configs/cpu/tiny_teacher.py", f"--config.{field}=1"]
    message = common.unknown_config_field(argv, AttributeError(field))
    assert message == f"--config.{field}: no such config field; nearest valid: {nearest}"


def test_old_flag_names_warn_and_still_work(inputs) -> None:
    """Renamed flags (``--workdir`` -> ``--run``, ``--cond`` -> ``--images``) keep working for one
    release: one warning line each on stderr, then the command behaves as with the new names."""
    missing = inputs["missing"]
    proc, _ = _run(["-m", "codi_jax.sample", f"--workdir={FINETUNE}", f"--cond={missing}", "--out=x"])
    skip_if_subprocess_lacks_optional(proc.stderr)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "warning: --workdir is deprecated; use --run (removed next release)",
        "warning: --cond is deprecated; use --images (removed next release)",
        f"error: --images {missing}: no such file or directory.",
    ]


def test_flag_errors_are_immediate(results) -> None:
    """The thin CLIs import JAX / TF only once the flags pass, so a typo costs no import."""
    for case in ("missing_cond", "unknown_flag", "steps_zero"):
        assert results[case][1] < 8, (case, results[case][1])


def test_existing_out_is_refused_before_loading(inputs, monkeypatch) -> None:
    """On a real conditional run: no restore (the loader is replaced by one that fails) and fast."""
    from codi_jax.sampling import few_step

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(few_step, "load_conditional", no_load)
    start = time.perf_counter()
    with pytest.raises(FileExistsError, match="already holds"):
        few_step.run(few_step.SampleRequest(FINETUNE, inputs["images"], inputs["taken"], (1,)))
    with pytest.raises(ValueError, match="must be at least 1"):
        few_step.run(few_step.SampleRequest(FINETUNE, inputs["images"], inputs["taken"] + "_new", (0,)))
    assert time.perf_counter() - start < 30
    # The control: with nothing wrong, the (replaced) loader is reached.
    with pytest.raises(AssertionError, match="was loaded"):
        few_step.run(few_step.SampleRequest(FINETUNE, inputs["images"], inputs["taken"] + "_new", (1,)))
    assert not os.path.exists(inputs["taken"] + "_new")


def test_checks_from_the_saved_config_alone(inputs) -> None:
    """The grid, strict-size, run-spec and teacher checks, on a workdir with no weights at all."""
    from codi_jax.evaluation import evaluate
    from codi_jax.sampling import few_step, many_step

    fresh = inputs["taken"] + "_unused"
    with pytest.raises(ValueError) as error:
        few_step.prepare(few_step.SampleRequest(inputs["fake"], inputs["images"], fresh, (9,)))
    assert (
        common.one_line(error.value)
        == "--steps=9: 9 sampling steps exceed the 8-point training grid; use at most 8 steps."
    )
    with pytest.raises(ValueError, match=r"im0.png: 48x40, the model takes 32x32 images \(--strict_size\)"):
        few_step.prepare(few_step.SampleRequest(inputs["fake"], inputs["images"], fresh, (8,), strict_size=True))
    plan = few_step.prepare(few_step.SampleRequest(inputs["fake"], inputs["images"], fresh, (8,)))
    assert plan.files == ["im0.png", "grid.png"] and plan.cond.shape == plan.target.shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="'justadir' is not NAME=WORKDIR or NAME=WORKDIR:1,2,4"):
        evaluate.parse_runs(["justadir"])
    assert evaluate.parse_runs(["a=/x/y:1,2", "b=/z"]) == [("a", "/x/y", (1, 2)), ("b", "/z", None)]
    with pytest.raises(ValueError, match="names must differ"):
        evaluate.parse_runs(["a=/x", "a=/y"])
    with pytest.raises(ValueError, match="--run a: --steps=9: 9 sampling steps exceed the 8-point"):
        evaluate.check_runs([evaluate.RunSpec("a", inputs["fake"], (1, 9))], (1,))
    checked = evaluate.check_runs([("a", inputs["fake"], (1, 8)), ("b", FINETUNE)], (2, 50))
    assert [run.steps for run, _ in checked] == [(1, 8), (2, 50)]
    with pytest.raises(ValueError, match="holds a conditional 'codi' run; sample it with python -m codi_jax.sample"):
        many_step.check_request(inputs["fake"], fresh, steps=2, num_images=1, batch_size=1)
    with pytest.raises(ValueError, match="--num_images=0: must be at least 1"):
        many_step.check_request(inputs["fake"], fresh, steps=2, num_images=0, batch_size=1)
    assert not os.path.exists(fresh)


def test_wrong_size_is_resized_with_a_note(inputs, capsys) -> None:
    from codi_jax.sampling import few_step

    names, images = few_step.load_images(inputs["images"], 32)
    assert names == ["im0"] and images.shape == (1, 32, 32, 3)
    assert capsys.readouterr().out.splitlines() == ["im0.png: 48x40 resized to 32x32"]
    few_step.load_images(inputs["images"], 8, accepted_sizes=(8, 32))
    assert "resized to 8x8" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"im0.png: 48x40, the model takes 32x32 images \(--strict_size\)"):
        few_step.load_images(inputs["images"], 32, strict=True)


def test_run_main_reports_user_errors_and_keeps_bug_tracebacks(capsys) -> None:
    def bad_input(argv):
        raise common.UserError("first line\nsecond line")

    def bug(argv):
        raise RuntimeError("a genuine bug")

    with pytest.raises(SystemExit) as exit_info:
        common.run_main(bad_input, argv=["prog"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: first line; second line\n"
    with pytest.raises(RuntimeError, match="a genuine bug"):
        common.run_main(bug, argv=["prog"])
    try:
        with pytest.raises(common.UserError):  # --verbose: the traceback instead of one line
            common.run_main(bad_input, argv=["prog", "--verbose"])
    finally:
        common.FLAGS.verbose = False


def _failing_write(monkeypatch, fail_at: int) -> list[str]:
    """Makes the ``fail_at``-th low-level write of ``atomic`` fail as a full disk does, midway."""
    calls: list[str] = []
    real = atomic._write

    def write(path: str, data: bytes) -> None:
        calls.append(path)
        if len(calls) == fail_at:
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])  # a partial temporary, as a full disk leaves
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(atomic, "_write", write)
    return calls


def test_disk_full_midway_leaves_nothing_and_a_rerun_works(tmp_path, monkeypatch) -> None:
    from codi_jax.evaluation import report, scoring
    from codi_jax.sampling import few_step

    out = str(tmp_path / "out")
    columns = [np.zeros((2, 16, 16, 3), np.float32), np.ones((2, 16, 16, 3), np.float32)]
    calls = _failing_write(monkeypatch, fail_at=3)  # im0, im1 written; grid.png fails
    with pytest.raises(OSError) as error:
        few_step.write_outputs(out, ["im0", "im1"], columns)
    grid = os.path.join(out, "grid.png")
    assert str(error.value) == f"writing {grid} failed: [Errno 28] No space left on device; nothing was written"
    assert error.value.errno == 28 and len(calls) == 3
    assert os.listdir(out) == []  # no sample, no grid, no temporary
    monkeypatch.undo()
    paths = few_step.write_outputs(out, ["im0", "im1"], columns)  # the rerun into the same --out
    assert sorted(os.listdir(out)) == ["grid.png", "im0.png", "im1.png"] and paths[-1] == grid
    assert np.asarray(Image.open(paths[0])).shape == (16, 16, 3)
    # Tiles are enlarged to >= 128 px (16 px: 8x): 2 rows, 2 columns, 1 px padding.
    assert np.asarray(Image.open(grid)).shape == (8 * (2 * 17 + 1), 8 * (2 * 17 + 1), 3)

    rows = [scoring.condition_row({"cond": columns[0], "image": columns[1]})]
    _failing_write(monkeypatch, fail_at=2)
    results = str(tmp_path / "results")
    with pytest.raises(OSError, match="results.md failed: .*No space left on device; nothing was written"):
        report.write_results(rows, results)
    assert os.listdir(results) == []
    monkeypatch.undo()
    json_path, _ = report.write_results(rows, results)
    with open(json_path) as f:
        assert json.load(f)["rows"][0]["method"] == scoring.BICUBIC


def test_failed_rename_takes_back_what_was_placed(tmp_path, monkeypatch) -> None:
    calls = []
    real = os.replace

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(13, "Permission denied")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    files = {str(tmp_path / "a.txt"): b"a", str(tmp_path / "b.txt"): b"b"}
    with pytest.raises(OSError, match=r"b.txt failed: \[Errno 13\] Permission denied; nothing was written"):
        atomic.write_files(files)
    assert os.listdir(tmp_path) == []


def test_third_party_info_is_quiet_by_default() -> None:
    import logging

    import orbax.checkpoint

    quiet = common.QuietThirdParty()
    orbax_file = os.path.join(os.path.dirname(orbax.checkpoint.__file__), "checkpoint_manager.py")

    def record(level: int, path: str, msg: str = "something") -> logging.LogRecord:
        return logging.LogRecord("absl", level, path, 1, msg, None, None)

    assert not quiet.filter(record(logging.INFO, orbax_file))
    assert quiet.filter(record(logging.WARNING, orbax_file))
    assert not quiet.filter(record(logging.WARNING, orbax_file, "Given directory is read only=/x"))
    assert quiet.filter(record(logging.INFO, os.path.join(REPO, "codi_jax", "train_loop.py")))
    assert not quiet.filter(logging.LogRecord("jax._src.xla_bridge", logging.INFO, "x.py", 1, "tpu", None, None))
