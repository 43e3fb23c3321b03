"""What the training loop adds to the step: the per-step host read and the separate encoder program.

The tiny CoDi step (``benchmarks/train_throughput.py --config=tiny``) on latents of a small random
VAE (``AutoencoderKL``, 32x32 RGB -> 16x16x3 latents, sampled posterior), run N steps the way
``training/loop.py`` runs them, four ways:

  separate + read   the encoder as its own jitted program before each step, and the rejection flag
                    read back to the host after each step (the loop before ``encode_in_step``)
  separate          the encoder as its own program, the flag counted on the device
  fused + read      the encoder inside the step, the flag read back each step
  fused             the encoder inside the step, the flag counted on the device (the loop now)

Printed: the median over ``--repeats`` of the wall time per step (ms) of each, after a warm-up.

  python benchmarks/loop_overhead.py [--steps=30] [--repeats=5] [--batch=8] [--devices=N]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

from train_throughput import _host_devices_from_argv

_host_devices_from_argv(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_host import cpu_model, usable_cores  # noqa: E402
from train_throughput import random_like, run_config, step_and_inputs  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from codi_jax import sharding  # noqa: E402
from codi_jax.frozen import batch_inputs  # noqa: E402
from codi_jax.models.vae import AutoencoderKL  # noqa: E402
from codi_jax.training import recipes  # noqa: E402
from codi_jax.training.loop import _count_rejection  # noqa: E402

LATENT, PIXELS = 16, 32


def build(batch: int, mesh: jax.sharding.Mesh):
    """``(step, encode, frozen, init, raw batch)`` on ``mesh``: the tiny CoDi step and a small VAE."""
    config, _, _ = run_config("tiny", "pe")
    step, init, batch_tree, _ = step_and_inputs(config, LATENT, None, batch)
    vae = AutoencoderKL(latent_channels=3, block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8)
    vae_params = vae.init(jax.random.PRNGKey(5), jnp.zeros((1, PIXELS, PIXELS, 3)))["params"]
    frozen = batch_inputs.FrozenData(vae_params, None, None)
    encode = functools.partial(batch_inputs.encode_batch, vae=vae, mode="sample")
    raw = {"image": jax.ShapeDtypeStruct((batch, PIXELS, PIXELS, 3), jnp.float32), "cond": batch_tree["cond"]}
    repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    return (
        step,
        encode,
        jax.device_put(frozen, repl),
        jax.jit(init, out_shardings=repl),
        jax.device_put(random_like(raw), data),
    )


def programs(step, encode, mesh, fused: bool):
    """``run(state, frozen, batch, rng) -> (state, metrics)``: one fused program, or encode then step."""
    repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    if fused:
        inner = jax.jit(functools.partial(recipes.encoded_train_step, encode, step), donate_argnums=(0,))
        return inner
    encode_jit = jax.jit(encode, out_shardings=data)
    step_jit = jax.jit(step, donate_argnums=(0,), out_shardings=(repl, repl))

    def run(state, frozen, batch, rng):
        return step_jit(state, encode_jit(frozen, batch, jax.random.fold_in(rng, recipes.ENCODE_KEY)), rng)

    return run


def time_loop(run, init, frozen, batch, steps: int, read: bool) -> float:
    """Wall seconds per step over ``steps`` steps dispatched as the loop does."""
    state, counts, rng = init(), np.zeros(2, np.int32), jax.random.PRNGKey(3)
    for i in range(3):  # warm-up: compile and first calls
        state, metrics = run(state, frozen, batch, jax.random.fold_in(rng, i))
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(steps):
        state, metrics = run(state, frozen, batch, jax.random.fold_in(rng, i))
        if read:
            rejected = float(sharding.to_host(metrics["skipped_nonfinite"]))  # noqa: F841
        else:
            counts = _count_rejection(counts, metrics["skipped_nonfinite"])
    jax.block_until_ready((state, counts))
    return (time.perf_counter() - start) / steps


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--devices", type=int, default=1)
    args = p.parse_args(argv)
    mesh = sharding.make_mesh(args.devices)
    print(f"host: {cpu_model()}, {len(usable_cores())} usable cores; {args.devices} device(s), batch {args.batch}")
    step, encode, frozen, init, batch = build(args.batch, mesh)
    cases = {
        "separate + read": (False, True),
        "separate": (False, False),
        "fused + read": (True, True),
        "fused": (True, False),
    }
    runs = {fused: programs(step, encode, mesh, fused) for fused in (False, True)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved, so drift in the host's speed hits every case alike
        for name, (fused, read) in cases.items():
            times[name].append(time_loop(runs[fused], init, frozen, batch, args.steps, read))
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:16s} {1e3 * median:8.2f} ms/step (min {1e3 * min(values):.2f}, max {1e3 * max(values):.2f})")


if __name__ == "__main__":
    main()
