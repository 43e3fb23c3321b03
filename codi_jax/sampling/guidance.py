"""Classifier-free guidance (CFG): the guided combination and a guided network apply for samplers.

``combine(uncond, cond, w) = cond + (w - 1) (cond - uncond)``, which is diffusers'
``uncond + w (cond - uncond)`` rearranged (both are ``w cond + (1 - w) uncond``); written this way
``w = 1`` gives ``cond`` itself (bitwise: that case is selected, not computed) and ``w = 0`` gives
``uncond``. The combination is linear, so combining the network's raw outputs (eps or v) is
the same as combining the eps (or x) they imply at a given ``z_t``.

``guided_apply(apply_fn)`` turns a conditioned network ``apply_fn(params, z, model_t, context)``
into the samplers' ``apply_fn(guided, z, model_t)``, where ``guided`` is a ``Guided`` pytree of
the parameters, the conditional and unconditional contexts and the scale. Everything that varies
per call is an argument of the jitted sampler (no closures over arrays): one compiled sampler
serves every prompt and scale of the same shapes. As diffusers does, the guided apply is one
network call on the batch doubled as ``[uncond; cond]``.

A context is any pytree whose leaves have the batch first (a text embedding ``(B, L, D)``, or a
tuple ``(text embedding, control image)`` for a ControlNet); the unconditional context has the
same structure (e.g. the negative prompt's embedding with the same control image).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# apply_fn(params, z_t, model_t, context) -> network output
ContextApplyFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]


class Guided(NamedTuple):
    """The first argument of a guided apply: a pytree, so it passes through ``jax.jit`` and ``scan``.

    ``uncond_context=None`` means no guidance: the network is called once with ``context``
    (``scale`` is then ignored).
    """

    params: Any
    context: Any
    uncond_context: Any = None
    scale: jax.Array | float = 1.0


def _per_example(scale: jax.Array | float, like: jax.Array) -> jax.Array:
    """A scalar or per-example ``(B,)`` scale, broadcast over the trailing axes of ``like``."""
    scale = jnp.asarray(scale, like.dtype)
    if scale.ndim > 1 or (scale.ndim == 1 and scale.shape[0] not in (1, like.shape[0])):
        raise ValueError(f"Guidance scale of shape {scale.shape}: expected a scalar or ({like.shape[0]},).")
    return scale.reshape(scale.shape + (1,) * (like.ndim - scale.ndim))


def combine(uncond: jax.Array, cond: jax.Array, scale: jax.Array | float) -> jax.Array:
    """``cond + (scale - 1) * (cond - uncond)`` (= diffusers' ``uncond + scale * (cond - uncond)``).

    ``scale`` is a scalar or one value per example (broadcast over NHWC). Where ``scale == 1``
    the result is ``cond`` bitwise; ``scale == 0`` gives ``uncond`` (up to rounding).
    """
    w = _per_example(scale, cond)
    return jnp.where(w == 1.0, cond, cond + (w - 1.0) * (cond - uncond))


def _doubled(uncond: Any, cond: Any) -> Any:
    """``[uncond; cond]`` along the batch, leaf by leaf (the two must have the same structure)."""
    if jax.tree_util.tree_structure(uncond) != jax.tree_util.tree_structure(cond):
        raise ValueError(
            "The unconditional context must have the conditional context's structure: "
            f"{jax.tree_util.tree_structure(uncond)} vs {jax.tree_util.tree_structure(cond)}."
        )
    return jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)


def apply_guided(apply_fn: ContextApplyFn, guided: Guided, z_t: jax.Array, model_t: jax.Array) -> jax.Array:
    """The CFG network output at ``(z_t, model_t)``: one call on ``[uncond; cond]``, then ``combine``."""
    if guided.uncond_context is None:
        return apply_fn(guided.params, z_t, model_t, guided.context)
    batch = z_t.shape[0]
    contexts = _doubled(guided.uncond_context, guided.context)
    both = apply_fn(
        guided.params, jnp.concatenate([z_t, z_t], axis=0), jnp.concatenate([model_t, model_t], axis=0), contexts
    )
    return combine(both[:batch], both[batch:], guided.scale)


def guided_apply(apply_fn: ContextApplyFn) -> Callable[[Guided, jax.Array, jax.Array], jax.Array]:
    """``apply_fn(params, z, model_t, context)`` -> the samplers' ``(guided: Guided, z, model_t)`` apply.

    E.g. ``sampling.ddim_sample(guided_apply(unet_apply), Guided(params, text, negative_text, 7.5),
    z, times, schedule, "eps", clip_denoised=False, output="z")``. Bind with ``functools.partial``
    (as here) so the result is hashable and jit-static; arrays travel in ``Guided``.
    """
    return functools.partial(apply_guided, apply_fn)
