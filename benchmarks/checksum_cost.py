"""What the checkpoint checksums cost (``codi_jax.runs.integrity``), per GiB, next to the save and
restore they ride on: a synthetic fp32 state of ``--gib`` GiB, saved and restored with the
project's ``Checkpointer`` with and without the checksums (medians of ``--repeats``).

  python benchmarks/checksum_cost.py --gib 0.25 --repeats 3

Prints one line per measurement and, with ``--state_gib`` (e.g. an SD-1.5 state's bytes from
``benchmarks/state_memory.py``), the extrapolated cost at that size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from codi_jax.runs import checkpoint, integrity

GIB = 2**30


def _state(gib: float) -> dict:
    leaves = max(1, int(gib * GIB / (4 * 2**20 * 4)))  # 4M-element fp32 leaves (16 MiB), like big kernels
    keys = jax.random.split(jax.random.PRNGKey(0), leaves)
    return {f"w{i}": jax.random.normal(k, (2048, 2048), jnp.float32) for i, k in enumerate(keys)}


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--state_gib", type=float, default=0.0, help="extrapolate to a state of this size")
    args = parser.parse_args()
    state = _state(args.gib)
    gib = sum(x.nbytes for x in jax.tree.leaves(state)) / GIB
    integrity.checksums(state)  # compile
    sums = _timed(lambda: integrity.checksums(state), args.repeats)
    config = ml_collections.ConfigDict({"optimizer": {"decay": "constant", "decay_steps": 0}})
    with tempfile.TemporaryDirectory() as root:
        ckpt = checkpoint.Checkpointer(os.path.join(root, "c"), save_every_steps=1, keep=args.repeats + 1)
        step = iter(range(1, 1000))

        def save():
            ckpt.save(next(step), state, config, force=True)
            ckpt.wait()

        save_time = _timed(save, args.repeats)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restore_time = _timed(lambda: ckpt.restore(abstract), args.repeats)
        ckpt.close()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; state {gib:.3f} GiB")
    print(f"checksums: {sums:.3f} s = {sums / gib:.2f} s/GiB ({gib / sums:.2f} GiB/s)")
    print(f"save with checksums: {save_time:.3f} s ({sums / save_time:.0%} of it the checksums)")
    print(f"restore with verification: {restore_time:.3f} s ({sums / restore_time:.0%} of it the checksums)")
    if args.state_gib:
        print(f"at {args.state_gib:.2f} GiB: checksums {args.state_gib * sums / gib:.1f} s on save and on restore")
    np.testing.assert_equal(len(integrity.checksums(state)), len(state))


if __name__ == "__main__":
    main()
