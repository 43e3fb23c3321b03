"""A local diffusers model as a teacher workdir (the library behind ``python -m codi_jax.convert``).

``python -m codi_jax.convert --diffusers=DIR --out=OUT [--controlnet=DIR] [--variant=fp16] [--overwrite]``

Input (``--diffusers``), read from local files only:

- a pipeline folder: ``model_index.json``, ``unet/``, ``scheduler/`` and the frozen parts
  ``model_index.json`` lists (``vae/``, ``text_encoder/``, ``tokenizer/``; SDXL also
  ``text_encoder_2/``, ``tokenizer_2/``): Stable Diffusion 1.x / 2.x / XL, or a pixel ``DDPMPipeline``;
  or Stable Diffusion 3 / 3.5 (``model_index.json`` lists ``transformer`` instead of ``unet``: an
  ``SD3Transformer2DModel``, a ``FlowMatchEulerDiscreteScheduler``, ``text_encoder`` / ``text_encoder_2``
  (``CLIPTextModelWithProjection``), optionally ``text_encoder_3`` / ``tokenizer_3`` (T5); the teacher
  is a ``kind='dit'`` model on a ``kind='flow'`` schedule, its ``--controlnet`` an ``SD3ControlNetModel``
  (``docs/flow_matching.md``).
  Listed parts a teacher never uses (``safety_checker``,
  ``feature_extractor``, ``image_encoder``) are skipped; any other listed part is refused.
- a single pixel ``UNet2DModel`` folder (``config.json`` + safetensors). Its
  noise schedule is read from the first of ``DIR/scheduler/scheduler_config.json``,
  ``DIR/scheduler_config.json`` and ``DIR/../scheduler/scheduler_config.json`` that exists; with
  none the conversion is refused naming the three paths. There is deliberately no default
  schedule: a wrong prediction type or beta range gives a teacher that loads and samples garbage.
  A single folder brings no VAE / text encoder, so a text-conditioned ``UNet2DConditionModel``
  folder alone (e.g. ``PIPELINE/unet``) is refused, naming the pipeline folder to pass instead.
  Weights are read from ``*.safetensors`` files (a truncated one is refused in one line): the plain
  ones (``diffusion_pytorch_model.safetensors`` / ``model.safetensors``, or a ``*.safetensors.index.json``
  and its shards), or a diffusers / transformers variant (``variant``, ``--variant=fp16``:
  ``diffusion_pytorch_model.fp16.safetensors``, or ``*.safetensors.index.fp16.json`` and the shards it
  lists). Without ``variant`` a part whose folder holds no plain weights but exactly one variant
  uses that variant (the summary names it); several variants are refused naming them. With
  ``variant`` every part (UNet, VAE, text encoder, ControlNet) must hold it, else the refusal names
  the file expected. fp16 / bf16 weights are upcast to float32 (the parameters are float32 masters).

Output (``OUT``), a teacher workdir that ``config.teacher_workdir=OUT`` (codi / finetune runs) and
``pretrained.load_teacher(OUT)`` read like one trained here:

- ``checkpoints/0/{state,config}`` (``checkpoint.Checkpointer``). The state is
  ``{"step": 0, "ema_params": <UNet params>}``: every reader of a teacher
  (``pretrained.restore_params``, ``use_ema`` True or False: ``pretrained._request`` falls back to
  ``ema_params``) finds the UNet there, so the weights are stored once (SD 1.5's UNet: 3.4 GB),
  without a ``params`` copy or zero Adam moments (4x that). It is not a state to resume teacher
  *training* from (no ``opt_state``).
- ``components/``: byte copies of ``vae/``, ``text_encoder/``, ``tokenizer/`` (SDXL:
  ``text_encoder_2/``, ``tokenizer_2/``), ``scheduler/`` and ``model_index.json`` (the frozen
  parts stay diffusers / transformers files; each is loaded once
  with this codebase's loaders before the output is committed). A part read from a variant is
  copied with that variant's weights files under the plain names (``model.fp16.safetensors`` ->
  ``model.safetensors``; an index keeps the shard names it lists) and without its other weights files,
  so every later reader finds plain weights.
- ``controlnet/`` (``--controlnet=DIR``, a diffusers ``ControlNetModel`` whose backbone fields equal
  the UNet's): ``params/``, an Orbax PyTree checkpoint of the adapter params
  (``restore_controlnet``), and ``adapter.json``, the adapter fields (``controlnet_adapter_fields``).

The saved config (``teacher_config``): ``method="teacher"``; ``model`` = every ``UNet`` field
(``unet_config_from_diffusers`` over the UNet's defaults) + ``dtype`` / ``remat`` / ``conv_impl`` +
``parametrization`` (``epsilon`` / ``v_prediction`` / ``sample`` -> eps / v / x); ``schedule`` =
``{kind, num_train_timesteps, beta_start, beta_end}``; ``data`` with ``image_size`` = the UNet's
``sample_size`` times the VAE's downsampling (the pixel size ``networks.model_input_size`` divides
back to the UNet's input size; the UNet's ``sample_size`` for a pixel model); ``latent`` =
``{vae: abs OUT/components/vae | "", encode: "sample"}``; ``text`` = ``encoders.default_text_config``
with ``encoder``, ``tokenizer`` (SDXL: ``encoder_2``, ``tokenizer_2`` too): abs paths, and ``max_length``
(0 without a tokenizer); SDXL's ``force_zeros_for_empty_prompt`` from ``model_index.json``;
``source`` = ``{diffusers, controlnet}`` (absolute input paths); the training sections of
``codi_jax/configs/cpu/teacher_patches32`` (optimizer, EMA, logging, sharding, nonfinite) for completeness.

Every check on paths and configs (an existing ``OUT``, missing folders or weights, unsupported
UNet / VAE / text encoder / scheduler / ControlNet fields) runs before any weights are read, and
``OUT`` is written atomically (``flax_to_torch.atomic_directory``): all or nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import ml_collections

# = pretrained.checkpoint_dir(workdir); not imported from there: pretrained pulls in the data
# pipeline and TensorFlow (~9 s of the CLI's wall time on this machine).
CHECKPOINTS = "checkpoints"
COMPONENTS = "components"
CONTROLNET = "controlnet"
CONTROLNET_PARAMS = "params"
ADAPTER_FILE = "adapter.json"
MODEL_INDEX = "model_index.json"
CONFIG_NAME = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
# Frozen parts a pipeline may list, with the classes our loaders read.
FROZEN_PARTS = {
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "text_encoder_2": ("CLIPTextModelWithProjection",),  # SDXL
    "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "text_encoder_3": ("T5EncoderModel",),  # SD3 (optional there: without it, zeros)
    "tokenizer_3": ("T5Tokenizer", "T5TokenizerFast"),
}
# An SD3 pipeline's classes where they differ from FROZEN_PARTS (CLIP-L has a projection there).
SD3_PART_CLASSES = {"text_encoder": ("CLIPTextModelWithProjection",)}
TEXT_PARTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))  # (encoder, tokenizer) pairs
SD3_TEXT_PARTS = (*TEXT_PARTS, ("text_encoder_3", "tokenizer_3"))
# A pipeline's network: a UNet (SD 1.x / 2.x / XL) or SD3's transformer (model_index.json names which).
BACKBONES = ("unet", "transformer")
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
# FlowMatchEulerDiscreteScheduler fields: read (num_train_timesteps, shift), used by diffusers only with
# use_dynamic_shifting (ignored, since that is refused), and refused when set (field, refused(value), why).
FLOW_READ = ("num_train_timesteps", "shift")
FLOW_IGNORED = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type")
FLOW_REFUSALS = (
    ("use_dynamic_shifting", bool, "resolution-dependent shift (mu); give a fixed shift"),
    ("invert_sigmas", bool, "inverted sigmas"),
    ("shift_terminal", lambda v: v is not None, "a stretched terminal sigma"),
    ("use_karras_sigmas", bool, "Karras sigmas"),
    ("use_exponential_sigmas", bool, "exponential sigmas"),
    ("use_beta_sigmas", bool, "beta sigmas"),
    ("stochastic_sampling", bool, "stochastic sampling"),
)
IGNORED_PARTS = ("safety_checker", "feature_extractor", "image_encoder")
PARAMETRIZATIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x"}
BETA_SCHEDULES = ("scaled_linear", "linear")
# diffusers' defaults for a scheduler_config.json that omits a field (DDPM / DDIM / PNDM / Euler ...).
SCHEDULER_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon"
)
# Schedulers over DDPM betas (their other fields are sampling choices, ours are our own).
SCHEDULER_CLASSES = (
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "LCMScheduler",
    "TCDScheduler",
)
# (field, refused(value), why): scheduler fields that change what the UNet was trained on.
SCHEDULER_REFUSALS = (
    ("trained_betas", lambda v: v is not None, "explicit betas (ours come from beta_schedule)"),
    ("rescale_betas_zero_snr", bool, "zero-terminal-SNR rescaled betas"),
    ("timestep_type", lambda v: v not in (None, "discrete"), "the UNet is fed continuous (sigma) times"),
    ("variance_type", lambda v: v in ("learned", "learned_range"), "the UNet also predicts the variance"),
)
# ControlNet fields that are the adapter's own (the rest must equal the UNet's); out_channels is
# diffusers' default 4 on a ControlNet, which has no output conv.
ADAPTER_FIELDS = ("hint_channels", "hint_downsamples", "cond_channels", "output")
NOT_COMPARED = ("out_channels",)


@dataclasses.dataclass(frozen=True)
class ConversionRequest:
    """What to convert (``python -m codi_jax.convert``'s flags): the diffusers pipeline / UNet folder
    ``diffusers`` (and the ControlNetModel folder ``controlnet``) into the teacher workdir ``workdir``;
    ``overwrite`` replaces a non-empty ``workdir``; ``variant``: the weights variant, e.g. ``"fp16"``,
    else chosen per part (see the module docstring)."""

    diffusers: str
    workdir: str
    _: dataclasses.KW_ONLY
    controlnet: str | None = None
    overwrite: bool = False
    variant: str | None = None


@dataclasses.dataclass(frozen=True)
class Source:
    """Where each part of the input lives (checked to exist; nothing loaded)."""

    root: str  # absolute --diffusers
    kind: str  # "pipeline" | "unet folder"
    unet_dir: str  # the backbone's folder (``unet/``, or SD3's ``transformer/``)
    unet_config: dict[str, Any]  # the backbone's config.json
    scheduler_file: str
    parts: dict[str, str]  # frozen part name -> its folder
    model_index: str  # "" for a single UNet folder
    skipped: tuple[str, ...]  # parts model_index.json lists that are not converted
    controlnet_dir: str  # "" without --controlnet
    variants: dict[str, str] = dataclasses.field(
        default_factory=dict
    )  # part -> weights variant read ("unet": backbone)
    backbone: str = "unet"  # "transformer": an SD3 pipeline (``BACKBONES``)

    @property
    def is_sd3(self) -> bool:
        return self.backbone == "transformer"


@dataclasses.dataclass(frozen=True)
class Plan:
    """A checked conversion: the source, the output and every field derived from configs alone."""

    source: Source
    out: str  # absolute
    unet_fields: dict[str, Any]  # the backbone's fields (``UNet`` s, or the ``DiT`` s of an SD3 transformer)
    schedule: dict[str, Any]
    parametrization: str
    image_size: int
    adapter_fields: dict[str, Any] | None


@dataclasses.dataclass(frozen=True)
class Summary:
    plan: Plan
    param_counts: dict[str, int]  # part -> number of parameters
    max_length: int
    seconds: float


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Missing {path}.")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}.") from error


def _require_weights(directory: str, names: tuple[str, str], what: str, variant: str | None) -> str:
    """``directory`` holds ``config.json`` and safetensors weights (a single file or an index); returns
    the variant to read (``""``: the plain weights; see the module docstring for the choice)."""
    from codi_jax.interop import torch_state

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Missing {what} folder {directory}.")
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        raise FileNotFoundError(f"Missing {what} config {os.path.join(directory, CONFIG_NAME)}.")
    plain = any(os.path.isfile(os.path.join(directory, name)) for name in names)
    variants = torch_state.weights_variants(directory, *names)
    if variant:
        if variant not in variants:
            expected = os.path.join(directory, torch_state.variant_name(names[0], variant))
            holds = (["plain weights"] if plain else []) + [f"variant {v}" for v in variants]
            raise FileNotFoundError(
                f"Missing {what} weights {expected} for --variant={variant} "
                f"(the folder holds {', '.join(holds) or 'no safetensors weights'})."
            )
        return variant
    if plain:
        return ""
    if len(variants) > 1:
        raise ValueError(
            f"The {what} folder {directory} holds no plain weights but the variants {', '.join(variants)}: "
            "pass --variant= one of them."
        )
    if not variants:
        raise FileNotFoundError(
            f"Missing {what} weights {os.path.join(directory, names[0])}{_weights_hint(directory)}."
        )
    return variants[0]


def _weights_hint(directory: str) -> str:
    """What the folder holds instead: PyTorch ``.bin`` weights."""
    binaries = sorted(n for n in os.listdir(directory) if n.endswith(".bin"))
    return f" (only {binaries[0]} is there: save it as safetensors first)" if binaries else ""


def _check_variant(variant: str | None) -> str | None:
    if variant and not variant.replace("_", "").isalnum():
        raise ValueError(f"--variant={variant!r} is not a variant name (letters, digits, _: fp16, bf16).")
    return variant or None


def _require_tokenizer(directory: str) -> None:
    if not any(os.path.isfile(os.path.join(directory, n)) for n in ("tokenizer.json", "vocab.json")):
        raise FileNotFoundError(f"Missing tokenizer files in {directory} (tokenizer.json or vocab.json + merges.txt).")


def _find_scheduler(unet_dir: str) -> str:
    """The scheduler config beside a single UNet folder (see the module docstring)."""
    candidates = [
        os.path.join(unet_dir, "scheduler", SCHEDULER_CONFIG),
        os.path.join(unet_dir, SCHEDULER_CONFIG),
        os.path.join(os.path.dirname(unet_dir), "scheduler", SCHEDULER_CONFIG),
    ]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"No scheduler config for the UNet at {unet_dir}: none of {candidates} exists (the noise schedule and "
        "prediction type come from it; pass the pipeline folder, or put the scheduler/ folder beside the UNet)."
    )


def _pipeline_parts(
    root: str, index: Mapping[str, Any], variant: str | None, backbone: str = "unet"
) -> tuple[dict[str, str], tuple[str, ...], dict[str, str]]:
    """The frozen parts ``model_index.json`` lists (checked), the listed parts that are skipped and
    the weights variant each part is read from (parts with plain weights left out)."""
    parts, skipped, variants = {}, [], {}
    classes = {**FROZEN_PARTS, **(SD3_PART_CLASSES if backbone == "transformer" else {})}
    for name, entry in index.items():
        if name.startswith("_") or name in (backbone, "scheduler") or not isinstance(entry, list):
            continue
        class_name = entry[1] if len(entry) > 1 else None
        if class_name is None:
            continue
        if name in IGNORED_PARTS:
            skipped.append(name)
            continue
        if name not in FROZEN_PARTS:
            raise ValueError(
                f"{os.path.join(root, MODEL_INDEX)} lists {name}={class_name}, a part this converter does not "
                f"handle (converted: {backbone}, scheduler, {', '.join(FROZEN_PARTS)}; "
                f"skipped: {', '.join(IGNORED_PARTS)})."
            )
        if class_name not in classes[name]:
            raise ValueError(f"{MODEL_INDEX}: {name} is a {class_name}; supported: {list(classes[name])}.")
        directory = os.path.join(root, name)
        if name.startswith("tokenizer"):
            if not os.path.isdir(directory):
                raise FileNotFoundError(f"{MODEL_INDEX} lists a tokenizer but {directory} is missing.")
            _require_tokenizer(directory)
        else:
            names = DIFFUSERS_WEIGHTS if name == "vae" else TRANSFORMERS_WEIGHTS
            variants[name] = _require_weights(directory, names, name, variant)
        parts[name] = directory
    return parts, tuple(skipped), {name: v for name, v in variants.items() if v}


def _pipeline_backbone(index: Mapping[str, Any], where: str) -> str:
    """``"unet"`` or ``"transformer"``: the network ``model_index.json`` lists (exactly one of them)."""
    listed = [name for name in BACKBONES if isinstance(index.get(name), list) and index[name][-1]]
    if len(listed) != 1:
        raise ValueError(
            f"{where} lists {listed or 'neither'} of {list(BACKBONES)}: a pipeline has exactly one network."
        )
    return listed[0]


def find_source(diffusers: str, controlnet: str | None = None, variant: str | None = None) -> Source:
    """The input's layout, every file it needs checked to exist (no weights read); ``variant``: see
    the module docstring."""
    root, variant = os.path.abspath(diffusers), _check_variant(variant)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--diffusers={diffusers}: no such directory.")
    controlnet_dir = os.path.abspath(controlnet) if controlnet else ""
    variants = {}
    if controlnet_dir:
        variants["controlnet"] = _require_weights(controlnet_dir, DIFFUSERS_WEIGHTS, "ControlNet", variant)
    index_path = os.path.join(root, MODEL_INDEX)
    if os.path.isfile(index_path):
        index = _read_json(index_path)
        backbone = _pipeline_backbone(index, index_path)
        unet_dir = os.path.join(root, backbone)
        what = "UNet" if backbone == "unet" else "SD3 transformer"
        variants["unet"] = _require_weights(unet_dir, DIFFUSERS_WEIGHTS, what, variant)
        scheduler_file = os.path.join(root, "scheduler", SCHEDULER_CONFIG)
        if not os.path.isfile(scheduler_file):
            raise FileNotFoundError(f"Missing scheduler config {scheduler_file} (the pipeline's noise schedule).")
        parts, skipped, part_variants = _pipeline_parts(root, index, variant, backbone)
        unet_config = _read_json(os.path.join(unet_dir, CONFIG_NAME))
        variants = {name: v for name, v in {**variants, **part_variants}.items() if v}
        return Source(
            root,
            "pipeline",
            unet_dir,
            unet_config,
            scheduler_file,
            parts,
            index_path,
            skipped,
            controlnet_dir,
            variants,
            backbone,
        )
    if not os.path.isfile(os.path.join(root, CONFIG_NAME)):
        raise FileNotFoundError(
            f"--diffusers={diffusers}: neither a pipeline folder ({MODEL_INDEX}) nor a UNet folder ({CONFIG_NAME})."
        )
    variants["unet"] = _require_weights(root, DIFFUSERS_WEIGHTS, "UNet", variant)
    variants = {name: v for name, v in variants.items() if v}
    unet_config = _read_json(os.path.join(root, CONFIG_NAME))
    scheduler_file = _find_scheduler(root)
    if unet_config.get("cross_attention_dim"):  # a text-conditioned UNet: useless without its VAE and encoder
        parent = os.path.dirname(root)
        where = (
            f"pass --diffusers={parent}"
            if os.path.isfile(os.path.join(parent, MODEL_INDEX))
            else "pass its pipeline folder"
        )
        raise ValueError(
            f"--diffusers={diffusers} is a text-conditioned UNet (cross_attention_dim="
            f"{unet_config['cross_attention_dim']}) without its pipeline: it needs the VAE and text encoder; {where}."
        )
    return Source(root, "unet folder", root, unet_config, scheduler_file, {}, "", (), controlnet_dir, variants)


def schedule_from_scheduler_config(config: Mapping[str, Any], where: str = SCHEDULER_CONFIG) -> tuple[dict, str]:
    """``(schedule section, parametrization)`` of a diffusers scheduler config; unsupported fields
    raise ``ValueError`` naming the field and ``where``."""
    class_name = config.get("_class_name")
    if class_name is not None and class_name not in SCHEDULER_CLASSES:
        raise ValueError(f"{where}: _class_name={class_name!r} is not a DDPM-beta scheduler we read.")
    for field, refused, why in SCHEDULER_REFUSALS:
        if refused(config.get(field)):
            raise ValueError(f"{where}: {field}={config[field]!r} is not supported ({why}).")
    values = {key: config.get(key, default) for key, default in SCHEDULER_DEFAULTS.items()}
    if values["beta_schedule"] not in BETA_SCHEDULES:
        raise ValueError(
            f"{where}: beta_schedule={values['beta_schedule']!r} is not supported (supported: {list(BETA_SCHEDULES)})."
        )
    if values["prediction_type"] not in PARAMETRIZATIONS:
        raise ValueError(
            f"{where}: prediction_type={values['prediction_type']!r} is not supported "
            f"(supported: {list(PARAMETRIZATIONS)})."
        )
    if int(values["num_train_timesteps"]) < 1:
        raise ValueError(f"{where}: num_train_timesteps={values['num_train_timesteps']!r} must be at least 1.")
    schedule = dict(
        kind=values["beta_schedule"],
        num_train_timesteps=int(values["num_train_timesteps"]),
        beta_start=float(values["beta_start"]),
        beta_end=float(values["beta_end"]),
    )
    return schedule, PARAMETRIZATIONS[values["prediction_type"]]


def flow_schedule_from_scheduler_config(config: Mapping[str, Any], where: str = SCHEDULER_CONFIG) -> tuple[dict, str]:
    """``(schedule section, "v")`` of a diffusers ``FlowMatchEulerDiscreteScheduler`` config: ``kind='flow'``
    with its ``shift`` and ``num_train_timesteps`` (our Euler grid is its ``set_timesteps`` sigmas:
    ``flow_matching.euler_times``). Fields that change the grid (``FLOW_REFUSALS``) and unknown fields
    raise ``ValueError`` naming the field and ``where``."""
    class_name = config.get("_class_name")
    if class_name != FLOW_SCHEDULER:
        raise ValueError(f"{where}: _class_name={class_name!r}; an SD3 transformer samples with {FLOW_SCHEDULER}.")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in (*FLOW_READ, *FLOW_IGNORED))
    unknown = [k for k in unknown if k not in {field for field, _, _ in FLOW_REFUSALS}]
    if unknown:
        raise ValueError(f"{where}: field {unknown[0]!r} is not supported by this converter.")
    for field, refused, why in FLOW_REFUSALS:
        if refused(config.get(field)):
            raise ValueError(f"{where}: {field}={config[field]!r} is not supported ({why}).")
    shift, steps = config.get("shift", 1.0), config.get("num_train_timesteps", 1000)
    if not isinstance(shift, int | float) or isinstance(shift, bool) or not shift > 0:
        raise ValueError(f"{where}: shift={shift!r} must be a number > 0.")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"{where}: num_train_timesteps={steps!r} must be an int >= 1.")
    return dict(kind="flow", shift=float(shift), num_train_timesteps=steps), "v"


def _check_frozen_parts(source: Source, unet_fields: Mapping[str, Any]) -> int:
    """The frozen parts' configs fit the UNet (and our modules); returns the VAE's downsampling (1 without)."""
    from codi_jax.models import vae

    factor = 1
    if "vae" in source.parts:
        vae_config = _read_json(os.path.join(source.parts["vae"], CONFIG_NAME))
        model = vae.vae_from_diffusers_config(vae_config)
        for field in ("in_channels", "out_channels"):
            if unet_fields[field] != model.latent_channels:
                raise ValueError(
                    f"unet/config.json {field}={unet_fields[field]} but vae/config.json latent_channels="
                    f"{model.latent_channels}: not a latent teacher (an inpainting / depth UNet?)."
                )
        factor = 2 ** (len(model.block_out_channels) - 1)
    if source.is_sd3:
        _check_sd3_text(source, unet_fields)
    else:
        _check_text_widths(source, unet_fields)
    return factor


def _check_sd3_text(source: Source, fields: Mapping[str, Any]) -> None:
    """SD3's encoders fit the transformer: both CLIPs (with tokenizers) are there, their hidden sizes
    sum to at most ``joint_attention_dim`` (zero-padded to it), their projections to
    ``pooled_projection_dim``; ``text_encoder_3`` (optional, with ``tokenizer_3``) is ``joint_attention_dim`` wide."""
    from codi_jax.models import clip_text

    for encoder, tokenizer in SD3_TEXT_PARTS:
        if encoder == "text_encoder_3" and encoder not in source.parts and tokenizer not in source.parts:
            continue
        missing = [name for name in (encoder, tokenizer) if name not in source.parts]
        if missing:
            raise ValueError(f"{MODEL_INDEX} of an SD3 pipeline lists no {missing[0]} (needed beside {encoder}).")
    config = lambda name: _read_json(os.path.join(source.parts[name], CONFIG_NAME))
    clips = [clip_text.clip_text_config_fields(config(name)) for name, _ in TEXT_PARTS]
    joint, pooled = fields["joint_attention_dim"], fields["pooled_projection_dim"]
    if sum(c["hidden_size"] for c in clips) > joint:
        raise ValueError(
            f"text_encoder / text_encoder_2 hidden sizes sum to {sum(c['hidden_size'] for c in clips)}, more than "
            f"transformer/config.json joint_attention_dim={joint}."
        )
    if sum(c["projection_dim"] for c in clips) != pooled:
        raise ValueError(
            f"text_encoder / text_encoder_2 projection_dim sum to {sum(c['projection_dim'] for c in clips)} but "
            f"transformer/config.json pooled_projection_dim={pooled}."
        )
    if "text_encoder_3" in source.parts and config("text_encoder_3").get("d_model") != joint:
        raise ValueError(
            f"text_encoder_3/config.json d_model={config('text_encoder_3').get('d_model')} but "
            f"transformer/config.json joint_attention_dim={joint}."
        )


def _check_text_widths(source: Source, unet_fields: Mapping[str, Any]) -> None:
    """The text encoders' hidden sizes sum to the UNet's ``cross_attention_dim``; a text_time UNet
    (SDXL) has ``text_encoder_2`` and its ``add_embedding`` reads its projection plus six time ids."""
    from codi_jax.models import clip_text
    from codi_jax.models.unet import SDXL_TIME_IDS

    fields = {
        name: clip_text.clip_text_config_fields(_read_json(os.path.join(source.parts[name], CONFIG_NAME)))
        for name, _ in TEXT_PARTS
        if name in source.parts
    }
    if fields and sum(f["hidden_size"] for f in fields.values()) != unet_fields.get("cross_attention_dim"):
        sizes = " + ".join(f"{name}/config.json hidden_size={f['hidden_size']}" for name, f in fields.items())
        raise ValueError(f"{sizes} but unet/config.json cross_attention_dim={unet_fields.get('cross_attention_dim')}.")
    if unet_fields.get("addition_embed_type") != "text_time":
        if "text_encoder_2" in fields:
            raise ValueError("model_index.json lists text_encoder_2 but unet/config.json has no addition_embed_type.")
        return
    if "text_encoder_2" not in fields:
        raise ValueError("unet/config.json addition_embed_type='text_time' (SDXL) needs the pipeline's text_encoder_2.")
    width = fields["text_encoder_2"]["projection_dim"] + SDXL_TIME_IDS * unet_fields["addition_time_embed_dim"]
    if width != unet_fields["projection_class_embeddings_input_dim"]:
        expected = unet_fields["projection_class_embeddings_input_dim"]
        raise ValueError(
            f"unet/config.json projection_class_embeddings_input_dim={expected}"
            f" but text_encoder_2's projection_dim + {SDXL_TIME_IDS} time ids x addition_time_embed_dim is {width}."
        )


def check_controlnet_backbone(adapter: Mapping[str, Any], unet_fields: Mapping[str, Any], where: str) -> dict:
    """The adapter fields of a ControlNet (``controlnet_config_from_diffusers`` output) whose backbone
    fields must equal the UNet's (``ValueError`` naming the first that differs)."""
    backbone = {k: v for k, v in adapter.items() if k not in ADAPTER_FIELDS}
    plain = lambda value: list(value) if isinstance(value, tuple | list) else value
    for field in sorted((set(backbone) | set(unet_fields)) - set(NOT_COMPARED)):
        ours, theirs = backbone.get(field), unet_fields.get(field)
        if plain(ours) != plain(theirs):
            raise ValueError(f"{where}: the ControlNet's {field}={ours!r} differs from the UNet's {field}={theirs!r}.")
    return {field: adapter[field] for field in ADAPTER_FIELDS}


# A converted SD3 ControlNet's adapter fields (``adapter.json``): the blocks it copies, the condition's
# channels (the VAE latent of the control image; see docs/flow_matching.md) and diffusers' pipeline flag.
SD3_ADAPTER_FIELDS = ("dit_blocks", "cond_channels", "force_zeros_for_pooled_projection")


def check_sd3_controlnet(directory: str, transformer_fields: Mapping[str, Any]) -> dict[str, Any]:
    """The adapter fields (``SD3_ADAPTER_FIELDS``) of an ``SD3ControlNetModel`` folder whose copied
    architecture equals the transformer's (``ValueError`` naming the first field that differs; its
    ``num_layers`` may be at most the transformer's, ``out_channels`` is unused)."""
    from codi_jax.interop import torch_to_flax

    where = os.path.join(directory, CONFIG_NAME)
    config = _read_json(where)
    copy, cond_channels = torch_to_flax.sd3_controlnet_fields(config)
    plain = lambda value: list(value) if isinstance(value, tuple | list) else value
    for field in sorted(set(copy) - {"num_layers", "out_channels"}):
        if plain(copy[field]) != plain(transformer_fields.get(field)):
            raise ValueError(
                f"{where}: the ControlNet's {field}={copy[field]!r} differs from the transformer's "
                f"{field}={transformer_fields.get(field)!r}."
            )
    if copy["num_layers"] > transformer_fields["num_layers"]:
        raise ValueError(
            f"{where}: num_layers={copy['num_layers']} copies more blocks than the transformer has "
            f"({transformer_fields['num_layers']})."
        )
    force_zeros = bool(config.get("force_zeros_for_pooled_projection", True))
    return dict(
        dit_blocks=copy["num_layers"], cond_channels=cond_channels, force_zeros_for_pooled_projection=force_zeros
    )


def _check_out(out: str, overwrite: bool, inputs: tuple[str, ...]) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out={out} exists and is not a directory.")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"--out={out} exists and is not empty; pass --overwrite to replace it.")
    for path in inputs:
        real_in, real_out = os.path.realpath(path), os.path.realpath(out)
        if real_in == real_out or real_in.startswith(real_out + os.sep):
            raise ValueError(f"--out={out} holds the input {path}: write the teacher elsewhere.")


def plan_conversion(request: ConversionRequest) -> Plan:
    """Every check of a conversion, from paths and configs alone (no weights read)."""
    diffusers, controlnet = request.diffusers, request.controlnet
    if not os.path.exists(diffusers):
        raise FileNotFoundError(f"--diffusers={diffusers}: no such directory.")
    out = os.path.abspath(request.workdir)
    _check_out(out, request.overwrite, tuple(p for p in (diffusers, controlnet) if p))
    source = find_source(diffusers, controlnet, request.variant)
    from codi_jax.interop import torch_to_flax

    if source.is_sd3:
        return _plan_sd3(source, out)

    unet_fields = torch_to_flax.unet_config_from_diffusers(source.unet_config)
    schedule, parametrization = schedule_from_scheduler_config(_read_json(source.scheduler_file), source.scheduler_file)
    sample_size = source.unet_config.get("sample_size")
    levels = len(unet_fields["block_out_channels"])
    if not isinstance(sample_size, int) or sample_size % 2 ** (levels - 1):
        raise ValueError(
            f"{os.path.join(source.unet_dir, CONFIG_NAME)}: sample_size={sample_size!r} (need one int, a multiple of "
            f"2**{levels - 1} for {levels} levels; it sets data.image_size)."
        )
    factor = _check_frozen_parts(source, unet_fields)
    adapter_fields = None
    if source.controlnet_dir:
        where = os.path.join(source.controlnet_dir, CONFIG_NAME)
        adapter = torch_to_flax.controlnet_config_from_diffusers(_read_json(where))
        adapter_fields = check_controlnet_backbone(adapter, unet_fields, where)
    return Plan(source, out, unet_fields, schedule, parametrization, sample_size * factor, adapter_fields)


def _plan_sd3(source: Source, out: str) -> Plan:
    """``plan_conversion`` of an SD3 pipeline: the transformer's ``DiT`` fields, the flow schedule, the
    frozen parts' checks and (``--controlnet``) the ``SD3ControlNetModel``'s adapter fields."""
    from codi_jax.interop import torch_to_flax

    fields = torch_to_flax.sd3_transformer_fields(source.unet_config)
    schedule, parametrization = flow_schedule_from_scheduler_config(
        _read_json(source.scheduler_file), source.scheduler_file
    )
    sample_size = source.unet_config.get("sample_size", 128)
    if not isinstance(sample_size, int) or sample_size % fields["patch_size"]:
        raise ValueError(
            f"{os.path.join(source.unet_dir, CONFIG_NAME)}: sample_size={sample_size!r} (need one int, a multiple of "
            f"patch_size={fields['patch_size']}; it sets data.image_size)."
        )
    factor = _check_frozen_parts(source, fields)
    adapter_fields = None
    if source.controlnet_dir:
        adapter_fields = check_sd3_controlnet(source.controlnet_dir, fields)
    return Plan(source, out, fields, schedule, parametrization, sample_size * factor, adapter_fields)


def _training_sections() -> dict[str, Any]:
    """The non-model sections of a teacher config: ``codi_jax/configs/cpu/teacher_patches32``'s, for
    completeness (without its colour augmentation: a converted teacher was trained on its own data)."""
    from codi_jax.configs.cpu import teacher_patches32

    config = teacher_patches32.get_config()
    config.data.color_augment = 0.0
    return {key: config[key] for key in config if key not in ("model", "schedule")}


def _model_section(
    unet_fields: Mapping[str, Any], parametrization: str, kind: str = "unet"
) -> ml_collections.ConfigDict:
    """Every ``UNet`` field (``kind='dit'``: every ``DiT`` field) with its default, then the converted
    ones, plus the parametrization."""
    from codi_jax.models.dit import DiT
    from codi_jax.models.unet import UNet

    module = DiT if kind == "dit" else UNet
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(module)
        if f.name not in ("parent", "name") and f.default is not dataclasses.MISSING
    }
    choices = {"dtype": "float32", "remat": False, **({} if kind == "dit" else {"conv_impl": "auto"})}
    model = {**defaults, **unet_fields, **choices}
    if kind == "dit":
        model["dual_attention_layers"] = list(model["dual_attention_layers"])
    return ml_collections.ConfigDict(dict(model, kind=kind, parametrization=parametrization))


def teacher_config(plan: Plan, max_length: int) -> ml_collections.ConfigDict:
    """The config saved with the converted teacher (field layout: see the module docstring)."""
    components = os.path.join(plan.out, COMPONENTS)
    parts = plan.source.parts
    config = ml_collections.ConfigDict(_training_sections())
    config.method = "teacher"
    config.model = _model_section(plan.unet_fields, plan.parametrization, "dit" if plan.source.is_sd3 else "unet")
    config.schedule = ml_collections.ConfigDict(plan.schedule)
    config.data.image_size = plan.image_size
    vae = os.path.join(components, "vae") if "vae" in parts else ""
    config.latent = ml_collections.ConfigDict(dict(vae=vae, encode="sample"))
    config.text = _text_section(plan, components, max_length)
    config.source = ml_collections.ConfigDict(
        dict(diffusers=plan.source.root, controlnet=plan.source.controlnet_dir or "")
    )
    return config


def _text_section(plan: Plan, components: str, max_length: int) -> ml_collections.ConfigDict:
    """``encoders.default_text_config`` with the copied encoders / tokenizers and SDXL's
    ``force_zeros_for_empty_prompt`` (read from ``model_index.json``; SD 1.x / 2.x have none)."""
    from codi_jax.frozen import encoders, sdxl_text

    parts = plan.source.parts
    text = encoders.default_text_config()
    for field, name in (("encoder", "text_encoder"), ("tokenizer", "tokenizer")):
        text[field] = os.path.join(components, name) if name in parts else ""
    for field, name in (("encoder_2", "text_encoder_2"), ("tokenizer_2", "tokenizer_2")):
        text[field] = os.path.join(components, name) if name in parts else ""
    for field, name in (("encoder_3", "text_encoder_3"), ("tokenizer_3", "tokenizer_3")):
        text[field] = os.path.join(components, name) if name in parts else ""
    text.max_length = int(max_length)
    if "text_encoder_2" in parts and not plan.source.is_sd3:
        text.force_zeros_for_empty_prompt = sdxl_text.read_force_zeros(os.path.dirname(plan.source.model_index))
    return text


def count_params(tree: Any) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def _copy_part(directory: str, destination: str, names: tuple[str, str], variant: str) -> None:
    """A byte copy of a frozen part; its ``variant``'s weights files land under the plain names (an
    index keeps its shards' names), its other weights files are left out (see the module docstring)."""
    from codi_jax.interop import torch_state

    if not variant:
        shutil.copytree(directory, destination)
        return
    stem, index_stem = names[0].removesuffix(".safetensors"), names[1].removesuffix(".json")
    weights = lambda n: n.startswith(stem) and (n.endswith(".safetensors") or n.startswith(index_stem))
    shutil.copytree(directory, destination, ignore=lambda _, files: [n for n in files if weights(n)])
    index = os.path.join(directory, torch_state.variant_name(names[1], variant))
    files = torch_state.safetensors_files(directory, *names, os.path.basename(directory), ("", ""), variant)
    if os.path.isfile(index):
        shutil.copyfile(index, os.path.join(destination, names[1]))
        for file in files:
            shutil.copyfile(file, os.path.join(destination, os.path.basename(file)))
    else:
        shutil.copyfile(files[0], os.path.join(destination, names[0]))


def _copy_components(source: Source, components: str) -> None:
    """Byte copies (symbolic links followed, as in a hub cache snapshot) of the frozen parts."""
    os.makedirs(components)
    for name, directory in source.parts.items():
        names = DIFFUSERS_WEIGHTS if name == "vae" else TRANSFORMERS_WEIGHTS
        _copy_part(directory, os.path.join(components, name), names, source.variants.get(name, ""))
    scheduler_dir = os.path.dirname(source.scheduler_file)
    if os.path.basename(scheduler_dir) == "scheduler":
        shutil.copytree(scheduler_dir, os.path.join(components, "scheduler"))
    else:  # a scheduler_config.json beside the UNet's config.json
        os.makedirs(os.path.join(components, "scheduler"))
        shutil.copyfile(source.scheduler_file, os.path.join(components, "scheduler", SCHEDULER_CONFIG))
    if source.model_index:
        shutil.copyfile(source.model_index, os.path.join(components, MODEL_INDEX))


def _check_components(components: str, source: Source) -> tuple[dict[str, int], int]:
    """Loads every copied part with our loaders; returns their parameter counts and the prompt length."""
    from codi_jax.interop import torch_to_flax
    from codi_jax.models import clip_text, clip_tokenizer

    counts, max_length = {}, 0
    if "vae" in source.parts:
        counts["vae"] = count_params(torch_to_flax.load_diffusers_vae(os.path.join(components, "vae"))[1])
    for encoder, tokenizer in TEXT_PARTS:  # SDXLText checks that both tokenizers give one length
        if encoder in source.parts:
            text_dir = os.path.join(components, encoder)
            counts[encoder] = count_params(clip_text.load_clip_text(text_dir)[1])
            config = _read_json(os.path.join(text_dir, CONFIG_NAME))
            max_length = max_length or int(config.get("max_position_embeddings", 77))
        if tokenizer in source.parts:
            loaded = clip_tokenizer.load_clip_tokenizer(os.path.join(components, tokenizer))
            max_length = max_length if tokenizer == "tokenizer_2" else loaded.model_max_length or max_length
    counts.update(_check_t5(components, source))
    return counts, max_length


def _check_t5(components: str, source: Source) -> dict[str, int]:
    """Loads SD3's copied ``text_encoder_3`` / ``tokenizer_3`` (if any); returns the encoder's parameter count."""
    if "text_encoder_3" not in source.parts:
        return {}
    from codi_jax.models import t5, t5_tokenizer

    t5_tokenizer.load_t5_tokenizer(os.path.join(components, "tokenizer_3"))
    return {"text_encoder_3": count_params(t5.load_t5_encoder(os.path.join(components, "text_encoder_3"))[1])}


def _save_teacher(workdir: str, unet_params: Any, config: ml_collections.ConfigDict) -> None:
    """``workdir/checkpoints/0``: the minimal teacher state (see the module docstring) and ``config``."""
    import jax
    import jax.numpy as jnp

    from codi_jax.runs import checkpoint

    state = {"step": jnp.zeros((), jnp.int32), "ema_params": jax.device_put(unet_params)}
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, CHECKPOINTS), async_save=False)
    try:
        ckpt.save(0, state, config, force=True)
        ckpt.wait()
    finally:
        ckpt.close()


def save_controlnet(directory: str, params: Any, adapter_fields: Mapping[str, Any]) -> None:
    """``directory/params`` (Orbax PyTree of the adapter params) and ``directory/adapter.json``."""
    import jax
    import orbax.checkpoint as ocp

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ADAPTER_FILE), "w") as f:
        json.dump(dict(adapter_fields), f, indent=2, sort_keys=True)
    checkpointer = ocp.PyTreeCheckpointer()
    checkpointer.save(os.path.join(directory, CONTROLNET_PARAMS), args=ocp.args.PyTreeSave(jax.device_put(params)))
    checkpointer.close()


def _controlnet_dir(path: str) -> str:
    """A converted ControlNet folder: ``path`` itself or the teacher workdir's ``controlnet/``."""
    for directory in (path, os.path.join(path, CONTROLNET)):
        if os.path.isfile(os.path.join(directory, ADAPTER_FILE)):
            return directory
    raise FileNotFoundError(f"No converted ControlNet at {path}: no {ADAPTER_FILE} there nor in {CONTROLNET}/.")


def controlnet_adapter_fields(path: str) -> dict[str, Any]:
    """The adapter fields of a converted ControlNet (``path``: its folder or the teacher workdir):
    ``hint_channels`` (tuple), ``hint_downsamples``, ``cond_channels``, ``output``."""
    fields = _read_json(os.path.join(_controlnet_dir(path), ADAPTER_FILE))
    if "hint_channels" not in fields:  # an SD3 ControlNet (``SD3_ADAPTER_FIELDS``)
        return fields
    return dict(fields, hint_channels=tuple(fields["hint_channels"]))


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    import jax

    return {
        "/".join(str(k.key) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def restore_controlnet(path: str, abstract_params: Any) -> Any:
    """The converted ControlNet's params (``path``: its folder or the teacher workdir), read straight
    into the shapes and shardings of ``abstract_params`` (``jax.ShapeDtypeStruct`` leaves with
    ``sharding``, the adapter's tree). A missing / extra leaf or a shape mismatch raises ``ValueError``
    naming the leaf."""
    import orbax.checkpoint as ocp
    from etils import epath

    params_dir = os.path.join(_controlnet_dir(path), CONTROLNET_PARAMS)
    saved = _leaf_shapes(ocp.PyTreeCheckpointHandler().metadata(epath.Path(params_dir)).tree)
    wanted = _leaf_shapes(abstract_params)
    missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    if missing or extra:
        raise ValueError(f"ControlNet at {params_dir}: leaves missing {missing[:5]}, not asked for {extra[:5]}.")
    for leaf, shape in wanted.items():
        if saved[leaf] != shape:
            raise ValueError(f"ControlNet at {params_dir}: leaf {leaf} is {saved[leaf]} on disk, asked for {shape}.")
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        return checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(abstract_params, restore_args=restore_args))
    finally:
        checkpointer.close()


def convert(request: ConversionRequest) -> Summary:
    """Converts a local diffusers pipeline / UNet folder (and ControlNet) into the teacher workdir
    (``request``; see the module docstring); every check runs before any weights are read."""
    start = time.perf_counter()
    plan = plan_conversion(request)
    variants = plan.source.variants
    from codi_jax.interop import flax_to_torch, torch_to_flax

    with flax_to_torch.atomic_directory(plan.out, overwrite=request.overwrite) as staging:
        components = os.path.join(staging, COMPONENTS)
        _copy_components(plan.source, components)
        counts, max_length = _check_components(components, plan.source)
        load = torch_to_flax.load_diffusers_sd3_transformer if plan.source.is_sd3 else torch_to_flax.load_diffusers_unet
        _, unet_params = load(plan.source.unet_dir, variant=variants.get("unet"))
        counts = {"unet": count_params(unet_params), **counts}
        _save_teacher(staging, unet_params, teacher_config(plan, max_length))
        del unet_params
        if plan.source.controlnet_dir:
            load = (
                torch_to_flax.load_diffusers_sd3_controlnet
                if plan.source.is_sd3
                else torch_to_flax.load_diffusers_controlnet
            )
            _, controlnet_params = load(plan.source.controlnet_dir, variant=variants.get("controlnet"))
            counts["controlnet"] = count_params(controlnet_params)
            save_controlnet(os.path.join(staging, CONTROLNET), controlnet_params, plan.adapter_fields)
    return Summary(plan, counts, max_length, time.perf_counter() - start)


def summary_lines(summary: Summary) -> list[str]:
    """What was converted, where it went, parameter counts and the wall time."""
    plan, counts = summary.plan, summary.param_counts
    schedule = plan.schedule
    class_name = plan.source.unet_config.get("_class_name", "UNet")
    if schedule["kind"] == "flow":
        grid = f"shift {schedule['shift']:g}"
    else:
        grid = f"beta {schedule['beta_start']:g}..{schedule['beta_end']:g}"
    lines = [
        f"Converted {plan.source.root} ({plan.source.kind}) -> {plan.out} in {summary.seconds:.1f} s",
        f"  {plan.source.backbone}: {class_name}, {counts['unet']:,} parameters -> checkpoints/0 (ema_params); "
        f"parametrization {plan.parametrization}, schedule {schedule['kind']} ({schedule['num_train_timesteps']} "
        f"steps, {grid}), data.image_size {plan.image_size}",
    ]
    for name in FROZEN_PARTS:
        if name in plan.source.parts:
            size = f"{counts[name]:,} parameters" if name in counts else f"max_length {summary.max_length}"
            lines.append(f"  {name}: {size} -> {COMPONENTS}/{name} (copied, loaded and checked)")
    lines.append(f"  scheduler: {os.path.basename(plan.source.scheduler_file)} -> {COMPONENTS}/scheduler")
    if plan.adapter_fields is not None and plan.source.is_sd3:
        fields = plan.adapter_fields
        lines.append(
            f"  controlnet: SD3ControlNetModel, {counts['controlnet']:,} parameters -> {CONTROLNET}/ "
            f"({fields['dit_blocks']} blocks, cond_channels {fields['cond_channels']})"
        )
    elif plan.adapter_fields is not None:
        fields = plan.adapter_fields
        lines.append(
            f"  controlnet: {counts['controlnet']:,} parameters -> {CONTROLNET}/ (hint network "
            f"x{2 ** fields['hint_downsamples']}, cond_channels {fields['cond_channels']})"
        )
    if plan.source.skipped:
        lines.append(f"  skipped: {', '.join(plan.source.skipped)}")
    for variant in sorted(set(plan.source.variants.values())):
        parts = [name for name in ("unet", *FROZEN_PARTS, "controlnet") if plan.source.variants.get(name) == variant]
        lines.append(f"  weights variant {variant} read for {', '.join(parts)} (upcast to float32)")
    return lines
