"""What the frozen encoders add to each batch of a latent, text-conditioned run.

A latent run (``config.latent.vae``) trains on the VAE's scaled latents of the data's images:
each training batch goes through the encoder on the fly, under ``stop_gradient`` (``encode_batch``:
inside the jitted train step with ``config.encode_in_step``, the default, else as a program of its
own before it), with the noise of the Gaussian sample drawn from the step's key (so a resumed run
sees the same latents). ``latent.encode="sample"`` (default) draws
``mean + std * noise`` as Stable Diffusion was trained (and as diffusers' training scripts do);
``"mean"`` takes the mean. The condition of a UNet run stays in pixel space: the ControlNet's hint
network downsamples it (``adapter.hint_downsamples``). A latent DiT run (SD3's ControlNet,
``latent_condition``) hands its adapter the condition through the frozen VAE instead, as diffusers'
``StableDiffusion3ControlNetPipeline`` does: ``condition_latents``, the one function training
(``encode_batch``) and every sampler (``encode_condition``) use.

Text: where the prompts a run uses are fixed by its config (``text.prompt``, or one per
instruction of the ``edit`` task: its ``EDIT_NAMES``), their CLIP embeddings are computed once
when the run starts and held as data (``FrozenData.contexts``); each batch gets its row
(``context``). Prompts of the data itself (``example_prompts``: the free-text instructions of
``edit_triples``, the captions of a folder or tfds dataset), tokenised in the input pipeline
(``prompt_ids`` per example), are encoded per batch by the frozen CLIP (``FrozenData.text_params``).
Every batch also gets the negative prompt's embedding (``uncond_context``, for CFG). Nothing here is
trained or checkpointed.

SDXL (a text_time UNet, ``encoders.is_sdxl``): the prompts go through both text encoders
(``codi_jax.frozen.sdxl_text``), so ``contexts`` / ``uncond_context`` are ``{"tokens", "text_embeds"}``
dicts with a row per prompt; a configured negative prompt "" is diffusers' ``None`` (zeros under the
pipeline's ``force_zeros_for_empty_prompt``). ``add_text`` completes the UNet's context with the
``time_ids``: the batch's ``micro_cond`` (SDXL's crop micro-conditioning, in training batches), else
what diffusers' pipeline uses at sampling, ``(H, W, 0, 0, H, W)`` of the condition's pixel size; the
unconditional context gets the same time ids. Per-example prompts (captions, free-text
instructions) are not encoded for SDXL yet (``check_sdxl_text`` refuses them).

SD3 (a joint-attention DiT backbone, ``encoders.is_sd3``): the prompts go through CLIP-L, CLIP-G and
T5 (``codi_jax.frozen.sd3_text``), so ``contexts`` / ``uncond_context`` are
``{"encoder_hidden_states", "pooled_projections"}`` dicts (the DiT's context as it is; no time ids);
the negative prompt, "" included, is encoded as diffusers' ``StableDiffusion3Pipeline`` does. Per-example
prompts are refused for SD3 as for SDXL.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from codi_jax.data import captions, task_spec
from codi_jax.frozen import encoders, sd3_text, sdxl_text


@dataclasses.dataclass
class FrozenData:
    """Arrays the batches need from the frozen models (a pytree: pass it to jitted functions)."""

    vae_params: Any  # None for pixel runs
    contexts: Any  # (P, L, D): one row per prompt (P = 1, or one per instruction); SDXL: a dict of rows
    uncond_context: Any  # (1, L, D): the negative prompt; SDXL: a dict
    text_params: Any = None  # the CLIP text encoder's, for per-example prompts (``prompt_ids``)


jax.tree_util.register_dataclass(
    FrozenData, data_fields=["vae_params", "contexts", "uncond_context", "text_params"], meta_fields=[]
)


def prompts_of(config: ml_collections.ConfigDict) -> list[str]:
    """The prompts of a run: one per instruction (``edit``: its edit names), else ``text.prompt``."""
    names = task_spec.instruction_names(config.task)
    return [name.replace("_", " ") for name in names] if names else [str(config.text.get("prompt", ""))]


def backbone_text_width(model_config: Any) -> int | None:
    """The width of the text tokens a backbone config reads: a UNet's ``cross_attention_dim``, a joint
    DiT's ``joint_attention_dim``; None for a backbone without text."""
    for field in ("cross_attention_dim", "joint_attention_dim"):
        if model_config.get(field) is not None:
            return int(model_config.get(field))
    return None


def has_text(config: ml_collections.ConfigDict) -> bool:
    """Whether the run's backbone reads a text context (a text encoder and cross- / joint attention)."""
    return encoders.has_text(config) and backbone_text_width(config.model) is not None


def example_prompts(config: ml_collections.ConfigDict) -> bool:
    """Whether each example brings its own prompt (``prompt_ids``): a text run on ``edit_triples``
    (``task.instructions='text'``) or on captioned data (``captions.has_captions``), unless its task
    names the prompts (the ``edit`` task's instruction ids)."""
    if not has_text(config):
        return False
    if task_spec.text_instructions(config.task):
        return True
    return not task_spec.num_instructions(config.task) and captions.has_captions(config.data)


def check_sdxl_text(config: ml_collections.ConfigDict) -> None:
    """SDXL / SD3 runs take the config's prompts only (per-example prompts need all tokenizers: to come)."""
    several = encoders.is_sdxl(config) or encoders.is_sd3(config)
    if has_text(config) and several and example_prompts(config):
        where = "task.instructions='text'" if task_spec.text_instructions(config.task) else "data.caption_key"
        name = "SD3" if encoders.is_sd3(config) else "SDXL"
        raise ValueError(
            f"{where}: per-example prompts (captions, free-text instructions) are not supported for {name} teachers "
            "yet; set data.caption_key='' to train on the fixed text.prompt."
        )


def _sdxl_contexts(enc: encoders.Encoders, config: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """(prompt rows, negative) ``{"tokens", "text_embeds"}`` dicts; a negative prompt "" is None."""
    contexts = sdxl_text.encode_sdxl_prompts(enc.sdxl, prompts_of(config))
    return contexts, sdxl_text.encode_sdxl_negative(enc.sdxl, config.text.negative_prompt or None, 1)


def _sd3_contexts(enc: encoders.Encoders, config: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """(prompt rows, negative) ``{"encoder_hidden_states", "pooled_projections"}`` dicts (SD3 encodes
    the negative prompt, "" included)."""
    contexts = sd3_text.encode_sd3_prompts(enc.sd3, prompts_of(config))
    return contexts, sd3_text.encode_sd3_prompts(enc.sd3, [str(config.text.get("negative_prompt", ""))])


def load(config: ml_collections.ConfigDict) -> tuple[encoders.Encoders, FrozenData]:
    """The run's encoders and the data they give once per run (prompt embeddings computed here)."""
    check_sdxl_text(config)
    enc = encoders.load_encoders(config)
    contexts = uncond = text_params = None
    if has_text(config) and enc.sd3 is not None:
        contexts, uncond = _sd3_contexts(enc, config)
    elif has_text(config) and enc.sdxl is not None:
        contexts, uncond = _sdxl_contexts(enc, config)
    elif has_text(config):
        contexts = encoders.encode_prompts(enc, prompts_of(config))
        uncond = encoders.encode_prompts(enc, [str(config.text.get("negative_prompt", ""))])
        text_params = enc.text_params if example_prompts(config) else None
    return enc, FrozenData(enc.vae_params if enc.vae is not None else None, contexts, uncond, text_params)


def tokenizer_of(config: ml_collections.ConfigDict, enc: encoders.Encoders) -> Callable | None:
    """``text -> token ids`` for data with prompts of its own (``example_prompts``), else None."""
    if not example_prompts(config):
        return None
    return lambda text: encoders.tokenize(enc, [text])[0]


def _rows(rows: jax.Array, batch: dict[str, jax.Array], n: int) -> jax.Array:
    """Each example's row of ``rows`` (P, ...): its instruction's, or the one prompt's."""
    if rows.shape[0] > 1:
        return rows[batch["instruction"].astype(jnp.int32)]
    return jnp.broadcast_to(rows, (n,) + rows.shape[1:])


def pipeline_time_ids(n: int, height: int, width: int) -> jax.Array:
    """``(H, W, 0, 0, H, W)`` for ``n`` examples (n, 6): diffusers' SDXL pipelines' default time ids
    (original = target size = the image's, no crop), for the negative prompt too."""
    return jnp.broadcast_to(jnp.array([height, width, 0, 0, height, width], jnp.float32), (n, 6))


def sdxl_time_ids(batch: dict[str, jax.Array]) -> jax.Array:
    """SDXL's time ids (B, 6): the batch's ``micro_cond``, else ``pipeline_time_ids`` of the condition."""
    if "micro_cond" in batch:
        return batch["micro_cond"].astype(jnp.float32)
    n, height, width = batch["cond"].shape[:3]
    return pipeline_time_ids(n, height, width)


def add_text(data: FrozenData, batch: dict[str, jax.Array], text_model: Any = None) -> dict[str, jax.Array]:
    """``batch`` plus its ``context``: the example's own prompt (``prompt_ids``, encoded with
    ``text_model``), its instruction's row, or the run's one prompt; and ``uncond_context``
    (SDXL: both completed with ``sdxl_time_ids``)."""
    if data.contexts is None:
        return batch
    n = batch["cond"].shape[0]
    if "prompt_ids" in batch:
        context = encoders.text_embeddings(text_model, data.text_params, batch["prompt_ids"])
    else:
        context = jax.tree.map(lambda rows: _rows(rows, batch, n), data.contexts)
    uncond = jax.tree.map(lambda row: jnp.broadcast_to(row, (n,) + row.shape[1:]), data.uncond_context)
    if isinstance(data.contexts, dict) and "tokens" in data.contexts:  # SDXL (SD3's dict has no time ids)
        time_ids = sdxl_time_ids(batch)
        context, uncond = {**context, "time_ids": time_ids}, {**uncond, "time_ids": time_ids}
    return {**batch, "context": context, "uncond_context": uncond}


def latent_condition(config: ml_collections.ConfigDict) -> bool:
    """Whether the run's adapter reads the condition as VAE latents: a latent run on a DiT backbone,
    whose ControlNet (``SD3ControlNetModel``) patch-embeds the VAE-encoded control image."""
    return bool(encoders.vae_path(config)) and config.model.get("kind", "unet") == "dit"


def check_latent_condition(config: ml_collections.ConfigDict) -> None:
    """A latent DiT run's condition must be an image the VAE encodes: 3 channels, or 1 (repeated)."""
    if latent_condition(config) and task_spec.cond_channels(config.task) not in (1, 3):
        raise ValueError(
            f"task.name={config.task.name!r}: a latent DiT ControlNet reads its condition through the VAE, "
            f"which takes 1- or 3-channel images, not {task_spec.cond_channels(config.task)}."
        )


def condition_latents(vae: Any, vae_params: Any, cond: jax.Array) -> jax.Array:
    """The control image (NHWC in [-1, 1]; 1 channel repeated to RGB) as a DiT ControlNet reads it:
    ``(mean - shift_factor) * scaling_factor`` of the VAE posterior, under ``stop_gradient``.

    diffusers' ``StableDiffusion3ControlNetPipeline`` draws ``latent_dist.sample()`` from torch's
    global generator (its ``generator`` does not reach it); the posterior mean is that draw without
    its noise, deterministic, and the same in training and sampling. The shift is the VAE's: the
    pipeline's choice for a ControlNet with ``force_zeros_for_pooled_projection=False``, which reads
    the pooled prompt as our adapter does (exports write that flag)."""
    images = jnp.repeat(cond, 3, axis=-1) if cond.shape[-1] == 1 else cond
    return jax.lax.stop_gradient(vae.latents_from_images(vae_params, images.astype(jnp.float32)))


def encode_condition(data: FrozenData, cond: jax.Array, *, vae: Any) -> jax.Array:
    """The condition the adapter reads: ``condition_latents`` for a latent DiT run (``vae`` given),
    else ``cond`` itself (``vae`` None: pixel runs and UNet ControlNets, whose hint network reads pixels)."""
    return cond if vae is None else condition_latents(vae, data.vae_params, cond)


def condition_encoder(config: ml_collections.ConfigDict, enc: encoders.Encoders) -> Callable:
    """``(data, cond) -> cond`` as the adapter reads it (``encode_condition`` bound, jitted): what every
    sampler applies to the pixel condition before sampling."""
    vae = enc.vae if latent_condition(config) else None
    return jax.jit(functools.partial(encode_condition, vae=vae))


def encode_batch(
    data: FrozenData,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    vae: Any,
    mode: str,
    text_model: Any = None,
    cond_vae: Any = None,
) -> dict[str, jax.Array]:
    """The batch the backbone trains on: images -> scaled latents (latent runs), the condition through
    ``encode_condition`` (``cond_vae``: a latent DiT run's VAE, else None), plus text."""
    out = dict(batch)
    if vae is not None:
        latents = encoders.encode_images(vae, data.vae_params, batch["image"], rng, mode)
        out["image"] = jax.lax.stop_gradient(latents)
    if cond_vae is not None and "cond" in batch:
        out["cond"] = encode_condition(data, batch["cond"], vae=cond_vae)
    return add_text(data, out, text_model)


def batch_encoder(config: ml_collections.ConfigDict, enc: encoders.Encoders) -> Callable | None:
    """``encode_batch`` with its modules bound, or None when a run needs nothing added."""
    if enc.vae is None and not has_text(config):
        return None
    cond_vae = enc.vae if latent_condition(config) else None
    return functools.partial(
        encode_batch, vae=enc.vae, mode=enc.encode_mode, text_model=enc.text_model, cond_vae=cond_vae
    )


is_latent = encoders.is_latent
is_sdxl = encoders.is_sdxl
