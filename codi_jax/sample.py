"""``python -m codi_jax.sample``: runs ``codi_jax.cli.sample``."""

from codi_jax.cli.common import run_main
from codi_jax.cli.sample import main

if __name__ == "__main__":
    run_main(main)
