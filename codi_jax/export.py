"""``python -m codi_jax.export``: runs ``codi_jax.cli.export``."""

from codi_jax.cli.common import run_main
from codi_jax.cli.export import main

if __name__ == "__main__":
    run_main(main)
