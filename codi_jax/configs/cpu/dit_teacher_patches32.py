"""Flow-matching DiT teacher on 32x32 patches of scikit-image's bundled photographs (CPU scale).

The DiT miniature of issue 29 beside the committed UNet teacher (``teacher_patches32``, whose data,
optimizer, EMA and run settings it keeps): a 9.8M-parameter DiT (4x4 patches: an 8x8 token grid,
width 256, 4 heads, 8 adaLN-zero blocks; ``codi_jax.models.dit``) trained with flow matching
(``codi_jax.flow_matching``): velocity prediction on ``x_t = (1 - t) x_0 + t eps``, SD3's
logit-normal training times, no time shift at 32 px (shift 1.0), Euler sample grids. Its train
step costs about the UNet teacher's on this CPU; sizes and step times: ``docs/flow_matching.md``.
"""

import ml_collections

from codi_jax.configs.cpu import teacher_patches32


def get_config() -> ml_collections.ConfigDict:
    config = teacher_patches32.get_config()
    config.model = ml_collections.ConfigDict(
        dict(
            kind="dit",
            in_channels=3,
            out_channels=3,
            patch_size=4,  # 2x2 patches (256 tokens) cost 2.6x the UNet's step on the CPU
            num_layers=8,
            num_attention_heads=4,
            attention_head_dim=64,
            mlp_ratio=4.0,
            time_embed_channels=256,
            dtype="float32",
            remat=False,
            attention_impl="dot_product",
            remat_policy="full",
            parametrization="v",  # the flow velocity eps - x_0
        )
    )
    # shift: SD3's time shift (1.0: none; SD3 uses 3.0 at 1024 px); time_sampling: 'logit_normal'
    # (SD3's, sigmoid of N(logit_mean, logit_std^2)) | 'uniform'.
    config.schedule = ml_collections.ConfigDict(
        dict(kind="flow", shift=1.0, time_sampling="logit_normal", logit_mean=0.0, logit_std=1.0)
    )
    return config
