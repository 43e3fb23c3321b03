"""``python -m codi_jax.evaluate``: runs ``codi_jax.cli.evaluate``."""

from codi_jax.cli.common import run_main
from codi_jax.cli.evaluate import main

if __name__ == "__main__":
    run_main(main)
