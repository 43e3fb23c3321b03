"""Stable Diffusion 3 / 3.5: PE-CoDi x4 real-world super-resolution at 1024 px (flow-matching teacher).

Fill in the local paths (each is checked, with an error naming the field, before anything is
compiled):

  python -m codi_jax.convert --diffusers=/models/stable-diffusion-3-medium-diffusers \\
      [--controlnet=/models/SD3-Controlnet-Tile] --out=$SD3
  python -m codi_jax.train --config=codi_jax/configs/sd/sd3_sr4.py --workdir=$RUN \\
      --config.teacher_workdir=$SD3 --config.data.folder=/data/DF2K_HR

The teacher's saved config supplies the joint-attention DiT (``model.kind='dit'``), the flow schedule
(the scheduler's shift 3), the 16-channel VAE (``latent``: scaling 1.5305, shift 0.0609) and the three
text encoders (``text``: CLIP-L, CLIP-G, T5; the negative prompt "" is encoded, as diffusers does).
The adapter is the DiT's ControlNet (an ``SD3ControlNetModel`` copy of ``adapter.dit_blocks`` blocks,
0 = half). It reads the condition as diffusers' ``StableDiffusion3ControlNetPipeline`` hands it over:
the control image through the frozen VAE (posterior mean, ``(z - shift) * scaling``;
``batch_inputs.condition_latents``), so ``adapter.init_from`` takes a converted ``SD3ControlNetModel``
(16 latent channels) as it is.
Captions are not read for SD3 yet (``data.caption_key=''``: the fixed ``text.prompt``).
"""

import ml_collections

from codi_jax.configs.sd import sd15_sr4


def get_config() -> ml_collections.ConfigDict:
    config = sd15_sr4.get_config()
    config.teacher_workdir = ""  # set: a converted SD3 / SD3.5 workdir (python -m codi_jax.convert)
    config.data.image_size = 1024  # pixels; the DiT sees the 128x128 latents (64x64 tokens of 2x2 patches)
    config.data.caption_key = ""  # per-example prompts need all three tokenizers: not yet for SD3
    config.adapter.init_from = ""  # optional: a converted SD3ControlNetModel (convert --controlnet workdir)
    config.adapter.dit_blocks = 0  # 0 = half of the transformer's blocks (SD3 medium: 12 of 24)
    config.adapter.hint_unit_range = False  # no hint network: the condition is patch-embedded
    config.text = ml_collections.ConfigDict({"prompt": "", "negative_prompt": "", "drop_prob": 0.0})
    config.model.dtype = "bfloat16"
    config.model.remat = True
    config.sharding.fsdp = 8  # SD3 medium's 2.0 B transformer parameters, sharded over an 8-GPU node
    config.batch_size = 32
    return config
