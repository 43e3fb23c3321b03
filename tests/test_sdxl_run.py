"""A tiny SDXL CoDi run end to end: diffusers SDXL folder -> ``python -m codi_jax.convert`` -> train
(exact resume) -> ``python -m codi_jax.sample``.

The teacher is ``tests/tiny_sdxl.make_pipeline`` (64-px images, 8x8 latents, two CLIP text encoders,
a text_time UNet, SDXL base's Euler scheduler config); the adapter starts from its converted
``ControlNetModel`` (``adapter.init_from``). Training batches carry SDXL's micro-conditioning
(``micro_cond``), which reaches the UNet as the context's ``time_ids``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from codi_jax.runs import pretrained  # noqa: E402
from tests import tiny_sdxl  # noqa: E402

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
