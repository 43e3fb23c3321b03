"""Stable Diffusion 2.1 (768 px, v-prediction): PE-CoDi x4 real-world super-resolution.

  python -m codi_jax.convert --diffusers=/models/stable-diffusion-2-1 --out=$SD21
  python -m codi_jax.train --config=codi_jax/configs/sd/sd21_sr4.py --workdir=$RUN \\
      --config.teacher_workdir=$SD21 --config.data.folder=/data/DF2K_HR

As ``sd15_sr4`` otherwise; the teacher's config says v-prediction, SD 2.x's linear projections
and per-level heads, and its OpenCLIP text encoder (gelu).
"""

import ml_collections

from codi_jax.configs.sd import sd15_sr4


def get_config() -> ml_collections.ConfigDict:
    config = sd15_sr4.get_config()
    config.teacher_workdir = ""  # set: a converted SD-2.1 workdir
    config.data.image_size = 768  # 96x96 latents
    config.batch_size = 32
    return config
