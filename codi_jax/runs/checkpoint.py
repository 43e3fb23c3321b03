"""Orbax checkpoints: the train state plus the config that produced it.

Each step directory holds ``state`` (the TrainState pytree), ``config`` (JSON of the run's config)
and ``checksums`` (one per array, ``integrity``; checkpoints written before it have none and
restore unverified). Restoring takes an abstract state whose leaves carry the *current*
shardings, so a checkpoint restores onto another device count, and verifies the checksums.

Resuming (``restore_latest_intact``) tells two kinds of failure apart. A checkpoint whose config
differs in a field that fixes the model, the data stream, the objective or the optimizer
(``RESUME_FIELDS``), or whose saved arrays do not fit the state this config builds, is refused in
one line naming the fields, and nothing on disk moves. Only a checkpoint whose data does not read
back, or reads back different (checksums), is damaged: it is moved aside to ``corrupt-step-<N>``
and the next older one is tried. A workdir with checkpoints never starts again from step 0.
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
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from codi_jax.runs import config_diff, config_upgrade, integrity

# Config sections that fix the parameter tree (and so must match to restore a state).
ARCHITECTURE_SECTIONS = ("model", "adapter", "task.name")
# ... and the fields that fix the data stream, the objective and the optimizer: a resumed run
# compares all of them with the checkpoint's (``allow_resume_changes`` names deliberate changes).
RESUME_FIELDS = ARCHITECTURE_SECTIONS + (
    "method",
    "seed",
    "batch_size",
    "ema_decay",
    "ema_warmup",
    "schedule",
    "optimizer",
    "data",
    "task",
    "codi",
    "latent.encode",
    "text.prompt",
    "text.negative_prompt",
    "text.drop_prob",
)
# Where the data lives, not what it is; what initialised the adapter (read at step 0 only).
NOT_COMPARED = ("data.data_dir", "adapter.init_from")
SET_ASIDE = "corrupt-step-"


class ResumeMismatch(ValueError):
    """The checkpoint was written by another config, or holds arrays this config's state lacks."""


def resume_fields(config: ml_collections.ConfigDict | Mapping) -> tuple[str, ...]:
    """``RESUME_FIELDS``, plus ``num_train_steps`` where it sets the end of a cosine decay."""
    optimizer = config_diff.as_dict(config)["optimizer"]
    ends_with_run = optimizer["decay"] == "cosine" and not optimizer["decay_steps"]
    return RESUME_FIELDS + (("num_train_steps",) if ends_with_run else ())


def resume_differences(saved: Mapping, config: ml_collections.ConfigDict | Mapping) -> tuple[list[str], list[str]]:
    """``(refused, allowed)``: the differing resume fields, split by ``config.allow_resume_changes``
    (comma-separated fields or sections)."""
    config = config_upgrade.upgrade(config_diff.as_dict(config))  # a caller's raw config, too
    # Path fields compare as absolute paths (a run saved before resolution made them absolute).
    saved, config = config_upgrade.absolute_paths(saved), config_upgrade.absolute_paths(config)
    diffs = config_diff.differences(saved, config, resume_fields(config), exclude=NOT_COMPARED)
    allowed_names = [name.strip() for name in str(config["allow_resume_changes"]).split(",") if name.strip()]
    allowed = [d for d in diffs if config_diff.covered(d.split(":")[0], allowed_names)]
    return [d for d in diffs if d not in allowed], allowed


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
        self.directory, self.read_only = os.path.abspath(directory), read_only
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
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "config", "checksums")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, config: ml_collections.ConfigDict, *, force: bool = False) -> bool:
        """Saves if the policy says so (or ``force``), with the arrays' checksums; returns whether
        a save started."""
        if not force and not self.manager.should_save(step):
            return False
        args = ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            config=ocp.args.JsonSave(config_diff.as_dict(config)),
            checksums=ocp.args.JsonSave(integrity.checksums(state)),
        )
        return self.manager.save(step, args=args, force=force)

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
        items = {"state": args}
        if os.path.isdir(os.path.join(self.directory, str(step), "checksums")):  # absent: written before them
            items["checksums"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        _check_all_read(restored["state"], f"{self.directory} (step {step})")
        if "checksums" in items:
            integrity.verify(restored["state"], restored["checksums"])
        else:
            logging.info(
                "Checkpoint %s/%d has no checksums (written before they were): not verified.", self.directory, step
            )
        return restored["state"]

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
        """The newest checkpoint that restores, into ``abstract_state``'s shardings (see the module
        docstring): a config or structure mismatch raises ``ResumeMismatch`` and moves nothing; a
        damaged checkpoint is moved aside, logged in one line, and the next older one is tried;
        if none restores the error lists each step and why. Incomplete ``*-tmp`` directories
        (interrupted writes) are never steps; they are named in the log."""
        incomplete = sorted(name for name in os.listdir(self.directory) if "tmp" in name)
        if incomplete:
            logging.info("Ignoring incomplete checkpoint writes in %s: %s", self.directory, incomplete)
        tried = []
        for step in sorted(self.all_steps(), reverse=True):
            try:  # reading: a failure here is damage
                saved, on_disk = self.restore_config(step), self._saved_leaves(step)
            except Exception as error:  # noqa: BLE001
                tried.append(self._set_aside(step, error))
                continue
            self._check_resume(step, saved, config)  # comparing: a failure here moves nothing
            self._check_structure(step, on_disk, abstract_state)
            try:
                return self.restore(abstract_state, step=step)
            except Exception as error:  # noqa: BLE001
                tried.append(self._set_aside(step, error))
        moved = "" if self.read_only else f" Each was moved to {SET_ASIDE}<step>;"
        raise FileNotFoundError(
            f"No checkpoint in {self.directory} restores; tried: "
            + "; ".join(tried)
            + f".{moved} move back what you trust, or use a fresh --workdir."
        )

    def check_resume_config(self, config: ml_collections.ConfigDict | Mapping) -> None:
        """``ResumeMismatch`` if the newest checkpoint whose config reads was written with other
        ``RESUME_FIELDS`` (a JSON read: checked before any model is built or weight loaded)."""
        for step in sorted(self.all_steps(), reverse=True):
            try:
                saved = self.restore_config(step)
            except Exception:  # noqa: BLE001  (damage: restore_latest_intact reports it)
                continue
            allowed = self._check_resume(step, saved, config)
            if allowed:
                logging.warning("Resuming with deliberate changes (allow_resume_changes): %s", "; ".join(allowed))
            return

    def _check_resume(self, step: int, saved: Mapping, config: ml_collections.ConfigDict | Mapping) -> list[str]:
        """Raises ``ResumeMismatch`` on refused differences; returns the allowed ones."""
        refused, allowed = resume_differences(saved, config)
        if refused:
            raise ResumeMismatch(
                f"Checkpoint {self.directory}/{step} was written with another config; resuming would mix two "
                f"runs: {'; '.join(refused)}. Use the config that wrote it or a fresh --workdir, or name "
                f"deliberate changes in --config.allow_resume_changes={','.join(d.split(':')[0] for d in refused)}"
            )
        return allowed

    def _saved_leaves(self, step: int) -> dict[str, tuple]:
        """``{leaf name: (shape, dtype)}`` of the saved state, from its metadata (no array is read)."""
        saved = self.saved_tree(step)
        saved = getattr(saved, "tree", saved)
        return _leaf_specs(saved)

    def _check_structure(self, step: int, on_disk: Mapping[str, tuple], abstract_state: Any) -> None:
        """The saved arrays' names, shapes and dtypes equal the state's."""
        wanted = _leaf_specs(abstract_state)
        diffs = [
            f"{name}: {on_disk.get(name, 'absent')} (checkpoint) vs {wanted.get(name, 'absent')} (config)"
            for name in sorted(set(on_disk) | set(wanted))
            if on_disk.get(name) != wanted.get(name)
        ]
        if diffs:
            raise ResumeMismatch(
                f"Checkpoint {self.directory}/{step} holds another model's arrays ({len(diffs)} differ, e.g. "
                f"{'; '.join(diffs[:3])}). Use the config that wrote it or a fresh --workdir."
            )

    def set_aside_steps(self) -> list[str]:
        """The ``corrupt-step-*`` folders: checkpoints an earlier run found damaged."""
        return sorted(name for name in os.listdir(self.directory) if name.startswith(SET_ASIDE))

    def _set_aside(self, step: int, error: Exception) -> str:
        """Moves a damaged step aside (read-only: leaves it) and returns the line naming it;
        a failure that is not damage (memory) is raised instead."""
        if not _is_damage(error):
            raise error
        path = os.path.join(self.directory, str(step))
        cause = short_cause(error)
        if self.read_only:
            logging.warning("Checkpoint step %d does not restore (%s); trying an older one.", step, cause)
            return f"step {step} ({type(error).__name__}: {cause})"
        aside, n = os.path.join(self.directory, f"{SET_ASIDE}{step}"), 0
        while os.path.exists(aside):  # never onto an earlier one: corrupt-step-6.1, .2, ...
            n += 1
            aside = os.path.join(self.directory, f"{SET_ASIDE}{step}.{n}")
        if jax.process_index() == 0:  # one mover; the others wait for it (shared storage)
            os.rename(path, aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"codi_jax set aside checkpoint {step}")
        self.manager.reload()
        message = f"step {step} ({type(error).__name__}: {cause})"
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


_PAYLOADS = ("[tensorstore_spec=", "[source locations=")


def _check_all_read(tree: Any, where: str) -> None:
    """A partial restore leaves the leaves the checkpoint does not hold as they were asked for
    (``ShapeDtypeStruct`` s): one line naming them, not a type error later."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    unread = [jax.tree_util.keystr(path) for path, leaf in leaves if isinstance(leaf, jax.ShapeDtypeStruct)]
    if unread:
        more = f" and {len(unread) - 3} more" if len(unread) > 3 else ""
        raise ValueError(
            f"Checkpoint {where} holds no {', '.join(unread[:3])}{more}: it was written by another version of the "
            "model (parameter names differ)."
        )


def short_cause(error: BaseException, width: int = 300) -> str:
    """The first line of an error's message, cut in the middle where long: library errors name
    what failed at the start and the OS reason at the end ("... File too large [os_error=27]")."""
    line = (str(error).strip().splitlines() or [""])[0]
    for payload in _PAYLOADS:  # tensorstore appends its spec after the OS reason
        line = line.split(payload)[0].rstrip()
    if len(line) <= width:
        return line
    return f"{line[: width // 3]} ... {line[-(width - width // 3) :]}"


def _leaf_specs(tree: Any) -> dict[str, tuple]:
    """``{leaf name: (shape, dtype)}`` of arrays, abstract arrays or saved array metadata."""
    named = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {integrity.leaf_name(path): (tuple(x.shape), str(x.dtype)) for path, x in named}


def _is_damage(error: Exception) -> bool:
    """Whether a restore failure means the checkpoint's bytes are bad (not the host: memory)."""
    if isinstance(error, MemoryError):
        return False
    return "RESOURCE_EXHAUSTED" not in str(error)


def abstract_like(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` leaves carrying ``shardings`` (for restoring onto the current mesh)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
