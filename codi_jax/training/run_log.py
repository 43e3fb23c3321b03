"""The run's log file, ``<workdir>/train.log``: everything, while the console tells the short story.

While a run holds it (``file_log``, process 0 only), every log record goes to the file, appended
across resumes: the resolved config (``FILE_ONLY`` records, which the console leaves out), INFO
lines, and third-party errors with their full tracebacks (Orbax's failed background writes log
hundreds of lines; on the console they are left out, and the run's one line names what failed
and the last complete checkpoint). What threads started outside Python print through
``sys.stderr`` (TensorStore's callbacks into Orbax's closed event loops, one traceback each,
after a failed write) and the tracebacks of Python threads that die go to the file too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import traceback
from collections.abc import Iterator

import jax
from absl import logging as absl_logging

LOG_NAME = "train.log"
FILE_ONLY = {"file_only": True}  # ``extra=`` of a record that goes to the log file only
# Their errors carry tracebacks: Orbax's failed writes, and asyncio's "Future exception was never
# retrieved" for the writes Orbax abandoned.
FILE_ONLY_LIBRARIES = ("orbax", "tensorstore", "asyncio")


class _ConsoleFilter(logging.Filter):
    """Drops file-only records and library records that carry a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "file_only", False):
            return False
        library = any(f"/{name}/" in record.pathname for name in FILE_ONLY_LIBRARIES)
        return not (library and (record.exc_info or record.levelno >= logging.ERROR))


class _LogFile(logging.FileHandler):
    """The log file's handler: a write that fails (the disk the run is filling) is dropped without a
    word; the console and the run's own error line carry on."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass

    def write(self, text: str) -> None:
        try:
            self.stream.write(text)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        try:
            super().close()
        except OSError:
            pass


class _ForeignThreadsToFile:
    """``sys.stderr`` as seen from threads Python did not start (``threading._DummyThread``):
    their writes go to the log file; every other thread's to the console as before."""

    def __init__(self, console, file: _LogFile):
        self.console, self.file = console, file

    def write(self, text: str) -> int:
        if isinstance(threading.current_thread(), threading._DummyThread):
            self.file.write(text)
            return len(text)
        return self.console.write(text)

    def __getattr__(self, name: str):
        return getattr(self.console, name)


@contextlib.contextmanager
def file_log(workdir: str) -> Iterator[str | None]:
    """Sends every record to ``<workdir>/train.log`` while the run holds it (process 0; others:
    nothing, yields None); yields the file's path."""
    if jax.process_index() > 0:
        yield None
        return
    path = os.path.join(workdir, LOG_NAME)
    handler = _LogFile(path, encoding="utf-8")
    handler.setFormatter(absl_logging.PythonFormatter())
    console, root = _ConsoleFilter(), logging.getLogger()
    absl_handler = absl_logging.get_absl_handler()
    stderr, hook = sys.stderr, threading.excepthook

    def to_file(args) -> None:
        handler.write("".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))

    root.addHandler(handler)
    absl_handler.addFilter(console)
    sys.stderr, threading.excepthook = _ForeignThreadsToFile(stderr, handler), to_file
    try:
        yield path
    finally:
        sys.stderr, threading.excepthook = stderr, hook
        absl_handler.removeFilter(console)
        root.removeHandler(handler)
        handler.close()
