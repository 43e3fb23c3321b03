"""Orbax checkpoints: the train state plus the config that produced it.

Each step directory holds ``state`` (StandardSave of the TrainState pytree) and ``config``
(JSON of the run's config). Restoring takes an abstract state whose leaves carry the *current*
shardings, so a checkpoint restores onto another device count. Restoring into a model whose
architecture differs from the saved config is an error naming the differing fields, never a
silent partial load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

# Config sections that fix the parameter tree (and so must match to restore a state).
ARCHITECTURE_SECTIONS = ("model", "adapter", "task.name")


def _config_dict(config: ml_collections.ConfigDict | Mapping) -> dict:
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))


def config_differences(saved: Mapping, current: Mapping, sections=ARCHITECTURE_SECTIONS) -> list[str]:
    """``section.field: saved -> current`` for every architecture field that differs.

    ``sections`` names whole config sections or single ``section.field`` entries."""
    diffs = []
    for entry in sections:
        section, _, field = entry.partition(".")
        a, b = dict(saved.get(section) or {}), dict(current.get(section) or {})
        keys = [field] if field else sorted(set(a) | set(b))
        for key in keys:
            va, vb = a.get(key), b.get(key)
            if isinstance(va, list | tuple) and isinstance(vb, list | tuple):
                va, vb = list(va), list(vb)
            if va != vb:
                diffs.append(f"{section}.{key}: {va!r} (checkpoint) vs {vb!r} (config)")
    return diffs


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` with the save / keep policies of this project."""

    def __init__(
        self,
        directory: str,
        *,
        save_every_steps: int = 1000,
        keep: int = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = os.path.abspath(directory)
        policies = checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy(
                [
                    policies.FixedIntervalPolicy(save_every_steps),
                    policies.PreemptionCheckpointingPolicy(),
                ]
            ),
            preservation_policy=policies.LatestN(keep),
            enable_async_checkpointing=async_save,
            read_only=read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, config: ml_collections.ConfigDict, *, force: bool = False) -> bool:
        """Saves if the policy says so (or ``force``); returns whether a save started."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(_config_dict(config))),
            force=force,
        )

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(restored["config"])

    def restore(
        self, abstract_state: Any, config: ml_collections.ConfigDict | Mapping | None = None, step: int | None = None
    ) -> Any:
        """Restores ``state`` at ``step`` (default latest) into ``abstract_state``'s shapes and shardings.

        If ``config`` is given, its architecture sections must equal the saved ones.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        if config is not None:
            diffs = config_differences(self.restore_config(step), _config_dict(config))
            if diffs:
                raise ValueError(
                    f"Checkpoint {self.directory} (step {step}) was written by a different model config:\n  "
                    + "\n  ".join(diffs)
                    + "\nUse a fresh --workdir, or the config that wrote it."
                )
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` leaves carrying ``shardings`` (for restoring onto the current mesh)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
