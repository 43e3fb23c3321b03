"""Orbax checkpoints: the train state plus the config that produced it.

Each step directory holds ``state`` (StandardSave of the TrainState pytree) and ``config``
(JSON of the run's config). Restoring takes an abstract state whose leaves carry the *current*
shardings, so a checkpoint restores onto another device count. Restoring into a model whose
architecture differs from the saved config is an error naming the differing fields, never a
silent partial load.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

from codi_jax.runs import config_diff, config_upgrade

# Config sections that fix the parameter tree (and so must match to restore a state).
ARCHITECTURE_SECTIONS = ("model", "adapter", "task.name")


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
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state), config=ocp.args.JsonSave(config_diff.as_dict(config))
            ),
            force=force,
        )

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return config_upgrade.upgrade(restored["config"])  # fields added since it was saved, filled in

    def saved_tree(self, step: int) -> Mapping[str, Any]:
        """The saved state's tree of array metadata (shapes, dtypes) at ``step``, read from disk."""
        return ocp.PyTreeCheckpointHandler().metadata(epath.Path(self.directory) / str(step) / "state")

    def restore(
        self,
        abstract_state: Any,
        config: ml_collections.ConfigDict | Mapping | None = None,
        step: int | None = None,
        *,
        partial: bool = False,
    ) -> Any:
        """Restores the state at ``step`` (default latest) into ``abstract_state``'s shapes and shardings.

        The one restore of this codebase: every array is read straight into its target sharding
        (``jax.ShapeDtypeStruct(..., sharding=...)`` leaves), so a checkpoint written on one
        topology restores on another and nothing passes through a single device. ``partial``
        restores only the sub-trees ``abstract_state`` names (a dict keyed like the saved state,
        e.g. ``{"ema_params": ...}``). If ``config`` is given, its architecture sections must equal
        the saved ones.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        if config is not None:
            diffs = config_diff.differences(self.restore_config(step), config, ARCHITECTURE_SECTIONS)
            if diffs:
                raise ValueError(
                    f"Checkpoint {self.directory} (step {step}) was written by a different model config:\n  "
                    + "\n  ".join(diffs)
                    + "\nUse a fresh --workdir, or the config that wrote it."
                )
        partial = partial or self._only_empty_fields_unsaved(abstract_state, step)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        args = ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args, partial_restore=partial)
        return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]

    def _only_empty_fields_unsaved(self, abstract_state: Any, step: int) -> bool:
        """Whether the saved state lacks only fields that are empty in ``abstract_state`` (a state
        written before such a field existed, e.g. ``TrainState.frozen``: it restores as is)."""
        fields = getattr(abstract_state, "__dataclass_fields__", None)
        if not fields:
            return False
        saved = self.saved_tree(step)
        saved = getattr(saved, "tree", saved)
        unsaved = [name for name in fields if name not in saved]
        return bool(unsaved) and all(not jax.tree.leaves(getattr(abstract_state, name)) for name in unsaved)

    def restore_latest_intact(self, abstract_state: Any, config: ml_collections.ConfigDict | Mapping) -> Any:
        """The newest checkpoint that restores, into ``abstract_state``'s shardings.

        One that does not restore (truncated data, missing metadata or manifest) is reported in
        one line (step, path, cause), moved aside to ``corrupt-step-<N>`` (kept on disk, out of
        the manager's way) and the next older one is tried; if none restores the error lists
        what was tried. A config mismatch is not damage: it is raised at once. Incomplete
        ``*-tmp`` directories (interrupted writes) are never steps; they are named in the log.
        """
        incomplete = sorted(name for name in os.listdir(self.directory) if "tmp" in name)
        if incomplete:
            logging.info("Ignoring incomplete checkpoint writes in %s: %s", self.directory, incomplete)
        tried = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                saved = self.restore_config(step)
            except Exception as error:  # noqa: BLE001  (any damage: fall back)
                tried.append(self._set_aside(step, error))
                continue
            diffs = config_diff.differences(saved, config, ARCHITECTURE_SECTIONS)
            if diffs:
                raise ValueError(
                    f"Checkpoint {self.directory} (step {step}) was written by a different model config:\n  "
                    + "\n  ".join(diffs)
                    + "\nUse a fresh --workdir, or the config that wrote it."
                )
            try:
                return self.restore(abstract_state, step=step)
            except Exception as error:  # noqa: BLE001
                tried.append(self._set_aside(step, error))
        raise FileNotFoundError(f"No checkpoint in {self.directory} restores; tried: " + "; ".join(tried))

    def _set_aside(self, step: int, error: Exception) -> str:
        path = os.path.join(self.directory, str(step))
        cause = (str(error).strip().splitlines() or [""])[0][:300]
        aside = os.path.join(self.directory, f"corrupt-step-{step}")
        os.replace(path, aside)
        self.manager.reload()
        message = f"step {step} ({path}): {type(error).__name__}: {cause}"
        logging.warning("Checkpoint %s does not restore; moved to %s, trying an older one.", message, aside)
        return message

    def check_for_errors(self) -> None:
        """Raises the error of a failed background write (the step it was writing is incomplete)."""
        self.manager.check_for_errors()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` leaves carrying ``shardings`` (for restoring onto the current mesh)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
