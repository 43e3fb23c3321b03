"""The measurements of ``benchmarks/gpu_check.py``, one group of cases per process (see its docstring).

Each function returns JSON-ready rows (dicts); nothing here prints a table or decides what runs.
The networks are SD-1.5-shaped, SDXL-shaped for a case with ``model="sdxl"`` or SD3-medium-shaped for
``model="sd3"`` (``--dry_run``: tiny shapes of the same kinds) with random weights filled on the device,
the inputs synthetic arrays of the real shapes, and the text context a random (77, 768) array in place
of CLIP's output (SDXL: the ``UNet.context_spec`` dict, tokens (77, 2048), text_embeds (1280,) and 6
time ids; SD3: the ``DiT.context_spec`` dict, encoder_hidden_states (333, 4096) and pooled_projections
(2048,); random too). SD3's condition is a random 128x128x16 latent (what the VAE would hand the DiT's
ControlNet).
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from gpu_check import flops_key
from latent_encoding import TINY_UNET, TINY_VAE
from sd3_shapes import SD3_MEDIUM, SD3_TEXT
from sd15_shapes import SD15_UNET, SD15_VAE
from sdxl_shapes import SDXL_TEXT, SDXL_UNET
from train_throughput import SD15_TEXT, flops_of, model_flops, peak_memory, run_config, step_and_inputs

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from codi_jax.frozen import encoders  # noqa: E402
from codi_jax.interop.torch_to_flax import unet_config_from_diffusers  # noqa: E402
from codi_jax.models import networks  # noqa: E402
from codi_jax.models.vae import vae_from_diffusers_config, vae_param_shapes  # noqa: E402
from codi_jax.sampling import conditional, samplers  # noqa: E402
from codi_jax.training.aot import device_bytes_limit, step_memory  # noqa: E402
from codi_jax.training.train_state import model_params  # noqa: E402

GIB = float(2**30)
BATCH_STEPS = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256)
MEMORY_SAFETY = 0.92  # the share of the device's bytes_limit a predicted batch may fill (AOT)
TINY_TEXT = (77, 32)
TINY_HINT = (4, 4, 8, 8)
# The dry run's UNet: one level of latent_encoding's tiny UNet (cross-attention kept), so the CPU compiles little.
DRY_UNET = dict(TINY_UNET, block_out_channels=[16], down_block_types=["CrossAttnDownBlock2D"])
DRY_UNET.update(up_block_types=["CrossAttnUpBlock2D"])
# The dry run's SDXL-kind UNet: the same level with linear projections and the text_time added
# embedding (a 16-wide pooled text embedding and 6 time ids of 8 sinusoids each): the dict context.
DRY_SDXL_UNET = dict(DRY_UNET, use_linear_projection=True)
DRY_SDXL_UNET.update(addition_embed_type="text_time", addition_time_embed_dim=8)
DRY_SDXL_UNET.update(projection_class_embeddings_input_dim=16 + 6 * 8)
# The dry run's SD3-kind DiT: two joint blocks 16 wide (the ControlNet copies one), 16 latent channels,
# the tiny text width for the joint attention and a 16-wide pooled projection: the dict context.
DRY_SD3_DIT = dict(SD3_MEDIUM, num_layers=2, num_attention_heads=2, attention_head_dim=8)
DRY_SD3_DIT.update(joint_attention_dim=TINY_TEXT[1], pooled_projection_dim=16, pos_embed_max_size=8, sample_size=8)


def shapes(dry_run: bool, model: str = "sd15") -> dict[str, Any]:
    """The networks' configs (a UNet's diffusers config, or ``dit``: SD3's ``DiT`` fields) and the input
    sizes: SD-1.5 at 512 px, SDXL or SD3 at 1024 px (``model="sdxl"`` / ``"sd3"``, train cases only: no
    VAE), or tiny ones."""
    if dry_run and model == "sd3":
        return dict(unet=None, dit=DRY_SD3_DIT, vae=None, image=64, latent=8, context=TINY_TEXT, hint=None)
    if dry_run:
        unet = DRY_SDXL_UNET if model == "sdxl" else DRY_UNET
        return dict(unet=unet, vae=TINY_VAE, image=64, latent=8, context=TINY_TEXT, hint=TINY_HINT)
    if model == "sd3":
        return dict(unet=None, dit=SD3_MEDIUM, vae=None, image=1024, latent=128, context=SD3_TEXT, hint=None)
    if model == "sdxl":
        return dict(unet=SDXL_UNET, vae=None, image=1024, latent=128, context=SDXL_TEXT, hint=None)
    return dict(unet=SD15_UNET, vae=SD15_VAE, image=512, latent=64, context=SD15_TEXT, hint=None)


def dry_model(size: dict[str, Any], model: ml_collections.ConfigDict) -> dict[str, Any]:
    """The dry run's model section: the tiny UNet (eps) or DiT (flow velocity, 'v') with ``model``'s
    dtype and remat."""
    if size["unet"] is None:
        fields = dict(size["dit"], parametrization="v")
    else:
        fields = dict(unet_config_from_diffusers(size["unet"]), kind="unet", parametrization="eps")
    return dict(fields, dtype=model.dtype, remat=model.remat)


def check_config(method: str, attention_impl: str, remat_policy: str, dry_run: bool, model: str = "sd15"):
    """``(config, latent size, context shape)``: ``sd15_sr4`` (``model="sdxl"``: ``sdxl_sr4``; ``"sd3"``:
    ``sd3_sr4``) as ``train_throughput`` builds it, with the model's attention / remat choices (and, for
    the dry run, the tiny shapes)."""
    config, latent, context = run_config(model, method)
    size = shapes(dry_run, model)
    if dry_run:
        with config.unlocked():
            config.model = ml_collections.ConfigDict(dry_model(size, config.model))
            config.data.image_size = size["image"]
            if size["hint"] is not None:  # a UNet ControlNet's hint network (a DiT's reads latents)
                config.adapter.hint_channels = size["hint"]
        latent, context = size["latent"], size["context"]
    with config.unlocked():
        config.model.attention_impl = attention_impl
        config.model.remat_policy = remat_policy
    return config, latent, context


@functools.partial(jax.jit, static_argnums=(1, 2))
def _piece(buffer: jax.Array, shape: tuple[int, ...], dtype: Any, start: jax.Array) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(buffer, start, math.prod(shape)).reshape(shape).astype(dtype)


def filled(abstract: Any, seed: int = 0) -> Any:
    """Arrays of ``abstract``'s shapes on the device: floats ~ N(0, 0.02^2), each a slice of one random
    buffer (one program per distinct shape: cheap to compile for a thousand leaves), integers 0."""
    leaves, tree = jax.tree.flatten(abstract)
    largest = max([math.prod(a.shape) for a in leaves] + [1])
    buffer = 0.02 * jax.random.normal(jax.random.PRNGKey(seed), (2 * largest,), jnp.float32)
    made = [
        _piece(buffer, tuple(a.shape), a.dtype, jnp.int32((i * 7919) % (largest + 1)))
        if jnp.issubdtype(a.dtype, jnp.floating)
        else jnp.zeros(a.shape, a.dtype)
        for i, a in enumerate(leaves)
    ]
    return jax.tree.unflatten(tree, made)


def compile_step(config, latent: int, context, batch: int) -> dict[str, Any]:
    """The run's train step jitted with the state donated and compiled ahead of time at ``batch``."""
    step, init, batch_tree, rng = step_and_inputs(config, latent, context, batch)
    abstract = jax.eval_shape(init)
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(abstract, batch_tree, rng).compile()
    sizes = step_memory(compiled)
    return dict(
        batch=batch,
        compiled=compiled,
        abstract=abstract,
        batch_tree=batch_tree,
        compile_s=time.perf_counter() - start,
        aot=sizes,
    )


def predicted_batch(probe: dict[str, Any], limit: int) -> int:
    """The largest of ``BATCH_STEPS`` whose AOT total, extrapolated linearly in the temporaries from
    the probe compile, stays under ``MEMORY_SAFETY`` of ``limit``."""
    sizes = probe["aot"]
    per_example = sizes["temp"] / probe["batch"]
    room = MEMORY_SAFETY * limit - (sizes["total"] - sizes["temp"])
    under = [b for b in BATCH_STEPS if b * per_example <= room]
    return max(under) if under else 1


def fits(candidate: dict[str, Any], limit: int) -> bool:
    """Whether a compiled candidate's AOT total is within the device's limit (unknown: assumed so)."""
    return candidate["aot"] is None or candidate["aot"]["total"] <= limit


def search_batch(
    config, latent: int, context, args, fixed: int | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int | None]:
    """``(candidates, every compile, bytes limit)``. Candidates, largest batch first: the probe
    (``fixed`` / ``--batch`` / ``--probe_batch``, halved until its AOT total fits) and, where the device
    reports a memory limit, the batch its AOT memory predicts if that fits too (a prediction that does
    not fit is refined once from its own compile). ``limit`` None (CPU), ``fixed`` or ``--batch``: the
    probe only (one compile)."""
    limit = device_bytes_limit(jax.local_devices()[0])
    fixed = fixed or args.batch
    probe = compile_step(config, latent, context, fixed or args.probe_batch)
    tries = [probe]
    if fixed or limit is None or probe["aot"] is None:
        return [probe], tries, limit
    while not fits(probe, limit) and probe["batch"] > 1:
        probe = compile_step(config, latent, context, probe["batch"] // 2)
        tries.append(probe)
    base = probe
    for _ in range(2):
        target = predicted_batch(base, limit)
        if target <= probe["batch"] or target == base["batch"]:
            break
        bigger = compile_step(config, latent, context, target)
        tries.append(bigger)
        if fits(bigger, limit):
            return [bigger, probe], tries, limit
        base = bigger
    return [probe], tries, limit


def train_times(compiled: Any, state: Any, batch: Any, steps: int, warmup: int) -> list[float]:
    """Wall seconds of ``steps`` device-synchronised steps after ``warmup`` (the state donated step to step)."""
    rng, times = jax.random.PRNGKey(3), []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, jax.random.fold_in(rng, i))
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return times[warmup:]


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def run_candidates(tries: list[dict[str, Any]], args) -> tuple[dict[str, Any], list[float], list[str]]:
    """Times the largest candidate that runs; an out-of-memory step falls back to the next one."""
    notes = []
    for i, candidate in enumerate(tries):
        try:
            state, batch = filled(candidate["abstract"]), filled(candidate["batch_tree"], seed=1)
            times = train_times(candidate["compiled"], state, batch, args.steps, args.warmup)
            return candidate, times, notes
        except Exception as error:  # noqa: BLE001  (an OOM at the first step: the next candidate)
            if i + 1 == len(tries) or not is_out_of_memory(error):
                raise
            notes.append(f"batch {candidate['batch']}: out of memory at run time ({str(error)[:160]})")
    raise RuntimeError("no batch candidate")


def aot_fields(sizes: dict[str, int] | None) -> dict[str, Any]:
    if sizes is None:
        return dict(aot_gib=None, aot_bytes=None)
    return dict(aot_gib=sizes["total"] / GIB, aot_bytes=sizes)


def device_peak_gib() -> float | None:
    """``memory_stats()['peak_bytes_in_use']`` of this process's device (None on CPU)."""
    what, peak = peak_memory()
    return peak / GIB if what.startswith("memory_stats") else None


def train_row(case: dict[str, Any], known_flops: dict[str, float], args) -> dict[str, Any]:
    """One train case: batch search, median step time, images/s, model TFLOP/s, MFU, AOT vs peak.
    ``known_flops``: model FLOPs per step by ``method@batch`` from earlier cases (not lowered again)."""
    method, model = case["method"], case.get("model", "sd15")
    config, latent, context = check_config(method, case["attention_impl"], case["remat_policy"], args.dry_run, model)
    candidates, tries, limit = search_batch(config, latent, context, args, case.get("fixed_batch"))
    chosen, times, notes = run_candidates(candidates, args)
    batch, median = chosen["batch"], statistics.median(times)
    flops = known_flops.get(flops_key(case, batch))
    if flops is None:
        plain = ml_collections.ConfigDict(config.to_dict())
        plain.model.attention_impl = "dot_product"  # the same math; XLA's cost analysis cannot see cuDNN's kernel
        flops = model_flops(plain, latent, context, batch)
    tflops = flops / median / 1e12
    return dict(
        batch=batch,
        step_ms=1e3 * median,
        step_ms_all=[1e3 * t for t in times],
        images_per_s=batch / median,
        ms_per_image=1e3 * median / batch,
        model_flops_per_step=flops,
        model_tflop_per_step=flops / 1e12,
        executed_tflop_per_step=flops_of(chosen["compiled"].cost_analysis()) / 1e12,
        tflops=tflops,
        mfu=tflops / args.peak_tflops,
        compile_s=chosen["compile_s"],
        batch_search=[dict(batch=t["batch"], compile_s=t["compile_s"], **aot_fields(t["aot"])) for t in tries],
        bytes_limit_gib=None if limit is None else limit / GIB,
        peak_gib=device_peak_gib(),
        notes=notes,
        **aot_fields(chosen["aot"]),
    )


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` device-synchronised calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def sampling_parts(args) -> dict[str, Any]:
    """The PE-CoDi student (UNet + ControlNet) and the VAE with random weights, on the device."""
    config, latent, context = check_config("pe", "dot_product", "full", args.dry_run)
    with config.unlocked():
        config.model.attention_impl = args.sample_attention_impl
        config.model.remat = False
    model, schedule = networks.build_conditional(config)
    _, init, _, _ = step_and_inputs(config, latent, context, 1)
    params = filled(model_params(jax.eval_shape(init), ema=True))
    vae = vae_from_diffusers_config(shapes(args.dry_run)["vae"])
    vae_params = filled(vae_param_shapes(vae), seed=1)
    return dict(
        config=config, model=model, schedule=schedule, params=params, vae=vae, vae_params=vae_params,
        latent=latent, context=context,
    )  # fmt: skip


def sampler_inputs(parts: dict[str, Any], batch: int, guidance_scale: float | None) -> dict[str, Any]:
    """A batch of random conditions, initial noise and text contexts (CFG: with a negative one)."""
    config, latent = parts["config"], parts["latent"]
    size = int(config.data.image_size)
    keys = jax.random.split(jax.random.PRNGKey(batch), 4)
    text = {
        "context": jax.random.normal(keys[0], (batch, *parts["context"]), jnp.float32),
        "uncond_context": jax.random.normal(keys[1], (batch, *parts["context"]), jnp.float32),
        "guidance_scale": None if guidance_scale is None else jnp.full((batch,), guidance_scale, jnp.float32),
    }
    return dict(
        cond=jax.random.uniform(keys[2], (batch, size, size, 3), jnp.float32, -1.0, 1.0),
        z=jax.random.normal(keys[3], (batch, latent, latent, int(config.model.in_channels)), jnp.float32),
        text=text,
    )


def sampling_program(parts: dict[str, Any], case: dict[str, Any], args) -> tuple[list, Callable, dict[str, Any]]:
    """``(lowered programs, run(compiled programs), row fields)`` of one case. Sampling: the sampler
    (CoDi's grid and re-noising, or the many-step DDIM teacher with CFG) then the VAE decode, as
    ``few_step.sample_conditional`` runs them; ``vae_encode``: the encoder (a posterior sample, as
    ``latent.encode='sample'`` trains)."""
    batch, vae_params = case["batch"], parts["vae_params"]
    if case["kind"] == "vae_encode":
        size = int(parts["config"].data.image_size)
        encode = jax.jit(functools.partial(encoders.encode_images, parts["vae"], mode="sample"))
        images = jax.random.uniform(jax.random.PRNGKey(5), (batch, size, size, 3), jnp.float32, -1.0, 1.0)
        rng = jax.random.PRNGKey(6)
        run = lambda compiled: compiled[0](vae_params, images, rng)
        return [encode.lower(vae_params, images, rng)], run, dict(vae_dtype=jnp.dtype(parts["vae"].dtype).name)
    teacher, config = case["kind"] == "teacher", parts["config"]
    guidance = args.teacher_guidance if teacher else None
    grid = samplers.uniform_times(case["steps"]) if teacher else conditional.sample_times(config, case["steps"])
    renoise = not teacher and conditional.renoise_between_steps(config)
    data, grid = sampler_inputs(parts, batch, guidance), jnp.asarray(grid)
    keys = samplers.example_keys(0, range(batch)) if renoise else None
    inputs = (parts["params"], data["cond"], None, data["z"], grid, keys, data["text"])
    sample = conditional.make_conditional_sampler(parts["model"], parts["schedule"], "eps", clip=False)
    decode = jax.jit(functools.partial(encoders.decode_latents, parts["vae"]))
    latents = jax.ShapeDtypeStruct(data["z"].shape, jnp.float32)
    run = lambda compiled: compiled[1](vae_params, compiled[0](*inputs))
    lowered = [sample.lower(*inputs), decode.lower(vae_params, latents)]
    return lowered, run, dict(steps=case["steps"], guidance_scale=guidance, renoise=renoise)


def _compile_timed(lowered: list) -> tuple[list, float]:
    start = time.perf_counter()
    return [program.compile() for program in lowered], time.perf_counter() - start


def measured_row(case: dict[str, Any], compiled: list, run: Callable, compile_s: float, args) -> dict[str, Any]:
    """Median latency of ``run`` over ``--sample_repeats`` synchronised calls, and the AOT memory."""
    times = timed(lambda: run(compiled), args.sample_repeats)
    median, batch = statistics.median(times), case["batch"]
    sizes = [step_memory(program) for program in compiled]
    aot = None if None in sizes else max(size["total"] for size in sizes)
    key = "step_ms" if case["kind"] == "vae_encode" else "sample_ms"
    return {
        "batch": batch,
        key: 1e3 * median,
        f"{key}_all": [1e3 * t for t in times],
        "images_per_s": batch / median,
        "ms_per_image": 1e3 * median / batch,
        "compile_s": compile_s,
        "aot_gib": None if aot is None else aot / GIB,
        "aot_bytes": sizes,
        "peak_gib": device_peak_gib(),
    }


def _error(case: dict[str, Any], error: BaseException) -> dict[str, Any]:
    return dict(case, status="error", error=f"{type(error).__name__}: {error}"[:2000])


def sampling_rows(cases: list[dict[str, Any]], args) -> Iterator[dict[str, Any]]:
    """The sampling / VAE cases in one process (the networks built once): every program lowered, then
    compiled on ``--compile_threads`` threads (each row's ``compile_s`` is its own, overlapping the
    others'), then each case timed alone; a failing case gives its error row and the others run."""
    parts, programs = sampling_parts(args), {}
    for case in cases:
        try:
            programs[case["case"]] = sampling_program(parts, case, args)
        except Exception as error:  # noqa: BLE001  (recorded; the next case runs)
            programs[case["case"]] = error
    with concurrent.futures.ThreadPoolExecutor(max(1, args.compile_threads)) as pool:
        futures = {
            name: pool.submit(_compile_timed, program[0])
            for name, program in programs.items()
            if not isinstance(program, BaseException)
        }
        concurrent.futures.wait(futures.values())  # nothing compiles while a case is timed
        for case in cases:
            program = programs[case["case"]]
            try:
                if isinstance(program, BaseException):
                    raise program
                compiled, compile_s = futures[case["case"]].result()
                row = measured_row(case, compiled, program[1], compile_s, args)
                yield dict(case, status="ok", **program[2], **row)
            except Exception as error:  # noqa: BLE001  (recorded; the next case runs)
                yield _error(case, error)


def process_fields() -> dict[str, Any]:
    """What every row records about the process that measured it."""
    device = jax.local_devices()[0]
    return dict(
        device_kind=device.device_kind,
        platform=device.platform,
        device_count=jax.device_count(),
        jax_version=jax.__version__,
        tensorflow_imported="tensorflow" in sys.modules,
    )


def group_rows(group: dict[str, Any], args) -> Iterator[dict[str, Any]]:
    if group["kind"] == "sampling":
        yield from sampling_rows(group["cases"], args)
        return
    for case in group["cases"]:
        try:
            yield dict(case, status="ok", **train_row(case, group.get("known_flops", {}), args))
        except Exception as error:  # noqa: BLE001  (recorded: cudnn unsupported, out of memory, ...)
            yield _error(case, error)


def run_child(group: dict[str, Any], args) -> None:
    """A child process of ``gpu_check.py``: its group's rows, one JSON line each as it is done."""
    if args.teacher_guidance is None:
        from codi_jax.configs.sd import sd15_edit

        args.teacher_guidance = float(sd15_edit.get_config().sample_guidance_scale)
    for row in group_rows(group, args):
        row.update(process_fields())
        with open(args.result, "a") as f:
            f.write(json.dumps(row) + "\n")
        summary = "ok" if row["status"] == "ok" else f"{row['status']}: {row['error'][:300]}"
        numbers = ", ".join(
            f"{k} {row[k]:.4g}"
            for k in ("batch", "step_ms", "sample_ms", "images_per_s", "mfu")
            if row.get(k) is not None
        )
        print(f"[gpu_check] {row['case']}: {summary}" + (f" ({numbers})" if numbers else ""), flush=True)
