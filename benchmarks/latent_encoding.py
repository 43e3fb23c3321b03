"""What encoding training images with the VAE on the fly costs, against the CoDi train step.

Counts XLA's FLOPs (``Lowered.cost_analysis``; nothing is run or allocated) for Stable Diffusion
1.5 shapes: the VAE encoder on a batch of 512-px images against one PE-CoDi step (UNet +
ControlNet forward / backward at 64x64 latents), and times both on CPU for the tiny pipeline of
the tests. Caching latents would save the encoder's share at most, and only where crops and
flips are fixed.

  python benchmarks/latent_encoding.py [--batch=4] [--skip_sd]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
from sd15_shapes import SD15_UNET, SD15_VAE

from codi_jax import diffusion
from codi_jax.interop.torch_to_flax import unet_config_from_diffusers
from codi_jax.models import adapters, student
from codi_jax.models.unet import UNet
from codi_jax.models.vae import vae_from_diffusers_config
from codi_jax.objectives import codi
from codi_jax.training.train_state import create_train_state, make_optimizer

TINY_UNET = dict(SD15_UNET, block_out_channels=[16, 32], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"])
TINY_UNET.update(up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32, layers_per_block=1)
TINY_UNET.update(norm_num_groups=8, attention_head_dim=4, sample_size=8)
TINY_VAE = dict(SD15_VAE, block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4, sample_size=64)


def _parts(unet_config: dict, vae_config: dict, hint: tuple[int, ...]):
    backbone = UNet(
        **unet_config_from_diffusers(unet_config), dtype=jnp.bfloat16 if unet_config is SD15_UNET else jnp.float32
    )
    adapter = adapters.default_adapter_config()
    adapter.update(hint_channels=hint, hint_downsamples=3, hint_unit_range=True)
    model = student.build_adapted_model(backbone, adapter, cond_channels=3)
    return model, vae_from_diffusers_config(vae_config)


def _functions(model, vae, batch: int, size: int, width: int):
    """(encode, step, their abstract inputs) of one batch: VAE encoder; PE-CoDi train step."""
    optimizer, schedule = make_optimizer(make_optimizer_config()), diffusion.Schedule("scaled_linear")
    latent = size // 8
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)

    def init():
        backbone = model.backbone.init(
            jax.random.PRNGKey(0), jnp.zeros((1, latent, latent, 4)), jnp.zeros((1,)), jnp.zeros((1, 1, width))
        )
        params = model.init(
            jax.random.PRNGKey(1),
            backbone["params"],
            jnp.zeros((1, size, size, 3)),
            None,
            sample_shape=(1, latent, latent, 4),
            context=jnp.zeros((1, 1, width)),
        )
        trained, frozen = model.split(params)
        return create_train_state(trained, optimizer, jax.random.PRNGKey(2), frozen)

    state = jax.eval_shape(init)
    vae_params = jax.eval_shape(lambda: vae.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"])
    encode = lambda p, x, r: vae.latents_from_images(p, x, r, sample=True)
    config = codi.default_codi_config()
    step = functools.partial(
        codi.train_step,
        model=model,
        schedule=schedule,
        optimizer=optimizer,
        ema_decay=0.999,
        ema_warmup=False,
        parametrization="eps",
        config=config,
    )
    batch_tree = {
        "image": jax.ShapeDtypeStruct((batch, latent, latent, 4), jnp.float32),
        "cond": images,
        "context": jax.ShapeDtypeStruct((batch, 77, width), jnp.float32),
    }
    return (encode, (vae_params, images, rng)), (step, (state, batch_tree, rng)), init


def make_optimizer_config():
    import ml_collections

    return ml_collections.ConfigDict(
        dict(learning_rate=1e-5, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0)
    )


def _flops(fn, args) -> float:
    cost = jax.jit(fn).lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))


def _time(fn, args, repeats: int = 3) -> float:
    compiled = jax.jit(fn)
    jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(compiled(*args))
    return (time.perf_counter() - start) / repeats


def _concrete(abstract, seed: int = 0):
    leaves, tree = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    made = [
        jax.random.normal(k, a.shape, a.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros(a.shape, a.dtype)
        for k, a in zip(keys, leaves)
    ]
    return jax.tree.unflatten(tree, made)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--skip_sd", action="store_true")
    args = parser.parse_args()
    if not args.skip_sd:
        model, vae = _parts(SD15_UNET, SD15_VAE, (16, 32, 96, 256))
        (encode, e_args), (step, s_args), _ = _functions(model, vae, args.batch, 512, 768)
        fe, fs = _flops(encode, e_args), _flops(step, s_args)
        print(
            f"SD-1.5 shapes, batch {args.batch} at 512 px: VAE encode {fe / 1e12:.2f} TFLOP, "
            f"PE-CoDi step {fs / 1e12:.2f} TFLOP; encode = {100 * fe / (fe + fs):.1f}% of encode + step"
        )
    model, vae = _parts(TINY_UNET, TINY_VAE, (8, 8, 16, 16))
    (encode, e_args), (step, s_args), init = _functions(model, vae, args.batch, 64, 32)
    vae_params = vae.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]
    e_concrete = (vae_params, _concrete(e_args[1]), jax.random.PRNGKey(0))
    state = jax.jit(init)()
    batch = _concrete(s_args[1])
    te = _time(encode, e_concrete)
    ts = _time(step, (state, batch, jax.random.PRNGKey(1)))
    print(
        f"tiny pipeline on CPU, batch {args.batch} at 64 px: VAE encode {1e3 * te:.1f} ms, "
        f"PE-CoDi step {1e3 * ts:.1f} ms; encode = {100 * te / (te + ts):.1f}%"
    )


if __name__ == "__main__":
    main()
