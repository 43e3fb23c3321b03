"""Stable Diffusion 1.5: PE-CoDi x4 real-world super-resolution at 512 px (the paper's setting).

Fill in the local paths (each is checked, with an error naming the field, before anything is
compiled):

  python -m codi_jax.convert --diffusers=/models/stable-diffusion-v1-5 --out=$SD15
  python -m codi_jax.train --config=codi_jax/configs/sd/sd15_sr4.py --workdir=$RUN \\
      --config.teacher_workdir=$SD15 --config.data.folder=/data/DF2K_HR

The teacher's saved config supplies the UNet, the scaled_linear eps schedule, the VAE
(``latent``) and the CLIP text encoder (``text``); the prompt is empty. Training images are
encoded by the VAE on the fly (``latent.encode``: a sample of the encoder's Gaussian, as SD was
trained); the condition (the degraded image upsampled back to 512 px) stays in pixel space and
enters the ControlNet through diffusers' x8 hint network, so ``--config.adapter.init_from`` can
be a converted public ControlNet (``python -m codi_jax.convert ... --controlnet=DIR``).
"""

import ml_collections

from codi_jax.configs.cpu import codi_sr4
from codi_jax.configs.paper import teacher_df2k256


def get_config() -> ml_collections.ConfigDict:
    config = codi_sr4.get_config()
    config.teacher_workdir = ""  # set: a converted SD-1.5 workdir (python -m codi_jax.convert)
    config.data = teacher_df2k256.get_config().data  # an image folder (DF2K_HR), random 512 crops
    config.data.image_size = 512  # pixels; the UNet sees the 64x64 latents
    # Recolouring is the CPU demo's remedy for its small teacher (docs/colour_augmentation.md), not
    # the paper's: a user's SD training images keep their colours (and edits require it).
    config.data.color_augment = 0.0
    # A folder's captions (metadata.jsonl column, or .txt sidecars) are the examples' prompts when
    # it has them (docs/configs.md); '' = always the fixed text.prompt.
    config.data.caption_key = "text"
    config.task.degradation = "realesrgan"
    config.adapter.kind = "controlnet"
    config.adapter.init_from = ""  # optional: a converted ControlNetModel (workdir/controlnet)
    config.adapter.hint_channels = (16, 32, 96, 256)  # diffusers' conditioning_embedding_out_channels
    config.adapter.hint_downsamples = 3  # 512 px condition -> 64 latent grid
    config.adapter.hint_zero_init = True  # diffusers' ControlNet initialisation
    config.adapter.hint_unit_range = True  # the condition enters the hint network in [0, 1], as in diffusers
    # drop_prob: the share of training examples whose caption becomes the empty prompt (CFG).
    config.text = ml_collections.ConfigDict({"prompt": "", "negative_prompt": "", "drop_prob": 0.0})
    config.latent = ml_collections.ConfigDict({"encode": "sample"})
    # The paper's choices in latent units: r = 1, one t per batch, DDIM-free PREv predictor.
    config.codi.guidance_weight = 1.0
    config.codi.shared_t = True
    config.codi.cfg_range = ()  # (w_min, w_max): CFG-aware distillation (text prompts only)
    config.model.dtype = "bfloat16"
    config.model.remat = True
    config.optimizer.learning_rate = 1e-5
    config.update(ema_decay=0.9999, ema_warmup=False, batch_size=64, num_train_steps=50_000)
    config.update(log_every_steps=100, checkpoint_every_steps=1000)
    config.update(sample_every_steps=2500, num_sample_images=8, sample_step_counts=(1, 2, 4))
    return config
