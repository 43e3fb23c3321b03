"""The train step compiled ahead of time, and what it needs per device.

``compile_train_step`` lowers and compiles a recipe's pure step with its shardings (state donated)
before step 1, logs ``Compiled.memory_analysis()`` as one line and refuses a step that cannot fit
a device (``StepMemoryError``, naming the config fields to change). No TensorFlow: the GPU check
(``benchmarks/gpu_check.py``) and ``benchmarks/train_throughput.py`` report the same figures.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
from absl import logging

from codi_jax.training import recipes
from codi_jax.training.train_state import TrainState

# ``Compiled.memory_analysis()`` fields (``<name>_size_in_bytes``) of the AOT memory line.
MEMORY_PARTS = ("argument", "output", "alias", "temp", "generated_code")
GIB = 2**30


class StepMemoryError(ValueError):
    """The compiled train step needs more memory per device than a device has (a user error: exit 2)."""


def step_memory(compiled: Any) -> dict[str, int] | None:
    """Per-device bytes of a compiled step (``memory_analysis``): ``MEMORY_PARTS`` and ``total`` =
    arguments + outputs - aliased (donated state buffers reused for the outputs) + temporaries +
    generated code; None where the backend reports none."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001  (a backend without memory analysis: nothing to report)
        return None
    if stats is None:
        return None
    sizes = {name: int(getattr(stats, f"{name}_size_in_bytes", 0) or 0) for name in MEMORY_PARTS}
    sizes["total"] = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"] + sizes["generated_code"]
    return sizes


def device_bytes_limit(device: Any) -> int | None:
    """The memory an accelerator lets one program use (``memory_stats()["bytes_limit"]``); None on
    backends that report none (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  (memory_stats is unimplemented on some backends)
        return None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


def memory_line(sizes: Mapping[str, int], bytes_limit: int | None) -> str:
    """The AOT memory log line (GiB per device)."""
    gib = {name: sizes[name] / GIB for name in (*MEMORY_PARTS, "total")}
    limit = (
        f"of {bytes_limit / GIB:.2f} GiB on the device" if bytes_limit else "(no device limit reported: not checked)"
    )
    return (
        f"Train step memory per device (AOT): arguments {gib['argument']:.3f} GiB + outputs {gib['output']:.3f} GiB "
        f"- donated {gib['alias']:.3f} GiB + temporaries {gib['temp']:.3f} GiB + generated code "
        f"{gib['generated_code']:.3f} GiB = {gib['total']:.3f} GiB {limit}."
    )


def check_step_memory(sizes: Mapping[str, int], bytes_limit: int | None, config: ml_collections.ConfigDict) -> None:
    """Raises ``StepMemoryError`` naming the config fields to change when the step's total exceeds
    ``bytes_limit`` (None: no limit known, nothing checked)."""
    if bytes_limit is None or sizes["total"] <= bytes_limit:
        return
    model, section = config.get("model") or {}, config.get("sharding") or {}
    raise StepMemoryError(
        f"the compiled train step needs {sizes['total'] / GIB:.2f} GiB per device (temporaries "
        f"{sizes['temp'] / GIB:.2f} GiB, arguments {sizes['argument'] / GIB:.2f} GiB) but a device has "
        f"{bytes_limit / GIB:.2f} GiB. To fit: lower config.batch_size (now {config.get('batch_size')}); shard the "
        f"state over more devices with config.sharding.fsdp (now {section.get('fsdp', 1)}); set "
        f"config.model.remat=True (now {model.get('remat', False)}); or compute in "
        f"config.model.dtype='bfloat16' (now {model.get('dtype', 'float32')!r})."
    )


def step_batch_abstract(recipe: recipes.Recipe, batch: dict, rng: jax.Array, batch_sharding: Any) -> dict:
    """Shapes of the batch the step trains on: ``batch`` itself, or what ``recipe.encode_batch``
    makes of it (VAE latents, prompt embeddings), on ``batch_sharding``; nothing is run."""
    if recipe.encode_batch is not None:
        batch = jax.eval_shape(recipe.encode_batch, recipe.frozen_data, batch, rng)
    return _on(batch, batch_sharding)


def _on(batch: dict, batch_sharding: Any) -> dict:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding, weak_type=x.weak_type), batch
    )


def encodes_in_step(recipe: recipes.Recipe, config: ml_collections.ConfigDict) -> bool:
    """Whether the compiled step runs the recipe's batch encoder itself (``config.encode_in_step``)."""
    return recipe.encode_batch is not None and bool(config.encode_in_step)


def _compile(recipe: recipes.Recipe, fused: bool, in_shardings: tuple, state: TrainState, batch: dict) -> Any:
    """The jitted step lowered for ``state`` / ``batch`` and compiled (state donated)."""
    state_sharding_tree, batch_sharding, repl = in_shardings
    rng = jax.random.fold_in(state.rng, 0)  # shape / dtype / sharding of every step's key
    if not fused:
        step, args = recipe.train_step, (state, step_batch_abstract(recipe, batch, rng, batch_sharding), rng)
    else:
        step = functools.partial(recipes.encoded_train_step, recipe.encode_batch, recipe.train_step)
        args = (state, recipe.frozen_data, _on(batch, batch_sharding), rng)
        in_shardings = (state_sharding_tree, repl, batch_sharding, repl)
    jitted = jax.jit(step, in_shardings=in_shardings, out_shardings=(state_sharding_tree, repl), donate_argnums=(0,))
    return jitted.lower(*args).compile()


def compile_train_step(
    recipe: recipes.Recipe, config: ml_collections.ConfigDict, in_shardings: tuple, state: TrainState, batch: dict
) -> Callable:
    """The train step compiled ahead of time (``in_shardings`` = state, batch, rng), its memory
    analysis logged and checked against the device's memory before step 1.

    Returns ``step(state, batch, rng) -> (state, metrics)`` taking the loader's batch: the batch
    encoder runs inside the step when ``encodes_in_step``; otherwise ``batch`` must already be
    encoded (``recipe.encode_batch``, key ``fold_in(rng, recipes.ENCODE_KEY)``)."""
    fused = encodes_in_step(recipe, config)
    start = time.time()
    compiled = _compile(recipe, fused, in_shardings, state, batch)
    inside = " (the batch encoder inside)" if fused else ""
    logging.info("Train step compiled ahead of time in %.1f s%s.", time.time() - start, inside)
    sizes = step_memory(compiled)
    if sizes is None:
        logging.info("Train step memory: this backend reports no memory analysis.")
    else:
        bytes_limit = device_bytes_limit(jax.local_devices()[0])
        logging.info("%s", memory_line(sizes, bytes_limit))
        check_step_memory(sizes, bytes_limit, config)
    if not fused:
        return compiled
    frozen_data = recipe.frozen_data
    return lambda state, batch, rng: compiled(state, frozen_data, batch, rng)
