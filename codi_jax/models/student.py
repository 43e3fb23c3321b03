"""The adapted (conditional) model as training and sampling see it.

Its parameter tree is ``{"backbone", "adapter"}`` plus ``"lora"`` (LoRA factors, when
``adapter.lora_rank > 0``) and ``"initial"`` (a frozen copy of the initial adapted model, only for
the frozen-teacher predictor: the pre-trained backbone with its zero-output adapter, i.e. the
unconditional model, or a fine-tuned conditional model for two-stage consistency distillation).
Which sub-trees train is data (``is_trained``); ``split`` separates the trained sub-trees (the
train state's ``params``: differentiated, in Adam, EMA'd) from the frozen ones (its ``frozen``:
held once). When the backbone is frozen, ``initial`` holds no second copy of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from codi_jax.models import adapters, lora
from codi_jax.models.dit import DiT
from codi_jax.models.unet import UNet


@dataclasses.dataclass(frozen=True)
class AdaptedModel:
    module: adapters.ConditionalModel
    train_backbone: bool
    lora_rank: int = 0
    lora_scale: float = 1.0
    lora_targets: str = ""
    keep_initial: bool = False  # store the initial model frozen beside the trained one

    @property
    def backbone(self) -> UNet:
        return self.module.backbone

    @property
    def takes_guidance_scale(self) -> bool:
        """Whether the student reads the CFG scale w (CFG-aware distillation)."""
        return bool(getattr(self.module.adapter, "guidance_embedding", False))

    def init(
        self,
        rng: jax.Array,
        backbone_params: Any,
        cond: jax.Array,
        instruction: jax.Array | None,
        *,
        sample_shape: tuple[int, ...] | None = None,
        context: jax.Array | None = None,
        guidance_scale: jax.Array | None = None,
        adapter_params: dict | None = None,
    ) -> dict:
        """Fresh adapter (and LoRA) parameters around the pre-trained ``backbone_params``;
        ``sample_shape`` defaults to the condition's spatial size (pixel-space backbones).
        ``adapter_params`` (a converted public ControlNet) replace the adapter's sub-trees they name."""
        rng_module, rng_lora = jax.random.split(rng)
        sample = jnp.zeros(sample_shape or cond.shape[:-1] + (self.backbone.in_channels,), jnp.float32)
        time = jnp.zeros(cond.shape[:1])
        params = self.module.init(rng_module, sample, time, cond, instruction, context, guidance_scale=guidance_scale)
        params = params["params"]
        params = adapters.init_from_backbone(
            dict(params),
            backbone_params,
            copy_encoder=isinstance(self.module.adapter, (adapters.ControlNet, adapters.DiTControlNet)),
        )
        if adapter_params is not None:
            params["adapter"] = {**params["adapter"], **adapter_params}
        if self.lora_rank:
            params["lora"] = lora.init_lora(rng_lora, backbone_params, self.lora_targets, self.lora_rank)
        return self.with_initial(params)

    def with_initial(self, params: dict) -> dict:
        """``params`` plus, when ``keep_initial``, a frozen copy of them as the ``initial`` model
        (without the backbone when it is frozen: ``apply_initial`` then shares the one copy)."""
        params = {key: sub for key, sub in params.items() if key != "initial"}
        if self.keep_initial:
            copied = {key: sub for key, sub in params.items() if key != "backbone" or self.train_backbone}
            params["initial"] = jax.tree.map(jnp.copy, copied)
        return params

    def module_params(self, params: dict) -> dict:
        backbone = params["backbone"]
        if "lora" in params:
            backbone = lora.merge_lora(backbone, params["lora"], self.lora_scale)
        return {"backbone": backbone, "adapter": params["adapter"]}

    def apply(
        self,
        params: dict,
        z_t: jax.Array,
        model_t: jax.Array,
        cond: jax.Array,
        instruction: jax.Array | None = None,
        context: jax.Array | None = None,
        *,
        guidance_scale: jax.Array | None = None,
        train: bool = False,
        rngs: dict | None = None,
    ) -> jax.Array:
        """The network output; ``context`` is the text embedding sequence (text backbones),
        ``guidance_scale`` the student's w (CFG-aware distillation)."""
        return self.module.apply(
            {"params": self.module_params(params)},
            z_t,
            model_t,
            cond,
            instruction,
            context,
            guidance_scale=guidance_scale,
            train=train,
            rngs=rngs,
        )

    def apply_initial(self, params: dict, z_t: jax.Array, model_t: jax.Array, cond: jax.Array, *args, **kwargs):
        """The frozen initial model, for the ``teacher`` predictor (see the module docstring);
        further arguments as ``apply``."""
        if "initial" not in params:
            raise ValueError("apply_initial needs the 'initial' parameters (built with keep_initial=True).")
        initial = {"backbone": params["backbone"], **params["initial"]}
        return self.apply(initial, z_t, model_t, cond, *args, **kwargs)

    def is_trained(self, key: str) -> bool:
        """Whether the top-level sub-tree ``key`` trains."""
        return {"backbone": self.train_backbone, "adapter": True, "lora": True, "initial": False}[key]

    def split(self, params: dict) -> tuple[dict, dict]:
        """``(trained, frozen)``: the top-level sub-trees that train and those that never change."""
        trained = {key: sub for key, sub in params.items() if self.is_trained(key)}
        frozen = {key: sub for key, sub in params.items() if not self.is_trained(key)}
        return trained, frozen


def build_adapted_model(
    backbone: UNet | DiT,
    adapter_config: ml_collections.ConfigDict,
    cond_channels: int,
    num_instructions: int = 0,
    keep_initial: bool = False,
    guidance_embedding: bool = False,
) -> AdaptedModel:
    """``adapters.build_conditional_model`` of these fields with ``adapter_config``'s LoRA and trained
    parts; ``keep_initial`` keeps the initial model beside it."""
    rank = int(adapter_config.lora_rank)
    if rank and adapter_config.train_backbone:
        raise ValueError("adapter.lora_rank > 0 with adapter.train_backbone=True: LoRA is for a frozen backbone.")
    return AdaptedModel(
        module=adapters.build_conditional_model(
            backbone, adapter_config, cond_channels, num_instructions, guidance_embedding
        ),
        train_backbone=bool(adapter_config.train_backbone),
        lora_rank=rank,
        lora_scale=lora.lora_scale(rank, adapter_config.lora_alpha) if rank else 1.0,
        lora_targets=adapter_config.lora_targets,
        keep_initial=keep_initial,
    )


def count_params(tree: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def trainable_param_count(model: AdaptedModel, params: dict) -> int:
    return count_params(model.split(params)[0])
