"""Stable Diffusion 1.5: PE-CoDi inpainting (free-form masks) on an image folder.

  python -m codi_jax.train --config=codi_jax/configs/sd/sd15_inpaint.py --workdir=$RUN \\
      --config.teacher_workdir=$SD15 --config.data.folder=/data/images
"""

import ml_collections

from codi_jax.configs.sd import sd15_sr4


def get_config() -> ml_collections.ConfigDict:
    config = sd15_sr4.get_config()
    config.task.name = "inpaint"
    config.data.random_crop = False
    return config
