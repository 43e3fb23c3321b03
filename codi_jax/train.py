"""``python -m codi_jax.train``: runs ``codi_jax.cli.train``."""

from codi_jax.cli.common import run_main
from codi_jax.cli.train import main

if __name__ == "__main__":
    run_main(main)
