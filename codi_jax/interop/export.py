"""Writing a trained run as a diffusers folder (the library behind ``python -m codi_jax.export``).

Export a trained run as a diffusers folder that PyTorch loads.

``python -m codi_jax.export --run=RUN --out=DIR [--overwrite] [--steps=4]``

A conditional (CoDi / fine-tune) run with a ControlNet adapter becomes ``DIR/unet/`` (the
backbone it samples with, LoRA merged; for PE-CoDi the frozen teacher's), ``DIR/controlnet/``
(diffusers ``ControlNetModel``), ``DIR/scheduler/scheduler_config.json`` (``DDIMScheduler``) and
``DIR/README.md`` (how to load it, the few-step timesteps and sampler moves). A teacher run
becomes ``unet/`` + ``scheduler/``. The mu-fusion (full CoDi) and T2I adapters have no diffusers
counterpart and are refused. The folder is written atomically; an existing non-empty ``--out``
is refused (before any weights are read) unless ``--overwrite``.

Schedules: the discrete ``scaled_linear`` / ``linear`` schedules map exactly to diffusers' betas
(our model time is diffusers' integer timestep). Our ``cosine`` schedule (log-SNR clipped to
[-15, 15], fed ``1000 t``) has no exact diffusers equivalent: the scheduler config says
``squaredcos_cap_v2`` and the README states it is an approximation and by how much; the README's
sampling loop uses our exact ``alpha_t`` / ``sigma_t`` whatever the schedule.
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

UNSUPPORTED_ADAPTERS = {
    "fusion": "the mu-fusion adapter (full CoDi: (1 - mu) h + mu f blending of the encoder features)",
    "t2i": "the T2I adapter (a light condition encoder without a backbone copy)",
}
PREDICTION_TYPES = {"v": "v_prediction", "eps": "epsilon", "x": "sample"}
BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}


def check_out(out: str, overwrite: bool) -> None:
    """Refuses an existing non-empty ``out`` (or a file there) unless ``overwrite``."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out={out} exists and is not a directory.")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"--out={out} exists and is not empty; pass --overwrite to replace it.")


def check_exportable(config: Any) -> None:
    """Refuses runs whose adapter diffusers cannot represent (from the config alone: no weights read)."""
    if config.get("method", "teacher") == "teacher":
        return
    if tuple(config.get("codi", {}).get("cfg_range", ()) or ()):
        raise ValueError(
            "codi.cfg_range: a CFG-distilled student reads the guidance scale through an embedding that diffusers' "
            "ControlNetModel cannot represent; export a run trained without codi.cfg_range."
        )
    kind = config.adapter.kind
    if kind in UNSUPPORTED_ADAPTERS:
        raise ValueError(
            f"adapter.kind={kind!r}: diffusers cannot represent {UNSUPPORTED_ADAPTERS[kind]}; only a ControlNet "
            "adapter (adapter.kind='controlnet', zero-conv residuals) exports, as a diffusers ControlNetModel."
        )


def scheduler_config(schedule: diffusion.Schedule, parametrization: str, clip_sample: bool = True) -> dict[str, Any]:
    """``DDIMScheduler`` config of our schedule: betas, prediction type, and DDIM as our sampler does it
    (x_hat clipped to [-1, 1] in pixel space, not for latents; ``trailing`` spacing = our uniform
    times, final alpha 1 = ``t = 0``)."""
    from codi_jax.interop.flax_to_torch import DIFFUSERS_VERSION

    if parametrization not in PREDICTION_TYPES:
        raise ValueError(f"parametrization={parametrization!r}; expected one of {sorted(PREDICTION_TYPES)}.")
    return {
        "_class_name": "DDIMScheduler",
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
        "timestep_spacing": "trailing",
        "thresholding": False,
        "rescale_betas_zero_snr": False,
    }


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
    """``(subfolder, config.json, state dict)`` of every network of a restored run (``Pretrained``)."""
    from codi_jax.interop import flax_to_torch
    from codi_jax.models import networks
    from codi_jax.models.unet import UNet

    check_exportable(pre.config)
    data = pre.config.get("data")
    sample_size = networks.model_input_size(pre.config) if data is not None and data.get("image_size") else None
    if isinstance(pre.model, UNet):  # a teacher
        config = flax_to_torch.unet_diffusers_config(pre.model, sample_size)
        return [("unet", config, flax_to_torch.unet_state_dict(pre.model, pre.params))]
    params = pre.model.module_params(pre.params)  # LoRA merged into the backbone
    backbone, adapter = pre.model.backbone, pre.model.module.adapter
    controlnet = flax_to_torch.controlnet_diffusers_config(adapter)
    return [
        (
            "unet",
            flax_to_torch.unet_diffusers_config(backbone, sample_size),
            flax_to_torch.unet_state_dict(backbone, params["backbone"]),
        ),
        ("controlnet", controlnet, flax_to_torch.controlnet_state_dict(adapter, params["adapter"])),
    ]


def _model_call(parts: Mapping[str, Mapping[str, Any]]) -> str:
    """The network evaluation inside the README's sampling loop."""
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
    parts: Mapping[str, Mapping[str, Any]], table: list[tuple[float, ...]], parametrization: str, renoise: bool
) -> str:
    """A self-contained PyTorch sampling loop (our exact sampler: clipped x_hat, DDIM or re-noising)."""
    rows = "".join(f"    ({m!r}, {a!r}, {s!r}),  # t = {t:.4f}\n" for t, m, a, s in table[:-1])
    t, m, a, s = table[-1]
    rows += f"    ({m!r}, {a!r}, {s!r}),  # t = {t:.4f}: the end (its timestep is never fed)\n"
    return (
        "import torch\n\n"
        "# (model timestep fed to the networks, alpha_t, sigma_t), from the first time down to t = 0\n"
        f"STEPS = [\n{rows}]\n"
        f"PREDICTION = {parametrization!r}  # what the network predicts: 'v' | 'eps' | 'x'\n"
        f"RENOISE = {renoise!r}  # True: fresh noise between steps (CoDi); False: DDIM moves\n\n\n"
        "@torch.no_grad()\n"
        "def sample(z, cond=None, context=None, generator=None):\n"
        '    """z: NCHW standard-normal noise at the first time; returns the sample (clipped to [-1, 1])."""\n'
        "    for (timestep, alpha, sigma), (_, alpha_s, sigma_s) in zip(STEPS[:-1], STEPS[1:]):\n"
        "        time = torch.full((z.shape[0],), timestep)\n"
        f"{_model_call(parts)}"
        '        if PREDICTION == "v":\n'
        "            x, eps = alpha * z - sigma * out, sigma * z + alpha * out\n"
        '        elif PREDICTION == "eps":\n'
        "            x, eps = (z - sigma * out) / alpha, out\n"
        "        else:\n"
        "            x, eps = out, (z - alpha * out) / max(sigma, 1e-8)\n"
        "        x = x.clamp(-1.0, 1.0)\n"
        "        if RENOISE:\n"
        "            eps = torch.randn(z.shape, generator=generator, dtype=z.dtype)\n"
        "        z = alpha_s * x + sigma_s * eps\n"
        "    return x\n"
    )


def _loading_snippet(parts: Mapping[str, Mapping[str, Any]], path: str) -> str:
    classes = sorted({config["_class_name"] for config in parts.values()} | {"DDIMScheduler"})
    lines = [f"from diffusers import {', '.join(classes)}", "", f"path = {path!r}  # this folder"]
    for name, config in parts.items():
        lines.append(f'{name} = {config["_class_name"]}.from_pretrained(path, subfolder="{name}").eval()')
    lines.append('scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")')
    return "\n".join(lines) + "\n"


def _source_lines(pre: Any) -> list[str]:
    config = pre.config
    method = config.get("method", "teacher")
    lines = [f"Exported by `python -m codi_jax.export` from `{pre.path}` (step {pre.step}, method `{method}`)."]
    if method == "teacher":
        return lines + ["", "- `unet/`: the teacher (a many-step model: sample it with 50 or more DDIM steps)."]
    lora = int(config.adapter.get("lora_rank", 0))
    backbone = (
        "trained with the adapter (full fine-tuning)" if config.adapter.train_backbone else "the frozen teacher's"
    )
    backbone += f", LoRA (rank {lora}) merged into it" if lora else ""
    return lines + [
        "",
        f"- `unet/`: the backbone the run samples with ({backbone}).",
        "- `controlnet/`: the trained ControlNet adapter; its residuals are added to the UNet's skips.",
        f"- condition (`controlnet_cond`): exactly as the run trained on it: task `{config.task.name}`, "
        f"{pre.model.module.adapter.cond_channels} channel(s), NCHW float32 in our [-1, 1] convention "
        "(not diffusers' [0, 1] control images), at the model's resolution times 2**hint_downsamples.",
    ]


def _schedule_lines(schedule: diffusion.Schedule, scheduler: Mapping[str, Any]) -> list[str]:
    lines = [
        f"`scheduler/` is a `DDIMScheduler` for our `{schedule.kind}` schedule with "
        f"`prediction_type={scheduler['prediction_type']!r}`, `timestep_spacing='trailing'` and `clip_sample=True`: "
        "deterministic DDIM on evenly spaced times as `codi_jax.sample_teacher` does it. It does not do CoDi's "
        "grid or re-noising; use the loop above for the distilled model."
    ]
    if schedule.is_discrete:
        lines.append("")
        lines.append(
            f"The betas are exact (`{schedule.kind}`, {schedule.num_train_timesteps} steps): our model time "
            "`t * T - 1` is diffusers' integer timestep; the spacing matches ours when the step count divides T."
        )
    else:
        lines.append("")
        lines.append(
            "**Approximation:** our `cosine` schedule (alpha_t = cos(a t + b), log-SNR clipped to [-15, 15], "
            "network fed 1000 t) has no exact diffusers counterpart; `beta_schedule='squaredcos_cap_v2'` is the "
            f"closest (max |alpha| difference {cosine_approximation_error(schedule):.3g} at equal timesteps). "
            "The loop above uses our exact alpha_t / sigma_t and timesteps, so it is exact."
        )
    return lines


def readme_text(pre: Any, parts: Mapping[str, Mapping[str, Any]], table: list, out_path: str) -> str:
    """The export's README: what is there, how to load and sample it in PyTorch."""
    from codi_jax.sampling import conditional

    scheduler = scheduler_config(pre.schedule, pre.parametrization)
    renoise = conditional.renoise_between_steps(pre.config)
    moves = (
        "re-noising: z_s = alpha_s x_hat + sigma_s eps with fresh eps ~ N(0, I) (CoDi's multistep sampling)"
        if renoise
        else "DDIM: z_s = alpha_s x_hat + sigma_s eps_hat (deterministic)"
    )
    rows = [f"| {i} | {t:.4f} | {m:g} | {a:.6f} | {s:.6f} |" for i, (t, m, a, s) in enumerate(table)]
    sections = [
        "# diffusers export",
        "",
        *_source_lines(pre),
        "",
        "The folder holds the denoising networks only (no VAE, text encoder or tokenizer). Cross-attention models "
        "must be given `encoder_hidden_states` (the context the run trained with).",
        "",
        "## Load in PyTorch",
        "",
        "```python\n" + _loading_snippet(parts, out_path) + "```",
        "",
        f"## Sampling in {len(table) - 1} steps",
        "",
        f"Network output: `{pre.parametrization}` ({scheduler['prediction_type']}). Each step feeds the model "
        f"timestep below, forms x_hat (clipped to [-1, 1]) and eps_hat, then moves by {moves}. The last step returns "
        "x_hat. Start from z ~ N(0, I) at the first time.",
        "",
        "| step | t | model timestep | alpha_t | sigma_t |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "```python\n" + sampler_snippet(parts, table, pre.parametrization, renoise) + "```",
        "",
        "## Scheduler",
        "",
        *_schedule_lines(pre.schedule, scheduler),
        "",
    ]
    return "\n".join(sections)


def export_pretrained(pre: Any, out: str, *, steps: int = 4, overwrite: bool = False) -> list[str]:
    """Writes a restored run (``pretrained.Pretrained``) as a diffusers folder at ``out``, atomically.

    Returns the written files. Raises ``ValueError`` for what diffusers cannot represent and
    ``FileExistsError`` for an existing non-empty ``out`` without ``overwrite``.
    """
    from codi_jax.interop import flax_to_torch

    check_out(out, overwrite)
    parts = model_parts(pre)
    configs = {name: config for name, config, _ in parts}
    table = step_table(pre.config, pre.schedule, steps)
    readme = readme_text(pre, configs, table, os.path.abspath(out))
    with flax_to_torch.atomic_directory(out, overwrite=overwrite) as staging:
        for name, config, state in parts:
            flax_to_torch.write_model_files(os.path.join(staging, name), config, state)
        os.makedirs(os.path.join(staging, "scheduler"))
        scheduler = scheduler_config(pre.schedule, pre.parametrization, clip_sample=not _frozen_components(pre.config))
        with open(os.path.join(staging, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(scheduler, f, indent=2, sort_keys=True)
        _write_pipeline_files(pre.config, staging, configs)
        with open(os.path.join(staging, "README.md"), "w") as f:
            f.write(readme)
    return sorted(os.path.join(root, name) for root, _, names in os.walk(out) for name in names)


def _frozen_components(config: Any) -> dict[str, str]:
    """subfolder -> the diffusers / transformers folder of each frozen model a latent text run uses."""
    latent, text = config.get("latent") or {}, config.get("text") or {}
    found = {
        "vae": latent.get("vae", ""),
        "text_encoder": text.get("encoder", ""),
        "tokenizer": text.get("tokenizer", ""),
    }
    return {name: path for name, path in found.items() if path}


PIPELINE_LIBRARIES = {
    "unet": ["diffusers", "UNet2DConditionModel"],
    "controlnet": ["diffusers", "ControlNetModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"],
}


def _write_pipeline_files(config: Any, staging: str, parts: Mapping[str, Any]) -> None:
    """For a latent text run: its frozen VAE / text encoder / tokenizer folders copied as they are
    (never trained), and ``model_index.json`` of a ``StableDiffusion[ControlNet]Pipeline``."""
    import shutil

    from codi_jax.interop.flax_to_torch import DIFFUSERS_VERSION

    components = _frozen_components(config)
    if set(components) != {"vae", "text_encoder", "tokenizer"}:
        return  # not a full SD pipeline: the networks alone
    for name, path in components.items():
        shutil.copytree(path, os.path.join(staging, name))
    names = sorted(set(parts) | set(components) | {"scheduler"})
    index = {"_class_name": "StableDiffusionControlNetPipeline" if "controlnet" in parts else "StableDiffusionPipeline"}
    index.update(_diffusers_version=DIFFUSERS_VERSION, requires_safety_checker=False)
    index.update({name: PIPELINE_LIBRARIES[name] for name in names})
    index.update(safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None])
    with open(os.path.join(staging, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)


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
    from codi_jax.interop import flax_to_torch
    from codi_jax.models import networks
    from codi_jax.runs import pretrained

    config, _ = pretrained.read_config(workdir, checkpoint_step)
    check_exportable(config)
    step_table(config, diffusion.schedule_from_config(config.schedule), steps)  # --steps fits the run's grid
    if networks.is_conditional(config):  # the architectures diffusers must represent, still before any weights
        model, _ = networks.build_conditional(config)
        flax_to_torch.unet_diffusers_config(model.backbone)
        flax_to_torch.controlnet_diffusers_config(model.module.adapter)
    pre = pretrained.load(workdir, step=checkpoint_step, use_ema=ema)
    return export_pretrained(pre, out, steps=steps, overwrite=overwrite)
