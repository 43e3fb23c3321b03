"""Train-step throughput of a CoDi run: step time, images/s, per-device memory, FLOPs and MFU.

The step is ``codi.train_step`` bound exactly as ``recipes`` binds it for a run, jitted with the
state donated and compiled ahead of time (as ``training.aot`` does), on one device:

  tiny   codi_jax/configs/cpu/tiny_codi.py on codi_jax/configs/cpu/tiny_teacher.py's UNet (16x16, x2 SR)
  demo   codi_jax/configs/cpu/codi_sr4.py (--method=full: codi_jax/configs/cpu/codi_full_sr4.py, batch 8) on
         codi_jax/configs/cpu/teacher_patches32.py's UNet (the demo's shapes: 32x32)
  sd15   codi_jax/configs/sd/sd15_sr4.py on an SD-1.5-shaped UNet (diffusers UNet2DConditionModel config,
         random weights) + ControlNet (x8 hint network), bf16, remat, 64x64 latents with a
         77x768 text context and 512x512 conditions (the batch the step sees after the VAE /
         text encoder; encoding them is benchmarks/latent_encoding.py's subject)
  sdxl   codi_jax/configs/sd/sdxl_sr4.py on an SDXL-base-shaped UNet + ControlNet, bf16, remat, 128x128
         latents, 1024x1024 conditions and SDXL's context dict (77x2048 tokens, the pooled 1280-wide
         text_embeds, 6 time ids: ``UNet.context_spec``), one device (no FSDP)
  sd3    codi_jax/configs/sd/sd3_sr4.py on an SD3-medium-shaped transformer (``DiT``, flow schedule with
         shift 3, velocity) + its ControlNet (``DiTControlNet``, half the blocks), bf16, remat, 128x128x16
         latents, the condition as 128x128x16 VAE latents (``batch_inputs.latent_condition``) and SD3's
         context dict (333x4096 tokens: 77 CLIP + 256 T5; pooled 2048: ``DiT.context_spec``), one device

Printed: compile time; memory per device from ``Compiled.memory_analysis()`` (what
``training.aot`` logs before step 1) and, where the backend has them, ``memory_stats()`` peak
bytes (on CPU: the process's max RSS, which also holds the compiler and Python); model FLOPs
per step (XLA's cost analysis of the step lowered without remat: what the model needs) and
executed FLOPs (of the compiled step, recomputation included); then, unless ``--no_run``,
the median step time over ``--steps`` timed steps after ``--warmup`` untimed ones, images/s,
TFLOP/s (model FLOPs / step time) and, given ``--peak_tflops`` (the device's dense bf16 or fp32
peak), MFU.

On CPU, ``--devices=N`` splits the batch over N host devices (data parallel, state replicated),
as a run with ``num_devices=N`` does; the script sets ``--xla_force_host_platform_device_count``
itself. ``cpu`` in the step line is the process CPU time per step: cpu / wall is how many cores
the step kept busy.

  python benchmarks/train_throughput.py --config=tiny|demo|sd15|sdxl|sd3 [--method=pe|full] [--batch=N] \\
      [--devices=N] \\
      [--no_run] [--peak_tflops=989] [--attention_impl=dot_product|cudnn|einsum] \\
      [--remat=true|false] [--remat_policy=full|dots_saveable|...] [--dtype=bfloat16] \\
      [--conv_impl=auto|xla|im2col]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from typing import Any


def _host_devices_from_argv(argv: list[str]) -> None:
    """``--devices=N`` (N > 1) as ``--xla_force_host_platform_device_count=N``, before JAX starts."""
    for arg in argv:
        if arg.startswith("--devices=") and int(arg.split("=", 1)[1]) > 1:
            flag = f"--xla_force_host_platform_device_count={int(arg.split('=', 1)[1])}"
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


_host_devices_from_argv(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from bench_host import cpu_model, usable_cores  # noqa: E402
from sd3_shapes import SD3_MEDIUM, SD3_SCHEDULE, SD3_TEXT  # noqa: E402
from sd15_shapes import SD15_UNET  # noqa: E402
from sdxl_shapes import SDXL_TEXT, SDXL_UNET  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from codi_jax import sharding  # noqa: E402
from codi_jax.configs.cpu import codi_full_sr4, codi_sr4, teacher_patches32, tiny_codi, tiny_teacher  # noqa: E402
from codi_jax.configs.sd import sd3_sr4, sd15_sr4, sdxl_sr4  # noqa: E402
from codi_jax.frozen import batch_inputs  # noqa: E402
from codi_jax.interop.torch_to_flax import unet_config_from_diffusers  # noqa: E402
from codi_jax.models import networks  # noqa: E402
from codi_jax.training import aot, recipes  # noqa: E402
from codi_jax.training.train_state import create_train_state, make_optimizer  # noqa: E402

SD15_TEXT = (77, 768)
DEFAULT_BATCH = {"tiny": None, "demo": None, "sd15": 4, "sdxl": 4, "sd3": 4}  # None: the config's batch_size


# ``config.latent.vae`` of the SD3 benchmark config: a latent DiT run's marker (the adapter reads the
# condition as VAE latents, ``batch_inputs.latent_condition``); the benchmark's step is handed latents
# and never reads a VAE.
SYNTHETIC_VAE = "(synthetic latents: no VAE read)"


def sd3_config() -> tuple[ml_collections.ConfigDict, dict[str, Any], dict[str, Any], int, tuple[int, int]]:
    """``(sd3_sr4 config, model section, schedule section, latent size, context)`` of an SD3-medium-shaped
    run as ``convert`` resolves it: the DiT on the flow schedule (velocity), the latent condition."""
    config = sd3_sr4.get_config()
    model = dict(SD3_MEDIUM, parametrization="v", dtype=config.model.dtype, remat=config.model.remat)
    with config.unlocked():
        config.latent.vae = SYNTHETIC_VAE
        config.sharding.fsdp = 1  # one device
    return config, model, dict(SD3_SCHEDULE), SD3_MEDIUM["sample_size"], SD3_TEXT


def run_config(name: str, method: str) -> tuple[ml_collections.ConfigDict, int, tuple[int, int] | None]:
    """``(resolved-like codi config, backbone input size, text context (tokens, width) or None)``."""
    if name == "sd3":
        config, model, schedule, latent, context = sd3_config()
    elif name in ("sd15", "sdxl"):
        config = sd15_sr4.get_config() if name == "sd15" else sdxl_sr4.get_config()
        unet, context = (SD15_UNET, SD15_TEXT) if name == "sd15" else (SDXL_UNET, SDXL_TEXT)
        model = dict(unet_config_from_diffusers(unet), kind="unet", parametrization="eps")
        model.update(dtype=config.model.dtype, remat=config.model.remat)
        schedule, latent = dict(kind="scaled_linear"), unet["sample_size"]
        with config.unlocked():
            config.sharding.fsdp = 1  # one device
    else:
        config, teacher = (tiny_codi.get_config(), tiny_teacher.get_config())
        if name == "demo":
            demo = codi_full_sr4 if method == "full" else codi_sr4
            config, teacher = demo.get_config(), teacher_patches32.get_config()
        model, schedule = teacher.model.to_dict(), teacher.schedule.to_dict()
        config.data = teacher.data
        latent, context = int(config.data.image_size), None
    with config.unlocked():
        config.model = ml_collections.ConfigDict(model)
        config.schedule = ml_collections.ConfigDict(schedule)
        config.adapter.train_backbone = method == "full"  # the tiny config's full CoDi; codi_full_sr4 sets it too
    return config, latent, context


def context_specs(backbone: Any, context: tuple[int, int] | None, batch: int) -> Any:
    """The batch's ``context`` as ``ShapeDtypeStruct`` s (None without text): ``(tokens, width)`` as the
    backbone reads it (``UNet.context_spec``: the token array, or SDXL's ``TEXT_TIME_KEYS`` dict)."""
    if context is None:
        return None
    if context[1] != backbone.cross_attention_dim:
        raise ValueError(
            f"context width {context[1]} != the UNet's cross_attention_dim {backbone.cross_attention_dim}."
        )
    return backbone.context_spec(batch, context[0])


def step_and_inputs(config: ml_collections.ConfigDict, latent: int, context: tuple[int, int] | None, batch: int):
    """``(step, init, abstract batch, abstract rng)``: the run's pure step and a fresh-state init."""
    model, schedule = networks.build_conditional(config)
    optimizer = make_optimizer(config.optimizer)
    step = recipes.bind_train_step(config, model, schedule, optimizer)
    channels = int(config.model.in_channels)
    cond_channels = networks.adapter_cond_channels(config)  # a latent DiT run's: the latent channels
    size = latent if batch_inputs.latent_condition(config) else int(config.data.image_size)
    context_tree = context_specs(model.backbone, context, batch)

    def init():
        one = None if context is None else (1, context[1])  # one token: the parameter shapes are the same
        one_context = jax.tree.map(jnp.zeros_like, context_specs(model.backbone, one, 1))
        sample = jnp.zeros((1, latent, latent, channels))
        backbone = model.backbone.init(jax.random.PRNGKey(0), sample, jnp.zeros((1,)), one_context)["params"]
        cond = jnp.zeros((1, size, size, cond_channels))
        params = model.init(jax.random.PRNGKey(1), backbone, cond, None, sample_shape=sample.shape, context=one_context)
        trained, frozen = model.split(params)
        return create_train_state(trained, optimizer, jax.random.PRNGKey(2), frozen)

    batch_tree = {
        "image": jax.ShapeDtypeStruct((batch, latent, latent, channels), jnp.float32),
        "cond": jax.ShapeDtypeStruct((batch, size, size, cond_channels), jnp.float32),
    }
    if context_tree is not None:
        batch_tree["context"] = context_tree
    return step, init, batch_tree, jax.ShapeDtypeStruct((2,), jnp.uint32)


def flops_of(cost: Any) -> float:
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get("flops", float("nan")))


def model_flops(config, latent, context, batch: int) -> float:
    """FLOPs of one step as the model needs them: the step lowered without remat (nothing compiled)."""
    plain = ml_collections.ConfigDict(config.to_dict())
    plain.model.remat = False
    step, init, batch_tree, rng = step_and_inputs(plain, latent, context, batch)
    return flops_of(jax.jit(step).lower(jax.eval_shape(init), batch_tree, rng).cost_analysis())


def random_like(abstract: Any, seed: int = 0) -> Any:
    leaves, tree = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [jax.random.uniform(k, a.shape, a.dtype, -1.0, 1.0) for k, a in zip(keys, leaves)])


def peak_memory() -> tuple[str, float | None]:
    """``(what, bytes)``: the device's peak bytes in use where reported, else the process's max RSS."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001  (unimplemented on some backends)
        stats = {}
    if "peak_bytes_in_use" in stats:
        return "memory_stats peak_bytes_in_use", float(stats["peak_bytes_in_use"])
    return "process max RSS (CPU: includes compiler + Python)", resource.getrusage(
        resource.RUSAGE_SELF
    ).ru_maxrss * 1024.0


def time_steps(compiled, init, batch_tree, steps: int, warmup: int, shardings=None) -> tuple[list[float], list[float]]:
    """``(wall seconds, process CPU seconds)`` of ``steps`` steps after ``warmup`` untimed ones
    (state donated step to step); ``shardings`` = (state, batch) placements, or None (one device)."""
    init_fn = jax.jit(init, out_shardings=None if shardings is None else shardings[0])
    init_fn = init_fn.lower().compile(compiler_options={"xla_backend_optimization_level": 0})
    state, batch, rng = init_fn(), random_like(batch_tree), jax.random.PRNGKey(3)
    if shardings is not None:
        batch = jax.device_put(batch, shardings[1])
    times, cpu = [], []
    for i in range(warmup + steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, batch, jax.random.fold_in(rng, i))
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return times, cpu


def apply_overrides(config: ml_collections.ConfigDict, args: argparse.Namespace) -> None:
    for field in ("attention_impl", "remat_policy", "dtype", "conv_impl"):
        if getattr(args, field) is not None:
            config.model[field] = getattr(args, field)
    if args.remat is not None:
        config.model.remat = args.remat == "true"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=("tiny", "demo", "sd15", "sdxl", "sd3"), default="tiny")
    p.add_argument("--method", choices=("pe", "full"), default="pe", help="PE-CoDi (adapter trains) or full CoDi")
    p.add_argument(
        "--batch", type=int, default=None, help="global batch (one device); default: the config's, sd15 / sdxl / sd3: 4"
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--no_run", action="store_true", help="compile only: memory and FLOPs, no step run")
    p.add_argument("--peak_tflops", type=float, default=None, help="the device's peak TFLOP/s (for MFU)")
    p.add_argument("--attention_impl", default=None, help="override model.attention_impl")
    p.add_argument("--remat", choices=("true", "false"), default=None, help="override model.remat")
    p.add_argument("--remat_policy", default=None, help="override model.remat_policy")
    p.add_argument("--dtype", default=None, help="override model.dtype")
    p.add_argument("--conv_impl", default=None, help="override model.conv_impl (auto, xla, im2col)")
    p.add_argument("--devices", type=int, default=1, help="data-parallel devices (CPU: simulated host devices)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    config, latent, context = run_config(args.config, args.method)
    apply_overrides(config, args)
    batch = args.batch or DEFAULT_BATCH[args.config] or int(config.batch_size)
    device = jax.local_devices()[0]
    print(f"host: {cpu_model()}, {len(usable_cores())} usable cores; device: {device.device_kind} ({device.platform})")
    model = config.model
    print(
        f"config={args.config} method={args.method} batch={batch} input {latent}x{latent}, dtype={model.dtype} "
        f"remat={model.remat} remat_policy={model.get('remat_policy', 'full')} "
        f"attention_impl={model.get('attention_impl', 'dot_product')}"
    )
    step, init, batch_tree, rng = step_and_inputs(config, latent, context, batch)
    shardings, jit_options = None, {}
    if args.devices > 1:  # data parallel: the batch split over the devices, the state replicated
        mesh = sharding.make_mesh(args.devices)
        shardings = (sharding.replicated(mesh), sharding.batch_sharding(mesh))
        jit_options = dict(in_shardings=(*shardings, shardings[0]), out_shardings=(shardings[0], shardings[0]))
        print(f"data parallel over {args.devices} devices (batch {batch // args.devices} each)")
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,), **jit_options).lower(jax.eval_shape(init), batch_tree, rng).compile()
    print(f"compile: {time.perf_counter() - start:.1f} s")
    report(compiled, config, latent, context, batch, args, init, batch_tree, shardings)


def report(compiled, config, latent, context, batch, args, init, batch_tree, shardings=None) -> None:
    sizes = aot.step_memory(compiled)
    if sizes is not None:
        print(aot.memory_line(sizes, aot.device_bytes_limit(jax.local_devices()[0])))
    flops, executed = model_flops(config, latent, context, batch), flops_of(compiled.cost_analysis())
    print(f"model FLOPs / step: {flops / 1e12:.4f} TFLOP (executed, remat included: {executed / 1e12:.4f} TFLOP)")
    if args.no_run:
        return
    times, cpu = time_steps(compiled, init, batch_tree, args.steps, args.warmup, shardings)
    median = statistics.median(times)
    what, peak = peak_memory()
    tflops = flops / median / 1e12
    mfu = f"{100 * tflops / args.peak_tflops:.1f}%" if args.peak_tflops else "n/a (give --peak_tflops)"
    print(f"peak memory ({what}): {peak / 2**30:.3f} GiB")
    print(
        f"step: median {1e3 * median:.1f} ms over {len(times)} (min {1e3 * min(times):.1f}, max "
        f"{1e3 * max(times):.1f}); cpu {1e3 * statistics.median(cpu):.1f} ms; {batch / median:.1f} images/s; "
        f"{tflops:.3f} TFLOP/s; MFU {mfu}"
    )


if __name__ == "__main__":
    main()
