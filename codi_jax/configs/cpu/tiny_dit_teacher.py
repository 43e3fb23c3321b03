"""A tiny flow-matching DiT teacher for tests and smoke runs: seconds per step on one CPU core."""

from codi_jax.configs.cpu import dit_teacher_patches32


def get_config():
    config = dit_teacher_patches32.get_config()
    config.model.patch_size = 2
    config.model.num_layers = 2
    config.model.num_attention_heads = 2
    config.model.attention_head_dim = 8
    config.model.time_embed_channels = 32
    config.data.image_size = 16
    config.batch_size = 8
    config.num_train_steps = 6
    config.optimizer.warmup_steps = 0
    config.update(log_every_steps=2, checkpoint_every_steps=3)
    config.update(sample_every_steps=6, sample_steps=4, num_sample_images=4)
    return config
