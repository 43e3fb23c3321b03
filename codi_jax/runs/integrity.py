"""Checksums of a checkpoint's arrays: written with every checkpoint, verified at every restore.

Each leaf's checksum is two 32-bit sums over its bytes read as words ``w_i`` (32-, 16- and 8-bit
dtypes one element per word, 64-bit ones as two words): ``sum_i w_i * m_i mod 2**32`` with
pseudo-random odd multipliers ``m_i`` hashed from the element's index, one family per sum. It is
computed where the array lives (a jitted pass per leaf, partial sums then an all-reduce), so it costs no
host transfer and does not depend on the sharding: integer addition modulo 2**32 is exact in any
order, and a checkpoint written on 8 devices verifies on 1. Any change to one word changes both
sums (``m_i`` is odd, hence invertible modulo 2**32); changes to several words escape one sum with
probability about 2**-32, so both together about 2**-64.

Leaves are named by their path (``params/unet/conv_in/kernel``), so a partial restore (e.g. only
``ema_params``) verifies the leaves it reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax import sharding

FAMILIES = (np.uint32(0x9E3779B9), np.uint32(0x85EBCA6B))  # one index offset per sum


class IntegrityError(ValueError):
    """Restored arrays differ from the ones written (damaged data that still decoded)."""


def leaf_name(path: tuple) -> str:
    """``params/unet/conv_in/kernel`` for a key path (dict keys, attributes and indices alike)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _words(x: jax.Array) -> jax.Array:
    """The array's bytes as uint32 words (one per element; two per 64-bit element)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = x.dtype.itemsize * 8
    if bits == 64:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # a trailing axis of 2 words
    unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bits]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _mix(h: jax.Array) -> jax.Array:
    """A 32-bit integer hash (xor-shift-multiply), applied element-wise."""
    h = (h ^ (h >> 16)) * np.uint32(0x7FEB352D)
    h = (h ^ (h >> 15)) * np.uint32(0x846CA68B)
    return h ^ (h >> 16)


@jax.jit
def _leaf_sums(x: jax.Array) -> jax.Array:
    """``uint32[2]``: the leaf's two weighted word sums."""
    words = _words(x)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):  # the row-major element index, without a reshape
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(stride % 2**32)
        stride *= words.shape[axis]
    sums = [jnp.sum(words * (_mix(index + offset) | np.uint32(1)), dtype=jnp.uint32) for offset in FAMILIES]
    return jnp.stack(sums)


def checksums(tree: Any) -> dict[str, str]:
    """``{leaf name: "xxxxxxxx-yyyyyyyy"}`` for every array leaf of ``tree`` (on its devices)."""
    named = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = [leaf_name(path) for path, _ in named]
    # One small program per leaf shape (a model has a few dozen): compiles in a fraction of the
    # time one program over the whole tree takes. Each finishes before the next is dispatched:
    # on XLA:CPU, many in-flight programs whose all-reduces span device subsets (an FSDP axis)
    # can deadlock at their rendezvous.
    sums = [sharding.to_host(_leaf_sums(leaf)) for _, leaf in named]
    return {name: "-".join(f"{int(v):08x}" for v in s) for name, s in zip(names, sums)}


def verify(tree: Any, saved: Mapping[str, str]) -> None:
    """Raises ``IntegrityError`` if any leaf of ``tree`` lacks a saved checksum or differs from it."""
    restored = checksums(tree)
    bad = [name for name, value in restored.items() if saved.get(name) != value]
    if bad:
        raise IntegrityError(
            f"checksum mismatch in {len(bad)} of {len(restored)} arrays (first: {bad[0]}): the data was damaged "
            "after it was written"
        )
