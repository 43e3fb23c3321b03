"""Stable Diffusion 3 / 3.5: PE-CoDi depth-to-image (``sd3_sr4``'s sections with ``sd15_depth``'s task
and data). Fill in the local paths as in ``sd3_sr4``; the one-channel depth map is repeated to RGB
before the VAE encodes it (``batch_inputs.condition_latents``: docs/flow_matching.md)."""

import ml_collections

from codi_jax.configs.sd import sd3_sr4, sd15_depth


def get_config() -> ml_collections.ConfigDict:
    return sd15_depth.as_depth(sd3_sr4.get_config())
