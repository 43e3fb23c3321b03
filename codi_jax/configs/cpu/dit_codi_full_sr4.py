"""Full CoDi x4 super-resolution from the flow-matching DiT teacher: ``dit_codi_sr4`` with the
backbone trained too, at batch 8 (as ``codi_full_sr4`` is to ``codi_sr4``)."""

import ml_collections

from codi_jax.configs.cpu import dit_codi_sr4


def get_config() -> ml_collections.ConfigDict:
    config = dit_codi_sr4.get_config()
    config.adapter.train_backbone = True
    config.batch_size = 8
    return config
