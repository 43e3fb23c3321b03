"""Per-device memory of the fp32 train state (params, EMA, Adam moments, frozen weights) for an
SD-1.5- or SDXL-shaped UNet (+ ControlNet), replicated vs FSDP, from shapes alone
(``jax.eval_shape``: nothing is allocated or compiled; activations are not counted).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/state_memory.py [--model=sdxl]

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
# SDXL base's UNet (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, as our fields); its
# ControlNet is diffusers/controlnet-canny-sdxl-1.0's shape (the UNet's encoder, an x8 hint network).
SDXL_UNET = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention_levels=(False, True, True),
    mid_attention=True,
    attention_head_dim=64,
    cross_attention_dim=2048,
    use_linear_projection=True,
    transformer_layers_per_block=(1, 2, 10),
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
# (our UNet fields, diffusers' parameter count, default latent size: 512 / 1024 px)
MODELS = {"sd15": (SD15_UNET, 859_520_964, 64), "sdxl": (SDXL_UNET, 2_567_463_684, 128)}
GIB = 2**30


def optimizer():
    return make_optimizer(
        ml_collections.ConfigDict(
            dict(learning_rate=1e-5, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0)
        )
    )


def shapes(unet_fields: dict, latent: int) -> tuple[dict, dict]:
    """(UNet params, ControlNet-adapted params) shapes with a text context (cross-attention built)."""
    unet = unet_from_config(unet_fields)
    adapter_config = adapters.default_adapter_config()
    adapter_config.update(hint_channels=(16, 32, 96, 256), hint_downsamples=3)
    model = student.build_adapted_model(unet, adapter_config, cond_channels=3)
    z, t = jnp.zeros((1, latent, latent, 4)), jnp.zeros((1,))
    context = jax.tree.map(lambda spec: jnp.zeros(spec.shape, spec.dtype), unet.context_spec(tokens=77))
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
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15", help="the UNet's shape")
    parser.add_argument("--latent", type=int, default=0, help="latent size (0: the model's, 64 = 512 px)")
    args = parser.parse_args()
    unet_fields, diffusers_count, latent = MODELS[args.model]
    backbone, full = shapes(unet_fields, args.latent or latent)
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))  # noqa: E731
    unet_count, controlnet_count = count(backbone), count(full["adapter"])
    print(f"{args.model} UNet params {unet_count:,} (diffusers: {diffusers_count:,}); ControlNet {controlnet_count:,}")
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
