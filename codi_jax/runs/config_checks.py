"""A run config's numeric fields, checked when it is resolved: before any teacher config, weight or
data is read.

``check_run_config`` raises ``ValueError`` with one line naming the field, its value and the valid
range, e.g. ``keep_checkpoints=0: must be at least 1 (0 would delete every checkpoint).`` The
optimizer's checks are ``train_state.check_optimizer_config`` (``learning_rate_schedule`` calls it
too); the update policy's ranges live beside its defaults (``train_state.UPDATE_POLICY_RANGES``).
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections

from codi_jax import flow_matching
from codi_jax.training import train_state
from codi_jax.training.train_state import Range

STEP_COUNT = Range(1, integer=True)
TOP_LEVEL_RANGES = {
    "num_train_steps": STEP_COUNT,
    "log_every_steps": STEP_COUNT,
    "checkpoint_every_steps": STEP_COUNT,
    "sample_every_steps": STEP_COUNT,
    "keep_checkpoints": Range(1, integer=True, why="0 would delete every checkpoint"),
    "batch_size": STEP_COUNT,
    "ema_decay": Range(0, 1),
}
TEXT_RANGES = {"drop_prob": Range(0, 1)}


def _check_fields(section: ml_collections.ConfigDict, ranges: Mapping[str, Range], prefix: str = "") -> None:
    for name, valid in ranges.items():
        valid.check(prefix + name, section.get(name))


def check_run_config(config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` (one line: field, value, valid range) for the first field of an
    upgraded run config (``config_upgrade.upgraded``) outside its valid range."""
    _check_fields(config, TOP_LEVEL_RANGES)
    train_state.check_optimizer_config(config.optimizer, config.num_train_steps)
    _check_fields(config.nonfinite, train_state.UPDATE_POLICY_RANGES, prefix="nonfinite.")
    _check_flow(config)
    if config.get("text") is not None:  # runs without text have no section
        _check_fields(config.text, TEXT_RANGES, prefix="text.")


def _check_flow(config: ml_collections.ConfigDict) -> None:
    """A flow-matching schedule's network predicts the velocity ``eps - x_0``: parametrization 'v'."""
    schedule = config.get("schedule") or {}
    if schedule.get("kind") == flow_matching.KIND and config.model["parametrization"] != "v":
        raise ValueError(
            f"model.parametrization={config.model['parametrization']!r}: schedule.kind='flow' predicts the "
            "velocity eps - x_0; use 'v'."
        )
