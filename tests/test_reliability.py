"""Reliability of training runs, asserted on disk: kill -9 and resume is bitwise exact, SIGTERM
writes a checkpoint at the current step, a damaged latest checkpoint falls back to the previous
one, divergence stops the run without a new checkpoint, a failed checkpoint write stops it."""

from __future__ import annotations

import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from codi_jax.configs.cpu import tiny_teacher
from codi_jax.runs import checkpoint
from codi_jax.runs.pretrained import load_teacher
from codi_jax.training import loop, run_status
from codi_jax.training.train_state import apply_gradients, create_train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> str:
    """A tiny teacher trained 6 steps (checkpoints 3 and 6), copied by the tests that damage or resume it."""
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    loop.train_and_evaluate(_config(data_dir, num_train_steps=6, sample_every_steps=1000), workdir)
    return workdir


def _copy(trained: str, tmp_path) -> str:
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    return workdir


def _config(data_dir: str, **overrides):
    config = tiny_teacher.get_config()
    config.data.data_dir = data_dir
    config.update(overrides)
    return config


def _flags(data_dir: str, workdir: str, **overrides) -> list[str]:
    config = os.path.join(REPO, "codi_jax", "configs", "cpu", "tiny_teacher.py")
    fields = {"data.data_dir": data_dir, **overrides}
    return [
        sys.executable,
        "-m",
        "codi_jax.train",
        f"--config={config}",
        f"--workdir={workdir}",
        "--compilation_cache=",
    ] + [f"--config.{key}={value}" for key, value in fields.items()]


def _env() -> dict:
    cache = jax.config.jax_compilation_cache_dir or ""
    return dict(os.environ, PYTHONPATH=REPO, JAX_COMPILATION_CACHE_DIR=cache)


def _state_leaves(workdir: str) -> list[np.ndarray]:
    step = max(_steps(workdir))
    state = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return [np.asarray(x) for x in jax.tree.leaves(state)]  # the whole saved tree: params, EMA, Adam, RNG


def _steps(workdir: str) -> list[int]:
    names = [os.path.basename(p) for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))]
    return sorted(int(name) for name in names if name.isdigit())  # complete steps (not *-tmp writes)


def test_kill_9_at_three_random_moments_then_resume_is_bitwise_exact(data_dir, tmp_path) -> None:
    overrides = {"num_train_steps": 8, "checkpoint_every_steps": 1, "sample_every_steps": 1000}
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    subprocess.run(_flags(data_dir, straight, **overrides), env=_env(), check=True, capture_output=True, timeout=600)
    rng = random.Random(0)
    for _ in range(3):
        proc = subprocess.Popen(_flags(data_dir, killed, **overrides), env=_env(), stderr=subprocess.DEVNULL)
        start = max(_steps(killed) or [0])
        target = start + rng.randint(1, 2)
        deadline = time.time() + 300
        while max(_steps(killed) or [0]) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(rng.uniform(0.01, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run(_flags(data_dir, killed, **overrides), env=_env(), check=True, capture_output=True, timeout=600)
    a, b = _state_leaves(straight), _state_leaves(killed)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_sigterm_writes_a_checkpoint_at_the_current_step(data_dir, tmp_path) -> None:
    workdir = str(tmp_path / "run")
    overrides = {"num_train_steps": 1000, "checkpoint_every_steps": 10_000, "log_every_steps": 1}
    proc = subprocess.Popen(
        _flags(data_dir, workdir, **overrides), env=_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "step 3/1000" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, rest = proc.communicate(timeout=300)
    log = "".join(lines) + rest
    assert proc.returncode == run_status.EXIT_PREEMPTED, log[-3000:]
    steps = _steps(workdir)
    assert len(steps) == 1 and 3 <= steps[0] < 1000, (steps, log[-2000:])
    assert f"Stopped by SIGTERM at step {steps[0]}" in log
    assert load_teacher(workdir).step == steps[0]  # complete and restorable


def _corrupt(step_dir: str, how: str) -> None:
    state = os.path.join(step_dir, "state")
    if how == "truncated data":
        files = [
            p for p in glob.glob(os.path.join(state, "**", "*"), recursive=True) if "/d/" in p and os.path.isfile(p)
        ]
        biggest = max(files, key=os.path.getsize)
        with open(biggest, "r+b") as f:
            f.truncate(os.path.getsize(biggest) // 2)
    elif how == "missing _METADATA":
        os.remove(os.path.join(state, "_METADATA"))
    else:  # the OCDBT manifest
        for path in glob.glob(os.path.join(state, "**", "manifest.ocdbt"), recursive=True):
            os.remove(path)


@pytest.mark.parametrize("how", ["truncated data", "missing _METADATA", "missing manifest"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(data_dir, trained, tmp_path, how, caplog) -> None:
    workdir = _copy(trained, tmp_path)
    assert _steps(workdir) == [3, 6]
    _corrupt(os.path.join(workdir, "checkpoints", "6"), how)
    with caplog.at_level("WARNING"):
        state = loop.train_and_evaluate(_config(data_dir, num_train_steps=7, sample_every_steps=1000), workdir)
    assert int(state.step) == 7
    assert any("step 6" in r.getMessage() and "does not restore" in r.getMessage() for r in caplog.records)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "corrupt-step-6"))  # kept on disk
    assert 6 in _steps(workdir) and 7 in _steps(workdir)  # retrained from step 3


def test_absurd_updates_are_rejected_and_stop_the_run(data_dir, tmp_path) -> None:
    # Unit: finite but absurd (norm x1e30), non-finite gradients, and a sane update.
    params = {"w": jnp.ones((4,))}
    for lr, grad, rejected in ((1e30, 1.0, 1.0), (1e-3, jnp.nan, 1.0), (1e-3, 1.0, 0.0)):
        sgd = optax.sgd(lr)
        state = create_train_state(params, sgd, jax.random.PRNGKey(0))
        new, flag = apply_gradients(state, {"w": jnp.full((4,), grad)}, sgd, 0.9, max_param_norm_ratio=2.0)
        assert float(flag) == rejected
        assert np.array_equal(np.asarray(new.params["w"]), np.ones(4)) == bool(rejected)
    # A run: 2 good steps with a checkpoint, then lr 1e30: stops after max_consecutive rejections.
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(_config(data_dir, num_train_steps=2, checkpoint_every_steps=2), workdir)
    config = _config(data_dir, num_train_steps=20, checkpoint_every_steps=1, sample_every_steps=1000)
    config.optimizer.learning_rate = 1e30
    config.allow_resume_changes = "optimizer.learning_rate"  # deliberately, on resume
    config.nonfinite.max_consecutive = 3
    with pytest.raises(run_status.Diverged, match="3 consecutive updates rejected up to step 5.*checkpoints/2"):
        loop.train_and_evaluate(config, workdir)
    assert _steps(workdir) == [2]  # no checkpoint while updates were being rejected


def test_failed_checkpoint_write_stops_at_the_next_step(data_dir, tmp_path, monkeypatch) -> None:
    workdir = str(tmp_path / "run")
    calls = {"n": 0}

    def failing(self) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # after the step-2 save has been issued
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.Checkpointer, "check_for_errors", failing)
    config = _config(data_dir, num_train_steps=6, checkpoint_every_steps=2, sample_every_steps=1000)
    with pytest.raises(run_status.CheckpointWriteFailed, match="No space left on device.*last complete checkpoint"):
        loop.train_and_evaluate(config, workdir)


def _names(workdir: str) -> list[str]:
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def test_changed_resume_fields_are_refused_and_move_nothing(data_dir, trained, tmp_path, caplog) -> None:
    """A resume with another batch size (the data stream) or another model (the arrays) is refused
    in one line naming the fields, and every checkpoint stays where it was; a change named in
    ``allow_resume_changes`` is accepted and logged."""
    workdir = _copy(trained, tmp_path)
    before = _names(workdir)
    with pytest.raises(
        checkpoint.ResumeMismatch,
        match=r"batch_size: 8 \(checkpoint\) vs 4 \(config\).*--config.allow_resume_changes=batch_size",
    ):
        loop.train_and_evaluate(_config(data_dir, num_train_steps=7, batch_size=4, sample_every_steps=1000), workdir)
    config = _config(data_dir, num_train_steps=7, sample_every_steps=1000, allow_resume_changes="model")
    config.model.layers_per_block = 2  # allowed in the config, but the arrays cannot fit
    with pytest.raises(checkpoint.ResumeMismatch, match=r"holds another model's arrays .*absent \(checkpoint\)"):
        loop.train_and_evaluate(config, workdir)
    assert _names(workdir) == before  # nothing moved aside
    config = _config(
        data_dir, num_train_steps=7, batch_size=4, sample_every_steps=1000, allow_resume_changes="batch_size"
    )
    with caplog.at_level("WARNING"):
        assert int(loop.train_and_evaluate(config, workdir).step) == 7
    assert any("deliberate changes" in r.getMessage() and "batch_size: 8" in r.getMessage() for r in caplog.records)


def _flip_byte(step_dir: str) -> None:
    files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True) if "/d/" in p]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.seek(os.path.getsize(biggest) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


def test_flipped_byte_is_detected_and_falls_back(data_dir, trained, tmp_path, caplog) -> None:
    workdir = _copy(trained, tmp_path)
    _flip_byte(os.path.join(workdir, "checkpoints", "6"))
    os.makedirs(os.path.join(workdir, "checkpoints", "corrupt-step-6"))  # an earlier one: never collided with
    with caplog.at_level("WARNING"):
        state = loop.train_and_evaluate(_config(data_dir, num_train_steps=6, sample_every_steps=1000), workdir)
    assert int(state.step) == 6
    damaged = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
    assert len(damaged) == 1 and "step 6 (IntegrityError: checksum mismatch" in damaged[0], damaged
    assert {"corrupt-step-6", "corrupt-step-6.1", "3", "6"} <= set(_names(workdir))


def test_workdir_with_only_damaged_checkpoints_never_restarts_from_0(data_dir, trained, tmp_path) -> None:
    workdir = _copy(trained, tmp_path)
    for step in ("3", "6"):
        _corrupt(os.path.join(workdir, "checkpoints", step), "missing _METADATA")
    config = _config(data_dir, num_train_steps=7, sample_every_steps=1000)
    with pytest.raises(FileNotFoundError, match=r"restores; tried: step 6 \(.*\); step 3 \(.*moved to corrupt-step-"):
        loop.train_and_evaluate(config, workdir)
    with pytest.raises(
        FileNotFoundError, match=r"only ones an earlier run set aside as damaged \(corrupt-step-3, corrupt-step-6\)"
    ):
        loop.train_and_evaluate(config, workdir)
    assert _names(workdir) == ["corrupt-step-3", "corrupt-step-6"]


def test_a_signal_at_the_last_step_finishes_the_run(data_dir, tmp_path, monkeypatch) -> None:
    from codi_jax.training import stop_signals

    monkeypatch.setattr(stop_signals.StopSignals, "agreed", lambda self: True)  # as if signalled at every step
    workdir = str(tmp_path / "run")
    config = _config(data_dir, num_train_steps=1, sample_every_steps=1000)
    assert int(loop.train_and_evaluate(config, workdir).step) == 1  # no Preempted
    assert _steps(workdir) == [1]


def test_checkpoint_save_failure_is_exit_5_and_the_rerun_resumes_bitwise(
    data_dir, trained, tmp_path, monkeypatch
) -> None:
    """The step-6 save is refused (EACCES): the run stops naming checkpoint 3; the rerun resumes
    from it and ends bitwise equal to the uninterrupted 6-step run (``trained``)."""
    save = ocp.CheckpointManager.save

    def denied_at_6(self, step, *args, **kwargs):
        if step == 6:
            self.wait_until_finished()  # as Orbax's save does before it starts another
            raise PermissionError(13, "Permission denied")
        return save(self, step, *args, **kwargs)

    workdir = str(tmp_path / "run")
    config = _config(data_dir, num_train_steps=6, sample_every_steps=1000)
    with monkeypatch.context() as patch:
        patch.setattr(ocp.CheckpointManager, "save", denied_at_6)
        with pytest.raises(
            run_status.CheckpointWriteFailed, match=r"Permission denied\); last complete checkpoint: .*/3\."
        ):
            loop.train_and_evaluate(config, workdir)
    assert _steps(workdir) == [3]
    loop.train_and_evaluate(config, workdir)
    a, b = _state_leaves(trained), _state_leaves(workdir)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def _lines_until(proc: subprocess.Popen, text: str, timeout: float) -> list[str]:
    lines, deadline = [], time.time() + timeout
    for line in proc.stderr:
        lines.append(line)
        if text in line or time.time() > deadline:
            break
    return lines


def test_second_run_on_a_workdir_is_refused_and_startup_signals_exit_in_one_line(data_dir, tmp_path) -> None:
    """While one run trains, a second on its workdir is refused at once (exit 2, one line naming the
    holder); SIGTERM during another run's start-up, once it holds its own lock, exits 143 in one
    line and leaves no lock behind; SIGTERM during the first's training is a preemption (exit 3);
    resuming it with another model is refused (exit 2) and moves nothing."""
    workdir, other = str(tmp_path / "run"), str(tmp_path / "other")
    long_run = {"num_train_steps": 1000, "checkpoint_every_steps": 10_000, "log_every_steps": 1}
    first = subprocess.Popen(_flags(data_dir, workdir, **long_run), env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        started = _lines_until(first, "step 2/1000", 300)
        assert os.path.exists(os.path.join(workdir, "run.lock")), "".join(started)[-2000:]
        assert not any("Config (resolved)" in line for line in started)  # the log file only:
        with open(os.path.join(workdir, "train.log")) as f:
            assert "Config (resolved):" in f.read()
        t0 = time.time()
        second = subprocess.run(_flags(data_dir, workdir), env=_env(), capture_output=True, text=True, timeout=120)
        refused_after = time.time() - t0
        assert second.returncode == 2, second.stderr[-2000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: --workdir {workdir} is in use by another run (host ")
        assert f"pid {first.pid}" in lines[0] and refused_after < 30
        third = subprocess.Popen(_flags(data_dir, other), env=_env(), stderr=subprocess.PIPE, text=True)
        _lines_until(third, "XLA compilation cache", 120)  # logged once the lock is held
        third.send_signal(signal.SIGTERM)
        _, rest = third.communicate(timeout=60)
        assert third.returncode == 143, rest[-2000:]
        assert rest.strip().splitlines()[-1].startswith("error: stopped by SIGTERM during start-up")
        assert "Traceback" not in rest and not os.path.exists(os.path.join(other, "run.lock"))
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
    assert first.returncode == run_status.EXIT_PREEMPTED
    assert not os.path.exists(os.path.join(workdir, "run.lock"))
    # Resuming it with another model: exit 2, one line, every checkpoint left where it was.
    before = _names(workdir)
    changed = subprocess.run(
        _flags(data_dir, workdir, **{"model.layers_per_block": 2}), env=_env(), capture_output=True, text=True
    )
    assert changed.returncode == 2, changed.stderr[-2000:]
    lines = changed.stderr.strip().splitlines()
    assert len(lines) == 1 and "was written with another config" in lines[0] and "model.layers_per_block: 1" in lines[0]
    assert _names(workdir) == before


def test_disk_write_failure_exits_5_within_seconds(data_dir, tmp_path) -> None:
    """Files capped at 200 kB (``RLIMIT_FSIZE``: the kernel fails the write, as on a full disk): the
    first checkpoint cannot be written; the run stops with exit 5, one console line naming the last
    complete checkpoint and no Orbax traceback (the full one is in train.log)."""
    from codi_jax.data import pipeline

    pipeline._skimage_builder(_config(data_dir).data)  # the dataset is built before the cap
    workdir = str(tmp_path / "run")
    limit = [sys.executable, os.path.join(REPO, "tests", "scripts", "file_size_limit.py"), str(200_000)]
    args = limit + _flags(data_dir, workdir, num_train_steps=1000, checkpoint_every_steps=1, log_every_steps=1)[1:]
    env = {k: v for k, v in _env().items() if k != "JAX_COMPILATION_CACHE_DIR"}  # no capped cache entries
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    started = _lines_until(proc, "Training from step 0", 300)
    t0 = time.time()
    _, rest = proc.communicate(timeout=120)
    assert proc.returncode == run_status.EXIT_CHECKPOINT_FAILED, ("".join(started) + rest)[-3000:]
    assert time.time() - t0 < 10
    errors = [line for line in rest.splitlines() if line.startswith("E")]
    assert len(errors) == 1 and "File too large" in errors[0] and "last complete checkpoint: " in errors[0]
    named = errors[0].split("last complete checkpoint: ")[1].split(". Free")[0]
    assert named.startswith("none in ") or os.path.basename(named) in map(str, _steps(workdir))
    assert "Traceback" not in rest
    with open(os.path.join(workdir, "train.log")) as f:
        assert "Traceback" in f.read()


@pytest.mark.parametrize("opening", ["", 'Error opening "zarr" driver: '])
def test_short_cause_keeps_the_os_reason_not_tensorstores_spec(opening) -> None:
    """Tensorstore appends the spec after the OS reason when the write fails while opening the
    array (seen on CI): the reason must survive, the spec must not."""
    spec = "[tensorstore_spec='" + '{\\"driver\\":\\"zarr\\",\\"shape\\":[16]}' * 40 + "']"
    message = (
        f'OUT_OF_RANGE: {opening}Error writing "ema_params.conv_in.bias/0" in OCDBT database at local file '
        f'"{"/tmp/run/checkpoints/1.orbax-checkpoint-tmp/" * 3}": Failed to write 640759 bytes to file 7: '
        f"File too large [os_error_code='27'] {spec}"
    )
    cause = checkpoint.short_cause(ValueError(message))
    assert cause.startswith("OUT_OF_RANGE: ") and cause.endswith("File too large [os_error_code='27']")
    assert "tensorstore_spec" not in cause and len(cause) <= 305


def test_unwritable_workdir_is_refused_before_anything_loads(tmp_path, monkeypatch) -> None:
    real_open = open

    def read_only(path, mode="r", *args, **kwargs):  # a read-only filesystem (root ignores chmod)
        if "w" in mode and ".write-test-" in str(path):
            raise OSError(30, "Read-only file system")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    with pytest.raises(OSError, match=r"--workdir .* is not writable: Read-only file system\."):
        loop.check_workdir(str(tmp_path / "run"))
