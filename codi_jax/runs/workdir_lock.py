"""One training run per workdir: the lock file ``<workdir>/run.lock``.

Contract:

- ``acquire(workdir)`` creates the workdir and then ``run.lock`` with ``O_CREAT | O_EXCL`` (atomic,
  also on NFS v3+), holding one JSON object: ``host`` (``socket.gethostname()``), ``pid``,
  ``pid_start`` (the process's start time, field 22 of ``/proc/<pid>/stat``, which tells a reused
  pid apart; null without ``/proc``), ``pid_namespace`` (``/proc/self/ns/pid``: two containers with
  one host name are two hosts), ``started`` (ISO-8601 UTC) and ``command`` (``sys.argv``, cut to
  200 characters). It returns a ``Lock``; ``release(lock)`` removes the file only while it still
  holds that same process (never another run's lock).
- A lock held by a live run is refused with ``WorkdirLocked`` (a ``ValueError``: the CLIs print
  one ``error: ...`` line and exit 2) naming the holder's host, pid, start time and the lock file.
- A lock is stale, and taken over with a warning naming the old holder, only where that can be
  known: its holder ran on this host (and pid namespace) and its pid is gone, a zombie, or now
  another process (a different ``pid_start``). A holder on another host is never presumed dead.
  A lock file that is not a readable lock (a crash between creating and writing it) is stale
  once ``GARBLED_GRACE_S`` old; younger, it is being created and refused.
- A stale lock is removed only under the takeover mutex ``run.lock.takeover`` (another
  ``O_EXCL`` file, held for milliseconds), after checking again that it is stale; the new lock
  is then created with ``O_EXCL`` like any other. So of several processes racing for one workdir
  (fresh or with a stale lock) exactly one wins and the others are refused. A mutex left by a
  process that died inside a takeover is removed once ``TAKEOVER_GRACE_S`` old.
- ``held(workdir)``: acquire on enter, release on exit (also on exceptions and Ctrl-C).
  ``held_by_run(workdir)``: the same for a run of several JAX processes: process 0 alone holds
  the lock and broadcasts the outcome, so that every process raises when it was refused (rather
  than the others waiting in a collective).

The lock lives in the workdir root (``checkpoints/`` holds only Orbax's steps). ``kill -9`` (or a
crash) leaves the file: the next run on the same host takes it over; a run on another host is
refused until it is deleted by hand (the message says which file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator

from absl import logging

LOCK_NAME = "run.lock"
GARBLED_GRACE_S = 60.0  # an unreadable lock file younger than this is being created
TAKEOVER_GRACE_S = 10.0  # a takeover mutex older than this was left by a process that died in it
TAKEOVER_WAIT_S = 30.0  # how long acquire waits for another process's takeover (clock skew bound)
_COMMAND_CHARS = 200
_STATUS_OK, _STATUS_LOCKED, _STATUS_FAILED = 0, 1, 2


class WorkdirLocked(ValueError):
    """The workdir is in use by another run (a user error: one line, exit code 2)."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lock: the JSON of ``run.lock``."""

    host: str
    pid: int
    pid_start: int | None
    started: str
    command: str
    pid_namespace: str | None = None

    def same_process(self, other: Holder) -> bool:
        return (self.host, self.pid, self.pid_start) == (other.host, other.pid, other.pid_start)


@dataclasses.dataclass(frozen=True)
class Lock:
    """A lock this process holds: ``release`` it (or use ``held``)."""

    path: str
    holder: Holder


def lock_path(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), LOCK_NAME)


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` from field 3 (state) on; None without it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # the name (field 2) may hold spaces and ')'


def _pid_start(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None  # field 22: starttime


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    fields = _proc_stat(pid)
    return not (fields and fields[0] in ("Z", "X"))  # a zombie has exited


def this_process() -> Holder:
    """This process as a lock holder."""
    pid = os.getpid()
    return Holder(
        host=socket.gethostname(),
        pid=pid,
        pid_start=_pid_start(pid),
        started=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command=shlex.join(sys.argv)[:_COMMAND_CHARS],
        pid_namespace=_pid_namespace(),
    )


def _parse(text: str) -> Holder | None:
    """The holder a lock file's text names; None if it is not a lock (empty, cut short, garbled)."""
    try:
        data = json.loads(text)
        holder = Holder(
            host=str(data["host"]),
            pid=int(data["pid"]),
            pid_start=None if data.get("pid_start") is None else int(data["pid_start"]),
            started=str(data.get("started", "?")),
            command=str(data.get("command", "")),
            pid_namespace=data.get("pid_namespace"),
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return holder if holder.pid > 0 else None


def read_holder(path: str) -> Holder | None:
    """The holder of the lock file ``path``; None if it is not a readable lock.
    Raises ``FileNotFoundError`` where there is no lock file."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return _parse(f.read())


def _why_gone(holder: Holder) -> str | None:
    """Why ``holder`` is known to be gone, or None where it may be running."""
    if holder.host != socket.gethostname():
        return None  # another host: its processes cannot be seen from here
    namespace = _pid_namespace()
    if holder.pid_namespace and namespace and holder.pid_namespace != namespace:
        return None  # another container on this host
    if not _pid_alive(holder.pid):
        return f"pid {holder.pid} is not running"
    start = _pid_start(holder.pid)
    if holder.pid_start is not None and start is not None and start != holder.pid_start:
        return f"pid {holder.pid} now belongs to another process"
    return None


def _refusal(workdir: str, path: str, holder: Holder) -> WorkdirLocked:
    return WorkdirLocked(
        f"--workdir {workdir} is in use by another run (host {holder.host}, pid {holder.pid}, "
        f"started {holder.started}): {path}. Wait for it to finish, or use another --workdir; "
        "if that run is gone, delete the lock file."
    )


def _stale_reason(workdir: str, path: str) -> str:
    """Why the lock file ``path`` is stale; raises ``WorkdirLocked`` where it may be in use and
    ``FileNotFoundError`` where it is gone."""
    holder = read_holder(path)
    if holder is None:
        age = time.time() - os.stat(path).st_mtime
        if age < GARBLED_GRACE_S:
            raise WorkdirLocked(
                f"--workdir {workdir} is in use by another run: its lock file {path} is being created "
                f"({age:.0f} s old, not yet readable). Wait for it to finish, or use another --workdir; "
                "if no run is starting there, delete the lock file."
            )
        return f"an unreadable lock file, {age:.0f} s old (a run that died while creating it)"
    reason = _why_gone(holder)
    if reason is None:
        raise _refusal(workdir, path, holder)
    return f"host {holder.host}, pid {holder.pid}, started {holder.started} ({reason}; command: {holder.command})"


def _create(path: str, holder: Holder) -> bool:
    """Creates the lock file ``path`` holding ``holder``; False where one exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        try:
            os.write(fd, json.dumps(dataclasses.asdict(holder)).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        os.remove(path)  # no lock without its holder (e.g. a full disk)
        raise
    return True


def _take_over(workdir: str, path: str) -> bool:
    """Removes the stale lock file ``path`` under the takeover mutex, checking again under it that
    it is stale (raises ``WorkdirLocked`` where it is not); False where another process holds the
    mutex. Only a mutex holder ever removes a lock it did not write."""
    mutex = path + ".takeover"
    try:
        os.close(os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - os.stat(mutex).st_mtime > TAKEOVER_GRACE_S:
                logging.warning("Removing %s, left by a process that died while taking over a stale lock.", mutex)
                os.remove(mutex)
        return False
    try:
        reason = _stale_reason(workdir, path)
        logging.warning("Taking over the stale lock %s of a run that is gone: %s.", path, reason)
        os.remove(path)
    except FileNotFoundError:
        pass  # released meanwhile: the caller creates it
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(mutex)
    return True


def acquire(workdir: str) -> Lock:
    """Makes this process ``workdir``'s one run (creating the directory): the lock to ``release``.

    Raises ``WorkdirLocked`` where another run holds it (or may: see the module docstring); a
    stale lock is taken over with a warning."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = lock_path(workdir)
    holder = this_process()
    deadline = time.monotonic() + TAKEOVER_WAIT_S
    while not _create(path, holder):
        try:
            _stale_reason(workdir, path)  # raises while in use
        except FileNotFoundError:
            continue  # released meanwhile
        if not _take_over(workdir, path):
            if time.monotonic() > deadline:
                raise WorkdirLocked(
                    f"--workdir {workdir}: another process has been taking over its stale lock {path} for "
                    f"{TAKEOVER_WAIT_S:.0f} s ({path}.takeover); if none is, delete that file."
                )
            time.sleep(0.02)
    return Lock(path, holder)


def release(lock: Lock) -> None:
    """Removes ``lock``'s file if it still names this lock's process; another's is left alone."""
    try:
        current = read_holder(lock.path)
    except FileNotFoundError:
        logging.warning("The lock file %s was already removed.", lock.path)
        return
    if current is None or not current.same_process(lock.holder):
        who = "an unreadable lock" if current is None else f"host {current.host}, pid {current.pid}"
        logging.warning("Not removing the lock file %s: it now holds %s.", lock.path, who)
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(lock.path)


@contextlib.contextmanager
def held(workdir: str) -> Iterator[Lock]:
    """``workdir``'s lock for the ``with`` block (released also on exceptions and Ctrl-C)."""
    lock = acquire(workdir)
    try:
        yield lock
    finally:
        release(lock)


@contextlib.contextmanager
def held_by_run(workdir: str) -> Iterator[Lock | None]:
    """``held`` for a run of one or several JAX processes: process 0 alone holds the lock (None on
    the others) and every process raises ``WorkdirLocked`` where process 0 was refused."""
    import jax  # here: the lock itself needs no JAX (and starts fast in a subprocess)
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        with held(workdir) as lock:
            yield lock
        return
    lock, failure, status = None, None, _STATUS_OK
    if jax.process_index() == 0:
        try:
            lock = acquire(workdir)
        except Exception as error:  # noqa: BLE001  (every process must learn of it, then it is raised)
            failure = error
            status = _STATUS_LOCKED if isinstance(error, WorkdirLocked) else _STATUS_FAILED
    status = int(multihost_utils.broadcast_one_to_all(np.int32(status)))
    if failure is not None:
        raise failure
    if status == _STATUS_LOCKED:
        raise WorkdirLocked(
            f"--workdir {os.path.abspath(workdir)} is in use by another run: process 0 was refused its lock "
            f"file {lock_path(workdir)} (see process 0's log for the holder)."
        )
    if status == _STATUS_FAILED:
        raise RuntimeError(f"Process 0 could not take the lock {lock_path(workdir)} (see its log).")
    try:
        yield lock
    finally:
        if lock is not None:
            release(lock)
