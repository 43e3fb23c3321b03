"""CoDi edge-to-image (Canny edges computed in the pipeline) on the bundled photographs."""

import ml_collections

from codi_jax.configs.cpu import codi_sr4


def get_config() -> ml_collections.ConfigDict:
    config = codi_sr4.get_config()
    config.task.name = "edge"
    config.task.edge_method = "canny"
    return config
