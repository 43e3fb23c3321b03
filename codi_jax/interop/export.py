"""Writing a trained run as a diffusers folder (the library behind ``python -m codi_jax.export``).

``python -m codi_jax.export --run=RUN --out=DIR [--overwrite] [--steps=4]``

A conditional (CoDi / fine-tune) run with a ControlNet adapter becomes ``DIR/unet/`` (the
backbone it samples with, LoRA merged; for PE-CoDi the frozen teacher's), ``DIR/controlnet/``
(diffusers ``ControlNetModel``), ``DIR/scheduler/scheduler_config.json`` and ``DIR/README.md``,
generated from the run. A latent text run also gets its frozen ``vae/``, ``text_encoder/``,
``tokenizer/`` and ``model_index.json``: a ``StableDiffusionControlNetPipeline`` whose call, with
the README's arguments (prompt, guidance scale, condition in [0, 1], CoDi's ``timesteps``), gives
``codi_jax.sample``'s images. An SDXL run (``text.encoder_2``) also gets ``text_encoder_2/`` and
``tokenizer_2/``: a ``StableDiffusionXLControlNetPipeline`` (``force_zeros_for_empty_prompt`` the
run's), called with the time ids the run samples with, ``(H, W, 0, 0, H, W)``. A teacher run
becomes ``unet/`` + ``scheduler/`` (a latent text teacher: the whole ``StableDiffusion[XL]Pipeline``).
An SD3 (joint DiT) CoDi / fine-tune run becomes a ``StableDiffusion3ControlNetPipeline``
(``codi_jax.interop.export_sd3``); DiT teachers and pixel DiT runs are refused in one line.
The mu-fusion and T2I adapters and CFG-distilled students export as a custom component
(``codi_model/``; refused for SDXL runs). The folder is written atomically; an existing
non-empty ``--out`` is refused (before any weights are read) unless ``--overwrite``.

Schedulers (``scheduler_config``): a re-noising CoDi run gets an ``LCMScheduler`` whose step is
CoDi's move; other runs a ``DDIMScheduler`` (deterministic DDIM on evenly spaced times). The
discrete ``scaled_linear`` / ``linear`` schedules map exactly to diffusers' betas (our model time
is diffusers' integer timestep). Our ``cosine`` schedule (log-SNR clipped to [-15, 15], fed
``1000 t``) has no exact diffusers equivalent: the scheduler config says ``squaredcos_cap_v2`` and
the README states it is an approximation and by how much; the README's sampling loop (for folders
without a pipeline) uses our exact ``alpha_t`` / ``sigma_t`` whatever the schedule.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

# The codi_jax modules (JAX, and TensorFlow through the data pipeline) are imported where they are
# used, so that the CLI's refusals (an existing --out, a missing workdir) answer at once.
if TYPE_CHECKING:
    from codi_jax import diffusion

PREDICTION_TYPES = {"v": "v_prediction", "eps": "epsilon", "x": "sample"}
BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}


def check_out(out: str, overwrite: bool) -> None:
    """Refuses an existing non-empty ``out`` (or a file there) unless ``overwrite``."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out={out} exists and is not a directory.")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"--out={out} exists and is not empty; pass --overwrite to replace it.")


LCM_TIMESTEP_SCALING = 1.0e6  # LCM's boundary scalings at timestep k >= 1: c_skip < 1e-13, c_out = 1 (float32)


def scheduler_config(
    schedule: diffusion.Schedule,
    parametrization: str,
    *,
    clip_sample: bool = True,
    renoise: bool = False,
    grid_size: int = 50,
) -> dict[str, Any]:
    """The exported scheduler: our betas, prediction type and moves.

    ``renoise`` (CoDi's multistep sampling): an ``LCMScheduler`` whose step is ours exactly, given
    our timesteps (``pipe(..., timesteps=pipeline_timesteps(...))``): x_hat (clipped to [-1, 1] in
    pixel space, ``clip_sample``), then ``z_s = alpha_s x_hat + sigma_s eps`` with fresh noise, x_hat at
    the last step. Its boundary scalings are switched off (``timestep_scaling`` large: c_out = 1,
    c_skip < 1e-13 at every timestep >= 1) and ``original_inference_steps`` is CoDi's grid, on which
    our timesteps lie. Otherwise a ``DDIMScheduler``: deterministic DDIM on evenly spaced
    (``trailing``) times, the teacher / fine-tune sampler, ending at ``t = 0`` (final alpha 1).
    """
    from codi_jax.interop.flax_to_torch import DIFFUSERS_VERSION

    if parametrization not in PREDICTION_TYPES:
        raise ValueError(f"parametrization={parametrization!r}; expected one of {sorted(PREDICTION_TYPES)}.")
    config = {
        "_class_name": "LCMScheduler" if renoise else "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": int(schedule.num_train_timesteps) if schedule.is_discrete else 1000,
        "beta_start": float(schedule.beta_start),
        "beta_end": float(schedule.beta_end),
        "beta_schedule": BETA_SCHEDULES[schedule.kind],
        "trained_betas": None,
        "prediction_type": PREDICTION_TYPES[parametrization],
        "clip_sample": bool(clip_sample),
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "thresholding": False,
        "rescale_betas_zero_snr": False,
    }
    if renoise:
        config.update(original_inference_steps=int(grid_size), timestep_scaling=LCM_TIMESTEP_SCALING)
        config.update(timestep_spacing="leading")  # unused: the pipeline is given our timesteps
    else:
        config.update(timestep_spacing="trailing")
    return config


def cosine_approximation_error(schedule: diffusion.Schedule) -> float:
    """Max |alpha| difference between diffusers' ``squaredcos_cap_v2`` at timestep k and our cosine
    schedule at the same model time (``t = k / 1000``), over k = 0..999."""
    steps = 1000
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)]
    theirs = np.sqrt(np.cumprod(1.0 - np.asarray(betas)))
    ours, _ = schedule.alpha_sigma(np.arange(steps, dtype=np.float32) / steps)
    return float(np.max(np.abs(theirs - np.asarray(ours, np.float64))))


def step_table(config: Any, schedule: diffusion.Schedule, steps: int) -> list[tuple[float, float, float, float]]:
    """``(t, model timestep, alpha_t, sigma_t)`` from the first sampling time down to ``t = 0``:
    the run's few-step grid (``conditional.sample_times``) or, for a teacher, uniform times."""
    from codi_jax.sampling import conditional, samplers

    if config.get("method", "teacher") == "teacher":
        times = samplers.uniform_times(steps)
    else:
        times = conditional.sample_times(config, steps)
    alpha, sigma = schedule.alpha_sigma(times)
    model_times = schedule.model_time(times)
    return [
        (float(t), float(m), float(a), float(s))
        for t, m, a, s in zip(times, np.asarray(model_times), np.asarray(alpha), np.asarray(sigma))
    ]


def model_parts(pre: Any) -> list[tuple[str, dict[str, Any], dict[str, np.ndarray]]]:
    """``(subfolder, config.json, state dict)`` of every network of a restored run (``Pretrained``):
    a teacher's ``unet``; a conditional run's ``unet`` + ``controlnet`` where diffusers' classes
    represent it, else the custom component ``codi_model`` (``codi_component``). LoRA is merged."""
    from codi_jax.interop import codi_component, flax_to_torch
    from codi_jax.models import networks
    from codi_jax.models.unet import UNet

    data = pre.config.get("data")
    sample_size = networks.model_input_size(pre.config) if data is not None and data.get("image_size") else None
    if isinstance(pre.model, UNet):  # a teacher
        config = flax_to_torch.unet_diffusers_config(pre.model, sample_size)
        return [("unet", config, flax_to_torch.unet_state_dict(pre.model, pre.params))]
    params = pre.model.module_params(pre.params)  # LoRA merged into the backbone
    module = pre.model.module
    if codi_component.diffusers_gap(module) is not None:
        config = codi_component.component_config(module, params, sample_size)
        return [(codi_component.NAME, config, codi_component.component_state_dict(module, params))]
    backbone, adapter = module.backbone, module.adapter
    return [
        (
            "unet",
            flax_to_torch.unet_diffusers_config(backbone, sample_size),
            flax_to_torch.unet_state_dict(backbone, params["backbone"]),
        ),
        (
            "controlnet",
            flax_to_torch.controlnet_diffusers_config(adapter),
            flax_to_torch.controlnet_state_dict(adapter, params["adapter"]),
        ),
    ]


def run_scheduler_config(pre: Any) -> dict[str, Any]:
    """``scheduler_config`` of a restored run: re-noising and grid from its config, clipping in pixels only."""
    from codi_jax.frozen import encoders
    from codi_jax.sampling import conditional

    renoise = pre.config.method != "teacher" and conditional.renoise_between_steps(pre.config)
    grid = int(pre.config.codi.grid_size) if renoise else 50
    return scheduler_config(
        pre.schedule,
        pre.parametrization,
        clip_sample=not encoders.is_latent(pre.config),
        renoise=renoise,
        grid_size=grid,
    )


def step_counts(config: Any, steps: int) -> list[int]:
    """The step counts the README lists: 1, 2, 4 and ``steps``, those the run's grid holds."""
    grid = int(config.codi.grid_size) if config.method == "codi" else 1000
    return sorted({n for n in (1, 2, 4, steps) if n <= grid})


def pipeline_timesteps(config: Any, schedule: diffusion.Schedule, steps: int) -> list[int]:
    """The integer timesteps a diffusers pipeline is given (``timesteps=``) to sample on our grid."""
    return [int(round(m)) for _, m, _, _ in step_table(config, schedule, steps)[:-1]]


def timesteps_exact(config: Any, schedule: diffusion.Schedule, steps: int) -> bool:
    """Whether diffusers' integer timesteps are our model times (discrete schedule, grid dividing T)."""
    table = step_table(config, schedule, steps)[:-1]
    return schedule.is_discrete and all(abs(m - round(m)) < 1e-3 and round(m) >= 1 for _, m, _, _ in table)


def _model_call(parts: Mapping[str, Mapping[str, Any]]) -> str:
    """The network evaluation inside the README's sampling loop."""
    if "codi_model" in parts:
        return (
            "        out = model(z, time, cond, encoder_hidden_states=context, guidance_scale=guidance_scale,\n"
            "                    instruction=instruction)\n"
        )
    if "controlnet" in parts:
        return (
            "        down, mid = controlnet(z, time, encoder_hidden_states=context, controlnet_cond=cond, "
            "return_dict=False)\n"
            "        out = unet(z, time, encoder_hidden_states=context, down_block_additional_residuals=down,\n"
            "                   mid_block_additional_residual=mid).sample\n"
        )
    if parts["unet"]["_class_name"] == "UNet2DConditionModel":
        return "        out = unet(z, time, encoder_hidden_states=context).sample\n"
    return "        out = unet(z, time).sample\n"


def sampler_snippet(
    parts: Mapping[str, Mapping[str, Any]],
    table: list[tuple[float, ...]],
    parametrization: str,
    renoise: bool,
    clip: bool = True,
) -> str:
    """A self-contained PyTorch sampling loop: our exact sampler (x_hat, clipped in pixel space;
    DDIM or re-noising moves), for folders without a diffusers pipeline."""
    rows = "".join(f"    ({m!r}, {a!r}, {s!r}),  # t = {t:.4f}\n" for t, m, a, s in table[:-1])
    t, m, a, s = table[-1]
    rows += f"    ({m!r}, {a!r}, {s!r}),  # t = {t:.4f}: the end (its timestep is never fed)\n"
    return (
        "import torch\n\n"
        "# (model timestep fed to the networks, alpha_t, sigma_t), from the first time down to t = 0\n"
        f"STEPS = [\n{rows}]\n"
        f"PREDICTION = {parametrization!r}  # what the network predicts: 'v' | 'eps' | 'x'\n"
        f"RENOISE = {renoise!r}  # True: fresh noise between steps (CoDi); False: DDIM moves\n"
        f"CLIP = {clip!r}  # clip x_hat to [-1, 1] (pixel models; latents are not clipped)\n\n\n"
        "@torch.no_grad()\n"
        "def sample(z, cond=None, context=None, generator=None, guidance_scale=None, instruction=None, noise=None):\n"
        '    """z: NCHW standard-normal noise at the first time; returns x_hat of the last step.\n'
        '    noise(k, shape): the re-noising noise of step k (default: torch.randn with generator)."""\n'
        "    for k, ((timestep, alpha, sigma), (_, alpha_s, sigma_s)) in enumerate(zip(STEPS[:-1], STEPS[1:])):\n"
        "        time = torch.full((z.shape[0],), timestep)\n"
        f"{_model_call(parts)}"
        '        if PREDICTION == "v":\n'
        "            x, eps = alpha * z - sigma * out, sigma * z + alpha * out\n"
        '        elif PREDICTION == "eps":\n'
        "            x, eps = (z - sigma * out) / alpha, out\n"
        "        else:\n"
        "            x, eps = out, (z - alpha * out) / max(sigma, 1e-8)\n"
        "        if CLIP:\n"
        "            x = x.clamp(-1.0, 1.0)\n"
        "        if RENOISE:\n"
        "            eps = torch.randn(z.shape, generator=generator) if noise is None else noise(k, z.shape)\n"
        "        z = alpha_s * x + sigma_s * eps\n"
        "    return x\n"
    )


def _loading_snippet(parts: Mapping[str, Mapping[str, Any]], path: str, config: Any) -> str:
    """Loads the folder's networks (and a text run's encoder, a latent run's VAE) in PyTorch."""
    if "codi_model" in parts:
        lines = ["from diffusers import AutoModel", "", f"path = {path!r}  # this folder"]
        lines.append('model = AutoModel.from_pretrained(path, subfolder="codi_model", trust_remote_code=True).eval()')
    else:
        lines = [f"from diffusers import {', '.join(sorted({c['_class_name'] for c in parts.values()}))}", ""]
        lines.append(f"path = {path!r}  # this folder")
        for name, part in parts.items():
            lines.append(f'{name} = {part["_class_name"]}.from_pretrained(path, subfolder="{name}").eval()')
    frozen = _frozen_components(config)
    if "text_encoder" in frozen:
        lines += [
            "",
            "from transformers import CLIPTextModel, CLIPTokenizer",
            "",
            'tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")',
            'text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval()',
            f"PROMPT, NEGATIVE_PROMPT = {config.text.prompt!r}, {config.text.negative_prompt!r}  # the run's",
            "",
            "",
            "def encode(prompts):  # the context: CLIP's last hidden states",
            "    n = tokenizer.model_max_length",
            '    ids = tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt")',
            "    return text_encoder(ids.input_ids)[0]",
        ]
    if "vae" in frozen:
        lines += [
            "",
            "",
            "from diffusers import AutoencoderKL",
            "",
            'vae = AutoencoderKL.from_pretrained(path, subfolder="vae").eval()',
            "# images in [-1, 1]: vae.decode(latents / vae.config.scaling_factor).sample",
        ]
    return "\n".join(lines) + "\n"


def pipeline_snippet(pre: Any, parts: Mapping[str, Mapping[str, Any]], path: str, steps: int) -> str:
    """The README's diffusers code: the folder's pipeline and ``sample(condition, steps)`` with the
    run's prompt, guidance scale, size and (re-noising runs) CoDi's timesteps."""
    config = pre.config
    pipeline = _pipeline_class(config, parts)
    renoise = run_scheduler_config(pre)["_class_name"] == "LCMScheduler"
    size = int(config.data.image_size)
    if renoise:
        grid = {n: pipeline_timesteps(config, pre.schedule, n) for n in step_counts(config, steps)}
        head, schedule = f"TIMESTEPS = {grid!r}  # CoDi's grid, per step count\n", "timesteps=TIMESTEPS[steps]"
    else:
        head, schedule = "", "num_inference_steps=steps"
    image = "        image=condition,\n        controlnet_conditioning_scale=1.0,\n" if "controlnet" in parts else ""
    load = "add_watermarker=False" if _is_sdxl(config) else "safety_checker=None"
    return (
        "import torch\n"
        f"from diffusers import {pipeline}\n\n"
        f"pipe = {pipeline}.from_pretrained({path!r}, {load})\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        f"{head}\n\n"
        f"def sample(condition, steps={steps}, generator=None, latents=None):\n"
        f'    """condition: float NCHW in [0, 1] at {size}x{size}; returns NHWC images in [0, 1] (numpy)."""\n'
        "    n = condition.shape[0]\n"
        "    return pipe(\n"
        f"        prompt=[{config.text.prompt!r}] * n,\n"
        f"{_negative_prompt_line(config)}"
        f"{image}"
        f"        {schedule},\n"
        f"        guidance_scale={float(config.sample_guidance_scale)!r},\n"
        f"        height={size},\n"
        f"        width={size},\n"
        f"{_sdxl_call_lines(config, size)}"
        "        generator=generator,\n"
        "        latents=latents,\n"
        '        output_type="np",\n'
        "    ).images\n"
    )


def _negative_prompt_line(config: Any) -> str:
    """The call's negative prompt; SDXL: a configured "" is None (zeros under ``force_zeros_for_empty_prompt``)."""
    negative = str(config.text.negative_prompt)
    if _is_sdxl(config) and not negative:
        return (
            "        negative_prompt=None,  # the run's empty negative prompt: zeros (force_zeros_for_empty_prompt)\n"
        )
    return f"        negative_prompt=[{negative!r}] * n,\n"


def _sdxl_call_lines(config: Any, size: int) -> str:
    """SDXL's micro-conditioning as the run samples: time ids (H, W, 0, 0, H, W), for the negative too."""
    if not _is_sdxl(config):
        return ""
    ids = (("original_size", (size, size)), ("crops_coords_top_left", (0, 0)), ("target_size", (size, size)))
    return "".join(f"        {name}={value!r},\n" for name, value in ids)


def _source_lines(pre: Any, parts: Mapping[str, Any]) -> list[str]:
    config = pre.config
    lines = [f"Exported by `python -m codi_jax.export` from `{pre.path}` (step {pre.step}, method `{config.method}`)."]
    if config.method == "teacher":
        return lines + ["", "- `unet/`: the teacher (a many-step model: sample it with 50 or more DDIM steps)."]
    lora = int(config.adapter.lora_rank)
    backbone = (
        "trained with the adapter (full fine-tuning)" if config.adapter.train_backbone else "the frozen teacher's"
    )
    backbone += f", LoRA (rank {lora}) merged into it" if lora else ""
    if lora and "unet" in parts:
        lines += [
            "",
            "- `lora/`: the LoRA alone (diffusers / PEFT format, scale folded in) for the teacher's UNet: on a "
            "pipeline built from the teacher, `pipe.load_lora_weights(PATH + '/lora')` gives `unet/`.",
        ]
    if "codi_model" in parts:
        return lines + [
            "",
            f"- `codi_model/`: backbone ({backbone}) and `{config.adapter.kind}` adapter as one diffusers custom "
            "component (`codi_model.py`, PyTorch + diffusers only; load it with `trust_remote_code=True`): "
            f"{_component_reason(pre)}.",
            f"- the condition `cond`: task `{config.task.name}`, NCHW float in [-1, 1] at the image size "
            f"({int(config.data.image_size)} px), as `codi_jax.sample` builds it from an input image.",
            *_component_input_lines(pre),
        ]
    return lines + [
        "",
        f"- `unet/`: the backbone the run samples with ({backbone}).",
        "- `controlnet/`: the trained ControlNet adapter; its residuals are added to the UNet's skips.",
        f"- the condition (`controlnet_cond`, the pipeline's `image=`): task `{config.task.name}`, "
        f"{pre.model.module.adapter.cond_channels} channel(s), NCHW float in [0, 1] at the image size "
        f"({int(config.data.image_size)} px): the condition `codi_jax.sample` builds from an input image "
        "(ours is in [-1, 1]; this is (c + 1) / 2, diffusers' control-image range).",
    ]


def _component_input_lines(pre: Any) -> list[str]:
    """What else the component's loop takes: the text context, the CFG scale a distilled student reads."""
    from codi_jax.frozen import encoders

    lines = []
    if "text_encoder" in _frozen_components(pre.config):
        lines.append(
            "- `context`: `encode(prompts)` below (one prompt per example: the run's prompt, or the example's own "
            "caption / instruction)."
        )
    if pre.model.takes_guidance_scale:
        w = float(pre.config.sample_guidance_scale)
        lines.append(
            "- `guidance_scale`: this student reads the CFG scale w itself (one network call per step): pass "
            f"`guidance_scale=torch.full((n,), w)`; the run samples with w = {w:g}."
        )
    if encoders.is_latent(pre.config):
        lines.append("- the loop returns latents: decode them with `vae` (below) to images in [-1, 1].")
    return lines


def _component_reason(pre: Any) -> str:
    from codi_jax.interop import codi_component

    return codi_component.diffusers_gap(pre.model.module).rstrip(".")


def _listing(names: Mapping[str, Any]) -> str:
    """```a/`, `b/` and `c/``` from the names' order."""
    quoted = [f"`{name}/`" for name in names]
    return ", ".join(quoted[:-1]) + f" and {quoted[-1]}" if len(quoted) > 1 else "".join(quoted)


def _encoding_lines(config: Any) -> list[str]:
    """How the pipeline encodes the prompt and decodes latents (SDXL: both encoders, time ids, negative)."""
    decode = "samples latents, decodes them with `vae/` (divided by its `scaling_factor`) and returns images in [0, 1]."
    if not _is_sdxl(config):
        return [
            "The pipeline encodes the run's prompt with `text_encoder/` (the context the run trained and samples "
            f"with), {decode}"
        ]
    size = int(config.data.image_size)
    zeros = bool(config.text.force_zeros_for_empty_prompt)
    return [
        "The pipeline encodes the run's prompt with `text_encoder/` and `text_encoder_2/` (penultimate hidden states "
        "concatenated, and the second encoder's pooled projection: the context the run trained and samples with), "
        f"{decode}",
        f"SDXL's time ids are ({size}, {size}, 0, 0, {size}, {size}) (`original_size` = `target_size` = the image "
        "size, no crop), for the negative prompt too, as `codi_jax.sample` uses them.",
        "A configured empty negative prompt is `negative_prompt=None`: "
        + (
            "zeros, as `force_zeros_for_empty_prompt` (true in `model_index.json`) says."
            if zeros
            else "the encoded empty prompt (`force_zeros_for_empty_prompt` is false in `model_index.json`)."
        ),
    ]


def _pipeline_lines(pre: Any, scheduler: Mapping[str, Any], steps: int) -> list[str]:
    """What the pipeline call does, and how exactly it is ours."""
    config = pre.config
    exact = all(timesteps_exact(config, pre.schedule, n) for n in step_counts(config, steps))
    lines = [
        *_encoding_lines(config),
        f"`guidance_scale` is the run's `sample_guidance_scale`, {float(config.sample_guidance_scale):g} (1 is no "
        "classifier-free guidance). Pass it: diffusers' default is 7.5.",
    ]
    if scheduler["_class_name"] == "LCMScheduler":
        lines.append(
            "`scheduler/` is an `LCMScheduler` that makes CoDi's moves: x_hat from the network output, then "
            "z_s = alpha_s x_hat + sigma_s eps with fresh noise eps ~ N(0, I) drawn from `generator`, and x_hat at "
            "the last step (its boundary scalings are switched off by `timestep_scaling`). Give it CoDi's "
            "timesteps (`TIMESTEPS` above): its own `num_inference_steps` spacing differs from CoDi's grid "
            "beyond 2 steps."
        )
    else:
        lines.append(
            "`scheduler/` is a `DDIMScheduler`: deterministic DDIM on evenly spaced (`trailing`) timesteps, "
            "as this run samples."
        )
    lines.append(
        "With the same initial latents (and, between steps, the same noise) the images equal `codi_jax.sample`'s "
        + ("(the timesteps are diffusers' integers, exactly ours)." if exact else "up to the timestep rounding.")
        + _dtype_note(config)
    )
    return [line for text in lines for line in (text, "")]


def _dtype_note(config: Any) -> str:
    """Where the run trained in another compute dtype: the weights here are float32, as ``sample``'s default."""
    dtype = str(config.model.get("dtype", "float32"))
    if dtype == "float32":
        return ""
    return (
        f" The weights are the float32 masters: the pipeline computes in float32, as `codi_jax.sample` does by "
        f"default (`--dtype=float32`); the run trained in {dtype} (`--dtype=run` samples so, differently)."
    )


def _schedule_lines(schedule: diffusion.Schedule) -> list[str]:
    if schedule.is_discrete:
        return [
            f"The betas are exact (`{schedule.kind}`, {schedule.num_train_timesteps} steps): our model time "
            "`t * T - 1` is diffusers' integer timestep."
        ]
    return [
        "**Approximation:** our `cosine` schedule (alpha_t = cos(a t + b), log-SNR clipped to [-15, 15], "
        "network fed 1000 t) has no exact diffusers counterpart; `beta_schedule='squaredcos_cap_v2'` is the "
        f"closest (max |alpha| difference {cosine_approximation_error(schedule):.3g} at equal timesteps). "
        "The loop above uses our exact alpha_t / sigma_t and timesteps, so it is exact."
    ]


def readme_text(pre: Any, parts: Mapping[str, Mapping[str, Any]], table: list, out_path: str) -> str:
    """The export's README, generated from the run: what is there and how to sample it in PyTorch."""
    from codi_jax.frozen import encoders

    scheduler = run_scheduler_config(pre)
    renoise = scheduler["_class_name"] == "LCMScheduler"
    steps = len(table) - 1
    rows = [f"| {i} | {t:.4f} | {m:g} | {a:.6f} | {s:.6f} |" for i, (t, m, a, s) in enumerate(table[:-1])]
    rows.append(f"| {steps} (end) | {table[-1][0]:.4f} | not fed | {table[-1][2]:.6f} | {table[-1][3]:.6f} |")
    moves = "fresh noise between steps (CoDi)" if renoise else "DDIM (deterministic)"
    sections = ["# diffusers export", "", *_source_lines(pre, parts), ""]
    if is_pipeline(pre.config, parts):
        sections += [
            f"The folder is a `{_pipeline_class(pre.config, parts)}` with the run's frozen "
            f"{_listing(_frozen_components(pre.config))} (copied as they are).",
            "",
            "## Sample with diffusers",
            "",
            "```python\n" + pipeline_snippet(pre, parts, out_path, steps) + "```",
            "",
            *_pipeline_lines(pre, scheduler, steps),
        ]
    else:
        sections += [
            "No diffusers pipeline runs this folder: load its parts and sample with the loop below (our exact "
            "sampler).",
            "",
            "```python\n" + _loading_snippet(parts, out_path, pre.config) + "```",
            "",
            "```python\n"
            + sampler_snippet(parts, table, pre.parametrization, renoise, clip=not encoders.is_latent(pre.config))
            + "```",
            "",
        ]
    sections += [
        f"## The {steps}-step moves",
        "",
        f"Network output `{pre.parametrization}` ({scheduler['prediction_type']}); moves: {moves}.",
        "",
        "| step | t | model timestep | alpha_t | sigma_t |",
        "|---|---|---|---|---|",
        *rows,
        "",
        *_schedule_lines(pre.schedule),
        "",
    ]
    return "\n".join(sections)


def export_pretrained(pre: Any, out: str, *, steps: int = 4, overwrite: bool = False) -> list[str]:
    """Writes a restored run (``pretrained.Pretrained``) as a diffusers folder at ``out``, atomically.

    Returns the written files. Raises ``ValueError`` for what diffusers cannot represent and
    ``FileExistsError`` for an existing non-empty ``out`` without ``overwrite``.
    """
    from codi_jax.interop import codi_component, flax_to_torch

    check_out(out, overwrite)
    check_sdxl_exportable(pre.config, pre.model)
    parts = model_parts(pre)
    configs = {name: config for name, config, _ in parts}
    table = step_table(pre.config, pre.schedule, steps)
    readme = readme_text(pre, configs, table, os.path.abspath(out))
    scheduler = run_scheduler_config(pre)
    with flax_to_torch.atomic_directory(out, overwrite=overwrite) as staging:
        for name, config, state in parts:
            if name == codi_component.NAME:
                codi_component.write(os.path.join(staging, name), config, state)
            else:
                flax_to_torch.write_model_files(os.path.join(staging, name), config, state)
        os.makedirs(os.path.join(staging, "scheduler"))
        with open(os.path.join(staging, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(scheduler, f, indent=2, sort_keys=True)
        _write_pipeline_files(pre.config, staging, {**configs, "scheduler": scheduler})
        if "unet" in configs and pre.params.get("lora"):
            _write_lora(pre, os.path.join(staging, "lora"))
        with open(os.path.join(staging, "README.md"), "w") as f:
            f.write(readme)
    return sorted(os.path.join(root, name) for root, _, names in os.walk(out) for name in names)


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def _write_lora(pre: Any, directory: str) -> None:
    """``lora/pytorch_lora_weights.safetensors``: the LoRA alone, for the teacher's UNet
    (``pipe.load_lora_weights(DIR/lora)``); ``unet/`` has it merged."""
    from safetensors.numpy import save_file

    from codi_jax.interop import flax_to_torch

    state = flax_to_torch.lora_state_dict(pre.params["backbone"], pre.params["lora"], pre.model.lora_scale)
    os.makedirs(directory)
    save_file(state, os.path.join(directory, LORA_WEIGHTS), metadata={"format": "pt"})


def _frozen_components(config: Any) -> dict[str, str]:
    """subfolder -> the diffusers / transformers folder of each frozen model a latent text run uses
    (SDXL: ``text_encoder_2`` / ``tokenizer_2`` too)."""
    latent, text = config.get("latent") or {}, config.get("text") or {}
    found = {
        "vae": latent.get("vae", ""),
        "text_encoder": text.get("encoder", ""),
        "tokenizer": text.get("tokenizer", ""),
        "text_encoder_2": text.get("encoder_2", ""),
        "tokenizer_2": text.get("tokenizer_2", ""),
    }
    return {name: path for name, path in found.items() if path}


PIPELINE_LIBRARIES = {
    "unet": ["diffusers", "UNet2DConditionModel"],
    "controlnet": ["diffusers", "ControlNetModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
}
SD_FROZEN = {"vae", "text_encoder", "tokenizer"}
SDXL_FROZEN = SD_FROZEN | {"text_encoder_2", "tokenizer_2"}


def _is_sdxl(config: Any) -> bool:
    from codi_jax.frozen import encoders

    return encoders.is_sdxl(config)


def is_pipeline(config: Any, parts: Mapping[str, Any]) -> bool:
    """Whether the export is a whole SD / SDXL pipeline: a latent text run (VAE, text encoder(s) and
    tokenizer(s)) whose networks are diffusers' own (no ``codi_model`` component)."""
    frozen = SDXL_FROZEN if _is_sdxl(config) else SD_FROZEN
    return set(_frozen_components(config)) == frozen and "codi_model" not in parts


def _pipeline_class(config: Any, parts: Mapping[str, Any]) -> str:
    """``StableDiffusion[XL][ControlNet]Pipeline``: XL for SDXL runs, ControlNet with a ``controlnet/``."""
    xl = "XL" if _is_sdxl(config) else ""
    return f"StableDiffusion{xl}{'ControlNet' if 'controlnet' in parts else ''}Pipeline"


def _pipeline_index(config: Any, parts: Mapping[str, Any], components: Mapping[str, str]) -> dict[str, Any]:
    """``model_index.json`` of the folder's pipeline (SDXL: ``force_zeros_for_empty_prompt`` the run's)."""
    from codi_jax.interop.flax_to_torch import DIFFUSERS_VERSION

    index: dict[str, Any] = {"_class_name": _pipeline_class(config, parts), "_diffusers_version": DIFFUSERS_VERSION}
    index.update(
        {name: PIPELINE_LIBRARIES[name] for name in sorted(set(parts) | set(components)) if name != "scheduler"}
    )
    index["scheduler"] = ["diffusers", parts["scheduler"]["_class_name"]]
    index.update(feature_extractor=[None, None], image_encoder=[None, None])
    if _is_sdxl(config):
        index["force_zeros_for_empty_prompt"] = bool(config.text.force_zeros_for_empty_prompt)
    else:
        index.update(requires_safety_checker=False, safety_checker=[None, None])
    return index


def _write_pipeline_files(config: Any, staging: str, parts: Mapping[str, Any]) -> None:
    """For a latent text run: its frozen VAE / text encoder(s) / tokenizer(s) folders copied as they
    are (never trained), and ``model_index.json`` of a ``StableDiffusion[XL][ControlNet]Pipeline``."""
    import shutil

    components = _frozen_components(config)
    for name, path in components.items():
        shutil.copytree(path, os.path.join(staging, name))
    if not is_pipeline(config, parts):
        return  # no diffusers pipeline: the parts alone
    with open(os.path.join(staging, "model_index.json"), "w") as f:
        json.dump(_pipeline_index(config, parts, components), f, indent=2, sort_keys=True)


def check_sdxl_exportable(config: Any, model: Any) -> None:
    """An SDXL run (``text.encoder_2``) exports as a diffusers SDXL pipeline only: its ``model`` (a
    teacher's UNet, or an ``AdaptedModel``) must be what diffusers' UNet + ControlNet represent."""
    from codi_jax.interop import codi_component
    from codi_jax.models.unet import UNet

    if not _is_sdxl(config):
        return
    missing = sorted(SDXL_FROZEN - set(_frozen_components(config)))
    if missing:
        raise ValueError(f"text.encoder_2={config.text.encoder_2}: an SDXL export needs {', '.join(missing)} too.")
    if isinstance(model, UNet):
        return
    gap = codi_component.diffusers_gap(model.module)
    if gap is not None:
        raise ValueError(
            f"text.encoder_2={config.text.encoder_2}: SDXL runs export as a StableDiffusionXLControlNetPipeline "
            f"only, and this one would need the custom component ({gap.rstrip('.')})."
        )


def export_workdir(
    workdir: str,
    out: str,
    *,
    steps: int = 4,
    overwrite: bool = False,
    checkpoint_step: int | None = None,
    ema: bool = True,
) -> list[str]:
    """Restores ``workdir``'s latest (or given) checkpoint and exports it (``export_pretrained``).
    ``out``, the architectures and ``steps`` are checked before any weights are read."""
    check_out(out, overwrite)
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"--run={workdir}: no checkpoints directory there (not a training workdir).")
    from codi_jax import diffusion
    from codi_jax.interop import export_sd3, flax_to_torch
    from codi_jax.models import networks
    from codi_jax.runs import pretrained

    config, _ = pretrained.read_config(workdir, checkpoint_step)
    if export_sd3.is_sd3(config):  # a StableDiffusion3ControlNetPipeline
        export_sd3.check_sd3_exportable(config, workdir)
        step_table(config, diffusion.schedule_from_config(config.schedule), steps)
        pre = pretrained.load(workdir, step=checkpoint_step, use_ema=ema)
        return export_sd3.export_pretrained(pre, out, steps=steps, overwrite=overwrite)
    step_table(config, diffusion.schedule_from_config(config.schedule), steps)  # --steps fits the run's grid
    if networks.is_conditional(config):  # the backbone diffusers must represent, still before any weights
        model, _ = networks.build_conditional(config)
        flax_to_torch.unet_diffusers_config(model.backbone)
        check_sdxl_exportable(config, model)
    pre = pretrained.load(workdir, step=checkpoint_step, use_ema=ema)
    return export_pretrained(pre, out, steps=steps, overwrite=overwrite)
