"""The pytree that is trained and checkpointed, and the optimizer that updates it."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs: step, trained params, their EMA, optimizer state, base RNG,
    and the frozen weights.

    ``params`` holds only what trains; ``ema_params`` is its exponential moving average (the
    teacher's sampling weights; CoDi's target network); ``opt_state`` has moments for it alone.
    ``frozen`` holds the weights that never change (PE-CoDi's backbone, the teacher predictor's
    initial model) once: not differentiated, not in Adam, not EMA'd. The model sees
    ``{**frozen, **params}`` (``model_params``). ``rng`` is the run's base key: step ``k`` uses
    ``fold_in(rng, k)``, so a resumed run draws exactly the numbers an uninterrupted one would.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    frozen: Any = flax.struct.field(default_factory=dict)


def model_params(state: TrainState, *, ema: bool) -> Any:
    """The full parameter tree the model applies: frozen weights plus the trained (or EMA) ones."""
    trained = state.ema_params if ema else state.params
    return {**state.frozen, **trained} if state.frozen else trained


LR_DECAYS = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of a numeric config field: finite numbers in ``[low, high]`` (an end left
    out where ``*_excluded``); ``integer``: whole numbers ``>= low``. ``why`` ends the error message."""

    low: float
    high: float = math.inf
    low_excluded: bool = False
    high_excluded: bool = False
    integer: bool = False
    why: str = ""

    def holds(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.integer else numbers.Real):
            return False
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_excluded else value >= self.low
        below = value < self.high if self.high_excluded else value <= self.high
        return above and below

    def describe(self, value: Any) -> str:
        """The valid range in words (a whole-number field: ``must be at least low``)."""
        if self.integer:
            whole = "" if isinstance(value, numbers.Integral) else "a whole number "
            return f"must be {whole}at least {self.low:g}"
        if self.high == math.inf:
            return f"must be a finite number {'>' if self.low_excluded else '>='} {self.low:g}"
        ends = ("(" if self.low_excluded else "[", ")" if self.high_excluded else "]")
        return f"must be in {ends[0]}{self.low:g}, {self.high:g}{ends[1]}"

    def check(self, field: str, value: Any) -> None:
        """Raises one readable ``ValueError``, ``field=value: the valid range (why).``, unless ``holds``."""
        if not self.holds(value):
            why = f" ({self.why})" if self.why else ""
            raise ValueError(f"{field}={value!r}: {self.describe(value)}{why}.")


_ADAM_DECAY = Range(0, 1, high_excluded=True, why="at 1 Adam's bias correction divides by 0: every update is NaN")
OPTIMIZER_RANGES = {
    "learning_rate": Range(0, low_excluded=True),
    "b1": _ADAM_DECAY,
    "b2": _ADAM_DECAY,
    "eps": Range(0, low_excluded=True),
    "weight_decay": Range(0),
    "grad_clip_norm": Range(0, low_excluded=True, why="0 clips every gradient to 0: nothing trains"),
}
# Fields older configs lack (``config_upgrade`` fills them in): their absence means this.
OPTIMIZER_DEFAULTS = {"warmup_steps": 0, "decay_steps": 0}
OPTIMIZER_STEP_RANGES = {name: Range(0, integer=True) for name in OPTIMIZER_DEFAULTS}


def check_optimizer_config(optimizer_config: ml_collections.ConfigDict, num_train_steps: int = 0) -> None:
    """The one optimizer check (``config_checks.check_run_config`` and ``learning_rate_schedule``
    call it): one readable error naming the field, its value and the valid range, for AdamW settings
    out of range (``OPTIMIZER_RANGES``), negative step counts, an unknown ``optimizer.decay``, or a
    cosine decay that would end before its warm-up does."""
    for name, valid in OPTIMIZER_RANGES.items():
        valid.check(f"optimizer.{name}", optimizer_config.get(name))
    for name, valid in OPTIMIZER_STEP_RANGES.items():
        valid.check(f"optimizer.{name}", optimizer_config.get(name, OPTIMIZER_DEFAULTS[name]))
    decay = optimizer_config.get("decay", "constant")
    if decay not in LR_DECAYS:
        raise ValueError(f"optimizer.decay={decay!r}; valid values: {LR_DECAYS}.")
    warmup, end = int(optimizer_config.get("warmup_steps", 0)), _decay_end(optimizer_config, num_train_steps)
    if decay == "cosine" and end <= warmup:
        raise ValueError(
            f"optimizer.decay='cosine' needs decay_steps (or num_train_steps) > warmup_steps={warmup}, got {end}."
        )


def _decay_end(optimizer_config: ml_collections.ConfigDict, num_train_steps: int) -> int:
    return int(optimizer_config.get("decay_steps", 0)) or int(num_train_steps)


def learning_rate_schedule(optimizer_config: ml_collections.ConfigDict, num_train_steps: int = 0) -> optax.Schedule:
    """Linear warm-up over ``warmup_steps``, then ``decay``: 'constant' (the paper's) or 'cosine'
    from the peak to 0 at ``decay_steps`` (0: ``num_train_steps``). Resuming a cosine run with a
    larger ``num_train_steps`` and ``decay_steps`` 0 moves the end of the decay, so the lr jumps back
    up; with ``decay_steps`` set, steps past it train at lr 0."""
    check_optimizer_config(optimizer_config, num_train_steps)
    lr = float(optimizer_config.learning_rate)
    warmup = int(optimizer_config.get("warmup_steps", 0))
    if optimizer_config.get("decay", "constant") == "constant":
        after = optax.constant_schedule(lr)
    else:
        after = optax.cosine_decay_schedule(lr, _decay_end(optimizer_config, num_train_steps) - warmup)
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(
    optimizer_config: ml_collections.ConfigDict, num_train_steps: int = 0
) -> optax.GradientTransformation:
    """AdamW with global-norm clipping on ``learning_rate_schedule``."""
    return optax.chain(
        optax.clip_by_global_norm(optimizer_config.grad_clip_norm),
        optax.adamw(
            learning_rate_schedule(optimizer_config, num_train_steps),
            b1=optimizer_config.b1,
            b2=optimizer_config.b2,
            eps=optimizer_config.eps,
            weight_decay=optimizer_config.weight_decay,
        ),
    )


def create_train_state(
    params: Any, optimizer: optax.GradientTransformation, rng: jax.Array, frozen: Any = None
) -> TrainState:
    """A fresh state; the EMA starts as a copy of the params (a distinct buffer, safe to donate)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        rng=rng,
        frozen={} if frozen is None else frozen,
    )


def tree_all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def default_update_policy() -> ml_collections.ConfigDict:
    """The ``nonfinite`` config section: when an update is rejected and when the run gives up."""
    config = ml_collections.ConfigDict()
    # Reject an update whose new global parameter norm differs from the old one by more than this
    # factor (either way): finite but absurd steps (e.g. learning_rate=1e30). Must be > 1 (see
    # UPDATE_POLICY_RANGES): a config cannot turn the check off.
    config.max_param_norm_ratio = 2.0
    config.max_consecutive = 10  # this many rejected updates in a row stop the run (0: never)
    return config


# Checked at config resolution (``config_checks``). A ratio of 0 used to turn the norm check off;
# then a finite exploded update was kept and the "last good" checkpoint could hold params near 1e30.
UPDATE_POLICY_RANGES = {
    "max_param_norm_ratio": Range(
        1,
        low_excluded=True,
        why="the factor one update may change the parameter norm by; 0 no longer turns the check off: a finite "
        "exploded update was kept and the last good checkpoint could hold params near 1e30; use e.g. 2.0",
    ),
    "max_consecutive": Range(0, integer=True),
}


def _global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def update_is_sane(
    loss: jax.Array, grads: Any, old_params: Any, new_params: Any, max_param_norm_ratio: float
) -> jax.Array:
    """Whether to keep an update: finite loss, gradients and new params, and (ratio > 0) a global
    parameter norm that moved by less than ``max_param_norm_ratio`` either way. Runs always pass
    a ratio > 1 (``UPDATE_POLICY_RANGES``); 0 (no norm check) is for direct callers only."""
    ok = jnp.isfinite(loss) & tree_all_finite(grads) & tree_all_finite(new_params)
    if max_param_norm_ratio:
        old, new = _global_norm(old_params), _global_norm(new_params)
        tiny = jnp.float32(1e-12)
        ok &= (new <= max_param_norm_ratio * old + tiny) & (old <= max_param_norm_ratio * new + tiny)
    return ok


def apply_gradients(
    state: TrainState,
    grads: Any,
    optimizer: optax.GradientTransformation,
    ema_decay: float,
    ema_warmup: bool = False,
    *,
    loss: jax.Array | None = None,
    max_param_norm_ratio: float = 0.0,
) -> tuple[TrainState, jax.Array]:
    """One optimizer + EMA update; rejected (state kept, step counted) when the loss, the gradients
    or the new params are non-finite or the update is absurd (``update_is_sane``).

    With ``ema_warmup`` the decay is ``min(ema_decay, (1 + step) / (10 + step))``, so that early
    EMA weights are not dominated by the random initialisation (at step 1000 a fixed 0.999 decay
    still gives the initial params a weight of 0.999**1000 = 37%).
    Returns the new state and a flag that is 1.0 where the update was rejected.
    """
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = jnp.asarray(ema_decay, jnp.float32)
    if ema_warmup:
        step = state.step.astype(jnp.float32)
        decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    ema_params = optax.incremental_update(params, state.ema_params, step_size=1.0 - decay)
    loss = jnp.float32(0.0) if loss is None else loss
    keep = update_is_sane(loss, grads, state.params, params, max_param_norm_ratio)
    # One conditional over the whole tree: a per-leaf jnp.where on the global flag makes XLA:CPU
    # fuse every leaf with the reduction and multiplies compile time (~5x measured).
    params, ema_params, opt_state = jax.lax.cond(
        keep,
        lambda: (params, ema_params, opt_state),
        lambda: (state.params, state.ema_params, state.opt_state),
    )
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state)
    return new_state, 1.0 - keep.astype(jnp.float32)
