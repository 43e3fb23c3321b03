"""Stable Diffusion 1.5: PE-CoDi instructed editing, with CFG-aware distillation.

  python -m codi_jax.train --config=configs/sd15_edit.py --workdir=$RUN \\
      --config.teacher_workdir=$SD15 --config.data.folder=/data/images

The instructions are this codebase's ``edit`` task (``data.tasks.EDIT_NAMES``, applied to the
folder's images); each instruction's CLIP embedding is computed once per run and is the text
context; the student learns the guided teacher for w in ``codi.cfg_range``. (InstructPix2Pix
triples with free-text instructions are not loadable yet.)
"""

import ml_collections

from configs import sd15_sr4


def get_config() -> ml_collections.ConfigDict:
    config = sd15_sr4.get_config()
    config.task.name = "edit"
    config.data.random_crop = False
    config.codi.cfg_range = (1.0, 8.0)
    config.sample_guidance_scale = 4.0
    return config
