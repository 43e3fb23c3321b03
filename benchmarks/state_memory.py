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
from sd3_shapes import SD3_MEDIUM, SD3_MEDIUM_PARAMS, SD35_LARGE, SD35_LARGE_PARAMS, SD35_MEDIUM, SD35_MEDIUM_PARAMS

from codi_jax import sharding
from codi_jax.models import adapters, networks, student
from codi_jax.models.dit import DiT
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
# (our backbone fields, diffusers' parameter count, default latent size: 512 / 1024 px)
MODELS = {
    "sd15": (SD15_UNET, 859_520_964, 64),
    "sdxl": (SDXL_UNET, 2_567_463_684, 128),
    "sd3m": (SD3_MEDIUM, SD3_MEDIUM_PARAMS, 128),
    "sd35m": (SD35_MEDIUM, SD35_MEDIUM_PARAMS, 128),
    "sd35l": (SD35_LARGE, SD35_LARGE_PARAMS, 128),
}
# The frozen text encoders of SD3 / SD3.5 (CLIP-L and CLIP-G with projection, T5-XXL v1.1),
# counted from our modules' shapes, held in bfloat16.
SD3_TEXT_ENCODERS = ("clip_l", "clip_g", "t5_xxl")
GIB = 2**30


def optimizer():
    return make_optimizer(
        ml_collections.ConfigDict(
            dict(learning_rate=1e-5, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0)
        )
    )


def shapes(fields: dict, latent: int) -> tuple[dict, dict]:
    """(backbone params, ControlNet-adapted params) shapes with a text context (cross-attention /
    joint attention built). A DiT's ControlNet copies half its blocks (``adapter.dit_blocks=0``) and
    reads a latent condition, as diffusers' SD3 ControlNet pipelines hand it a VAE-encoded image."""
    backbone_model = networks.backbone_from_config(dict(fields, kind=fields.get("kind", "unet")))
    adapter_config = adapters.default_adapter_config()
    adapter_config.update(hint_channels=(16, 32, 96, 256), hint_downsamples=3)
    channels = backbone_model.in_channels
    cond_channels, cond_size = (channels, latent) if isinstance(backbone_model, DiT) else (3, 8 * latent)
    model = student.build_adapted_model(backbone_model, adapter_config, cond_channels=cond_channels)
    z, t = jnp.zeros((1, latent, latent, channels)), jnp.zeros((1,))
    spec = backbone_model.context_spec(tokens=77)
    context = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)
    cond = jnp.zeros((1, cond_size, cond_size, cond_channels))
    unet = backbone_model
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


def text_encoder_rows() -> None:
    """SD3's frozen text encoders in bfloat16: CLIP-L, CLIP-G (with projection) and T5-XXL, counted
    from our modules' shapes (``jax.eval_shape``)."""
    from codi_jax.models import clip_text, t5

    clip_l = clip_text.CLIPTextModelWithProjection(projection_dim=768)
    clip_g = clip_text.CLIPTextModelWithProjection(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280
    )
    t5_xxl = t5.T5Encoder(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"
    )
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))  # noqa: E731
    counts = {
        "CLIP-L (with projection)": count(clip_text.clip_text_param_shapes(clip_l)),
        "CLIP-G (with projection)": count(clip_text.clip_text_param_shapes(clip_g)),
        "T5-XXL v1.1 encoder": t5.t5_param_memory(t5_xxl)[0],
    }
    print("\n| frozen text encoder | params | bf16 GiB |\n|---|---|---|")
    for name, n in counts.items():
        print(f"| {name} | {n:,} | {2 * n / GIB:.2f} |")
    total = sum(counts.values())
    print(f"| all three | {total:,} | {2 * total / GIB:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15", help="the UNet's shape")
    parser.add_argument("--latent", type=int, default=0, help="latent size (0: the model's, 64 = 512 px)")
    args = parser.parse_args()
    unet_fields, diffusers_count, latent = MODELS[args.model]
    backbone, full = shapes(unet_fields, args.latent or latent)
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))  # noqa: E731
    unet_count, controlnet_count = count(backbone), count(full["adapter"])
    print(
        f"{args.model} backbone params {unet_count:,} (diffusers: {diffusers_count:,}); ControlNet {controlnet_count:,}"
    )
    if args.model.startswith("sd3"):
        text_encoder_rows()
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
