"""What a conditional module reads besides ``(z_t, t)``, as one record, and the call that takes it.

``Conditioned`` modules (``adapters.ConditionalModel`` and its adapters: ``adapters.ControlNet``,
``adapters.T2IAdapter``, ``dit_controlnet.DiTControlNet``) are applied as ``(sample, timesteps, cond,
instruction=None, context=None, *, guidance_scale=None, train=False)``; ``__call__`` gathers the
conditioning inputs into a ``Conditioning`` and hands it to the subclass's compact ``conditioned``.
``ConditionalModel`` passes the record on to its adapter's ``conditioned`` as it is.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax


class Conditioning(NamedTuple):
    """The conditioning inputs."""

    cond: jax.Array  # (batch, height, width, channels): the condition image (or its latent)
    instruction: jax.Array | None = None  # (batch,) instruction ids, for adapters built with num_instructions
    context: Any = None  # the backbone's context: text embeddings, or a dict (SDXL's, SD3's)
    guidance_scale: jax.Array | None = None  # the CFG scale w, for adapters built with a guidance embedding

    def check(
        self,
        sample: jax.Array,
        adapter: str,
        *,
        channels: int | None = None,
        same_size: bool = False,
        takes_guidance_scale: bool = False,
    ) -> None:
        """Raises unless ``cond`` has ``sample``'s batch (with ``same_size`` its height and width too)
        and ``channels`` channels (any where None), or where a ``guidance_scale`` is given to an
        ``adapter`` that does not take one; ``adapter`` names it in the message."""
        expected = tuple(sample.shape[:3] if same_size else sample.shape[:1])
        if self.cond.shape[: len(expected)] != expected or channels not in (None, self.cond.shape[-1]):
            size = "batch and size" if same_size else "batch"
            in_channels = "" if channels is None else f" and {channels} channels"
            raise ValueError(
                f"Condition of shape {self.cond.shape} does not fit the {adapter}: expected {size} {expected}"
                f"{in_channels}."
            )
        if self.guidance_scale is not None and not takes_guidance_scale:
            raise ValueError(f"The {adapter} takes no guidance scale (codi.cfg needs a UNet's ControlNet).")


class Conditioned(nn.Module):
    """A module applied to ``(sample, timesteps)`` and the conditioning inputs (see the module docstring)."""

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        cond: jax.Array,
        instruction: jax.Array | None = None,
        context: Any = None,
        *,
        guidance_scale: jax.Array | None = None,
        train: bool = False,
    ) -> Any:
        inputs = Conditioning(cond, instruction, context, guidance_scale)
        return self.conditioned(sample, timesteps, inputs, train=train)

    def conditioned(self, sample: jax.Array, timesteps: jax.Array, inputs: Conditioning, *, train: bool = False) -> Any:
        """The output for ``(sample, timesteps, inputs)``; subclasses implement it (``nn.compact``)."""
        raise NotImplementedError
