"""The README's Stable Diffusion commands, run as written (in subprocesses, from a scratch folder,
with its relative paths) on a tiny random SD pipeline and ControlNet (``tests/tiny_sd.py``).

Only the README's input paths are replaced (``/models/...``, ``/data/images``, ``photos/``), and
the train command gets the overrides that make it tiny (steps, batch, image size, the tiny
ControlNet's hint widths); everything else, including the shipped config, is the README's.
Then the README's diffusers snippet runs on the export.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tests import tiny_sd  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TRAINING = [
    "--config.num_train_steps=2",
    "--config.batch_size=2",
    f"--config.data.image_size={tiny_sd.IMAGE_SIZE}",
    f"--config.adapter.hint_channels={tiny_sd.HINT_CHANNELS}".replace(" ", ""),
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=2",
    "--config.sample_every_steps=2",
    "--config.num_sample_images=2",
    "--config.sample_step_counts=(1,)",
]


def readme_section(title: str) -> str:
    text = open(os.path.join(REPO, "README.md")).read()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def readme_commands(section: str) -> list[list[str]]:
    """Every ``python -m codi_jax.*`` command of the section's bash blocks (continuations joined)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("python -m codi_jax."):
                commands.append(shlex.split(line.split("  #")[0]))
    return commands


def _images(directory: str, count: int, size: int, captions: bool) -> None:
    from PIL import Image

    os.makedirs(directory)
    rng = np.random.default_rng(len(directory))
    lines = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(os.path.join(directory, f"{i}.png"))
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a photo of a cat {i}"}))
    if captions:
        with open(os.path.join(directory, "metadata.jsonl"), "w") as f:
            f.write("\n".join(lines) + "\n")


def test_readme_sd_commands_run_as_written(tmp_path, monkeypatch) -> None:
    section = readme_section("Distil Stable Diffusion")
    commands = readme_commands(section)
    assert [c[2] for c in commands] == [
        "codi_jax.convert",
        "codi_jax.train",
        "codi_jax.sample",
        "codi_jax.evaluate",
        "codi_jax.export",
    ]
    pipe = tiny_sd.make_pipeline(str(tmp_path / "models" / "sd"))
    tiny_sd.make_controlnet(pipe.unet, str(tmp_path / "models" / "controlnet"))
    _images(str(tmp_path / "data" / "images"), 6, tiny_sd.IMAGE_SIZE + 16, captions=True)
    _images(str(tmp_path / "photos"), 2, tiny_sd.IMAGE_SIZE, captions=False)
    paths = {
        "/models/stable-diffusion-v1-5": str(tmp_path / "models" / "sd"),
        "/models/sd-controlnet-tile": str(tmp_path / "models" / "controlnet"),
        "/data/images": str(tmp_path / "data" / "images"),
    }
    env = dict(os.environ, PYTHONPATH=REPO)
    for command in commands:
        args = [sys.executable if a == "python" else a for a in command]
        for old, new in paths.items():
            args = [a.replace(old, new) for a in args]
        args = [a.replace("codi_jax/configs/", os.path.join(REPO, "codi_jax", "configs") + "/") for a in args]
        if command[2] == "codi_jax.train":
            args += TINY_TRAINING
        if command[2] == "codi_jax.evaluate":
            args += ["--batch_size=2"]
        result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, (command[2], result.stderr[-3000:])

    # The README's diffusers snippet, on the export (the condition: a [0, 1] image at the image size).
    snippet = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(snippet) == 1 and "exported" in snippet[0]
    monkeypatch.chdir(tmp_path)
    namespace = {"control": torch.rand(1, 3, tiny_sd.IMAGE_SIZE, tiny_sd.IMAGE_SIZE)}
    exec(snippet[0], namespace)
    image = np.asarray(namespace["image"])
    assert image.shape == (tiny_sd.IMAGE_SIZE, tiny_sd.IMAGE_SIZE, 3)
