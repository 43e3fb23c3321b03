"""The checkpoint checksums (``codi_jax.runs.integrity``): equal to a NumPy computation of the
same sums, blind to the sharding, and changed by any single flipped bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from codi_jax import xla_flags
from codi_jax.runs import integrity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mix(h: np.ndarray) -> np.ndarray:
    h = ((h ^ (h >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
    h = ((h ^ (h >> 15)) * 0x846CA68B) & 0xFFFFFFFF
    return h ^ (h >> 16)


def numpy_checksum(x: np.ndarray) -> str:
    """The same two sums in NumPy with 64-bit arithmetic, reduced modulo 2**32 by hand."""
    x = np.asarray(x)
    if x.dtype == np.bool_:
        words = x.astype(np.uint64).ravel()
    elif x.dtype.itemsize == 8:
        words = x.view(np.uint32).astype(np.uint64).ravel()
    else:
        words = x.view(f"u{x.dtype.itemsize}").astype(np.uint64).ravel()
    index = np.arange(words.size, dtype=np.uint64)
    sums = []
    for offset in integrity.FAMILIES:
        multiplier = _mix((index + np.uint64(offset)) & 0xFFFFFFFF) | 1
        sums.append(int(np.sum((words * multiplier) & 0xFFFFFFFF) & 0xFFFFFFFF))
    return "-".join(f"{s:08x}" for s in sums)


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.uint8, np.float16, ml_dtypes.bfloat16, np.bool_, np.uint32])
def test_checksum_equals_numpy(dtype) -> None:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, 5, 7)) * 50).astype(dtype)
    assert integrity.checksums({"x": jnp.asarray(x)}) == {"x": numpy_checksum(x)}


def test_every_single_bit_flip_changes_the_checksum() -> None:
    x = np.random.default_rng(1).normal(size=(4, 4)).astype(np.float32)
    reference = integrity.checksums([jnp.asarray(x)])["0"]
    words = x.view(np.uint32)
    for i in range(words.size):
        for bit in range(32):
            flipped = words.copy().ravel()
            flipped[i] ^= np.uint32(1 << bit)
            assert numpy_checksum(flipped.view(np.float32)) != reference, (i, bit)
    # one of them through the device computation too
    flipped = words.copy().ravel()
    flipped[7] ^= np.uint32(1 << 3)
    assert integrity.checksums([jnp.asarray(flipped.view(np.float32).reshape(4, 4))])["0"] != reference


def test_verify_names_leaves_like_a_partial_restore() -> None:
    state = {"params": {"w": jnp.ones((2, 3))}, "ema_params": {"w": jnp.zeros((2, 3))}, "step": jnp.int32(4)}
    saved = integrity.checksums(state)
    assert sorted(saved) == ["ema_params/w", "params/w", "step"]
    integrity.verify({"ema_params": state["ema_params"]}, saved)  # a partial restore verifies its leaves
    with pytest.raises(integrity.IntegrityError, match=r"checksum mismatch in 1 of 1 arrays \(first: ema_params/w\)"):
        integrity.verify({"ema_params": {"w": jnp.zeros((2, 3)).at[1, 2].set(1e-30)}}, saved)
    with pytest.raises(integrity.IntegrityError, match="first: frozen/w"):
        integrity.verify({"frozen": {"w": jnp.ones(2)}}, saved)  # no checksum saved for it


SHARDED = """
import jax, jax.numpy as jnp, numpy as np, json
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from codi_jax import xla_flags
from codi_jax.runs import integrity
x = {"a": jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6) * 0.5 - 3, "b": jnp.arange(12, dtype=jnp.bfloat16)}
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp"))
placed = {"a": jax.device_put(x["a"], NamedSharding(mesh, P("fsdp", "data"))),
          "b": jax.device_put(x["b"], NamedSharding(mesh, P("data")))}
print(json.dumps([integrity.checksums(x), integrity.checksums(placed)]))
"""


def test_checksums_do_not_depend_on_the_sharding() -> None:
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=xla_flags.simulated_devices(4))
    out = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    single, sharded = json.loads(out.stdout.strip().splitlines()[-1])
    assert single == sharded
    assert single["a"] == numpy_checksum(
        np.arange(48, dtype=np.float32).reshape(8, 6) * np.float32(0.5) - np.float32(3)
    )


def test_a_parameter_the_checkpoint_lacks_is_named_in_one_line(tmp_path) -> None:
    """Restoring names a model has that the checkpoint does not (a renamed parameter) is refused
    naming them, instead of handing back unread placeholders."""
    import jax
    import ml_collections

    from codi_jax import sharding
    from codi_jax.runs import checkpoint

    state = {"step": jnp.zeros((), jnp.int32), "ema_params": {"old_name": jnp.ones((3,))}}
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    ckpt.save(1, state, ml_collections.ConfigDict({"model": {}}), force=True)
    ckpt.wait()
    wanted = {"ema_params": {"old_name": jnp.ones((3,)), "new_name": jnp.ones((3,))}}
    mesh = sharding.make_mesh(devices=jax.local_devices()[:1])
    abstract = checkpoint.abstract_like(wanted, sharding.tree_shardings(wanted, mesh))
    with pytest.raises(ValueError, match=r"holds no \['ema_params'\]\['new_name'\]: it was written by another"):
        ckpt.restore(abstract, step=1, partial=True)
    ckpt.close()
