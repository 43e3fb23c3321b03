"""Faithfulness to the input: LR-consistency PSNR and mean-colour error (against NumPy / TF
references), the super-resolution operators of ``codi_jax.lowpass`` (against TF's resize and a NumPy
pseudo-inverse), and the low-frequency consistency option of the sampler (off: bitwise unchanged)."""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from codi_jax import diffusion, lowpass
from codi_jax.cli import common
from codi_jax.data import task_spec, tasks
from codi_jax.evaluation import evaluate, report, scoring
from codi_jax.metrics import compute_metrics
from codi_jax.runs import pretrained
from codi_jax.sampling import conditional, few_step, samplers
from codi_jax.sampling.options import SamplingOptions

SIZE, SCALE = 16, 4
FINETUNE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "checkpoints", "finetune_sr4_color")  # 32 px, x4 SR
LOW = SIZE // SCALE


def _sr_task(downsample: str = "bicubic") -> ml_collections.ConfigDict:
    task = task_spec.default_task_config()
    task.name, task.scale, task.downsample = "sr", SCALE, downsample
    return task


def _images(seed: int, n: int = 4, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, (n, SIZE, SIZE, 3)).astype(np.float32)


def _smooth_targets(seed: int, n: int = 3) -> np.ndarray:
    """Targets whose bicubic round trip stays inside [-1, 1] (so the condition is not clipped)."""
    return _images(seed, n, -0.5, 0.5)


def _numpy_psnr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    mse = np.mean(((x.astype(np.float64) - y) / 2.0) ** 2, axis=(1, 2, 3))
    return 10.0 * np.log10(1.0 / mse)


def _tf_downscale(images: np.ndarray, method: str) -> np.ndarray:
    """The task's own downscale (``tasks._resize``'s call)."""
    return tf.image.resize(images, [LOW, LOW], method=method, antialias=True).numpy().astype(np.float64)


def _downscale_fn(task: ml_collections.ConfigDict):
    ops = lowpass.sr_operators(task, SIZE)
    return lambda images: lowpass.downscale(ops, images)


@pytest.mark.parametrize("method", ["bicubic", "area"])
def test_lr_psnr_matches_numpy(method: str) -> None:
    target = _images(0)
    pred = np.clip(target + 0.3 * _images(1), -1.2, 1.2).astype(np.float32)  # overshoots: clipped first
    got = compute_metrics(pred, target, ["lr_psnr"], downscale=_downscale_fn(_sr_task(method)))["lr_psnr"]
    if method == "area":  # block means, NumPy only
        down = lambda x: x.reshape(len(x), LOW, SCALE, LOW, SCALE, 3).mean(axis=(2, 4), dtype=np.float64)  # noqa: E731
    else:
        down = functools.partial(_tf_downscale, method=method)
    expected = np.mean(_numpy_psnr(down(np.clip(pred, -1, 1)), down(target)))
    assert 10.0 < expected < 60.0
    np.testing.assert_allclose(got, expected, rtol=1e-4)  # ~1e-3 dB
    with pytest.raises(ValueError, match="lr_psnr needs the task's downscale"):
        compute_metrics(pred, target, ["lr_psnr"])


def test_mean_color_error_matches_numpy() -> None:
    target = _images(2)
    pred = np.clip(target + np.array([0.2, -0.1, 0.05], np.float32) + 0.2 * _images(3), -1, 1)
    got = compute_metrics(pred, target, ["color_error"])["color_error"]
    means = lambda x: 255.0 * ((x.astype(np.float64) + 1.0) / 2.0).mean(axis=(1, 2))  # noqa: E731
    expected = np.mean(np.linalg.norm(means(pred) - means(target), axis=-1))
    assert 5.0 < expected < 50.0
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    # A uniform shift d (in [-1, 1] units) is 255 / 2 * |d| levels.
    shifted = np.clip(target * 0.5 + np.array([0.1, 0.2, -0.2], np.float32), -1, 1)
    error = compute_metrics(shifted, target * 0.5, ["color_error"])["color_error"]
    np.testing.assert_allclose(error, 127.5 * np.linalg.norm([0.1, 0.2, -0.2]), rtol=1e-4)


@pytest.mark.parametrize("method", ["bicubic", "area"])
def test_target_is_consistent_with_its_own_condition(method: str) -> None:
    task = _sr_task(method)
    examples = tasks.degrade_images(task, _smooth_targets(4), seed=0)
    target, cond = examples["image"], examples["cond"]
    ops = lowpass.sr_operators(task, SIZE)
    low = np.asarray(lowpass.downscale(ops, target))
    np.testing.assert_allclose(low, _tf_downscale(target, method), atol=1e-5)  # = the task's LR input
    recovered = np.asarray(lowpass.lr_from_condition(ops, jnp.asarray(cond)))
    assert np.min(_numpy_psnr(recovered, low)) > 90.0  # the condition's LR image is the target's
    row = scoring.faithfulness_metrics(target, target, task)
    assert row["lr_psnr"] == np.inf and row["color_error"] == 0.0
    bicubic = scoring.faithfulness_metrics(cond, target, task)  # the bicubic row: finite, below
    assert 20.0 < bicubic["lr_psnr"] < 90.0
    inpaint = task_spec.default_task_config()
    inpaint.name = "inpaint"
    assert scoring.faithfulness_metrics(cond, target, inpaint)["lr_psnr"] is None  # not applicable


def test_lowpass_is_numpy_pseudo_inverse_projection() -> None:
    """``lowpass`` = pinv(D2) D2 with D2 the 2-D downscale built from TF's resize of basis images."""
    task = _sr_task()
    basis = np.eye(SIZE * SIZE, dtype=np.float32).reshape(-1, SIZE, SIZE, 1)
    d2 = _tf_downscale(np.repeat(basis, 3, axis=-1), "bicubic")[..., 0].reshape(SIZE * SIZE, LOW * LOW).T
    projection = np.linalg.pinv(d2) @ d2  # (S*S, S*S)
    x = _images(5, 2)
    expected = np.einsum("pq,nqc->npc", projection, x.reshape(2, -1, 3).astype(np.float64)).reshape(x.shape)
    got = np.asarray(lowpass.lowpass(lowpass.sr_operators(task, SIZE), jnp.asarray(x)))
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max())


def test_consistency_step_replaces_low_frequencies_only() -> None:
    task = _sr_task()
    ops = lowpass.sr_operators(task, SIZE)
    target = _smooth_targets(6, 2)
    cond = jnp.asarray(tasks.degrade_images(task, target, seed=0)["cond"])
    x = jnp.asarray(_images(7, 2))
    projected = lowpass.consistency_step(ops, x, cond)
    scale = float(jnp.abs(x).max())
    tol = dict(rtol=0, atol=1e-5 * scale)
    reference = lowpass.reference(ops, cond)
    np.testing.assert_allclose(lowpass.lowpass(ops, projected), lowpass.lowpass(ops, reference), **tol)
    np.testing.assert_allclose(projected - lowpass.lowpass(ops, projected), x - lowpass.lowpass(ops, x), **tol)
    np.testing.assert_allclose(lowpass.lowpass(ops, lowpass.lowpass(ops, x)), lowpass.lowpass(ops, x), **tol)
    # afterwards the sample's downscale is the task's LR input
    np.testing.assert_allclose(lowpass.downscale(ops, projected), _tf_downscale(target, "bicubic"), atol=1e-4)
    assert float(jnp.abs(projected - x).max()) > 0.1


def _toy_model() -> types.SimpleNamespace:
    """An x-predicting "network" of (z_t, t, cond): enough to drive the samplers."""

    def apply(params, z_t, model_t, cond, instruction):
        return jnp.tanh(params * z_t + 0.5 * cond) + 0.001 * model_t[:, None, None, None]

    return types.SimpleNamespace(apply=apply, takes_guidance_scale=False)


def _reference_ddim(apply_fn, params, z_init, times, schedule):
    """``ddim_sample``'s loop as it was before the projection hook (x prediction, clipped, DDIM moves)."""

    def step(z_t, inputs):
        t_pair, _ = inputs
        alpha_t, sigma_t = schedule.alpha_sigma(t_pair[0])
        alpha_s, sigma_s = schedule.alpha_sigma(t_pair[1])
        model_t = jnp.broadcast_to(schedule.model_time(t_pair[0]), (z_t.shape[0],))
        x_hat, eps_hat = diffusion.x_eps_from_prediction(z_t, apply_fn(params, z_t, model_t), alpha_t, sigma_t, "x")
        x_hat = jnp.clip(x_hat, -1.0, 1.0)
        return diffusion.ddim_step(x_hat, eps_hat, alpha_s, sigma_s), x_hat

    pairs = jnp.stack([times[:-1], times[1:]], axis=1)
    _, x_hats = jax.lax.scan(step, z_init, (pairs, jax.random.split(jax.random.PRNGKey(0), len(times) - 1)))
    return x_hats[-1]


@pytest.mark.parametrize("solver", ["ddim", "dpm++"])
def test_sampler_option(solver: str) -> None:
    """Off: bitwise the sampler without the hook; on: the sample's downscale is the LR input."""
    task = _sr_task()
    target = _smooth_targets(8, 2)
    cond = jnp.asarray(tasks.degrade_images(task, target, seed=0)["cond"])
    schedule = diffusion.Schedule("cosine")
    times = jnp.asarray([1.0, 0.6, 0.3, 0.0], jnp.float32)
    z = jax.random.normal(jax.random.PRNGKey(1), cond.shape)
    model, params = _toy_model(), jnp.float32(0.7)
    ops = lowpass.sr_operators(task, SIZE)
    off = conditional.make_conditional_sampler(model, schedule, "x", solver)(params, cond, None, z, times, None)
    on = conditional.make_conditional_sampler(model, schedule, "x", solver, lowpass_ops=ops)
    on = on(params, cond, None, z, times, None)
    apply_fn = lambda p, z_t, t: model.apply(p, z_t, t, cond, None)  # noqa: E731
    if solver == "ddim":
        before = jax.jit(functools.partial(_reference_ddim, apply_fn, schedule=schedule))(params, z, times)
        np.testing.assert_array_equal(np.asarray(off), np.asarray(before))
        np.testing.assert_allclose(lowpass.downscale(ops, on), _tf_downscale(target, "bicubic"), atol=1e-4)
    else:
        run = functools.partial(samplers.dpm_solver_pp_sample, apply_fn, schedule=schedule, parametrization="x")
        np.testing.assert_array_equal(np.asarray(off), np.asarray(jax.jit(run)(params, z, times)))
    assert float(jnp.abs(on - off).max()) > 1e-2


def test_option_refuses_latent_and_other_tasks() -> None:
    config = ml_collections.ConfigDict({"task": _sr_task(), "data": {"image_size": SIZE}})
    assert isinstance(conditional.lowpass_operators(config), lowpass.SrOperators)
    config.latent = ml_collections.ConfigDict({"vae": "/models/sd15/vae"})
    with pytest.raises(ValueError, match="needs a pixel-space run; this run samples VAE latents"):
        conditional.check_lowpass_consistency(config)
    config.latent.vae = ""
    config.task.name = "edge"
    with pytest.raises(ValueError, match="needs a super-resolution run .* task is 'edge'"):
        conditional.check_lowpass_consistency(config)


def test_markdown_table_columns() -> None:
    samples = np.zeros((1, SIZE, SIZE, 3), np.float32)
    extra = {"lpips": 0.1, "lr_psnr": 31.234, "color_error": 2.5}
    rows = [
        scoring.Row("CoDi", 4, 25.0, 0.8, 60.0, 1.0, 10, samples, extra=extra, lowpass_consistency=True),
        scoring.Row("CoDi", 4, 25.0, 0.8, 60.0, 1.0, 10, samples, extra={**extra, "lr_psnr": None}),
    ]
    table = report.markdown_table(rows).splitlines()
    assert "| LR-consistency (dB) | mean-colour error |" in table[0]
    assert "| CoDi + low-frequency consistency | 4 |" in table[2] and "| 31.23 | 2.50 |" in table[2]
    assert "| CoDi | 4 |" in table[3] and "| – | 2.50 |" in table[3]


def _edited_run(workdir: str, edit) -> str:
    """The committed SR run's saved config (no weights), edited by ``edit(config_dict)``."""
    source = os.path.join(FINETUNE, "checkpoints")
    step = str(max(int(name) for name in os.listdir(source) if name.isdigit()))
    target = os.path.join(workdir, "checkpoints", step)
    shutil.copytree(os.path.join(source, step), target, ignore=shutil.ignore_patterns("state"))
    metadata = os.path.join(target, "config", "metadata")
    with open(metadata) as f:
        config = json.load(f)
    edit(config)
    with open(metadata, "w") as f:
        json.dump(config, f)
    return workdir


def test_cli_checks_refuse_the_option_from_the_saved_config(tmp_path) -> None:
    """``--lowpass_consistency`` on sample / evaluate: one readable line, before any weight is read."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "im0.png")
    out = str(tmp_path / "out")
    plan = few_step.prepare(
        few_step.SampleRequest(FINETUNE, str(images), out, (1,)), SamplingOptions(lowpass_consistency=True)
    )
    assert plan.cond.shape == (1, 32, 32, 3)
    assert evaluate.check_runs([("sr", FINETUNE)], (1,), SamplingOptions(lowpass_consistency=True))

    latent = _edited_run(str(tmp_path / "latent"), lambda c: c.update(latent={"vae": "/models/vae"}))
    with pytest.raises(ValueError) as error:
        few_step.prepare(
            few_step.SampleRequest(latent, str(images), out, (1,)), SamplingOptions(lowpass_consistency=True)
        )
    assert common.one_line(error.value) == (
        "--lowpass_consistency: low-frequency consistency needs a pixel-space run; this run samples VAE latents "
        "(latent.vae=/models/vae)."
    )

    def to_inpaint(config: dict) -> None:
        config["task"]["name"] = "inpaint"

    inpaint = _edited_run(str(tmp_path / "inpaint"), to_inpaint)
    with pytest.raises(ValueError, match=r"^--run a: low-frequency consistency needs a super-resolution run"):
        evaluate.check_runs([("a", inpaint)], (1,), SamplingOptions(lowpass_consistency=True))
    assert evaluate.check_runs([("a", inpaint)], (1,))  # off: no check
    assert not os.path.exists(out)


def test_check_runs_fills_task_fields_added_since_a_run_was_saved(tmp_path) -> None:
    """A run saved before ``task.instructions`` existed (the field removed from a copy of the committed
    baseline) is evaluated beside a new run, which has it at its default; a real task difference is
    still refused."""
    old = _edited_run(str(tmp_path / "old"), lambda c: c["task"].pop("instructions"))
    new = _edited_run(str(tmp_path / "new"), lambda c: c["task"].update(instructions="ids"))
    saved = glob.glob(os.path.join(old, "checkpoints", "*", "config", "metadata"))
    assert len(saved) == 1 and "instructions" not in json.load(open(saved[0]))["task"]
    assert pretrained.read_config(old)[0].task.instructions == "ids"  # filled in once, at load
    assert len(evaluate.check_runs([("old", old), ("new", new)], (1,))) == 2
    other = _edited_run(str(tmp_path / "other"), lambda c: c["task"].update(instructions="ids", scale=2))
    with pytest.raises(ValueError, match="another task or image size"):
        evaluate.check_runs([("old", old), ("other", other)], (1,))
