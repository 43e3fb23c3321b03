"""The ControlNet-style adapter of a DiT backbone, laid out as diffusers' ``SD3ControlNetModel``.

A trainable copy of the backbone's patch embedding, time embedding and first ``num_layers``
blocks (same parameter names, initialised from the backbone by ``adapters.init_from_backbone``)
reads ``(z_t, t)`` plus the condition's tokens: ``pos_embed_input``, a patch embedding of the
condition without positions, added after the copy's position embedding. Each copied block's
output goes through a zero-initialised linear ``controlnet_blocks_i``; the backbone adds residual
``i`` after its blocks by diffusers' interval rule (``dit.residual_index``). At initialisation
every residual is exactly 0, so the adapted model is the teacher.

diffusers zero-initialises ``pos_embed_input`` too (``zero_module``); with the zero linears after
the copy that starts the condition path on a plateau it leaves only once the linears have moved
(``hint_zero_init=False``: a random patch embedding instead, as the UNet's ``HintNetwork``).

With a joint-attention (SD3 MMDiT) backbone the copy has its ``context_embedder`` and pooled-text
projection too, and reads the backbone's ``context``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from codi_jax.models import layers
from codi_jax.models.conditioning import Conditioned, Conditioning
from codi_jax.models.dit import XAVIER_CONV, DiT, PatchEmbed

ZERO = nn.initializers.zeros


class DiTControlNet(Conditioned, DiT):
    """``(z_t, t, cond[, instruction]) -> {"block_residuals": [...]}`` for a ``DiT`` backbone.

    Inherits the backbone's architecture fields, so ``embed`` / ``blocks`` build the parameter
    tree they build in the backbone (``pos_embed``, ``time_text_embed``, ``transformer_blocks_i``).
    ``num_layers`` is the number of copied blocks (set by ``adapters.build_conditional_model``).
    """

    cond_channels: int = 3
    hint_zero_init: bool = True
    num_instructions: int = 0  # > 0: a learned instruction embedding added to the time embedding

    @nn.compact
    def conditioned(
        self, sample: jax.Array, timesteps: jax.Array, inputs: Conditioning, *, train: bool = False
    ) -> dict[str, list[jax.Array]]:
        """The residuals for ``(sample, timesteps, inputs)``; ``inputs.context`` as the backbone's (the
        joint model's ``SD3_CONTEXT_KEYS`` dict). With text, every copied block is a full ``JointBlock``
        (none ``context_pre_only``), as ``SD3ControlNetModel`` builds them."""
        del train
        self.check_input(sample)
        inputs.check(sample, "DiT adapter", channels=self.cond_channels, same_size=True)
        text, pooled = self.split_context(inputs.context, sample.shape[0])
        hint_embed = PatchEmbed(
            self.width,
            self.patch_size,
            self.dtype,
            positions=False,
            kernel_init=ZERO if self.hint_zero_init else XAVIER_CONV,
            name="pos_embed_input",
        )
        hint = hint_embed(inputs.cond.astype(jnp.float32))
        tokens, temb = self.embed(sample, timesteps, hint=hint, pooled=pooled)
        if self.num_instructions:
            temb = temb + layers.instruction_embedding(self.num_instructions, temb.shape[-1], inputs.instruction)
        if text is None:
            _, features = self.blocks(tokens, temb)
        else:
            _, features = self.joint_blocks(tokens, self.embed_text(text), temb, last_context_pre_only=False)
        dense = [nn.Dense(self.width, kernel_init=ZERO, name=f"controlnet_blocks_{i}") for i in range(len(features))]
        return {"block_residuals": [layer(f) for layer, f in zip(dense, features)]}
