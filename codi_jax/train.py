"""``python -m codi_jax.train``: runs ``codi_jax.cli.train``."""

from codi_jax.cli import common

if __name__ == "__main__":  # a signal while JAX / TensorFlow import: one line, no traceback
    common.exit_on_signals(unwind=False)

from codi_jax.cli.train import main  # noqa: E402

if __name__ == "__main__":
    common.run_main(main)
