"""The ahead-of-time train step (``training.aot``): memory totals, the device-limit check (fake
numbers), and ``compile_train_step`` on a small fake recipe whose batch encoder changes the
batch's shapes (the step must be compiled for the encoded batch)."""

from __future__ import annotations

import logging
import types

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from codi_jax import sharding
from codi_jax.cli import common
from codi_jax.training import aot, recipes

GIB = 2**30


def _sizes(**gib: float) -> dict[str, int]:
    sizes = {name: int(gib.get(name, 0.0) * GIB) for name in aot.MEMORY_PARTS}
    sizes["total"] = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"] + sizes["generated_code"]
    return sizes


def _config(encode_in_step: bool = False, **model) -> ml_collections.ConfigDict:
    model = dict(dict(remat=False, dtype="float32"), **model)
    return ml_collections.ConfigDict(
        dict(batch_size=64, sharding=dict(fsdp=1), model=model, encode_in_step=encode_in_step)
    )


def test_step_memory_totals_from_memory_analysis() -> None:
    stats = types.SimpleNamespace(
        argument_size_in_bytes=1000,
        output_size_in_bytes=900,
        alias_size_in_bytes=800,  # the donated state, reused for the new state
        temp_size_in_bytes=5000,
        generated_code_size_in_bytes=70,
    )
    compiled = types.SimpleNamespace(memory_analysis=lambda: stats)
    sizes = aot.step_memory(compiled)
    assert sizes == dict(argument=1000, output=900, alias=800, temp=5000, generated_code=70, total=6170)

    def unsupported():
        raise NotImplementedError("no memory analysis here")

    assert aot.step_memory(types.SimpleNamespace(memory_analysis=unsupported)) is None
    assert aot.step_memory(types.SimpleNamespace(memory_analysis=lambda: None)) is None


def test_device_bytes_limit() -> None:
    def device(stats):
        return types.SimpleNamespace(memory_stats=stats)

    assert aot.device_bytes_limit(device(lambda: {"bytes_limit": 80 * GIB, "bytes_in_use": 3})) == 80 * GIB
    assert aot.device_bytes_limit(device(lambda: None)) is None  # CPU
    assert aot.device_bytes_limit(device(lambda: {"bytes_in_use": 3})) is None

    def unimplemented():
        raise NotImplementedError

    assert aot.device_bytes_limit(device(unimplemented)) is None
    assert aot.device_bytes_limit(jax.local_devices()[0]) is None  # this CPU reports no limit


def test_memory_check_names_the_fields_to_change() -> None:
    fits = _sizes(argument=10, output=10, alias=9, temp=50, generated_code=0.1)  # 61.1 GiB
    aot.check_step_memory(fits, 80 * GIB, _config())
    aot.check_step_memory(_sizes(temp=1000), None, _config())  # no limit known: not checked
    with pytest.raises(aot.StepMemoryError) as raised:
        aot.check_step_memory(_sizes(argument=10, temp=90), 80 * GIB, _config(dtype="bfloat16"))
    message = str(raised.value)
    for expected in (
        "100.00 GiB per device",
        "80.00 GiB",
        "config.batch_size (now 64)",
        "config.sharding.fsdp (now 1)",
        "config.model.remat=True (now False)",
        "config.model.dtype='bfloat16' (now 'bfloat16')",
    ):
        assert expected in message, (expected, message)
    assert isinstance(raised.value, common.USER_ERRORS)  # the CLI reports it in one line, exit code 2
    line = aot.memory_line(fits, 80 * GIB)
    assert "temporaries 50.000 GiB" in line and "= 61.100 GiB of 80.00 GiB" in line
    assert "not checked" in aot.memory_line(fits, None)


@flax.struct.dataclass
class _State:
    step: jax.Array
    w: jax.Array
    rng: jax.Array


def _recipe() -> recipes.Recipe:
    """A step on encoded batches: images (B, 8, 8, 3) -> latents (B, 4, 4, 2) + a (B, 5) context."""

    def encode(frozen, batch, rng):
        pooled = batch["image"].reshape(-1, 4, 2, 4, 2, 3).mean((2, 4)) @ frozen["proj"]
        return {"image": pooled, "context": jax.random.normal(rng, (batch["image"].shape[0], 5))}

    def step(state, batch, rng):
        loss = jnp.mean((batch["image"] * state.w) ** 2) + 0.0 * jnp.sum(batch["context"])
        new = state.replace(step=state.step + 1, w=state.w - 0.1 * jax.grad(lambda w: loss)(state.w))
        return new, {"loss": loss, "noise": jax.random.uniform(rng)}

    frozen = {"proj": jnp.ones((3, 2), jnp.float32)}
    return recipes.Recipe(None, None, None, step, None, None, encode_batch=encode, frozen_data=frozen)


def test_compile_train_step_on_the_encoded_batch(caplog, monkeypatch) -> None:
    mesh = sharding.make_mesh(1, 1)
    repl, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    state = jax.device_put(_State(jnp.zeros((), jnp.int32), jnp.full((2,), 0.5), jax.random.PRNGKey(0)), repl)
    shardings = jax.tree.map(lambda _: repl, state)
    images = np.random.RandomState(0).rand(4, 8, 8, 3).astype(np.float32)
    batch = jax.device_put({"image": images}, batch_sharding)
    recipe = _recipe()
    with caplog.at_level(logging.INFO):
        compiled = aot.compile_train_step(recipe, _config(), (shardings, batch_sharding, repl), state, batch)
    assert "Train step memory per device (AOT)" in caplog.text and "not checked" in caplog.text
    rng = jax.random.fold_in(state.rng, 0)
    encoded = jax.jit(recipe.encode_batch, out_shardings=batch_sharding)(recipe.frozen_data, batch, rng)
    expected, _ = recipe.train_step(state, encoded, rng)
    state_copy = jax.tree.map(jnp.copy, state)
    new_state, metrics = compiled(state, encoded, rng)  # the executable the loop runs: no recompile
    assert int(new_state.step) == 1 and float(metrics["loss"]) > 0
    np.testing.assert_allclose(new_state.w, expected.w, rtol=1e-6)
    assert state.w.is_deleted()  # the state was donated

    # The encoder inside the step (encode_in_step): one program on the raw batch, same result.
    fresh = jax.device_put(_State(jnp.zeros((), jnp.int32), jnp.full((2,), 0.5), jax.random.PRNGKey(0)), repl)
    with caplog.at_level(logging.INFO):
        fused = aot.compile_train_step(recipe, _config(True), (shardings, batch_sharding, repl), fresh, batch)
    assert "(the batch encoder inside)" in caplog.text
    encoded = jax.jit(recipe.encode_batch)(recipe.frozen_data, batch, jax.random.fold_in(rng, recipes.ENCODE_KEY))
    expected, expected_metrics = recipe.train_step(state_copy, encoded, rng)
    fused_state, fused_metrics = fused(fresh, batch, rng)
    np.testing.assert_allclose(fused_state.w, expected.w, rtol=1e-6)
    np.testing.assert_allclose(fused_metrics["loss"], expected_metrics["loss"], rtol=1e-6)
    assert fresh.w.is_deleted()  # the state was donated

    # A device too small for the step: an error naming the fields, before any step runs.
    monkeypatch.setattr(aot, "device_bytes_limit", lambda device: 16)
    fresh = jax.device_put(_State(jnp.zeros((), jnp.int32), jnp.ones((2,)), jax.random.PRNGKey(0)), repl)
    with pytest.raises(aot.StepMemoryError, match="config.batch_size"):
        aot.compile_train_step(recipe, _config(), (shardings, batch_sharding, repl), fresh, batch)
