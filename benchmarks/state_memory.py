"""Per-device memory of the fp32 train state (params, EMA, Adam moments, frozen weights) for an
SD-1.5-shaped UNet (+ ControlNet), replicated vs FSDP, from shapes alone (``jax.eval_shape``:
nothing is allocated or compiled; activations are not counted).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/state_memory.py

Rows: teacher (UNet trained), PE-CoDi (ControlNet trained, UNet frozen), full CoDi (both
trained); for PE-CoDi also the layout before frozen weights left the trained state (the UNet in
params and EMA, i.e. held twice). Checkpoint bytes = the whole state as saved (one copy).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from codi_jax import sharding
from codi_jax.models import adapters, student
from codi_jax.models.unet import unet_from_config
from codi_jax.training.train_state import create_train_state, make_optimizer

SD15_UNET = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_levels=(True, True, True, False),
    mid_attention=True,
    attention_head_dim=40,  # heads do not change parameter shapes
    cross_attention_dim=768,
    norm_num_groups=32,
)
SD15_UNET_PARAMS = 859_520_964  # diffusers' UNet2DConditionModel for SD 1.5
GIB = 2**30


def optimizer():
    return make_optimizer(
        ml_collections.ConfigDict(
            dict(learning_rate=1e-5, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0)
        )
    )


def shapes(latent: int) -> tuple[dict, dict]:
    """(UNet params, ControlNet-adapted params) shapes with a text context (cross-attention built)."""
    unet = unet_from_config(SD15_UNET)
    adapter_config = adapters.default_adapter_config()
    adapter_config.update(hint_channels=(16, 32, 96, 256), hint_downsamples=3)
    model = student.build_adapted_model(unet, adapter_config, cond_channels=3)
    z, t = jnp.zeros((1, latent, latent, 4)), jnp.zeros((1,))
    context = jnp.zeros((1, 77, 768))
    cond = jnp.zeros((1, 8 * latent, 8 * latent, 3))
    backbone = jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), z, t, context)["params"])
    full = jax.eval_shape(lambda: model.module.init(jax.random.PRNGKey(0), z, t, cond, None, context)["params"])
    return backbone, dict(full)


def per_device_bytes(tree, mesh, fsdp_rules: bool) -> float:
    rules = sharding.DEFAULT_RULES if fsdp_rules else ()
    shards = sharding.tree_shardings(tree, mesh, rules, sharding.DEFAULT_MIN_SIZE)
    return float(
        sum(
            np.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
            for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shards))
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=64, help="latent size (64 = 512 px)")
    args = parser.parse_args()
    backbone, full = shapes(args.latent)
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))  # noqa: E731
    print(f"UNet params {count(backbone):,} (SD 1.5: {SD15_UNET_PARAMS:,}); ControlNet {count(full['adapter']):,}")
    opt, rng = optimizer(), jax.random.PRNGKey(0)
    trained, frozen = {"adapter": full["adapter"]}, {"backbone": full["backbone"]}
    states = {
        "teacher": jax.eval_shape(lambda p: create_train_state(p, opt, rng), backbone),
        "PE-CoDi": jax.eval_shape(lambda p, f: create_train_state(p, opt, rng, f), trained, frozen),
        "PE-CoDi (before: UNet in params + EMA)": jax.eval_shape(
            lambda p, a: create_train_state(p, opt, rng).replace(opt_state=opt.init(a)), full, trained
        ),
        "full CoDi": jax.eval_shape(lambda p: create_train_state(p, opt, rng), full),
    }
    n = len(jax.devices())
    meshes = {"replicated": sharding.make_mesh(n, 1), f"fsdp {n}": sharding.make_mesh(n, n)}
    print(f"\n| state (fp32) | checkpoint GiB | per device, replicated GiB | per device, {n}-way FSDP GiB |")
    print("|---|---|---|---|")
    for name, state in states.items():
        total = per_device_bytes(state, meshes["replicated"], False) / GIB
        sharded = per_device_bytes(state, meshes[f"fsdp {n}"], True) / GIB
        print(f"| {name} | {total:.2f} | {total:.2f} | {sharded:.2f} |")


if __name__ == "__main__":
    main()
