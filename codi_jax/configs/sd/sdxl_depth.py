"""Stable Diffusion XL: PE-CoDi depth-to-image at 1024 px (NYU Depth v2 through tfds).

  python -m codi_jax.convert --diffusers=/models/stable-diffusion-xl-base-1.0 \\
      --controlnet=/models/controlnet-depth-sdxl-1.0 --out=$SDXL
  python -m codi_jax.train --config=codi_jax/configs/sd/sdxl_depth.py --workdir=$RUN \\
      --config.teacher_workdir=$SDXL --config.data.data_dir=/data/tfds \\
      --config.adapter.init_from=$SDXL/controlnet

``nyu_depth_v2`` must be prepared locally for tfds (no download at run time); its metric depth
becomes the condition (near = +1). The adapter starts from the public SDXL depth ControlNet
(diffusers/controlnet-depth-sdxl-1.0) converted with ``convert --controlnet``.
"""

import ml_collections

from codi_jax.configs.sd import sd15_depth, sdxl_sr4


def get_config() -> ml_collections.ConfigDict:
    return sd15_depth.as_depth(sdxl_sr4.get_config())
