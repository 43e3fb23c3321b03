"""CoDi real-world x4 super-resolution: Real-ESRGAN's second-order degradation (blur, resize,
noise, JPEG, twice) on the bundled photographs. Paper scale (DF2K, 512px, SD-scale backbone):
point ``data`` at a prepared tfds dataset or an image folder and ``teacher_workdir`` at a
converted backbone."""

import ml_collections

from codi_jax.configs.cpu import codi_sr4


def get_config() -> ml_collections.ConfigDict:
    config = codi_sr4.get_config()
    config.task.degradation = "realesrgan"
    return config
