"""Reliability of training runs, asserted on disk: kill -9 and resume is bitwise exact, SIGTERM
writes a checkpoint at the current step, a damaged latest checkpoint falls back to the previous
one, divergence stops the run without a new checkpoint, a failed checkpoint write stops it."""

from __future__ import annotations

import glob
import os
import random
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
def test_damaged_latest_checkpoint_falls_back_to_the_previous(data_dir, tmp_path, how, caplog) -> None:
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(_config(data_dir, num_train_steps=6, sample_every_steps=1000), workdir)
    assert _steps(workdir) == [3, 6]
    _corrupt(os.path.join(workdir, "checkpoints", "6"), how)
    with caplog.at_level("WARNING"):
        state = loop.train_and_evaluate(_config(data_dir, num_train_steps=7, sample_every_steps=1000), workdir)
    assert int(state.step) == 7
    assert any("step 6" in r.getMessage() and "does not restore" in r.getMessage() for r in caplog.records)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "corrupt-step-6"))  # kept on disk
    assert 6 in _steps(workdir) and 7 in _steps(workdir)  # retrained from step 3


def test_no_checkpoint_restores_is_a_clear_error(data_dir, tmp_path) -> None:
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(_config(data_dir, num_train_steps=3, sample_every_steps=1000), workdir)
    _corrupt(os.path.join(workdir, "checkpoints", "3"), "missing _METADATA")
    with pytest.raises(FileNotFoundError, match=r"No checkpoint in .* restores; tried: step 3"):
        loop.train_and_evaluate(_config(data_dir, num_train_steps=4, sample_every_steps=1000), workdir)


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
