"""CoDi inpainting (free-form strokes and boxes) on 32x32 patches of the bundled photographs."""

import ml_collections

from codi_jax.configs.cpu import codi_sr4


def get_config() -> ml_collections.ConfigDict:
    config = codi_sr4.get_config()
    config.task.name = "inpaint"  # cond: masked image (holes = 0) + hole channel (+1 missing)
    config.task.mask_kind = "mixed"
    return config
