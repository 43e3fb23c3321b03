"""Unconditional teacher on 32x32 patches of scikit-image's bundled photographs (CPU scale).

This config trains the committed default teacher (see README). 1.6M-parameter UNet,
v-prediction, cosine schedule.
"""

import ml_collections

from codi_jax import sharding
from codi_jax.data import sources
from codi_jax.training import train_state


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_devices = 0  # 0 = all visible devices

    config.model = ml_collections.ConfigDict(
        dict(
            kind="unet",  # the backbone: 'unet' | 'dit' (codi_jax/configs/cpu/dit_teacher_patches32.py)
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            attention_levels=(False, False, True),
            mid_attention=True,
            attention_head_dim=32,
            norm_num_groups=32,
            dropout=0.0,
            dtype="float32",
            remat=False,
            conv_impl="auto",
            parametrization="v",
        )
    )
    config.schedule = ml_collections.ConfigDict(dict(kind="cosine"))

    config.data = sources.default_data_config()  # 32 px patches of skimage's photographs, flipped
    config.data.caption_key = ""  # no captions (no text encoder)
    # Share of training examples recoloured (grey / hue / saturation), condition and target alike:
    # the committed checkpoints/teacher_patches32_color was continued with 0.5 from step 3,500 to
    # 5,000 (docs/colour_augmentation.md); the colours the models invent on new photographs dropped
    # (colour error 14.8 -> 10.6 on the generalisation set).
    config.data.color_augment = 0.5

    # decay: 'constant' after the warm-up, or 'cosine' to 0 at decay_steps (0: num_train_steps).
    config.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=3e-4,
            warmup_steps=200,
            decay="constant",
            decay_steps=0,
            b1=0.9,
            b2=0.99,
            eps=1e-8,
            weight_decay=0.0,
            grad_clip_norm=1.0,
        )
    )
    # ema_warmup: decay min(0.999, (1+step)/(10+step)): early samples not tied to the init
    config.update(ema_decay=0.999, ema_warmup=True, batch_size=32, num_train_steps=100_000)

    config.update(log_every_steps=50, checkpoint_every_steps=250, keep_checkpoints=2)
    # A resumed run refuses changes to the fields that fix the model, the data stream, the objective
    # and the optimizer (runs/checkpoint.RESUME_FIELDS); name deliberate ones: "batch_size,data.color_augment".
    config.allow_resume_changes = ""
    config.update(sample_every_steps=1000, sample_steps=50, num_sample_images=64)
    # Mesh (data x fsdp) and sharding rules: ((regex over the param path, spec), ...), spec a
    # PartitionSpec tuple or "fsdp" (split big leaves along fsdp); see codi_jax.sharding.
    config.sharding = sharding.default_sharding_config()
    # Update rejection (non-finite or parameter-norm jump) and when the run gives up; see
    # codi_jax.training.train_state.default_update_policy.
    config.nonfinite = train_state.default_update_policy()
    return config
