"""End to end on tiny models: teacher checkpoint -> CoDi run (exact resume) -> few-step sampling CLI.

One tiny teacher is trained for the module; CoDi runs from it. XLA:CPU compiles dominate, so the
runs share programs (same shapes) through the persistent compilation cache.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from PIL import Image

from codi_jax import metrics
from codi_jax.configs.cpu import tiny_codi, tiny_teacher
from codi_jax.evaluation import evaluate, held_out, report, scoring
from codi_jax.models import networks
from codi_jax.runs import checkpoint, pretrained
from codi_jax.sampling import few_step
from codi_jax.sampling.options import SamplingOptions
from codi_jax.training import loop

REPLICATED = jax.sharding.SingleDeviceSharding(jax.devices()[0])


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("teacher"))
    config = tiny_teacher.get_config()
    config.data.data_dir = os.path.join(workdir, "tfds")
    config.num_train_steps = 2
    config.checkpoint_every_steps = 2
    config.sample_every_steps = 1000
    loop.train_and_evaluate(config, workdir)
    return workdir


def _codi_config(teacher_dir: str, **overrides):
    config = tiny_codi.get_config()
    config.teacher_workdir = teacher_dir
    config.data.data_dir = os.path.join(teacher_dir, "tfds")  # the dataset the teacher fixture built
    config.update(overrides)
    return config


def _params(workdir: str):
    return pretrained.load_conditional(workdir, use_ema=False).params


def test_codi_run_resumes_exactly_and_samples(teacher_dir, tmp_path) -> None:
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    loop.train_and_evaluate(_codi_config(teacher_dir), straight)
    loop.train_and_evaluate(_codi_config(teacher_dir, num_train_steps=2), resumed)
    loop.train_and_evaluate(_codi_config(teacher_dir), resumed)
    a, b = _params(straight), _params(resumed)
    scale = max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(a))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6 * max(1.0, scale))
    # PE-CoDi: the backbone in the run's checkpoint is the teacher's EMA backbone, untouched.
    teacher = pretrained.load_teacher(teacher_dir)
    for x, y in zip(jax.tree.leaves(a["backbone"]), jax.tree.leaves(teacher.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert os.path.exists(os.path.join(straight, "samples", "step_0000004.png"))

    # The few-step sampling binary on a folder of clean images.
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / f"im{i}.png")
    out = str(tmp_path / "out")
    paths = few_step.run(few_step.SampleRequest(straight, str(images), out, (2,)), SamplingOptions(seed=1))
    assert sorted(os.path.basename(p) for p in paths) == ["grid.png", "im0.png", "im1.png", "im2.png"]
    first = np.asarray(Image.open(os.path.join(out, "im0.png")))
    assert first.shape == (16, 16, 3)
    # Deterministic given the seed; never overwrites.
    again = few_step.run(
        few_step.SampleRequest(straight, str(images), str(tmp_path / "out2"), (2,)), SamplingOptions(seed=1)
    )
    np.testing.assert_array_equal(first, np.asarray(Image.open(again[0])))
    with pytest.raises(FileExistsError, match="nothing was overwritten"):
        few_step.run(few_step.SampleRequest(straight, str(images), out, (2,)), SamplingOptions(seed=1))
    assert np.array_equal(first, np.asarray(Image.open(os.path.join(out, "im0.png"))))
    # CoDi's default re-noises between steps (codi.renoise); DDIM moves differ; too many steps is a
    # clear error.
    stochastic = few_step.run(
        few_step.SampleRequest(straight, str(images), str(tmp_path / "out3"), (2,)),
        SamplingOptions(seed=1, renoise=True),
    )
    np.testing.assert_array_equal(first, np.asarray(Image.open(stochastic[0])))
    ddim = few_step.run(
        few_step.SampleRequest(straight, str(images), str(tmp_path / "out3b"), (2,)),
        SamplingOptions(seed=1, renoise=False),
    )
    assert not np.array_equal(first, np.asarray(Image.open(ddim[0])))
    with pytest.raises(ValueError, match="exceed the 50-point training grid"):
        few_step.run(few_step.SampleRequest(straight, str(images), str(tmp_path / "out4"), (51,)))
    # Conditions given directly (a low-resolution image for SR).
    direct = few_step.run(
        few_step.SampleRequest(straight, str(images / "im0.png"), str(tmp_path / "out5"), (1,), input_kind="condition")
    )
    assert len(direct) == 2


@pytest.fixture(scope="module")
def codi_dir(teacher_dir, tmp_path_factory) -> str:
    """A 2-step tiny CoDi run."""
    workdir = str(tmp_path_factory.mktemp("codi"))
    loop.train_and_evaluate(_codi_config(teacher_dir, num_train_steps=2), workdir)
    return workdir


def test_conditional_errors(teacher_dir, codi_dir, tmp_path) -> None:
    workdir = codi_dir
    other = _codi_config(teacher_dir)
    other.adapter.kind = "t2i"
    with pytest.raises(ValueError, match="adapter.kind"):
        loop.train_and_evaluate(other, workdir)
    with pytest.raises(ValueError, match="not a conditional"):
        pretrained.load_conditional(teacher_dir)
    clash = _codi_config(teacher_dir)
    clash.model.block_out_channels = (8, 16)
    with pytest.raises(ValueError, match="model.block_out_channels"):
        loop.train_and_evaluate(clash, str(tmp_path / "clash"))
    missing = _codi_config(str(tmp_path / "no_teacher"))
    with pytest.raises(FileNotFoundError, match="no checkpoints directory"):
        loop.train_and_evaluate(missing, str(tmp_path / "missing"))


def test_two_stage_run_starts_from_a_conditional_checkpoint(teacher_dir, codi_dir, tmp_path) -> None:
    """CM-II: a run with ``init_workdir`` starts from that run's EMA params, keeps them frozen as the
    teacher predictor's model, and refuses a source trained with another task."""
    first = codi_dir
    source = pretrained.load_conditional(first).params
    second = str(tmp_path / "second")
    config = _codi_config(teacher_dir, num_train_steps=2, init_workdir=first)
    config.codi.predictor = "teacher"
    config.codi.guidance_weight = 0.0
    loop.train_and_evaluate(config, second)
    after = pretrained.load_conditional(second, use_ema=False).params
    assert sorted(after) == ["adapter", "backbone"]
    # The frozen initial model is the source, held once: the (frozen) backbone is not copied into it.
    ckpt = checkpoint.Checkpointer(os.path.join(second, "checkpoints"), read_only=True)
    saved = ckpt.saved_tree(2)
    assert sorted(saved["frozen"]) == ["backbone", "initial"] and sorted(saved["params"]) == ["adapter"]
    assert sorted(saved["frozen"]["initial"]) == ["adapter"]
    moments = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(saved["opt_state"])]
    assert any("adapter" in m for m in moments) and not any("backbone" in m or "initial" in m for m in moments)
    shapes = networks.param_shapes(pretrained.read_config(second)[0], with_initial=True)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=REPLICATED), shapes)
    full, _ = pretrained.restore_params(second, abstract, use_ema=False)
    for x, y in zip(jax.tree.leaves(full["initial"]["adapter"]), jax.tree.leaves(source["adapter"]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(full["backbone"]), jax.tree.leaves(source["backbone"]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The adapter trained on from the source's values (moved, but not re-initialised far away).
    moved = [
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(after["adapter"]), jax.tree.leaves(source["adapter"]))
    ]
    assert 0 < max(moved) < 0.1

    clash = _codi_config(teacher_dir, num_train_steps=2, init_workdir=first)
    clash.task.scale = 4
    with pytest.raises(ValueError, match="task.scale"):
        loop.train_and_evaluate(clash, str(tmp_path / "clash"))
    assert not os.path.exists(os.path.join(str(tmp_path / "clash"), "checkpoints"))


def test_evaluate_runs_scores_what_it_samples(codi_dir, tmp_path) -> None:
    rows = evaluate.evaluate_runs([("a", codi_dir), ("b", codi_dir)], (1, 2), SamplingOptions(batch_size=4), num_eval=5)
    assert [(r.method, r.steps) for r in rows] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    config = pretrained.load_conditional(codi_dir).config
    targets = held_out.held_out_examples(config, 5)["image"]
    for r in rows:
        assert r.samples.shape == targets.shape
        expected = metrics.compute_metrics(r.samples, targets, ["psnr", "ssim"])
        assert abs(r.psnr - expected["psnr"]) < 1e-4 and abs(r.ssim - expected["ssim"]) < 1e-4
        assert r.params_trained > 0 and r.ms_per_image > 0 and r.extra["lpips"] > 0
        assert set(r.extra) == {"lpips", "lr_psnr", "color_error"}
        assert r.extra == {**r.extra, **scoring.faithfulness_metrics(r.samples, targets, config.task)}
    # Same checkpoint, same seed: the same numbers; a different step count samples differently.
    assert rows[0].psnr == rows[2].psnr and rows[0].psnr != rows[1].psnr
    # The sampling command and evaluate run one loop: example i gets the same noise (initial and
    # re-noising) at any batch size, so the `sample` binary draws the samples evaluate scored (up to
    # float rounding, which another batch shape can change).
    held = held_out.held_out_examples(config, 5)
    model = pretrained.load_conditional(codi_dir)
    sampled = few_step.sample_conditional(model, held["cond"], None, 2, SamplingOptions(seed=0, batch_size=2))
    np.testing.assert_allclose(sampled, rows[1].samples, rtol=0, atol=1e-5 * 2.0)  # data range 2
    # Re-noising (the CoDi default) only acts between steps: 1 step is unchanged, 2 steps differ.
    ddim = evaluate.evaluate_runs([("a", codi_dir)], (1, 2), SamplingOptions(batch_size=4, renoise=False), num_eval=5)
    np.testing.assert_array_equal(ddim[0].samples, rows[0].samples)
    assert not np.allclose(ddim[1].samples, rows[1].samples)
    # Low-frequency consistency: the sample's downscale moves to the LR input (up to the final clip to
    # [-1, 1], which this barely trained model's far-off predictions make large: ~13 dB -> ~33 dB).
    consistent = evaluate.evaluate_runs(
        [("a", codi_dir)], (2,), SamplingOptions(batch_size=4, lowpass_consistency=True), num_eval=5
    )
    assert consistent[0].lowpass_consistency and "+ low-frequency consistency" in report.markdown_table(consistent)
    assert consistent[0].extra["lr_psnr"] > rows[1].extra["lr_psnr"] + 10.0
    # Raw (not EMA) weights: the rows of the raw params, which this short run's EMA lags behind.
    raw = evaluate.evaluate_runs([("a", codi_dir)], (1,), SamplingOptions(batch_size=4, ema=False), num_eval=5)[0]
    raw_model = pretrained.load_conditional(codi_dir, use_ema=False)
    direct = evaluate.evaluate_checkpoint(raw_model, held, (1,), "a", SamplingOptions(batch_size=4))[0]
    np.testing.assert_array_equal(raw.samples, direct.samples)
    assert not np.allclose(raw.samples, rows[0].samples)
    # Seeds: the row is the mean of the single-seed rows (seed 0 is rows[0]), with their spread.
    seeded = evaluate.evaluate_runs([("a", codi_dir)], (1,), SamplingOptions(batch_size=4), num_eval=5, num_seeds=2)[0]
    same_conditions = held_out.held_out_examples(config, 5)  # the same conditions; sampling seed 1
    # The same batch size as ``seeded``: another batch shape compiles other kernels, whose rounding
    # differs by CPU (on an AMD EPYC host SWD moved by 1.5e-6 relative at batch 64 against 4).
    seed1 = evaluate.evaluate_checkpoint(model, same_conditions, (1,), "a", SamplingOptions(seed=1, batch_size=4))[0]
    for name in ("psnr", "ssim", "swd"):
        values = [getattr(rows[0], name), getattr(seed1, name)]
        assert getattr(seeded, name) == pytest.approx(np.mean(values), rel=1e-6)
        assert seeded.spread[name] == pytest.approx(np.std(values, ddof=1), rel=1e-6, abs=1e-9 * abs(values[0]))
    assert seeded.seeds == 2 and seeded.spread["psnr"] > 0
    np.testing.assert_array_equal(seeded.samples, rows[0].samples)
    assert f"{seeded.psnr:.2f} ± {seeded.spread['psnr']:.2f}" in report.markdown_table([seeded])
    # Another solver does not inherit CoDi's re-noising default; asking for both is an error.
    dpm = evaluate.evaluate_runs([("a", codi_dir)], (2,), SamplingOptions(batch_size=4, solver="dpm++"), num_eval=5)
    assert dpm[0].samples.shape == targets.shape
    with pytest.raises(ValueError, match="needs solver='ddim'"):
        evaluate.evaluate_runs([("a", codi_dir)], (2,), SamplingOptions(batch_size=4, solver="dpm++", renoise=True))
    # The demo's table in one call: per-run step counts, the bicubic row, a progress line per row.
    lines: list[str] = []
    runs = [evaluate.RunSpec("a", codi_dir, (1,)), ("b", codi_dir)]
    mixed = evaluate.evaluate_runs(
        runs, (2,), SamplingOptions(batch_size=4), num_eval=5, bicubic=True, progress=lines.append
    )
    assert [(r.method, r.steps) for r in mixed] == [("a", 1), ("b", 2), (scoring.BICUBIC, 0)]
    assert mixed[0].psnr == rows[0].psnr and mixed[1].psnr == rows[3].psnr
    cond = held_out.held_out_examples(config, 5)["cond"]
    assert mixed[2].psnr == pytest.approx(metrics.compute_metrics(cond, targets, ["psnr"])["psnr"], abs=1e-4)
    assert lines[0] == "Evaluating 2 (run, step count) pairs on 5 held-out images."
    assert lines[1].startswith("[1/2] a, 1 step: PSNR") and "ETA" in lines[1] and lines[2].endswith("done")
    table = report.markdown_table(rows)
    assert "FID" not in table and table.count("\n") == 5
    rows[0].extra = {"fid": 12.3456}
    assert "| FID |" in report.markdown_table(rows) and "12.35" in report.markdown_table(rows)
    paths = report.write_results(rows, str(tmp_path / "out"))
    with pytest.raises(FileExistsError, match="nothing was overwritten"):
        report.write_results(rows, str(tmp_path / "out"))
    assert all(os.path.exists(p) for p in paths)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scoring.weighted_metrics(rows[0].samples, targets, scoring.MetricWeights(inception="/no/such/file"))
