"""Trains a model: ``python -m codi_jax.train --config=configs/teacher_patches32.py --workdir=DIR``.

Every config field can be overridden on the command line, e.g. ``--config.batch_size=16``.
Rerunning with the same workdir resumes from its latest checkpoint.
"""

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from codi_jax import train_loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml-collections config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard summaries and samples.")
flags.DEFINE_string(
    "compilation_cache",
    os.path.expanduser("~/.cache/codi_jax/xla"),
    "Persistent XLA compilation cache ('' disables): resumed runs skip compiling.",
)
flags.DEFINE_bool(
    "jax_distributed", False, "Call jax.distributed.initialize() first (multi-host: TPU pods, multi-node GPU)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.jax_distributed:
        jax.distributed.initialize()
    if FLAGS.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    logging.info("Config:\n%s", FLAGS.config)
    train_loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
