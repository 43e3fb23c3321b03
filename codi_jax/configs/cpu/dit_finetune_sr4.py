"""The non-distilled conditional baseline of the DiT miniature: ``dit_codi_sr4``'s adapted model
trained with the plain flow-matching loss (the velocity ``eps - x_0``), sampled with Euler."""

import ml_collections

from codi_jax.configs.cpu import dit_codi_sr4


def get_config() -> ml_collections.ConfigDict:
    config = dit_codi_sr4.get_config()
    config.method = "finetune"
    config.sample_step_counts = (4, 50)
    return config
