"""Command-line entry points: sampling restores a trained workdir, bad input fails clearly."""

import os
import subprocess
import sys

import numpy as np
import pytest

from codi_jax.cli import common
from codi_jax.configs.cpu import tiny_teacher
from codi_jax.sampling import many_step
from tests.optional_deps import skip_if_subprocess_lacks_optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    from codi_jax.training import loop  # TensorFlow and clu: here only, the module's other tests run without

    root = tmp_path_factory.mktemp("cli")
    config = tiny_teacher.get_config()
    config.data.data_dir = str(root / "tfds")
    config.num_train_steps = 2
    workdir = str(root / "run")
    loop.train_and_evaluate(config, workdir)
    return workdir


def test_sample_images_restores_and_is_seeded(trained_workdir):
    a = many_step.sample_images(trained_workdir, steps=3, num_images=3, batch_size=2, seed=0)
    b = many_step.sample_images(trained_workdir, steps=3, num_images=3, batch_size=2, seed=0)
    c = many_step.sample_images(trained_workdir, steps=3, num_images=3, batch_size=2, seed=1)
    assert a.shape == (3, 16, 16, 3) and a.dtype == np.float32
    assert np.all(np.isfinite(a)) and a.min() >= -1 and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_write_images_never_overwrites(tmp_path):
    images = np.zeros((2, 8, 8, 3), np.float32)
    paths = many_step.write_images(images, str(tmp_path))
    assert len(paths) == 3 and all(os.path.exists(p) for p in paths)
    before = {p: os.path.getmtime(p) for p in paths}
    with pytest.raises(FileExistsError, match="sample_00000.png"):
        many_step.write_images(np.ones((2, 8, 8, 3), np.float32), str(tmp_path))
    assert {p: os.path.getmtime(p) for p in paths} == before


def test_sampling_missing_workdir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoints"):
        many_step.sample_images(str(tmp_path / "nope"), steps=2, num_images=1, batch_size=1, seed=0)


def test_renamed_flags_are_spelt_the_new_way(capsys):
    renamed = {"use_ema": "ema", "step": "checkpoint_step", "workdir": "run"}
    args = [
        "prog",
        "--use_ema=false",
        "--nouse_ema",
        "--step=3",
        "--steps=1,2",
        "-workdir",
        "x",
        "--normalize",
        "--run=y",
    ]
    assert common.renamed_flags(args, renamed) == [
        "prog",
        "--ema=false",
        "--noema",
        "--checkpoint_step=3",
        "--steps=1,2",
        "-run",
        "x",
        "--normalize",
        "--run=y",
    ]
    warnings = capsys.readouterr().err.splitlines()
    assert warnings[0] == "warning: --use_ema is deprecated; use --ema (removed next release)"
    assert len(warnings) == 4  # one per old name used, the new names and the look-alikes pass silently


@pytest.mark.parametrize("command", ["train", "sample", "sample_teacher", "evaluate", "export", "convert", "demo"])
def test_help_exits_0_with_the_commands_flags(command, tmp_path):
    """From any folder: the command's docstring and its own flags on stdout, exit 0, no model loaded."""
    proc = subprocess.run(
        [sys.executable, "-m", f"codi_jax.{command}", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    skip_if_subprocess_lacks_optional(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"codi_jax.cli.{command}:" in proc.stdout and "--verbose" in proc.stdout


def test_configs_load_from_any_folder(tmp_path):
    """A shipped config by absolute path, and a user's config outside the repository that imports a
    shipped one, both load from another working directory (the error names a field that only a
    loaded config could be checked against)."""
    user_config = tmp_path / "my_config.py"
    user_config.write_text(
        "from codi_jax.configs.cpu import tiny_teacher\n\n\n"
        "def get_config():\n    config = tiny_teacher.get_config()\n    config.batch_size = 4\n    return config\n"
    )
    shipped = os.path.join(REPO, "codi_jax", "configs", "cpu", "tiny_teacher.py")
    for config_file in (shipped, str(user_config)):
        args = ["-m", "codi_jax.train", f"--config={config_file}", f"--workdir={tmp_path / 'run'}", "--config.bach=1"]
        proc = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        skip_if_subprocess_lacks_optional(proc.stderr)
        assert proc.returncode == 2, proc.stderr[-2000:]
        expected = "error: --config.bach: no such config field; nearest valid: batch_size (see --helpshort)"
        assert proc.stderr.strip() == expected


def test_demo_splits_the_batch_over_one_cpu_device_per_core(monkeypatch, tmp_path):
    """One CPU device per usable core that divides the batch; the XLA flag only before JAX starts
    a backend and only where the user has not set the count; a bad ``--cpu_devices`` ends in one
    line and exit 2 before anything loads."""
    from jax._src import xla_bridge

    from codi_jax import sharding

    for cores, batch, expected in ((2, 8, 2), (3, 8, 2), (6, 16, 4), (16, 8, 8), (1, 8, 1), (4, 6, 3)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)), raising=False)
        assert sharding.cpu_devices_for(batch) == expected, (cores, batch)
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1")
    assert sharding.use_cpu_devices(2) and os.environ["XLA_FLAGS"] == (
        "--xla_cpu_foo=1 --xla_force_host_platform_device_count=2 --xla_cpu_collective_timeout_seconds=900"
    )
    assert not sharding.use_cpu_devices(4)  # already set: the user's (or the first) count stays
    monkeypatch.setenv("XLA_FLAGS", "")
    assert not sharding.use_cpu_devices(1) and os.environ["XLA_FLAGS"] == ""
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    assert not sharding.use_cpu_devices(2) and os.environ["XLA_FLAGS"] == ""  # too late: left alone
    monkeypatch.undo()
    for value, message in (("3", "--cpu_devices=3 must divide the batch size 8."), ("0", "must be at least 1")):
        proc = subprocess.run(
            [sys.executable, "-m", "codi_jax.demo", "--out=demo_out", f"--cpu_devices={value}"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        skip_if_subprocess_lacks_optional(proc.stderr)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not os.path.exists(tmp_path / "demo_out")
