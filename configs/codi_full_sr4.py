"""Full CoDi x4 super-resolution (the demo's default): ``configs/codi_sr4.py`` with the backbone
trained too (the paper's CoDi; ``codi_sr4`` is PE-CoDi, adapter only).

Measured here (128 held-out patches, 800 steps; ``docs/results.md``): 4-step PSNR 24.2 dB with DDIM
moves, 24.6 with re-noising, against 22.7 / 23.4 for PE-CoDi; each step costs ~1.3x PE-CoDi's.
"""

import ml_collections

from configs import codi_sr4


def get_config() -> ml_collections.ConfigDict:
    config = codi_sr4.get_config()
    config.adapter.train_backbone = True
    return config
