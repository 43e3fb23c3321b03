"""Paper scale: CoDi real-world x4 SR on DF2K with the second-order Real-ESRGAN degradation.

Starts from a teacher trained with ``codi_jax/configs/paper/teacher_df2k256.py`` (set ``teacher_workdir``).
Batch, lr and EMA decay follow large-scale consistency distillation practice (EMA 0.9999, small
constant lr); the 1/2/4-step samples are logged every ``sample_every_steps``.

  python -m codi_jax.train --config=codi_jax/configs/paper/codi_sr4_df2k.py --workdir=$WORKDIR \\
      --config.teacher_workdir=$TEACHER --config.data.folder=/data/DF2K_HR
"""

import ml_collections

from codi_jax.configs.cpu import codi_sr4
from codi_jax.configs.paper import teacher_df2k256


def get_config() -> ml_collections.ConfigDict:
    config = codi_sr4.get_config()
    config.teacher_workdir = ""  # set: a teacher_df2k256 workdir
    config.data = teacher_df2k256.get_config().data
    config.task.degradation = "realesrgan"
    config.adapter.hint_channels = (32, 64, 128)
    config.optimizer.learning_rate = 5e-5
    config.update(ema_decay=0.9999, ema_warmup=False, batch_size=128, num_train_steps=100_000)
    config.update(log_every_steps=100, checkpoint_every_steps=2500)
    config.update(sample_every_steps=5000, sample_step_counts=(1, 2, 4))
    return config
