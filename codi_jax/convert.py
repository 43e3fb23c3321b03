"""``python -m codi_jax.convert``: runs ``codi_jax.cli.convert``."""

from codi_jax.cli.common import run_main
from codi_jax.cli.convert import main

if __name__ == "__main__":
    run_main(main)
