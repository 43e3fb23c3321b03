"""The flow-matching DiT teacher through the teacher recipe: the step learns, resume is exact, the
run's samples and ``sample_teacher`` use Euler; CoDi and the fine-tuned baseline run on it."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import flow_matching
from codi_jax.configs.cpu import teacher_patches32, tiny_codi, tiny_dit_teacher
from codi_jax.interop import export
from codi_jax.models import dit, dit_controlnet, networks
from codi_jax.objectives import teacher
from codi_jax.runs import checkpoint, config_resolution, config_upgrade, publish
from codi_jax.runs.pretrained import load_conditional, load_teacher
from codi_jax.sampling import many_step, samplers
from codi_jax.training import loop, recipes
from codi_jax.training.train_state import make_optimizer


def _tiny_config(tmp_path, **overrides):
    config = tiny_dit_teacher.get_config()
    config.data.data_dir = str(tmp_path / "tfds")
    for key, value in overrides.items():
        config[key] = value
    return config


def test_dit_flow_step_lowers_loss_on_fixed_batch(tmp_path) -> None:
    """adaLN-zero starts every block as the identity and the flow loss has a large irreducible part
    (``E|eps - x_0|^2 ~ 1.36`` at the zero output): 50 steps at 1e-3 take it ~20% down."""
    config = _tiny_config(tmp_path)
    config.optimizer.learning_rate = 1e-3
    model, schedule = loop.build_model(config)
    assert isinstance(model, dit.DiT) and isinstance(schedule, flow_matching.FlowSchedule)
    optimizer = make_optimizer(config.optimizer)
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    state, _ = loop.create_sharded_state(recipes.make_recipe(config, mesh), mesh, config)
    step = jax.jit(recipes.bind_train_step(config, model, schedule, optimizer))
    coarse = np.random.RandomState(0).uniform(-1, 1, (8, 4, 4, 3)).astype(np.float32)
    batch = {"image": jnp.asarray(np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2))}
    eval_rng = jax.random.PRNGKey(123)
    loss = functools.partial(teacher.diffusion_loss, model=model, schedule=schedule, x=batch["image"], rng=eval_rng)
    before = float(loss(state.params))
    for i in range(50):
        state, metrics = step(state, batch, jax.random.PRNGKey(i))
    after = float(loss(state.params))
    assert float(metrics["skipped_nonfinite"]) == 0.0
    assert after < 0.9 * before, (before, after)


def _state_leaves(workdir):
    pre, ema = load_teacher(workdir, use_ema=False), load_teacher(workdir, use_ema=True)
    return pre.step, jax.tree.leaves(jax.device_get(pre.params)), jax.tree.leaves(jax.device_get(ema.params))


def test_dit_teacher_resumes_exactly_and_samples_with_euler(tmp_path) -> None:
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    loop.train_and_evaluate(_tiny_config(tmp_path), straight)
    loop.train_and_evaluate(_tiny_config(tmp_path, num_train_steps=3), resumed)
    assert checkpoint.Checkpointer(os.path.join(resumed, "checkpoints")).latest_step() == 3
    loop.train_and_evaluate(_tiny_config(tmp_path), resumed)  # same workdir: resumes at 3, runs to 6

    step_a, params_a, ema_a = _state_leaves(straight)
    step_b, params_b, ema_b = _state_leaves(resumed)
    assert step_a == step_b == 6
    scale = max(float(np.max(np.abs(a))) for a in params_a)
    for a, b in zip(params_a + ema_a, params_b + ema_b):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * max(1.0, scale))
    fresh = _tiny_config(tmp_path)  # training moved the params: the equality is not vacuous
    model, _ = loop.build_model(fresh)
    init = jax.tree.leaves(networks.init_teacher_params(model, 16, jax.random.split(jax.random.PRNGKey(0))[0]))
    assert max(float(np.abs(a - b).max()) for a, b in zip(params_a, init)) > 1e-4
    assert os.listdir(os.path.join(straight, "samples"))  # the loop's Euler sample grid

    pre = load_teacher(straight)
    samples = many_step.sample_images(straight, steps=3, num_images=3, batch_size=2, seed=0)
    assert samples.shape == (3, 16, 16, 3) and np.isfinite(samples).all() and np.abs(samples).max() <= 1.0
    # The sampler is Euler on the flow grid: one example by hand.
    z = samplers.example_noise(0, [1], (16, 16, 3))
    apply = lambda params, x, model_t: pre.model.apply({"params": params}, x, model_t)  # noqa: E731
    by_hand = np.clip(samplers.euler_sample(apply, pre.params, z, pre.schedule.sampling_times(3), pre.schedule), -1, 1)
    np.testing.assert_allclose(samples[1:2], by_hand, atol=1e-5)


def test_codi_and_finetune_runs_on_a_dit_flow_teacher(tmp_path) -> None:
    """CoDi (and the non-distilled baseline) on a flow-matching DiT teacher: the adapter is a
    ``DiTControlNet``, the runs train, checkpoint and write their few-step sample grids."""
    teacher_dir = str(tmp_path / "teacher")
    loop.train_and_evaluate(_tiny_config(tmp_path, num_train_steps=1), teacher_dir)
    for method in ("codi", "finetune"):
        config = tiny_codi.get_config()
        config.update(teacher_workdir=teacher_dir, method=method, num_train_steps=2, sample_every_steps=2)
        config.data.data_dir = str(tmp_path / "tfds")
        resolved = config_resolution.resolve(config)
        assert resolved.model.kind == "dit" and resolved.schedule.kind == "flow"
        model, _ = networks.build_conditional(resolved)
        assert isinstance(model.module.adapter, dit_controlnet.DiTControlNet)
        workdir = str(tmp_path / method)
        loop.train_and_evaluate(config, workdir)
        assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 2
        assert os.listdir(os.path.join(workdir, "samples"))
    _check_publish(str(tmp_path / "codi"), str(tmp_path / "published"))
    with pytest.raises(
        ValueError, match=r"a pixel-space or image-only DiT run; only SD3 \(latent, joint-attention\) DiT runs export"
    ):
        export.export_workdir(str(tmp_path / "codi"), str(tmp_path / "export"))
    assert not os.path.exists(tmp_path / "export")
    bad = _tiny_config(tmp_path)
    bad.model.parametrization = "eps"
    with pytest.raises(ValueError, match=r"^model.parametrization='eps': schedule.kind='flow' predicts the velocity"):
        config_resolution.resolve(bad)


def _check_publish(run: str, out: str) -> None:
    """``publish`` keeps the EMA weights (trained) and the frozen backbone, and nothing else."""
    publish.publish(run, out)
    a, b = load_conditional(run), load_conditional(out)
    assert a.step == b.step == 2
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(x, y)
    saved = checkpoint.Checkpointer(os.path.join(out, "checkpoints"), read_only=True).saved_tree(2)
    assert set(saved) == {"step", "ema_params", "frozen"} and set(saved["frozen"]) == {"backbone"}
    assert os.listdir(os.path.join(out, "samples")) and not os.path.exists(out + ".partial")
    with pytest.raises(FileExistsError, match="exists; publish writes a new folder"):
        publish.publish(run, out)


def test_model_kind_is_filled_in_for_configs_saved_before_it() -> None:
    """A complete model section without ``kind`` was a UNet; a codi config's partial one stays partial."""
    old = teacher_patches32.get_config().to_dict()
    del old["model"]["kind"]
    assert config_upgrade.upgrade(old)["model"]["kind"] == "unet"
    assert config_upgrade.upgrade({"model": {"dtype": "bfloat16"}})["model"] == {"dtype": "bfloat16"}
    assert config_upgrade.upgrade(tiny_dit_teacher.get_config().to_dict())["model"]["kind"] == "dit"
    with pytest.raises(ValueError, match=r"^model.kind='vit'; valid: \('unet', 'dit'\)"):
        networks.backbone_from_config({**old["model"], "kind": "vit"})
