"""A tiny teacher for tests and smoke runs: seconds per step on one CPU core."""

import ml_collections

from codi_jax.configs.cpu import teacher_patches32


def shrink_run(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The tiny teachers' run: 16 px, batch 8, 6 steps, logs / checkpoints / samples within them."""
    config.data.image_size = 16
    config.batch_size = 8
    config.num_train_steps = 6
    config.optimizer.warmup_steps = 0
    config.update(log_every_steps=2, checkpoint_every_steps=3)
    config.update(sample_every_steps=6, sample_steps=4, num_sample_images=4)
    return config


def get_config():
    config = teacher_patches32.get_config()
    config.model.block_out_channels = (16, 32)
    config.model.layers_per_block = 1
    config.model.attention_levels = (False, True)
    config.model.attention_head_dim = 16
    config.model.norm_num_groups = 8
    return shrink_run(config)
