"""Paper scale: CoDi inpainting (free-form + box masks) on ImageNet at 64x64.

ImageNet comes through tfds (``imagenet2012``, prepared locally: tfds cannot download it). The
teacher is an unconditional ImageNet-64 model trained here (``codi_jax/configs/cpu/teacher_patches32.py`` with
the data and model overridden, or a converted diffusers ``UNet2DModel``); set ``teacher_workdir``.

  python -m codi_jax.train --config=codi_jax/configs/paper/codi_inpaint_imagenet.py --workdir=$WORKDIR \\
      --config.teacher_workdir=$TEACHER --config.data.data_dir=/data/tfds
"""

import ml_collections

from codi_jax.configs.cpu import codi_inpaint


def get_config() -> ml_collections.ConfigDict:
    config = codi_inpaint.get_config()
    config.teacher_workdir = ""  # set: an ImageNet-64 teacher workdir
    config.data.source = "tfds"
    config.data.tfds_name = "imagenet2012"
    config.data.image_size = 64
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.random_crop = False  # resize the short side, centre crop
    config.adapter.hint_channels = (32, 64)
    config.optimizer.learning_rate = 5e-5
    config.update(ema_decay=0.9999, ema_warmup=False, batch_size=256, num_train_steps=200_000)
    config.update(log_every_steps=100, checkpoint_every_steps=2500)
    config.update(sample_every_steps=5000)
    return config
