"""Config resolution: a user's config in, the complete config the run records out (a new one).

A codi / finetune run's backbone is its teacher's network: its ``model`` / ``schedule`` come
from the teacher's saved config (fields the user did set must agree), ``teacher_step`` records
which checkpoint. An ``init_workdir`` (the two-stage baselines) must have been trained with the
same model, schedule, adapter and task. Only saved configs are read here, never weights.
"""

from __future__ import annotations

import copy

import ml_collections

from codi_jax.interop import convert
from codi_jax.models import networks
from codi_jax.objectives import codi
from codi_jax.runs import config_checks, config_diff, config_upgrade, pretrained

METHODS = ("teacher",) + networks.CONDITIONAL_METHODS
INIT_SECTIONS = ("model", "schedule", "adapter", "task")
# The teacher's frozen models (VAE, text encoder) and prompts: a run inherits them; fields the
# user's config sets (e.g. ``text.prompt``) override the teacher's.
FROZEN_MODEL_SECTIONS = ("latent", "text")
# How the teacher's network is computed, not what it is: a run may choose its own.
RUN_MODEL_CHOICES = ("dtype", "remat", "conv_impl", "attention_impl", "remat_policy")


def _merged_section(teacher_section: ml_collections.ConfigDict, own: ml_collections.ConfigDict | None):
    merged = teacher_section.to_dict()
    merged.update((own or ml_collections.ConfigDict()).to_dict())
    return ml_collections.ConfigDict(merged)


def method_of(config: ml_collections.ConfigDict) -> str:
    method = config.get("method", "teacher")
    if method not in METHODS:
        raise ValueError(f"config.method={method!r}; valid methods: {METHODS}.")
    return method


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The complete config of the run ``config`` asks for (fields it lacks filled in:
    ``config_upgrade``; every path field absolute: ``config_upgrade.PATH_FIELDS``); ``config`` itself
    is left unchanged."""
    config = _with_absolute_paths(config_upgrade.upgraded(config))  # any working directory, any reader
    config_checks.check_run_config(config)  # before any teacher config is read
    if method_of(config) == "teacher":
        return config
    codi.check_codi_config(config.codi)
    if not config.get("teacher_workdir"):
        raise ValueError(f"config.method={config.method!r} needs config.teacher_workdir (a teacher training workdir).")
    teacher, step = pretrained.read_config(config.teacher_workdir, what="config.teacher_workdir")
    own = {key: config.model[key] for key in RUN_MODEL_CHOICES if key in (config.get("model") or {})}
    clashes = config_diff.differences(
        config, teacher, ("model", "schedule"), names=("config", "teacher"), only_first_keys=True
    )
    clashes = [c for c in clashes if c.split(":")[0].split(".", 1)[1] not in own]
    if clashes:
        raise ValueError(f"Config disagrees with the teacher at {config.teacher_workdir}: " + "; ".join(clashes))
    resolved = copy.deepcopy(config)
    with resolved.unlocked():
        resolved.model = ml_collections.ConfigDict({**teacher.model.to_dict(), **own})
        resolved.schedule = ml_collections.ConfigDict(teacher.schedule.to_dict())
        resolved.teacher_step = step
        for section in FROZEN_MODEL_SECTIONS:
            if teacher.get(section) is not None:
                resolved[section] = _merged_section(teacher[section], config.get(section))
    resolved = _with_absolute_paths(resolved)  # the teacher's frozen parts too
    networks.check_conditional(resolved)
    _check_init_workdir(resolved)
    _check_init_from(resolved)
    return resolved


def _with_absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with every path field absolute (``config_upgrade.PATH_FIELDS``)."""
    return ml_collections.ConfigDict(config_upgrade.absolute_paths(config.to_dict()))


def _check_init_from(config: ml_collections.ConfigDict) -> None:
    """``adapter.init_from`` (if set) is a converted ControlNet that fits the configured adapter."""
    path = config.adapter.init_from
    if not path:
        return
    if config.adapter.kind != "controlnet":
        raise ValueError(f"adapter.init_from={path} is a ControlNet; adapter.kind={config.adapter.kind!r}.")
    try:
        saved = convert.controlnet_adapter_fields(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"adapter.init_from={path}: {error}") from None
    wanted = _wanted_adapter_fields(config, saved)
    clashes = [f"{key}: {saved.get(key)} (ControlNet) vs {value} (config)" for key, value in wanted.items()]
    clashes = [c for c, (key, value) in zip(clashes, wanted.items()) if _normal(saved.get(key)) != _normal(value)]
    if clashes:
        raise ValueError(f"adapter.init_from={path} does not fit the configured adapter: " + "; ".join(clashes))


def _wanted_adapter_fields(config: ml_collections.ConfigDict, saved: dict) -> dict:
    """What a converted ControlNet must match: a UNet ControlNet's hint network and condition channels,
    an SD3 ControlNet's copied blocks (``adapter.dit_blocks``, 0 = half) and condition channels (for a
    latent run the VAE latent of the control image, ``networks.adapter_cond_channels``)."""
    cond_channels = networks.adapter_cond_channels(config)
    if "dit_blocks" in saved:
        blocks = int(config.adapter.dit_blocks) or max(1, int(config.model.num_layers) // 2)
        return {"dit_blocks": blocks, "cond_channels": cond_channels}
    return {
        "hint_channels": tuple(config.adapter.hint_channels),
        "hint_downsamples": int(config.adapter.hint_downsamples),
        "cond_channels": cond_channels,
    }


def _normal(value):
    return list(value) if isinstance(value, list | tuple) else value


def _check_init_workdir(config: ml_collections.ConfigDict) -> None:
    """``config.init_workdir`` (if set) holds a conditional run trained with this setup."""
    workdir = config.init_workdir
    if not workdir:
        return
    saved, _ = pretrained.read_config(workdir, what="config.init_workdir")  # upgraded, as ``config`` is
    saved = _with_absolute_paths(saved)  # a run saved before its paths were made absolute
    if not networks.is_conditional(saved):
        raise ValueError(f"config.init_workdir={workdir} holds a {saved.method!r} run, not a conditional one.")
    clashes = config_diff.differences(config, saved, INIT_SECTIONS, names=("config", "init_workdir"))
    if clashes:
        raise ValueError(f"config.init_workdir={workdir} was trained with a different setup: " + "; ".join(clashes))
