"""A tiny flow-matching DiT teacher for tests and smoke runs: seconds per step on one CPU core."""

from codi_jax.configs.cpu import dit_teacher_patches32, tiny_teacher


def get_config():
    config = dit_teacher_patches32.get_config()
    config.model.patch_size = 2
    config.model.num_layers = 2
    config.model.num_attention_heads = 2
    config.model.attention_head_dim = 8
    config.model.time_embed_channels = 32
    return tiny_teacher.shrink_run(config)
