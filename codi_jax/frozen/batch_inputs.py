"""What the frozen encoders add to each batch of a latent, text-conditioned run.

A latent run (``config.latent.vae``) trains on the VAE's scaled latents of the data's images:
each training batch goes through the encoder on the fly, under ``stop_gradient`` (``encode_batch``:
inside the jitted train step with ``config.encode_in_step``, the default, else as a program of its
own before it), with the noise of the Gaussian sample drawn from the step's key (so a resumed run
sees the same latents). ``latent.encode="sample"`` (default) draws
``mean + std * noise`` as Stable Diffusion was trained (and as diffusers' training scripts do);
``"mean"`` takes the mean. The condition stays in pixel space: the ControlNet's hint network
downsamples it (``adapter.hint_downsamples``).

Text: where the prompts a run uses are fixed by its config (``text.prompt``, or one per
instruction of the ``edit`` task: its ``EDIT_NAMES``), their CLIP embeddings are computed once
when the run starts and held as data (``FrozenData.contexts``); each batch gets its row
(``context``). Prompts of the data itself (``example_prompts``: the free-text instructions of
``edit_triples``, the captions of a folder or tfds dataset), tokenised in the input pipeline
(``prompt_ids`` per example), are encoded per batch by the frozen CLIP (``FrozenData.text_params``).
Every batch also gets the negative prompt's embedding (``uncond_context``, for CFG). Nothing here is
trained or checkpointed.
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
from codi_jax.frozen import encoders


@dataclasses.dataclass
class FrozenData:
    """Arrays the batches need from the frozen models (a pytree: pass it to jitted functions)."""

    vae_params: Any  # None for pixel runs
    contexts: jax.Array | None  # (P, L, D): one row per prompt (P = 1, or one per instruction)
    uncond_context: jax.Array | None  # (1, L, D): the negative prompt
    text_params: Any = None  # the CLIP text encoder's, for per-example prompts (``prompt_ids``)


jax.tree_util.register_dataclass(
    FrozenData, data_fields=["vae_params", "contexts", "uncond_context", "text_params"], meta_fields=[]
)


def prompts_of(config: ml_collections.ConfigDict) -> list[str]:
    """The prompts of a run: one per instruction (``edit``: its edit names), else ``text.prompt``."""
    names = task_spec.instruction_names(config.task)
    return [name.replace("_", " ") for name in names] if names else [str(config.text.get("prompt", ""))]


def has_text(config: ml_collections.ConfigDict) -> bool:
    """Whether the run's backbone reads a text context (a text encoder and cross-attention)."""
    return encoders.has_text(config) and config.model.get("cross_attention_dim") is not None


def example_prompts(config: ml_collections.ConfigDict) -> bool:
    """Whether each example brings its own prompt (``prompt_ids``): a text run on ``edit_triples``
    (``task.instructions='text'``) or on captioned data (``captions.has_captions``), unless its task
    names the prompts (the ``edit`` task's instruction ids)."""
    if not has_text(config):
        return False
    if task_spec.text_instructions(config.task):
        return True
    return not task_spec.num_instructions(config.task) and captions.has_captions(config.data)


def load(config: ml_collections.ConfigDict) -> tuple[encoders.Encoders, FrozenData]:
    """The run's encoders and the data they give once per run (prompt embeddings computed here)."""
    enc = encoders.load_encoders(config)
    contexts = uncond = text_params = None
    if has_text(config):
        contexts = encoders.encode_prompts(enc, prompts_of(config))
        uncond = encoders.encode_prompts(enc, [str(config.text.get("negative_prompt", ""))])
        text_params = enc.text_params if example_prompts(config) else None
    return enc, FrozenData(enc.vae_params if enc.vae is not None else None, contexts, uncond, text_params)


def tokenizer_of(config: ml_collections.ConfigDict, enc: encoders.Encoders) -> Callable | None:
    """``text -> token ids`` for data with prompts of its own (``example_prompts``), else None."""
    if not example_prompts(config):
        return None
    return lambda text: encoders.tokenize(enc, [text])[0]


def add_text(data: FrozenData, batch: dict[str, jax.Array], text_model: Any = None) -> dict[str, jax.Array]:
    """``batch`` plus its ``context``: the example's own prompt (``prompt_ids``, encoded with
    ``text_model``), its instruction's row, or the run's one prompt; and ``uncond_context``."""
    if data.contexts is None:
        return batch
    n = batch["cond"].shape[0]
    if "prompt_ids" in batch:
        context = encoders.text_embeddings(text_model, data.text_params, batch["prompt_ids"])
    elif data.contexts.shape[0] > 1:
        context = data.contexts[batch["instruction"].astype(jnp.int32)]
    else:
        context = jnp.broadcast_to(data.contexts, (n,) + data.contexts.shape[1:])
    uncond = jnp.broadcast_to(data.uncond_context, (n,) + data.uncond_context.shape[1:])
    return {**batch, "context": context, "uncond_context": uncond}


def encode_batch(
    data: FrozenData, batch: dict[str, jax.Array], rng: jax.Array, *, vae: Any, mode: str, text_model: Any = None
) -> dict[str, jax.Array]:
    """The batch the backbone trains on: images -> scaled latents (latent runs), plus text."""
    out = dict(batch)
    if vae is not None:
        latents = encoders.encode_images(vae, data.vae_params, batch["image"], rng, mode)
        out["image"] = jax.lax.stop_gradient(latents)
    return add_text(data, out, text_model)


def batch_encoder(config: ml_collections.ConfigDict, enc: encoders.Encoders) -> Callable | None:
    """``encode_batch`` with its modules bound, or None when a run needs nothing added."""
    if enc.vae is None and not has_text(config):
        return None
    return functools.partial(encode_batch, vae=enc.vae, mode=enc.encode_mode, text_model=enc.text_model)


is_latent = encoders.is_latent
