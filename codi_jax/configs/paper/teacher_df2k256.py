"""Paper scale: an unconditional pixel-space teacher on 256x256 random crops of DF2K (DIV2K +
Flickr2K high-resolution images in one local folder), the backbone for ``codi_sr4_df2k``.

The paper distils Stable Diffusion in latent space; this codebase has no VAE yet, so the
paper-scale SR run is pixel space with a teacher trained here (or converted from a diffusers
``UNet2DModel`` with ``codi_jax.interop.torch_to_flax``). Meant for a GPU/TPU pod:

  python -m codi_jax.train --config=codi_jax/configs/paper/teacher_df2k256.py --workdir=$WORKDIR \\
      --config.data.folder=/data/DF2K_HR
"""

import ml_collections

from codi_jax.configs.cpu import teacher_patches32


def get_config() -> ml_collections.ConfigDict:
    config = teacher_patches32.get_config()
    config.model.block_out_channels = (128, 128, 256, 256, 512, 512)
    config.model.attention_levels = (False, False, False, False, True, True)  # 16x16 and 8x8
    config.model.attention_head_dim = 64
    config.model.dropout = 0.1
    config.model.dtype = "bfloat16"
    config.model.remat = True
    config.data.source = "folder"
    config.data.folder = ""  # set: --config.data.folder=/path/to/DF2K_HR
    config.data.image_size = 256
    config.data.random_crop = True  # crops at native resolution, as SR training does
    config.data.eval_split = "test"
    config.optimizer.learning_rate = 1e-4
    config.optimizer.warmup_steps = 5000
    # batch_size: global; sharded over the mesh's data axis
    config.update(ema_decay=0.9999, batch_size=256, num_train_steps=500_000)
    config.update(log_every_steps=100, checkpoint_every_steps=5000)
    config.update(sample_every_steps=10_000, num_sample_images=16)
    return config
