"""A tiny CoDi run for tests and smoke runs: 16x16, x2 SR, from a tiny teacher workdir
(set ``teacher_workdir``)."""

import ml_collections

from codi_jax.configs.cpu import codi_sr4, tiny_teacher


def get_config() -> ml_collections.ConfigDict:
    config = codi_sr4.get_config()
    teacher = tiny_teacher.get_config()
    config.data = teacher.data
    config.teacher_workdir = ""
    config.task.scale = 2
    config.adapter.hint_channels = (8, 16)
    config.update(batch_size=8, num_train_steps=4)
    config.update(log_every_steps=2, checkpoint_every_steps=2)
    config.update(sample_every_steps=4, num_sample_images=4, sample_step_counts=(1, 2))
    return config
