"""Teacher training: the step learns, non-finite updates are skipped, resume is exact (sharding: test_multihost)."""

import functools
import glob
import logging
import os
import types
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.configs.cpu import tiny_teacher
from codi_jax.objectives import teacher
from codi_jax.runs import checkpoint, config_resolution
from codi_jax.runs.pretrained import load_teacher
from codi_jax.training import loop, recipes, train_state
from codi_jax.training.train_state import make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config(tmp_path, **overrides):
    config = tiny_teacher.get_config()
    config.data.data_dir = str(tmp_path / "tfds")
    for key, value in overrides.items():
        config[key] = value
    return config


def _fixed_batch(config, n=8):
    size = config.data.image_size
    rng = np.random.RandomState(0)
    # Smooth random images: low-frequency structure a small UNet can fit within a few steps.
    coarse = rng.uniform(-1, 1, (n, size // 4, size // 4, 3)).astype(np.float32)
    return {"image": jnp.asarray(np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2))}


def test_train_step_lowers_loss_on_fixed_batch(tmp_path):
    config = _tiny_config(tmp_path)
    model, schedule = loop.build_model(config)
    optimizer = make_optimizer(config.optimizer)
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    state, _ = loop.create_sharded_state(recipes.make_recipe(config, mesh), mesh, config)
    step = jax.jit(
        functools.partial(
            teacher.train_step, model=model, schedule=schedule, optimizer=optimizer, ema_decay=config.ema_decay
        )
    )
    batch = _fixed_batch(config)
    eval_rng = jax.random.PRNGKey(123)  # same t and noise before and after: only params change
    loss_before = float(teacher.diffusion_loss(state.params, model, schedule, batch["image"], eval_rng))
    params_before = state.params
    for i in range(25):
        state, metrics = step(state, batch, jax.random.PRNGKey(i))
    loss_after = float(teacher.diffusion_loss(state.params, model, schedule, batch["image"], eval_rng))
    assert int(state.step) == 25
    assert float(metrics["skipped_nonfinite"]) == 0.0
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    # The EMA moved from the initial params towards the new ones but not all the way.
    leaf = lambda t: jax.tree.leaves(t)[0]  # noqa: E731
    d_ema = float(jnp.abs(leaf(state.ema_params) - leaf(params_before)).max())
    d_params = float(jnp.abs(leaf(state.params) - leaf(params_before)).max())
    assert 0 < d_ema < d_params


def test_nonfinite_update_is_skipped(tmp_path):
    config = _tiny_config(tmp_path)
    model, schedule = loop.build_model(config)
    optimizer = make_optimizer(config.optimizer)
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    state, _ = loop.create_sharded_state(recipes.make_recipe(config, mesh), mesh, config)
    step = jax.jit(
        functools.partial(
            teacher.train_step, model=model, schedule=schedule, optimizer=optimizer, ema_decay=config.ema_decay
        )
    )
    batch = _fixed_batch(config)
    bad = {"image": batch["image"].at[0, 0, 0, 0].set(jnp.nan)}
    new_state, metrics = step(state, bad, jax.random.PRNGKey(0))
    assert float(metrics["skipped_nonfinite"]) == 1.0
    assert int(new_state.step) == 1
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _state_leaves(workdir):
    pre = load_teacher(workdir, use_ema=False)
    ema = load_teacher(workdir, use_ema=True)
    return pre.step, jax.tree.leaves(jax.device_get(pre.params)), jax.tree.leaves(jax.device_get(ema.params))


def test_resume_equals_uninterrupted_run(tmp_path):
    straight = str(tmp_path / "straight")
    resumed = str(tmp_path / "resumed")
    config = _tiny_config(tmp_path)
    loop.train_and_evaluate(config, straight)

    first_half = _tiny_config(tmp_path, num_train_steps=3)
    loop.train_and_evaluate(first_half, resumed)
    assert checkpoint.Checkpointer(os.path.join(resumed, "checkpoints")).latest_step() == 3
    loop.train_and_evaluate(config, resumed)  # same workdir: resumes at 3, runs to 6

    step_a, params_a, ema_a = _state_leaves(straight)
    step_b, params_b, ema_b = _state_leaves(resumed)
    assert step_a == step_b == 6
    scale = max(float(np.max(np.abs(a))) for a in params_a)
    for a, b in zip(params_a + ema_a, params_b + ema_b):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * max(1.0, scale))
    # Sanity: training did move the params (so equality above is not vacuous).
    fresh = _tiny_config(tmp_path, num_train_steps=1)
    loop.train_and_evaluate(fresh, str(tmp_path / "one_step"))
    _, params_one, _ = _state_leaves(str(tmp_path / "one_step"))
    assert max(float(np.abs(a - b).max()) for a, b in zip(params_a, params_one)) > 1e-4
    # The loop wrote summaries and a sample grid.
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(straight))
    assert os.listdir(os.path.join(straight, "samples"))


def test_resume_with_other_architecture_is_a_clear_error(tmp_path):
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(_tiny_config(tmp_path, num_train_steps=1), workdir)
    other = _tiny_config(tmp_path, num_train_steps=2)
    other.model.block_out_channels = (16, 16)
    with pytest.raises(ValueError, match="block_out_channels"):
        loop.train_and_evaluate(other, workdir)
    # The existing checkpoint is untouched.
    assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [1]


def test_committed_teacher_resumes_into_the_current_train_state():
    """checkpoints/teacher_patches32 was written before ``TrainState.frozen`` existed; the README's
    "continues from the committed step" restores it whole (strict on every saved field)."""
    from codi_jax.configs.cpu import teacher_patches32

    config = teacher_patches32.get_config()
    config.allow_resume_changes = "data.color_augment"  # trained without it (the docs' continuation)
    mesh = jax.make_mesh((1, 1), ("data", "fsdp"))
    recipe = recipes.make_recipe(config, mesh)
    abstract, shardings = loop.state_shardings(recipe, mesh, config)
    ckpt = checkpoint.Checkpointer(os.path.join(REPO, "checkpoints/teacher_patches32/checkpoints"), read_only=True)
    assert "frozen" not in ckpt.saved_tree(3500).tree
    state = ckpt.restore_latest_intact(checkpoint.abstract_like(abstract, shardings), config)
    assert int(state.step) == 3500 and state.frozen == {}
    assert jax.tree.structure(state) == jax.tree.structure(abstract)
    ema = ckpt.restore({"ema_params": abstract.ema_params}, step=3500, partial=True)["ema_params"]
    for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(ema)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="tree structures do not match"):  # other missing fields still fail
        ckpt.restore({"params": abstract.params, "extra": jnp.zeros(2)}, step=3500)


def test_ema_update_with_and_without_warmup():
    import optax

    from codi_jax.training.train_state import apply_gradients, create_train_state

    params = {"w": jnp.zeros((3,))}
    sgd = optax.sgd(1.0)
    grads = {"w": -jnp.ones((3,))}  # one SGD step moves params from 0 to 1
    state = create_train_state(params, sgd, jax.random.PRNGKey(0))
    # Fixed decay 0.9: ema = 0.9 * 0 + 0.1 * 1.
    new, _ = apply_gradients(state, grads, sgd, ema_decay=0.9)
    np.testing.assert_allclose(new.ema_params["w"], 0.1, rtol=1e-6)
    # Warm-up at step 0: decay = min(0.9, 1/10) = 0.1, so ema = 0.9.
    new, _ = apply_gradients(state, grads, sgd, ema_decay=0.9, ema_warmup=True)
    np.testing.assert_allclose(new.ema_params["w"], 0.9, rtol=1e-6)
    # Late in training the warm-up no longer matters: step 10_000 -> decay capped at 0.9.
    late = state.replace(step=jnp.asarray(10_000, jnp.int32))
    new, _ = apply_gradients(late, grads, sgd, ema_decay=0.9, ema_warmup=True)
    np.testing.assert_allclose(new.ema_params["w"], 0.1, rtol=1e-6)


def _optimizer_config(**fields):
    config = tiny_teacher.get_config().optimizer
    for key, value in fields.items():
        config[key] = value
    return config


@pytest.mark.parametrize("warmup", [0, 4])
def test_cosine_decay_drives_adam_steps(warmup):
    """With a constant gradient, Adam's bias-corrected step is lr_k * g / (|g| + eps) ~ lr_k: the
    steps follow the closed-form warm-up + cosine schedule and reach 0 at decay_steps."""
    peak, total = 1e-3, 20
    config = _optimizer_config(learning_rate=peak, warmup_steps=warmup, decay="cosine", decay_steps=0, weight_decay=0.0)
    optimizer = make_optimizer(config, num_train_steps=total)
    params = {"w": jnp.zeros((3,))}
    grads = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    state = optimizer.init(params)
    steps = []
    for _ in range(total + 1):
        updates, state = optimizer.update(grads, state, params)
        steps.append(float(jnp.abs(updates["w"][0])))
    k = np.arange(total + 1, dtype=np.float64)
    decay = 0.5 * peak * (1 + np.cos(np.pi * np.clip(k - warmup, 0, None) / (total - warmup)))
    expected = np.where(k < warmup, peak * k / max(warmup, 1), decay)
    np.testing.assert_allclose(steps, expected, rtol=1e-5, atol=1e-6 * peak)
    assert steps[-1] < 1e-6 * peak


def test_constant_schedule_is_the_default():
    config = tiny_teacher.get_config().optimizer
    assert config.decay == "constant"
    schedule = train_state.learning_rate_schedule(config, num_train_steps=100)
    assert float(schedule(0)) == pytest.approx(config.learning_rate)
    assert float(schedule(10_000)) == pytest.approx(config.learning_rate)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(decay="linear"), "optimizer.decay='linear'"),
        (dict(decay_steps=-1), "optimizer.decay_steps=-1: must be at least 0"),
        (dict(decay="cosine", warmup_steps=50, decay_steps=50), "needs decay_steps"),
    ],
)
def test_bad_lr_schedule_is_one_readable_error(fields, message):
    with pytest.raises(ValueError, match=message):
        train_state.learning_rate_schedule(_optimizer_config(**fields), num_train_steps=0)


def test_cosine_decay_ending_in_the_warm_up_is_refused_at_config_resolution(tmp_path):
    config = _tiny_config(tmp_path)
    config.optimizer.update(decay="cosine", warmup_steps=config.num_train_steps)
    with pytest.raises(ValueError, match="needs decay_steps"):
        config_resolution.resolve(config)


def _scalars(workdir: str, tag: str) -> dict[int, float]:
    """``{step: value}`` of one TensorBoard scalar over every events file in ``workdir``."""
    import tensorflow as tf

    values = {}
    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


def test_log_lines_after_a_resume_cover_only_their_own_steps(tmp_path, monkeypatch, caplog):
    """A resumed run's first log line is the mean over the steps since the resume (it once also
    averaged the first post-resume step into the next line: "step 5 loss 24.15" = mean(47.83, 0.47)),
    and steps/s counts only post-resume steps after the first call. Per-step losses: a straight run
    logging every step (a resumed run is bitwise equal to it)."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    config = _tiny_config(tmp_path, log_every_steps=1, sample_every_steps=1000)
    loop.train_and_evaluate(config, straight)
    per_step = _scalars(straight, "train/loss")
    assert sorted(per_step) == [1, 2, 3, 4, 5, 6]
    loop.train_and_evaluate(_tiny_config(tmp_path, num_train_steps=3, sample_every_steps=1000), resumed)

    clock = {"now": 0.0}  # the resumed run's time: step s ends at 1000 + 10 s (restore and compile before)
    real_after_step = loop._after_step

    def after_step(loop_state, step, state, metrics):
        clock["now"] = 1000.0 + 10.0 * step
        return real_after_step(loop_state, step, state, metrics)

    monkeypatch.setattr(loop, "time", types.SimpleNamespace(time=lambda: clock["now"]))
    monkeypatch.setattr(loop, "_after_step", after_step)
    caplog.set_level(logging.INFO)
    caplog.clear()  # the earlier runs' lines are captured too where INFO was already on (the full suite)
    loop.train_and_evaluate(_tiny_config(tmp_path, log_every_steps=2, sample_every_steps=1000), resumed)
    lines = [r.getMessage() for r in caplog.records if " loss " in r.getMessage()]
    assert lines == [f"step 4/6 loss {per_step[4]:.4f}", mock.ANY], lines  # step 4 alone: no rate yet
    assert lines[1].startswith(f"step 6/6 loss {(per_step[5] + per_step[6]) / 2:.4f}  0.10 steps/s"), lines
    losses = _scalars(resumed, "train/loss")
    np.testing.assert_allclose([losses[4], losses[6]], [per_step[4], (per_step[5] + per_step[6]) / 2], rtol=1e-6)
    assert _scalars(resumed, "train/steps_per_sec") == {2: mock.ANY, 3: mock.ANY, 6: pytest.approx(0.1)}
