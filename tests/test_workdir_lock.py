"""The workdir lock (codi_jax.runs.workdir_lock): refusal, release, stale takeover (dead pid,
reused pid, garbled file), another host, real processes racing, the context managers."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from codi_jax.runs import workdir_lock
from codi_jax.runs.workdir_lock import WorkdirLocked

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reaped_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(workdir, **fields) -> str:
    holder = dict(
        host=socket.gethostname(),
        pid=os.getpid(),
        pid_start=workdir_lock._pid_start(os.getpid()),
        started="2020-01-01T00:00:00+00:00",
        command="python -m codi_jax.train --workdir=elsewhere",
    )
    holder.update(fields)
    path = workdir_lock.lock_path(str(workdir))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(holder, f)
    return path


def _holder_pid(workdir) -> int:
    with open(workdir_lock.lock_path(str(workdir))) as f:
        return json.load(f)["pid"]


def test_second_acquire_is_refused_and_release_frees(tmp_path):
    workdir = tmp_path / "run"
    lock = workdir_lock.acquire(str(workdir))  # creates the workdir
    path = str(workdir / "run.lock")
    assert lock.path == path
    with open(path) as f:
        written = json.load(f)
    assert written["host"] == socket.gethostname() and written["pid"] == os.getpid()
    assert written["pid_start"] == workdir_lock._pid_start(os.getpid())
    assert written["started"].endswith("+00:00") and isinstance(written["command"], str)

    with pytest.raises(WorkdirLocked) as refused:
        workdir_lock.acquire(str(workdir))
    message = str(refused.value)
    assert isinstance(refused.value, ValueError) and "\n" not in message
    assert message == (
        f"--workdir {workdir} is in use by another run (host {socket.gethostname()}, pid {os.getpid()}, "
        f"started {written['started']}): {path}. Wait for it to finish, or use another --workdir; "
        "if that run is gone, delete the lock file."
    )

    workdir_lock.release(lock)
    assert not os.path.exists(path)
    workdir_lock.release(workdir_lock.acquire(str(workdir)))


def test_release_leaves_another_holders_lock(tmp_path):
    lock = workdir_lock.acquire(str(tmp_path))
    path = _write_lock(tmp_path, pid=_reaped_pid())  # overwritten by someone else
    workdir_lock.release(lock)
    assert os.path.exists(path)


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path, caplog):
    dead = _reaped_pid()
    _write_lock(tmp_path, pid=dead, pid_start=123)
    with caplog.at_level(logging.WARNING):
        lock = workdir_lock.acquire(str(tmp_path))
    assert _holder_pid(tmp_path) == os.getpid() == lock.holder.pid
    assert f"pid {dead} is not running" in caplog.text and "Taking over the stale lock" in caplog.text
    assert not os.path.exists(lock.path + ".takeover")
    workdir_lock.release(lock)


def test_reused_pid_is_stale(tmp_path):
    own_start = workdir_lock._pid_start(os.getpid())
    if own_start is None:
        pytest.skip("no /proc: pid_start is unknown")
    _write_lock(tmp_path, pid_start=own_start + 1)  # our pid, another process's start time
    lock = workdir_lock.acquire(str(tmp_path))
    assert lock.holder.pid_start == own_start
    workdir_lock.release(lock)


def test_another_hosts_lock_is_refused_even_with_a_dead_pid(tmp_path):
    dead = _reaped_pid()
    path = _write_lock(tmp_path, host="elsewhere.example", pid=dead)
    with pytest.raises(WorkdirLocked, match=f"host elsewhere.example, pid {dead}, started 2020-01-01"):
        workdir_lock.acquire(str(tmp_path))
    assert _holder_pid(tmp_path) == dead and os.path.exists(path)


def test_garbled_lock_is_refused_while_fresh_and_taken_over_when_old(tmp_path):
    path = workdir_lock.lock_path(str(tmp_path))
    with open(path, "w") as f:
        f.write('{"host": "')  # a crash between creating and writing
    with pytest.raises(WorkdirLocked, match="is being created"):
        workdir_lock.acquire(str(tmp_path))
    old = time.time() - 2 * workdir_lock.GARBLED_GRACE_S
    os.utime(path, (old, old))
    lock = workdir_lock.acquire(str(tmp_path))
    assert _holder_pid(tmp_path) == os.getpid()
    workdir_lock.release(lock)


_RACER = textwrap.dedent(
    """
    import os, sys, time
    from codi_jax.runs import workdir_lock
    workdir, name = sys.argv[1], sys.argv[2]
    open(os.path.join(workdir, "ready-" + name), "w").close()
    while not os.path.exists(os.path.join(workdir, "go")):
        time.sleep(0.001)
    try:
        lock = workdir_lock.acquire(os.path.join(workdir, "run"))
    except workdir_lock.WorkdirLocked:
        print("refused")
    else:
        time.sleep(1.0)
        workdir_lock.release(lock)
        print("acquired")
    """
)


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale"])
def test_racing_processes_exactly_one_wins(tmp_path, stale):
    if stale:
        _write_lock(tmp_path / "run", pid=_reaped_pid(), pid_start=123)
    env = dict(os.environ, PYTHONPATH=REPO)
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(tmp_path), str(i)], env=env, stdout=subprocess.PIPE, text=True
        )
        for i in range(4)
    ]
    deadline = time.monotonic() + 60
    while sum(name.startswith("ready-") for name in os.listdir(tmp_path)) < len(racers):
        assert time.monotonic() < deadline, "the racers did not start"
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outcomes = [racer.communicate(timeout=60)[0].strip() for racer in racers]
    assert all(racer.returncode == 0 for racer in racers)
    assert sorted(outcomes) == ["acquired", "refused", "refused", "refused"]
    assert not os.path.exists(tmp_path / "run" / "run.lock")
    assert not os.path.exists(tmp_path / "run" / "run.lock.takeover")


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_held_releases_on_exception(tmp_path, error):
    path = workdir_lock.lock_path(str(tmp_path))
    with pytest.raises(error, match="boom"):
        with workdir_lock.held(str(tmp_path)) as lock:
            assert lock.path == path and os.path.exists(path)
            raise error("boom")
    assert not os.path.exists(path)


def test_held_by_run_on_one_process_is_held(tmp_path):
    path = workdir_lock.lock_path(str(tmp_path))
    with workdir_lock.held_by_run(str(tmp_path)) as lock:
        assert lock is not None and lock.path == path and _holder_pid(tmp_path) == os.getpid()
        with pytest.raises(WorkdirLocked):
            workdir_lock.acquire(str(tmp_path))
    assert not os.path.exists(path)


@pytest.mark.parametrize("process_index", [0, 1])
def test_held_by_run_every_process_raises_when_process_0_is_refused(tmp_path, monkeypatch, process_index):
    import jax
    from jax.experimental import multihost_utils

    _write_lock(tmp_path, host="elsewhere.example")
    broadcast = []

    def broadcast_one_to_all(value):
        broadcast.append(int(value))
        return workdir_lock._STATUS_LOCKED  # process 0's answer

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: process_index)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast_one_to_all)
    expected = "host elsewhere.example" if process_index == 0 else "process 0 was refused"
    with pytest.raises(WorkdirLocked, match=expected):
        with workdir_lock.held_by_run(str(tmp_path)):
            pytest.fail("entered a locked workdir")
    assert broadcast == [workdir_lock._STATUS_LOCKED if process_index == 0 else workdir_lock._STATUS_OK]


def test_lock_round_trips_through_its_json(tmp_path):
    holder = workdir_lock.this_process()
    assert workdir_lock._parse(json.dumps(dataclasses.asdict(holder))) == holder
    for garbled in ("", "{", "[]", '"x"', '{"host": "h"}', '{"host": "h", "pid": 0}', '{"host": "h", "pid": "x"}'):
        assert workdir_lock._parse(garbled) is None, garbled
