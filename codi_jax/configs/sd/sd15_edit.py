"""Stable Diffusion 1.5: PE-CoDi instructed editing on InstructPix2Pix triples, with CFG-aware
distillation.

  python -m codi_jax.train --config=codi_jax/configs/sd/sd15_edit.py --workdir=$RUN \\
      --config.teacher_workdir=$SD15 --config.data.folder=/data/instruct-pix2pix

``data.source='edit_triples'`` reads InstructPix2Pix's layout: one directory per instruction with
``prompt.json`` (its ``edit`` field) and ``<seed>_0`` (source) / ``<seed>_1`` (edited) images. The
source image is the condition (ControlNet), the edited one the target, the instruction the text
context (encoded by the frozen CLIP per batch). The student learns the CFG-guided teacher for w
in ``codi.cfg_range`` and samples with ``--prompt="make it snowy" --guidance_scale=4``.
"""

import ml_collections

from codi_jax.configs.sd import sd15_sr4


def get_config() -> ml_collections.ConfigDict:
    config = sd15_sr4.get_config()
    config.task.name = "edit"
    config.task.instructions = "text"  # the data's own free-text instructions
    config.data.source = "edit_triples"
    config.data.folder = ""  # set: an InstructPix2Pix-format folder
    config.data.random_crop = False
    config.codi.cfg_range = (1.0, 8.0)
    config.sample_guidance_scale = 4.0
    return config
