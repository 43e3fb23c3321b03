"""Trains a model: ``python -m codi_jax.train --config=codi_jax/configs/cpu/teacher_patches32.py --workdir=DIR``.

Every config field can be overridden on the command line, e.g. ``--config.batch_size=16``.
Rerunning with the same workdir resumes from its latest checkpoint.
"""

import os
import signal
import sys

import jax
from absl import flags, logging
from ml_collections import config_flags

from codi_jax.cli import common
from codi_jax.training import loop
from codi_jax.training.run_status import CheckpointWriteFailed, RunStopped

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml-collections config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard summaries and samples.")
flags.DEFINE_string(
    "compilation_cache",
    os.path.expanduser("~/.cache/codi_jax/xla"),
    "Persistent XLA compilation cache ('' disables): resumed runs skip compiling.",
)
common.define_distributed_flags()


def main(argv):
    common.exit_on_signals(unwind=True)  # until the loop takes the signals: one line, the lock released
    common.no_arguments(argv)
    common.require_flags("config", "workdir")
    common.initialize_distributed()
    if FLAGS.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    try:
        loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except RunStopped as stopped:
        logging.error("%s: %s", type(stopped).__name__, stopped)
        if isinstance(stopped, CheckpointWriteFailed):  # Orbax's failed writer threads may never end
            logging.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(stopped.exit_code)
        sys.exit(stopped.exit_code)
    for signum in (signal.SIGINT, signal.SIGTERM):  # finished: a signal now changes nothing
        signal.signal(signum, signal.SIG_IGN)


def console() -> None:
    """The ``codi-...`` console script."""
    common.run_main(main)


if __name__ == "__main__":
    console()
