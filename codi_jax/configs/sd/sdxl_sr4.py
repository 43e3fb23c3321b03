"""Stable Diffusion XL: PE-CoDi x4 real-world super-resolution at 1024 px.

Fill in the local paths (each is checked, with an error naming the field, before anything is
compiled):

  python -m codi_jax.convert --diffusers=/models/stable-diffusion-xl-base-1.0 \\
      [--controlnet=/models/controlnet-canny-sdxl-1.0] --out=$SDXL
  python -m codi_jax.train --config=codi_jax/configs/sd/sdxl_sr4.py --workdir=$RUN \\
      --config.teacher_workdir=$SDXL --config.data.folder=/data/DF2K_HR \\
      [--config.adapter.init_from=$SDXL/controlnet]

The teacher's saved config supplies the text_time UNet, the scaled_linear eps schedule, the VAE
(``latent``, scaling factor 0.13025) and both CLIP text encoders (``text``; the empty negative
prompt is zeros, as SDXL base's ``force_zeros_for_empty_prompt``). Training batches carry SDXL's
micro-conditioning (the real crop's original size, top-left and target size) as the UNet's time
ids; sampling uses (1024, 1024, 0, 0, 1024, 1024) as diffusers does. The ControlNet (SDXL's hint
network: x8) can start from a converted public SDXL ControlNet (``adapter.init_from``). Captions
are not read for SDXL yet (``data.caption_key=''``: the fixed ``text.prompt``).
"""

import ml_collections

from codi_jax.configs.sd import sd15_sr4


def get_config() -> ml_collections.ConfigDict:
    config = sd15_sr4.get_config()
    config.teacher_workdir = ""  # set: a converted SDXL workdir (python -m codi_jax.convert)
    config.data.image_size = 1024  # pixels; the UNet sees the 128x128 latents
    config.data.caption_key = ""  # per-example prompts need both tokenizers: not yet for SDXL
    config.adapter.init_from = ""  # optional: a converted public SDXL ControlNet (workdir/controlnet)
    config.adapter.hint_channels = (16, 32, 96, 256)  # diffusers' conditioning_embedding_out_channels
    config.adapter.hint_downsamples = 3  # 1024 px condition -> 128 latent grid
    config.text = ml_collections.ConfigDict({"prompt": "", "negative_prompt": "", "drop_prob": 0.0})
    config.model.dtype = "bfloat16"
    config.model.remat = True
    config.sharding.fsdp = 8  # the state sharded over 8 devices (an 8-GPU node; 2.6 B backbone parameters)
    config.batch_size = 32
    return config
