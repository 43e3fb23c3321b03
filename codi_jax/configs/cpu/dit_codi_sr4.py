"""CoDi x4 super-resolution from the flow-matching DiT teacher (``dit_teacher_patches32``): the
DiT miniature of ``codi_sr4`` (same data, task, optimizer and CoDi choices), with the DiT's
ControlNet adapter (``codi_jax.models.dit_controlnet``: a copy of the teacher's first
``adapter.dit_blocks`` blocks and zero-initialised linear residuals, diffusers' ``SD3ControlNetModel``).

PE-CoDi: the backbone is frozen, as ``codi_sr4``; ``dit_codi_full_sr4`` trains it too. The loss
terms are CoDi's on the flow path (``docs/flow_matching.md``); the teacher's checkpoint supplies
``model`` and ``schedule``.
"""

import ml_collections

from codi_jax import configs
from codi_jax.configs.cpu import codi_sr4


def get_config() -> ml_collections.ConfigDict:
    config = codi_sr4.get_config()
    config.teacher_workdir = configs.committed_checkpoint("dit_teacher_patches32")
    config.adapter.dit_blocks = 4  # half of the teacher's 8 blocks
    # A random (not zero) condition patch embedding, as the UNet's hint conv (hint_zero_init).
    config.adapter.hint_zero_init = False
    # 3e-4, the teacher's rate, not codi_sr4's 1e-3: in a 300-step probe of full CoDi at batch 8 from
    # the teacher's step 4000, the logged loss over steps 250-300 was 0.063-0.064 at 3e-4 and
    # 0.079-0.080 at 1e-3 (docs/flow_matching.md).
    config.optimizer.learning_rate = 3e-4
    # The guidance term as r times the flow-matching loss (r / t^2 on x): at full weight near the data,
    # where PREv's consistency target is the student's own x_hat again; and Euler moves between sampling
    # steps, not re-noising (docs/flow_matching.md, "The student near the data").
    config.codi.guidance_schedule = "velocity"
    config.codi.renoise = False
    return config
