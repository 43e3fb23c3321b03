"""A run's sampling weights without its training state: what the repository commits for a teacher.

``publish(run, out)`` reads the run's checkpoint (latest or ``step``) and writes
``out/checkpoints/<step>`` holding ``{"step", "ema_params"[, "frozen"]}``: the EMA parameters of
the trained sub-trees and, for a conditional run, its frozen ones (the backbone of PE-CoDi), with
the run's config. That is the layout ``codi_jax.convert`` writes for a converted teacher, so every
reader of a teacher or a sampled model (``pretrained.load``, config resolution) takes it; a run
cannot resume from it (no optimizer state). A DiT teacher's full checkpoint is 4x the size (params,
EMA and Adam's two moments). The run's TensorBoard event files and its last sample grid come along.

    python -c "from codi_jax.runs import publish; publish.publish('RUN', 'OUT')"

``out`` must not exist; the copy is written beside it and renamed into place, so it is complete or
absent.
"""

from __future__ import annotations

import glob
import os
import shutil

import jax
import jax.numpy as jnp

from codi_jax import sharding
from codi_jax.models import networks
from codi_jax.runs import checkpoint
from codi_jax.runs.pretrained import read_config, restore_params


def _split(config, params: dict) -> dict:
    """``{"ema_params": trained sub-trees[, "frozen": frozen ones]}`` of a run's parameters."""
    if not networks.is_conditional(config):
        return {"ema_params": params}
    model, _ = networks.build_conditional(config)
    trained, frozen = model.split(params)
    return {"ema_params": trained, "frozen": frozen} if frozen else {"ema_params": trained}


def _copy_logs(run: str, staging: str) -> None:
    for path in glob.glob(os.path.join(run, "events.out.tfevents.*")):
        shutil.copy2(path, staging)
    grids = sorted(glob.glob(os.path.join(run, "samples", "*.png")))
    if grids:
        os.makedirs(os.path.join(staging, "samples"))
        shutil.copy2(grids[-1], os.path.join(staging, "samples"))


def publish(run: str, out: str, *, step: int | None = None) -> str:
    """Writes ``run``'s sampling weights to ``out`` (see the module docstring); returns ``out``."""
    if os.path.lexists(out):
        raise FileExistsError(f"{out} exists; publish writes a new folder (nothing was changed).")
    config, step = read_config(run, step, what="run")
    shapes = networks.param_shapes(config)
    mesh = sharding.make_mesh(devices=jax.local_devices()[:1])
    abstract = checkpoint.abstract_like(shapes, sharding.tree_shardings(shapes, mesh))
    params, step = restore_params(run, abstract, step=step, use_ema=True, what="run")
    staging = out.rstrip("/") + ".partial"
    if os.path.lexists(staging):
        shutil.rmtree(staging)
    ckpt = checkpoint.Checkpointer(os.path.join(staging, "checkpoints"), async_save=False)
    try:
        ckpt.save(step, {"step": jnp.asarray(step, jnp.int32), **_split(config, params)}, config, force=True)
        ckpt.wait()
    finally:
        ckpt.close()
    _copy_logs(run, staging)
    os.rename(staging, out)
    return out
