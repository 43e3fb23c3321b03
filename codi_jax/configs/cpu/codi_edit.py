"""CoDi instructed editing, CPU stand-in: 10 procedural edits of the source patch chosen by an
instruction id, read through a learned instruction embedding in the adapter."""

import ml_collections

from codi_jax.configs.cpu import codi_sr4


def get_config() -> ml_collections.ConfigDict:
    config = codi_sr4.get_config()
    config.task.name = "edit"
    return config
