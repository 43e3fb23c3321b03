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

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from codi_jax.models import layers
from codi_jax.models.dit import XAVIER_CONV, DiT, Patchify

ZERO = nn.initializers.zeros


class DiTControlNet(DiT):
    """``(z_t, t, cond[, instruction]) -> {"block_residuals": [...]}`` for a ``DiT`` backbone.

    Inherits the backbone's architecture fields, so ``embed`` / ``blocks`` build the parameter
    tree they build in the backbone (``pos_embed``, ``time_text_embed``, ``transformer_blocks_i``).
    ``num_layers`` is the number of copied blocks (set by ``adapters.build_conditional_model``).
    """

    cond_channels: int = 3
    hint_zero_init: bool = True
    num_instructions: int = 0  # > 0: a learned instruction embedding added to the time embedding

    def _check_condition(self, sample: jax.Array, cond: jax.Array) -> None:
        if cond.shape[:3] != sample.shape[:3] or cond.shape[-1] != self.cond_channels:
            raise ValueError(
                f"Condition of shape {cond.shape} does not fit the DiT adapter: expected batch and size "
                f"{sample.shape[:3]} and {self.cond_channels} channels."
            )

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        cond: jax.Array,
        instruction: jax.Array | None = None,
        context: Mapping[str, jax.Array] | None = None,
        *,
        train: bool = False,
    ) -> dict[str, list[jax.Array]]:
        """The residuals for ``(sample, timesteps, cond)``; ``context`` as the backbone's (the joint
        model's ``SD3_CONTEXT_KEYS`` dict). With text, every copied block is a full ``JointBlock``
        (none ``context_pre_only``), as ``SD3ControlNetModel`` builds them."""
        del train
        self.check_input(sample)
        self._check_condition(sample, cond)
        text, pooled = self.split_context(context, sample.shape[0])
        hint = HintEmbed(self.width, self.patch_size, self.dtype, self.hint_zero_init, name="pos_embed_input")(cond)
        tokens, temb = self.embed(sample, timesteps, hint=hint, pooled=pooled)
        if self.num_instructions:
            temb = temb + layers.instruction_embedding(self.num_instructions, temb.shape[-1], instruction)
        if text is None:
            _, features = self.blocks(tokens, temb)
        else:
            _, features = self.joint_blocks(tokens, self.embed_text(text), temb, last_context_pre_only=False)
        dense = [nn.Dense(self.width, kernel_init=ZERO, name=f"controlnet_blocks_{i}") for i in range(len(features))]
        return {"block_residuals": [layer(f) for layer, f in zip(dense, features)]}


class HintEmbed(nn.Module):
    """diffusers' ``pos_embed_input``: a ``PatchEmbed`` without positions (``proj`` only) of the condition."""

    features: int
    patch_size: int
    dtype: Any = jnp.float32
    zero_init: bool = True

    @nn.compact
    def __call__(self, cond: jax.Array) -> jax.Array:
        init = ZERO if self.zero_init else XAVIER_CONV
        return Patchify(self.features, self.patch_size, self.dtype, kernel_init=init, name="proj")(
            cond.astype(jnp.float32)
        )
