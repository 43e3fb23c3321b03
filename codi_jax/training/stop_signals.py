"""SIGTERM / SIGINT as a request to stop at the next step boundary (schedulers, TPU maintenance, Ctrl-C).

The first signal sets ``requested``; the loop finishes its step, writes a checkpoint and exits.
A second SIGINT exits at once (exit code 130). With several processes, ``agreed`` tells every
process the same answer (any process's signal stops all of them at the same step).
"""

from __future__ import annotations

import os
import signal
import types

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class StopSignals:
    """Context manager installing the handlers (main thread only; elsewhere it does nothing)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            os._exit(130)  # second Ctrl-C: at once, no checkpoint
        self.requested = name
        logging.warning(
            "%s received: finishing this step and writing a checkpoint (Ctrl-C again to exit at once).", name
        )

    def __enter__(self) -> StopSignals:
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread
            self._previous = {}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def agreed(self) -> bool:
        """Whether any process asked to stop (a host-level all-gather when there are several)."""
        if jax.process_count() == 1:
            return self.requested is not None
        flags = multihost_utils.process_allgather(np.int32(self.requested is not None))
        return bool(np.max(flags))
