"""Full CoDi x4 super-resolution (the demo's default): ``codi_jax/configs/cpu/codi_sr4.py`` with the backbone
trained too (the paper's CoDi; ``codi_sr4`` is PE-CoDi, adapter only), at batch 8.

Measured here (128 held-out patches, 800 steps, batch 16; ``docs/results.md``): 4-step PSNR 24.2 dB
with DDIM moves, 24.6 with re-noising, against 22.7 / 23.4 for PE-CoDi; each step costs ~1.3x
PE-CoDi's. Batch 8 (``docs/smoothness.md``, 64 held-out patches, 3 seeds, 2-core AMD EPYC host):
a step takes 0.53x batch 16's, and in the same training time the student gets further: 2,800 steps
at batch 8 (about the time of 1,500 at batch 16) score 26.14 dB / SWD 98.3 / LPIPS 0.214 at 4 steps,
1,500 at batch 16 26.03 / 100.1 / 0.218, and at 1 step 0.230 against 0.243 LPIPS.
"""

import ml_collections

from codi_jax.configs.cpu import codi_sr4


def get_config() -> ml_collections.ConfigDict:
    config = codi_sr4.get_config()
    config.adapter.train_backbone = True
    config.batch_size = 8
    return config
