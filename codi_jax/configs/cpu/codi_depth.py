"""CoDi depth-to-image. CPU stand-in: procedural scenes with exact depth, textured from the
bundled photographs (the photos' test split has no depth maps). For NYU Depth v2:
``--config.data.source=tfds --config.data.tfds_name=nyu_depth_v2 --config.task.depth_source=feature
--config.task.depth_is_disparity=False`` (and a teacher trained on that data)."""

import ml_collections

from codi_jax.configs.cpu import codi_sr4


def get_config() -> ml_collections.ConfigDict:
    config = codi_sr4.get_config()
    config.task.name = "depth"
    config.task.depth_source = "procedural"
    return config
