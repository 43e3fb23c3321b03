"""The non-distilled conditional baseline for x4 SR: the same adapted model as ``codi_sr4`` trained
with the plain diffusion loss (the paper's "ControlNet / LDM" rows), sampled with DDIM."""

import ml_collections

from codi_jax.configs.cpu import codi_sr4


def get_config() -> ml_collections.ConfigDict:
    config = codi_sr4.get_config()
    config.method = "finetune"
    config.sample_step_counts = (4, 50)
    return config
