"""The paper's two-stage CM-II baseline for x4 SR: start from the fine-tuned conditional model
(``checkpoints/finetune_sr4``, made with ``configs/finetune_sr4.py``) and distil it with plain
consistency distillation: a DDIM step of that frozen model is the predictor, the EMA target gives
the noise-space consistency target, and there is no conditional guidance term (r = 0)."""

import ml_collections

from configs import codi_sr4


def get_config() -> ml_collections.ConfigDict:
    config = codi_sr4.get_config()
    config.init_workdir = "checkpoints/finetune_sr4"
    config.codi.predictor = "teacher"  # the frozen initial model = the fine-tuned conditional model
    config.codi.guidance_weight = 0.0
    config.adapter.hint_zero_init = True  # as checkpoints/finetune_sr4 was made (its init is overwritten anyway)
    return config
