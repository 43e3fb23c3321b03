"""How a training run ends other than by finishing, and the exit code each gets (docs/operations.md).

0  finished (or nothing left to do)
1  a bug: an unexpected exception (traceback printed)
2  a user error: bad flag, config field, path or input (one line on stderr)
3  preempted: SIGTERM / SIGINT; a checkpoint of the current step was written: rerun to resume
4  diverged: too many consecutive updates rejected; the last good checkpoint is kept
5  a checkpoint write failed (e.g. disk full); the last complete checkpoint is named
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 3
EXIT_DIVERGED = 4
EXIT_CHECKPOINT_FAILED = 5


class RunStopped(Exception):
    """A run that stopped early on purpose; ``exit_code`` says why."""

    exit_code = 1


class Preempted(RunStopped):
    exit_code = EXIT_PREEMPTED


class Diverged(RunStopped):
    exit_code = EXIT_DIVERGED


class CheckpointWriteFailed(RunStopped):
    exit_code = EXIT_CHECKPOINT_FAILED
