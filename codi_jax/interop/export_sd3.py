"""Writing an SD3 CoDi / fine-tune run as a diffusers ``StableDiffusion3ControlNetPipeline`` folder.

``python -m codi_jax.export --run=RUN --out=DIR`` on a run with a joint-attention DiT backbone
(``model.kind='dit'``, a converted SD3 / SD3.5 teacher) writes ``transformer/`` (the backbone it samples
with: for PE-CoDi the frozen teacher's), ``controlnet/`` (the ``DiTControlNet`` as an
``SD3ControlNetModel`` with ``force_zeros_for_pooled_projection=False``: it reads the pooled prompt, and
the pipeline shifts the control latent by the VAE's ``shift_factor``, as the run did), the frozen
``vae/``, ``text_encoder[_2, _3]/``, ``tokenizer[_2, _3]/`` (copied from the teacher's components; no
T5 where the teacher had none), ``scheduler/`` (``FlowMatchEulerDiscreteScheduler`` with the run's
shift; ``stochastic_sampling`` for a re-noising CoDi run: ``(1 - s) x_hat + s eps'``, CoDi's move),
``model_index.json`` and a README with the call.

CoDi samples on its shifted grid ``shift(k / N)``; the pipeline is given the unshifted points as
``sigmas=`` and its scheduler shifts them (``pipeline_sigmas``). A fine-tune run samples on the
scheduler's own Euler grid (``num_inference_steps`` only). diffusers draws the control latent with
``latent_dist.sample()`` from torch's global generator; the run used the posterior mean
(``batch_inputs.condition_latents``), so the pipeline's samples differ by that draw (the SD3 VAE's
posterior is narrow); the tests replace the draw by the mean to compare.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

from codi_jax.interop import export  # light at import time: its codi_jax imports sit in its functions

FROZEN_PARTS = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
PIPELINE_CLASS = "StableDiffusion3ControlNetPipeline"
# model_index.json's [library, class] per subfolder: SD3's own classes here; the VAE, the CLIP tokenizers and
# the second CLIP text encoder as in an SDXL pipeline (``export.PIPELINE_LIBRARIES``), whose second CLIP
# text encoder (with a projection) is SD3's first too.
_SD3_LIBRARIES = {
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "controlnet": ["diffusers", "SD3ControlNetModel"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": export.PIPELINE_LIBRARIES["text_encoder_2"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "tokenizer_3": ["transformers", "T5TokenizerFast"],
}
LIBRARIES = {
    name: _SD3_LIBRARIES.get(name) or export.PIPELINE_LIBRARIES[name]
    for name in ("transformer", "controlnet", "scheduler", *FROZEN_PARTS)
}


def is_sd3(config: Any) -> bool:
    """Whether a run exports through this module: a DiT backbone."""
    return config.model.get("kind", "unet") == "dit"


def check_sd3_exportable(config: Any, workdir: str) -> None:
    """Before any weight is read: an SD3 run exports as a ControlNet pipeline only when it is a
    conditional latent run on a joint-attention (text) DiT."""
    from codi_jax.frozen import batch_inputs
    from codi_jax.models import networks

    if not networks.is_conditional(config):
        raise ValueError(f"--run={workdir}: a DiT teacher run; export writes SD3 CoDi / fine-tune runs (ControlNet).")
    if not batch_inputs.latent_condition(config) or config.model.get("joint_attention_dim") is None:
        raise ValueError(
            f"--run={workdir}: a pixel-space or image-only DiT run; only SD3 (latent, joint-attention) DiT runs export."
        )
    missing = [name for name in FROZEN_PARTS[:5] if not frozen_components(config).get(name)]
    if missing:
        raise ValueError(f"--run={workdir}: an SD3 export needs the teacher's {', '.join(missing)} too.")


def frozen_components(config: Any) -> dict[str, str]:
    """subfolder -> the folder of each frozen part the run used (T5's only where the teacher had it)."""
    latent, text = config.get("latent") or {}, config.get("text") or {}
    found = dict(vae=latent.get("vae", ""))
    for index, suffix in (("", ""), ("_2", "_2"), ("_3", "_3")):
        found[f"text_encoder{suffix}"] = text.get(f"encoder{index}", "")
        found[f"tokenizer{suffix}"] = text.get(f"tokenizer{index}", "")
    return {name: path for name, path in found.items() if path}


def model_parts(pre: Any) -> list[tuple[str, dict[str, Any], dict[str, np.ndarray]]]:
    """``(subfolder, config.json, state dict)`` of the transformer and the ControlNet (LoRA merged)."""
    from codi_jax.interop import flax_to_torch

    params = pre.model.module_params(pre.params)
    backbone, adapter = pre.model.module.backbone, pre.model.module.adapter
    return [
        (
            "transformer",
            flax_to_torch.sd3_transformer_diffusers_config(backbone),
            flax_to_torch.sd3_transformer_state_dict(backbone, params["backbone"]),
        ),
        (
            "controlnet",
            flax_to_torch.sd3_controlnet_diffusers_config(adapter),
            flax_to_torch.sd3_controlnet_state_dict(adapter, params["adapter"]),
        ),
    ]


def scheduler_config(config: Any) -> dict[str, Any]:
    """``FlowMatchEulerDiscreteScheduler`` with the run's shift; stochastic (CoDi's re-noising) where
    the run re-noises between steps."""
    from codi_jax.interop.flax_to_torch import DIFFUSERS_VERSION
    from codi_jax.sampling import conditional

    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": int(config.schedule.num_train_timesteps),
        "shift": float(config.schedule.shift),
        "use_dynamic_shifting": False,
        "stochastic_sampling": bool(conditional.renoise_between_steps(config)),
    }


def pipeline_sigmas(config: Any, steps: int) -> list[float] | None:
    """The ``sigmas=`` a CoDi run's pipeline call is given: its grid points ``k / N`` before the shift
    (the scheduler applies it); None for a fine-tune run (the scheduler's own grid)."""
    from codi_jax import diffusion

    if config.method != "codi":
        return None
    return [float(u) for u in diffusion.sampling_grid(steps, int(config.codi.grid_size))[:-1]]


def pipeline_call(config: Any, out_path: str, steps: int) -> str:
    """The README's python: load the folder, ``sample(control_image, steps)`` as the run samples (its
    prompt, negative prompt, guidance scale, T5 length; CoDi's ``sigmas``)."""
    counts = export.step_counts(config, steps)
    sigmas = {n: pipeline_sigmas(config, n) for n in counts}
    text = config.text
    size = int(config.data.image_size)
    no_t5 = "" if "text_encoder_3" in frozen_components(config) else ", text_encoder_3=None, tokenizer_3=None"
    return (
        "import torch\n"
        "from diffusers import StableDiffusion3ControlNetPipeline\n\n"
        f"pipe = StableDiffusion3ControlNetPipeline.from_pretrained({out_path!r}, dtype=torch.float32{no_t5})\n"
        f"SIGMAS = {sigmas!r}  # per step count: CoDi's grid before the shift (None: the scheduler's grid)\n\n\n"
        f"def sample(control_image, steps={steps}, latents=None, output_type='pil'):\n"
        '    """control_image: a PIL image (the pipeline VAE-encodes it)."""\n'
        "    return pipe(\n"
        f"        {str(text.get('prompt', ''))!r},\n"
        f"        negative_prompt={str(text.get('negative_prompt', ''))!r},\n"
        "        control_image=control_image,\n"
        f"        height={size},\n"
        f"        width={size},\n"
        "        num_inference_steps=steps,\n"
        "        sigmas=SIGMAS.get(steps),\n"
        f"        guidance_scale={float(config.get('sample_guidance_scale', 1.0))!r},\n"
        f"        max_sequence_length={int(text.get('max_sequence_length', 256))},\n"
        "        latents=latents,\n"
        "        output_type=output_type,\n"
        "    ).images\n"
    )


def readme_text(pre: Any, out_path: str, steps: int) -> str:
    """The export's README: what is there, and the pipeline call that samples as the run does."""
    config = pre.config
    scheduler = scheduler_config(config)
    moves = "re-noising with fresh noise (`stochastic_sampling`, CoDi)" if scheduler["stochastic_sampling"] else "Euler"
    return "\n".join(
        [
            "# diffusers export (SD3)",
            "",
            f"A `{PIPELINE_CLASS}`: `transformer/` (the backbone the run samples with), `controlnet/` (its "
            f"`{config.method}` adapter), the frozen {', '.join(sorted(frozen_components(config)))} copied from the "
            f"teacher, and a `FlowMatchEulerDiscreteScheduler` (shift {scheduler['shift']:g}; moves: {moves}).",
            "",
            "```python\n" + pipeline_call(config, out_path, steps) + "```",
            "",
            "The run encodes the control image with the VAE's posterior mean; the pipeline draws "
            "`latent_dist.sample()` from torch's global generator, so its samples differ by that draw.",
            "",
        ]
    )


def index(parts: dict[str, Any]) -> dict[str, Any]:
    """``model_index.json`` of the folder (no T5: ``text_encoder_3`` / ``tokenizer_3`` null)."""
    from codi_jax.interop.flax_to_torch import DIFFUSERS_VERSION

    entries = {name: LIBRARIES[name] if name in parts else [None, None] for name in LIBRARIES}
    return {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": DIFFUSERS_VERSION,
        **entries,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
    }


def export_pretrained(pre: Any, out: str, *, steps: int = 4, overwrite: bool = False) -> list[str]:
    """Writes a restored SD3 run (``pretrained.Pretrained``) as a ``StableDiffusion3ControlNetPipeline``
    folder at ``out``, atomically; returns the written files."""
    from codi_jax.interop import flax_to_torch

    export.check_out(out, overwrite)
    export.step_table(pre.config, pre.schedule, steps)  # --steps fits the run's grid
    parts, components = model_parts(pre), frozen_components(pre.config)
    readme = readme_text(pre, os.path.abspath(out), steps)
    with flax_to_torch.atomic_directory(out, overwrite=overwrite) as staging:
        for name, config, state in parts:
            flax_to_torch.write_model_files(os.path.join(staging, name), config, state)
        for name, path in components.items():
            shutil.copytree(path, os.path.join(staging, name))
        os.makedirs(os.path.join(staging, "scheduler"))
        with open(os.path.join(staging, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(scheduler_config(pre.config), f, indent=2, sort_keys=True)
        with open(os.path.join(staging, "model_index.json"), "w") as f:
            json.dump(index({name: 1 for name, _, _ in parts} | components | {"scheduler": 1}), f, indent=2)
        with open(os.path.join(staging, "README.md"), "w") as f:
            f.write(readme)
    return sorted(os.path.join(root, name) for root, _, names in os.walk(out) for name in names)
