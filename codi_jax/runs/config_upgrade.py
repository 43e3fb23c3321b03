"""Older configs, upgraded once at load: the fields added since a run was saved, filled in.

A saved config is read back by ``checkpoint.Checkpointer.restore_config`` (every restore, resume
and saved-config check goes through it) and a user's config by ``config_resolution.resolve``; both
pass through ``upgrade``, so the code reads every field directly and never supplies a fallback.

The values filled in are what the field's absence meant before it existed (a run saved before
``optimizer.decay`` decayed nothing, one saved before ``data.color_augment`` recoloured nothing,
one saved before ``data.caption_key`` read no captions: ``""``, where ``sources.default_data_config`` and
the SD configs now say ``"text"``);
for the sections with a ``default_*_config`` function, its defaults, which were those values when
the fields were added.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from codi_jax import sharding
from codi_jax.data import task_spec
from codi_jax.frozen import encoders
from codi_jax.models import adapters
from codi_jax.objectives import codi
from codi_jax.training import train_state

TOP_LEVEL = {
    "method": "teacher",
    "num_devices": 0,
    "ema_warmup": False,
    "init_workdir": "",
    "sample_guidance_scale": 1.0,
    # The batch encoder (VAE, text) inside the jitted step: the same arithmetic as the separate
    # program runs before it existed, so older runs take the current default rather than False.
    "encode_in_step": True,
    # Resume-field changes (checkpoint.RESUME_FIELDS) a resumed run accepts: "batch_size,optimizer".
    "allow_resume_changes": "",
}
# Sections every run has: the fields added to them since the first runs were saved.
ADDED_FIELDS = {
    "optimizer": {"decay": "constant", "decay_steps": 0, "warmup_steps": 0},
    "data": {"color_augment": 0.0, "data_dir": "", "folder": "", "caption_key": ""},
}
# Sections with a defaults function: filled where the run has the section (a teacher has no codi) ...
SECTION_DEFAULTS: dict[str, Callable[[], ml_collections.ConfigDict]] = {
    "codi": codi.default_codi_config,
    "adapter": adapters.default_adapter_config,
    "task": task_spec.default_task_config,
}
# ... or always (runs saved before the section existed ran with its defaults).
ALWAYS = {"nonfinite": train_state.default_update_policy, "sharding": sharding.default_sharding_config}
# The text section (``encoders.default_text_config``): a run's choices (prompt, negative_prompt,
# drop_prob) filled in wherever the section is; the frozen models' fields (``FROZEN_TEXT_FIELDS``:
# SDXL's second encoder came later) only where it names an encoder (a teacher's, a resolved run's),
# so that a user's section never overrides the teacher's encoders with empty paths.
TEXT_FIELDS = {k: v for k, v in encoders.default_text_config().items() if k not in encoders.FROZEN_TEXT_FIELDS}
FROZEN_TEXT_DEFAULTS = {k: encoders.default_text_config()[k] for k in encoders.FROZEN_TEXT_FIELDS}
# Every config field that names a file or folder: made absolute (``absolute_paths``) when a run's
# config is resolved, before anything is read, so the run, its saved config and every later reader
# (another working directory, Orbax, which restores from absolute paths only) mean the same files.
PATH_FIELDS = (
    "teacher_workdir",
    "init_workdir",
    "data.data_dir",
    "data.folder",
    "latent.vae",
    "text.encoder",
    "text.tokenizer",
    "text.encoder_2",
    "text.tokenizer_2",
    "adapter.init_from",
    "source.diffusers",
    "source.controlnet",
)


# ``model.kind`` (which backbone) came with the DiT: every complete model section written before it
# (one naming its ``in_channels``; a codi config's own section holds run choices only) was a UNet.
MODEL_KIND_BEFORE_DIT = "unet"


def upgrade(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` (a saved or a user's config, as a mapping) with every field it lacks filled in."""
    out = copy.deepcopy(dict(config))
    if "in_channels" in (out.get("model") or {}):
        out["model"] = {"kind": MODEL_KIND_BEFORE_DIT, **out["model"]}
    for key, value in TOP_LEVEL.items():
        out.setdefault(key, value)
    for section, fields in ADDED_FIELDS.items():
        if section in out:
            out[section] = {**fields, **out[section]}
    for section, defaults in SECTION_DEFAULTS.items():
        if out.get(section) is not None:
            out[section] = {**defaults().to_dict(), **out[section]}
    for section, defaults in ALWAYS.items():
        out[section] = {**defaults().to_dict(), **(out.get(section) or {})}
    if out.get("text") is not None:
        frozen = FROZEN_TEXT_DEFAULTS if "encoder" in out["text"] else {}
        out["text"] = {**TEXT_FIELDS, **frozen, **out["text"]}
    return out


def upgraded(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``upgrade`` of a ConfigDict, as a new ConfigDict (``config`` is left unchanged)."""
    return ml_collections.ConfigDict(upgrade(config.to_dict()))


def absolute_paths(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` (a mapping) with each non-empty ``PATH_FIELDS`` value it has absolute: ``~``
    expanded, a relative path taken from the working directory (where it was read from anyway)."""
    out = copy.deepcopy(dict(config))
    for field in PATH_FIELDS:
        *sections, name = field.split(".")
        section = out
        for key in sections:
            section = section.get(key) if isinstance(section, Mapping) else None
        if isinstance(section, Mapping) and isinstance(section.get(name), str) and section[name]:
            section[name] = os.path.abspath(os.path.expanduser(section[name]))
    return out
