"""A tiny SDXL CoDi run end to end: diffusers SDXL folder -> ``python -m codi_jax.convert`` -> train
(exact resume) -> ``python -m codi_jax.sample``.

The teacher is ``tests/tiny_sdxl.make_pipeline`` (64-px images, 8x8 latents, two CLIP text encoders,
a text_time UNet, SDXL base's Euler scheduler config); the adapter starts from its converted
``ControlNetModel`` (``adapter.init_from``). Training batches carry SDXL's micro-conditioning
(``micro_cond``), which reaches the UNet as the context's ``time_ids``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from codi_jax.frozen import batch_inputs  # noqa: E402
from codi_jax.runs import config_resolution, pretrained  # noqa: E402
from codi_jax.training import loop  # noqa: E402
from tests import export_check, tiny_sd, tiny_sdxl  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> dict:
    """The tiny SDXL pipeline and ControlNet, converted once through the CLI."""
    root = tmp_path_factory.mktemp("sdxl")
    pipe = tiny_sdxl.make_pipeline(str(root / "pipeline"))
    tiny_sdxl.save_controlnet(pipe.unet, str(root / "controlnet"))
    workdir = str(root / "teacher")
    done = _cli(
        "codi_jax.convert",
        f"--diffusers={root / 'pipeline'}",
        f"--controlnet={root / 'controlnet'}",
        f"--out={workdir}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"workdir": workdir, "root": root, "stdout": done.stdout}


def test_convert_records_both_text_encoders(teacher) -> None:
    config, step = pretrained.read_config(teacher["workdir"])
    components = os.path.join(teacher["workdir"], "components")
    assert step == 0 and config.model.addition_embed_type == "text_time"
    assert config.text.encoder == os.path.join(components, "text_encoder")
    assert config.text.encoder_2 == os.path.join(components, "text_encoder_2")
    assert config.text.tokenizer_2 == os.path.join(components, "tokenizer_2")
    assert config.text.force_zeros_for_empty_prompt is True and config.text.max_length == tiny_sdxl.tiny_sd.MAX_LENGTH
    assert config.schedule.to_dict() == dict(
        kind="scaled_linear", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012
    )
    assert config.data.image_size == tiny_sdxl.IMAGE_SIZE
    for part in ("text_encoder_2", "tokenizer_2", "controlnet"):
        assert f"  {part}: " in teacher["stdout"], teacher["stdout"]


def _config(teacher: dict, **overrides):
    """``tiny_sd.latent_codi_config`` (the tiny SDXL teacher has the tiny SD one's image size and hint
    network) sampled with CFG and a prompt, then ``overrides``."""
    config = tiny_sd.latent_codi_config(teacher)
    config.sample_guidance_scale = 2.0  # samples with CFG: the empty negative prompt is zeros (force_zeros)
    config.text = ml_collections.ConfigDict({"prompt": "a photo of a cat", "negative_prompt": ""})
    config.sample_every_steps = 4
    config.update(overrides)
    return config


def test_micro_conditioning_reaches_the_step(teacher) -> None:
    """The batch encoder's context: both encoders' prompt rows, the pooled embeds, the batch's
    ``micro_cond`` as ``time_ids`` (the unconditional context too: zeros, as SDXL base's empty negative)."""
    config = config_resolution.resolve(_config(teacher))
    assert batch_inputs.is_sdxl(config)
    enc, frozen = batch_inputs.load(config)
    batch = next(loop.local_batches(config, config.task, 0))
    assert batch["micro_cond"].shape == (2, 6)
    encode = batch_inputs.batch_encoder(config, enc)
    out = jax.jit(encode)(frozen, jax.tree.map(jax.numpy.asarray, batch), jax.random.PRNGKey(0))
    context, uncond = out["context"], out["uncond_context"]
    assert sorted(context) == ["text_embeds", "time_ids", "tokens"] and sorted(uncond) == sorted(context)
    np.testing.assert_array_equal(np.asarray(context["time_ids"]), batch["micro_cond"])
    np.testing.assert_array_equal(np.asarray(uncond["time_ids"]), batch["micro_cond"])
    assert context["tokens"].shape == (2, tiny_sdxl.tiny_sd.MAX_LENGTH, tiny_sdxl.CROSS_ATTENTION_DIM)
    assert context["text_embeds"].shape == (2, tiny_sdxl.POOLED_DIM) and np.abs(context["text_embeds"]).max() > 0
    assert np.abs(np.asarray(uncond["tokens"])).max() == 0 and np.abs(np.asarray(uncond["text_embeds"])).max() == 0
    sampled = batch_inputs.add_text(frozen, {"cond": np.zeros((1, 64, 48, 3), np.float32)})  # no micro_cond
    np.testing.assert_array_equal(np.asarray(sampled["context"]["time_ids"]), [[64, 48, 0, 0, 64, 48]])


class _Messages(logging.Handler):
    """The messages logged while it is attached (``caplog`` is per test; the run is per module)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def trained(teacher, tmp_path_factory) -> dict:
    """The tiny SDXL CoDi run trained 4 steps (logging every step), and the losses it logged."""
    workdir = str(tmp_path_factory.mktemp("sdxl_run") / "straight")
    handler, root = _Messages(), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        loop.train_and_evaluate(_config(teacher, log_every_steps=1), workdir)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    losses = [float(m.split()[3]) for m in handler.messages if m.startswith("step ")]
    return {"workdir": workdir, "losses": losses}


def test_sdxl_run_resumes_exactly_and_samples(teacher, trained, tmp_path) -> None:
    """The 4-step run's checkpoint at step 2 (it checkpoints every 2 steps), alone in a workdir as if
    the run had stopped there, resumed to step 4: bitwise the uninterrupted run's step 4."""
    straight, resumed = trained["workdir"], str(tmp_path / "resumed")
    losses = trained["losses"]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses), losses
    assert sorted(os.listdir(os.path.join(straight, "checkpoints"))) == ["2", "4"]
    shutil.copytree(os.path.join(straight, "checkpoints", "2"), os.path.join(resumed, "checkpoints", "2"))
    loop.train_and_evaluate(_config(teacher), resumed)
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["2", "4"]
    a = pretrained.load_conditional(straight, use_ema=False).params
    b = pretrained.load_conditional(resumed, use_ema=False).params
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert os.path.exists(os.path.join(straight, "samples", "step_0000004.png"))

    images = tmp_path / "inputs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    done = _cli("codi_jax.sample", f"--run={straight}", f"--images={images}", f"--out={tmp_path / 'out'}", "--steps=1")
    assert done.returncode == 0, done.stderr[-3000:]
    written = sorted(os.listdir(tmp_path / "out"))
    assert "grid.png" in written and len(written) == 3, written


def test_sdxl_refuses_captions(teacher) -> None:
    config = _config(teacher)
    config.data.source = "tfds"  # a tfds source with a caption_key: every example brings its caption
    config.data.caption_key = "caption"
    resolved = config_resolution.resolve(config)
    with pytest.raises(ValueError, match=r"^data\.caption_key: per-example prompts"):
        batch_inputs.check_sdxl_text(resolved)


def test_sdxl_pe_codi_export_reproduces_the_sampler(trained, tmp_path) -> None:
    """The trained run (sampled with CFG w = 2: the empty negative prompt is zeros) -> export -> the
    README's ``StableDiffusionXLControlNetPipeline`` call gives ``codi_jax.sample``'s images."""
    workdir, out = trained["workdir"], str(tmp_path / "export")
    errors = export_check.exported_pipeline_errors(workdir, out, pipeline="StableDiffusionXLControlNetPipeline")
    print(f"export SDXL PE-CoDi: diffusers pipeline vs codi_jax.sample, max abs err {errors} on [0, 1] images")
    assert max(errors.values()) <= 1e-4
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert index["force_zeros_for_empty_prompt"] is True and "safety_checker" not in index
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    for part in ("unet", "controlnet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        assert os.path.isdir(os.path.join(out, part)), part
    controlnet = json.load(open(os.path.join(out, "controlnet", "config.json")))
    assert controlnet["addition_embed_type"] == "text_time", controlnet


def test_export_refuses_sdxl_custom_components_in_one_line(teacher) -> None:
    from codi_jax.interop import export
    from codi_jax.models import networks

    config = _config(teacher, adapter=dict(kind="t2i", init_from=""))
    config = config_resolution.resolve(config)
    model, _ = networks.build_conditional(config)
    with pytest.raises(
        ValueError, match=r"^text\.encoder_2=.*: SDXL runs export as a StableDiffusionXLControlNetPipeline "
    ):
        export.check_sdxl_exportable(config, model)


def test_sdxl_teacher_exports_as_its_pipeline(teacher, tmp_path) -> None:
    """The converted teacher -> ``StableDiffusionXLPipeline`` folder: the README's call gives the
    original pipeline's images (its scheduler swapped for the exported DDIM one)."""
    from codi_jax.interop import export

    out = str(tmp_path / "export")
    export.export_workdir(teacher["workdir"], out, steps=2)
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    namespace = export_check.readme_namespace(out)
    original = diffusers.StableDiffusionXLPipeline.from_pretrained(
        str(teacher["root"] / "pipeline"), scheduler=namespace["pipe"].scheduler, add_watermarker=False
    )
    original.set_progress_bar_config(disable=True)
    latents = torch.randn(
        2, 4, tiny_sdxl.LATENT_SIZE, tiny_sdxl.LATENT_SIZE, generator=torch.Generator().manual_seed(0)
    )
    theirs = namespace["sample"](torch.zeros(2, 3, 64, 64), steps=2, latents=latents)
    size = dict(height=64, width=64, original_size=(64, 64), target_size=(64, 64))
    images = original(
        prompt=[""] * 2, num_inference_steps=2, guidance_scale=1.0, latents=latents, output_type="np", **size
    )
    np.testing.assert_allclose(theirs, images.images, rtol=0, atol=1e-6)
