"""Restoring trained weights from a workdir: a teacher, a conditional run's start, or a model to sample.

A workdir holds ``checkpoints/<step>/{state,config}`` written by the training loop; the saved
config rebuilds the model, so callers need only the path. Every restore goes through
``checkpoint.Checkpointer.restore`` with an abstract tree carrying the target shardings and asks
only for the sub-trees it needs (e.g. the EMA params, never the optimizer state), so weights
are read straight into their shards on any mesh, whatever topology wrote them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from codi_jax import diffusion, sharding
from codi_jax.models import networks
from codi_jax.runs import checkpoint


@dataclasses.dataclass
class Pretrained:
    """A restored model: module, schedule, parametrization, parameters and where they came from.

    ``model`` is the teacher's ``UNet`` (``method='teacher'``) or an ``adapted.AdaptedModel``; its
    ``params`` are the full tree it applies (frozen weights merged with the trained / EMA ones).
    """

    model: Any
    schedule: diffusion.Schedule
    parametrization: diffusion.Parametrization
    params: Any
    config: ml_collections.ConfigDict
    step: int
    path: str


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


def _open(workdir: str, step: int | None, what: str) -> tuple[checkpoint.Checkpointer, int]:
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{what}={workdir}: no checkpoints directory at {directory} (not a training workdir).")
    ckpt = checkpoint.Checkpointer(directory, read_only=True, async_save=False)
    steps = ckpt.all_steps()
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in steps:
        ckpt.close()
        raise FileNotFoundError(f"{what}={workdir}: no checkpoint for step {step} in {directory}; available: {steps}.")
    return ckpt, step


def read_config(workdir: str, step: int | None = None, what: str = "workdir") -> tuple[ml_collections.ConfigDict, int]:
    """The config a workdir's checkpoint was written with, and that checkpoint's step (no weights read)."""
    ckpt, step = _open(workdir, step, what)
    try:
        return ml_collections.ConfigDict(ckpt.restore_config(step)), step
    finally:
        ckpt.close()


def _request(saved: Mapping[str, Any], abstract_params: Mapping[str, Any], use_ema: bool, where: str) -> dict:
    """Which saved field each top-level entry of ``abstract_params`` is read from.

    Trained entries come from ``ema_params`` (or ``params``), frozen ones from ``frozen``. Runs
    written before frozen weights left the trained state keep everything in ``params`` /
    ``ema_params``, so those are looked in as well."""
    order = ("ema_params", "frozen", "params") if use_ema else ("params", "frozen", "ema_params")
    request: dict[str, dict] = {}
    for key, sub in abstract_params.items():
        field = next((f for f in order if key in (saved.get(f) or {})), None)
        if field is None:
            raise ValueError(f"{where} holds no parameters {key!r}; it has {sorted(saved.get('params') or {})}.")
        request.setdefault(field, {})[key] = sub
    return request


def restore_params(
    workdir: str, abstract_params: Any, *, step: int | None = None, use_ema: bool = True, what: str = "workdir"
) -> tuple[Any, int]:
    """The (EMA) parameters of ``workdir``'s latest (or given) checkpoint, read into the shapes and
    shardings of ``abstract_params`` (a dict of ``jax.ShapeDtypeStruct`` with ``sharding``): the
    teacher (its UNet params), a conditional run's start, or a model to sample. Returns
    ``(params, step)``."""
    ckpt, step = _open(workdir, step, what)
    try:
        where = f"{what}={workdir} (step {step})"
        request = _request(ckpt.saved_tree(step), abstract_params, use_ema, where)
        restored = ckpt.restore(request, step=step, partial=True)
    finally:
        ckpt.close()
    merged = {key: sub for field in request for key, sub in restored[field].items()}
    return {key: merged[key] for key in abstract_params}, step


def load(
    workdir: str,
    *,
    step: int | None = None,
    use_ema: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    conditional: bool | None = None,
    dtype: str | None = None,
) -> Pretrained:
    """The model a workdir's saved config describes with its (EMA) parameters, replicated on
    ``mesh`` (default: the first local device). ``conditional`` True / False requires a
    codi / finetune run or a teacher run. ``dtype`` replaces the run's ``model.dtype`` (the compute
    dtype; the weights stay float32), e.g. ``"float32"`` to sample a run trained in bfloat16 as the
    exported diffusers pipeline computes it."""
    config, step = read_config(workdir, step)
    if dtype is not None:
        config.model.dtype = dtype
    method = config.get("method", "teacher")
    if conditional is not None and networks.is_conditional(config) != conditional:
        wanted = "a conditional (codi / finetune)" if conditional else "an unconditional teacher"
        raise ValueError(f"{workdir} holds a {method!r} run, not {wanted} one.")
    if networks.is_conditional(config):
        model, schedule = networks.build_conditional(config)
    else:
        model, schedule = networks.build_teacher(config)
    mesh = mesh or sharding.make_mesh(devices=jax.local_devices()[:1])
    shapes = networks.param_shapes(config)
    abstract = checkpoint.abstract_like(shapes, sharding.tree_shardings(shapes, mesh))
    params, step = restore_params(workdir, abstract, step=step, use_ema=use_ema)
    return Pretrained(model, schedule, config.model.parametrization, params, config, step, workdir)


def load_teacher(workdir: str, **kwargs: Any) -> Pretrained:
    return load(workdir, conditional=False, **kwargs)


def load_conditional(workdir: str, **kwargs: Any) -> Pretrained:
    return load(workdir, conditional=True, **kwargs)
