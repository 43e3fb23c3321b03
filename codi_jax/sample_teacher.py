"""``python -m codi_jax.sample_teacher``: runs ``codi_jax.cli.sample_teacher``."""

from codi_jax.cli.common import run_main
from codi_jax.cli.sample_teacher import main

if __name__ == "__main__":
    run_main(main)
