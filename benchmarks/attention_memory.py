"""Memory of one attention layer per implementation (``UNet.attention_impl``), from XLA's memory
analysis of the compiled function (nothing is run): forward alone, and forward + backward
(gradients of q, k, v) as in training.

Default shape: SD's highest-resolution self-attention at 64x64 latents (512 px): 4096 tokens,
320 channels, 8 heads (head dim 40), batch 1, bf16. The float32 score matrix alone is
batch x heads x tokens^2 x 4 bytes = 512 MiB there.

  python benchmarks/attention_memory.py [--tokens=4096] [--channels=320] [--heads=8] [--batch=1] \\
      [--dtype=bfloat16] [--impls=einsum,dot_product[,cudnn]]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
from bench_host import cpu_model, usable_cores

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from codi_jax.models import layers  # noqa: E402

MIB = 2**20


def temp_mib(fn, args) -> float:
    """XLA's temporary-buffer bytes (MiB) of ``fn`` compiled for ``args``: what the layer adds
    beyond its inputs and outputs."""
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes / MIB


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--channels", type=int, default=320)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--impls", default="einsum,dot_product" + (",cudnn" if jax.default_backend() == "gpu" else ""))
    args = p.parse_args(argv)
    device = jax.local_devices()[0]
    print(f"host: {cpu_model()}, {len(usable_cores())} usable cores; device: {device.device_kind} ({device.platform})")
    b, t, c, h = args.batch, args.tokens, args.channels, args.heads
    dtype = jnp.dtype(args.dtype)
    qkv = [jax.ShapeDtypeStruct((b, t, c), dtype)] * 3
    scores = b * h * t * t * 4 / MIB
    print(f"{b} x {t} tokens x {c} channels, {h} heads, {dtype.name}; float32 scores: {scores:.0f} MiB")
    print("\n| attention_impl | forward temp MiB | forward + backward temp MiB |\n|---|---|---|")
    for impl in args.impls.split(","):
        forward = lambda q, k, v, impl=impl: layers.attention(q, k, v, h, impl)  # noqa: E731
        loss = lambda q, k, v, impl=impl: jnp.sum(layers.attention(q, k, v, h, impl).astype(jnp.float32))  # noqa: E731
        try:
            fwd, both = temp_mib(forward, qkv), temp_mib(jax.grad(loss, argnums=(0, 1, 2)), qkv)
        except Exception as error:  # noqa: BLE001  (e.g. cudnn off GPU: report and go on)
            print(f"| {impl} | failed: {type(error).__name__}: {str(error).splitlines()[0][:80]} | |")
            continue
        print(f"| {impl} | {fwd:.0f} | {both:.0f} |")


if __name__ == "__main__":
    main()
