"""Stable Diffusion 1.5: PE-CoDi depth-to-image (NYU Depth v2 through tfds, or pairs in a folder).

  python -m codi_jax.train --config=codi_jax/configs/sd/sd15_depth.py --workdir=$RUN \\
      --config.teacher_workdir=$SD15 --config.data.data_dir=/data/tfds

``nyu_depth_v2`` must be prepared locally for tfds (no download at run time); its metric depth
becomes the condition (near = +1). Initialise from a public depth ControlNet with
``--config.adapter.init_from=$SD15/controlnet`` after ``convert --controlnet``.
"""

import ml_collections

from codi_jax.configs.sd import sd15_sr4


def get_config() -> ml_collections.ConfigDict:
    return as_depth(sd15_sr4.get_config())


def as_depth(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` (an SD super-resolution config) with the depth task and NYU Depth v2 data, in place;
    ``sdxl_depth`` and ``sd3_depth`` build on it."""
    config.task.name = "depth"
    config.task.depth_source = "feature"
    config.task.depth_is_disparity = False
    config.data.source = "tfds"
    config.data.tfds_name = "nyu_depth_v2"
    config.data.caption_key = ""  # nyu_depth_v2 has no caption feature: the fixed text.prompt
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.random_crop = False
    return config
