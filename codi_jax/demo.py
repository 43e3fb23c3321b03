"""``python -m codi_jax.demo``: runs ``codi_jax.cli.demo``."""

from codi_jax.cli.common import run_main
from codi_jax.cli.demo import main

if __name__ == "__main__":
    run_main(main)
