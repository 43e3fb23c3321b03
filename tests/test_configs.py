"""Every config in configs/ is valid: known fields, a valid task, and (for conditional runs) an
adapted model that initialises for its task's condition (checked abstractly, no compile)."""

from __future__ import annotations

import importlib
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from codi_jax import codi, config_resolution, inference, networks
from codi_jax.data import tasks
from configs import tiny_teacher

CONFIG_NAMES = sorted(
    p.stem for p in (pathlib.Path(__file__).parent.parent / "configs").glob("*.py") if p.stem != "__init__"
)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_is_valid(name: str) -> None:
    config = importlib.import_module(f"configs.{name}").get_config()
    method = config_resolution.method_of(config)
    if method == "teacher":
        assert config.model.parametrization in ("v", "eps", "x")
        return
    tasks.check_task_config(config.task)
    codi.check_codi_config(config.codi)
    assert config.teacher_workdir is not None
    # Resolve the backbone as a teacher would (tiny one), then build and abstractly initialise.
    with config.unlocked():
        config.model = tiny_teacher.get_config().model
        config.schedule = tiny_teacher.get_config().schedule
    model, _ = networks.build_conditional(config)
    size = 16
    cond = jnp.zeros((1, size, size, tasks.cond_channels(config.task)))
    instruction = jnp.zeros((1,), jnp.int32) if tasks.num_instructions(config.task) else None
    backbone = jax.eval_shape(
        model.backbone.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1,))
    )
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), backbone["params"], cond, instruction)
    assert set(params) >= {"backbone", "adapter"}
    out = jax.eval_shape(model.apply, params, jnp.zeros((1, size, size, 3)), jnp.zeros((1,)), cond, instruction)
    assert out.shape == (1, size, size, 3)


def test_renoise_default_comes_from_the_codi_section() -> None:
    """CoDi configs re-noise between steps unless ``codi.renoise`` says no; configs saved before the
    field existed get its default; non-distilled models always move by DDIM."""
    config = importlib.import_module("configs.codi_sr4").get_config()
    assert inference.renoise_between_steps(config) is True
    assert inference.renoise_key(config, seed=3) is not None
    config.codi.renoise = False
    assert inference.renoise_between_steps(config) is False and inference.renoise_key(config, seed=3) is None
    old = config.to_dict()
    del old["codi"]["renoise"]
    assert inference.renoise_between_steps(ml_collections.ConfigDict(old)) is codi.default_codi_config().renoise
    finetune = importlib.import_module("configs.finetune_sr4").get_config()
    assert inference.renoise_between_steps(finetune) is False
