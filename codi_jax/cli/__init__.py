"""The command-line entry points, each thin: flags -> one library call (``python -m codi_jax.<name>``)."""
