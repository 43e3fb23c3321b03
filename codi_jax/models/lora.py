"""LoRA on the backbone's kernels, as a parameter transform (no change to the modules).

For a kernel ``W`` of shape ``(..., in, out)`` (Dense ``(in, out)``, conv ``(kh, kw, in, out)``)
LoRA keeps ``a`` of shape ``(prod(...) * in, rank)`` and ``b`` of shape ``(rank, out)`` and uses
``W + scale * (a @ b).reshape(W.shape)``. ``b`` starts at zero, so the merged parameters equal
the backbone's exactly at initialisation; ``a`` starts Kaiming-uniform as in the LoRA paper.
The LoRA tree mirrors the parameter tree's nesting with ``{"lora_a", "lora_b"}`` at each
targeted kernel, so it checkpoints like any other parameters.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util


def _path(keys: tuple) -> str:
    return "/".join(str(k) for k in keys)


def target_paths(params: Any, pattern: str) -> list[tuple]:
    """Flattened paths of the kernels (ndim >= 2) whose ``a/b/kernel`` path matches ``pattern``."""
    regex = re.compile(pattern)
    flat = traverse_util.flatten_dict(params)
    return [keys for keys, leaf in flat.items() if leaf.ndim >= 2 and regex.search(_path(keys))]


def init_lora(rng: jax.Array, params: Any, pattern: str, rank: int) -> dict:
    """Fresh LoRA factors for every kernel of ``params`` matching ``pattern``."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
    paths = target_paths(params, pattern)
    if not paths:
        raise ValueError(f"No backbone kernel matches lora_targets={pattern!r}.")
    flat = traverse_util.flatten_dict(params)
    lora = {}
    for i, keys in enumerate(paths):
        kernel = flat[keys]
        fan_in = math.prod(kernel.shape[:-1])
        bound = math.sqrt(6.0 / fan_in) / math.sqrt(5.0)  # kaiming_uniform(a=sqrt(5)), as torch Linear
        a = jax.random.uniform(jax.random.fold_in(rng, i), (fan_in, rank), jnp.float32, -bound, bound)
        lora[keys[:-1] + ("lora_a",)] = a
        lora[keys[:-1] + ("lora_b",)] = jnp.zeros((rank, kernel.shape[-1]), jnp.float32)
    return traverse_util.unflatten_dict(lora)


def merge_lora(params: Any, lora: dict, scale: float) -> Any:
    """``params`` with ``scale * a @ b`` added to each targeted kernel (differentiable in both)."""
    flat = dict(traverse_util.flatten_dict(params))
    flat_lora = traverse_util.flatten_dict(lora)
    for keys, a in flat_lora.items():
        if keys[-1] != "lora_a":
            continue
        kernel_keys = keys[:-1] + ("kernel",)
        if kernel_keys not in flat:
            raise ValueError(f"LoRA factor for {_path(kernel_keys)}, which the backbone does not have.")
        kernel = flat[kernel_keys]
        b = flat_lora[keys[:-1] + ("lora_b",)]
        flat[kernel_keys] = kernel + (scale * (a @ b)).reshape(kernel.shape).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def lora_scale(rank: int, alpha: float) -> float:
    """``alpha / rank`` (LoRA's convention); alpha 0 means scale 1."""
    return (alpha or rank) / rank
