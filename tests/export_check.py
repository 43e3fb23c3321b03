"""Checks an exported pipeline against ``codi_jax.sample`` (shared by the SD and SDXL run tests).

``exported_pipeline_errors(workdir, out)`` exports a tiny latent run (64-px images, 8x8x4 latents,
a 3-channel condition), runs the README's diffusers code at 1 / 2 / 4 steps with our initial
latents and, between steps, our re-noising noise (``OurRenoisingNoise``), and returns the max abs
difference to ``few_step.sample_conditional``'s images on [0, 1].
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax
import numpy as np

from codi_jax.interop import export
from codi_jax.runs import pretrained
from codi_jax.sampling import few_step, samplers
from codi_jax.sampling.options import SamplingOptions

IMAGE_SIZE = 64
LATENT_SHAPE = (8, 8, 4)  # HWC


class OurRenoisingNoise:
    """diffusers' ``LCMScheduler.step`` draws its re-noising noise with ``randn_tensor``; this gives
    it ours instead (``samplers.example_keys(seed + 1, i)`` folded with the step index), so the
    pipeline's images can be compared with ``codi_jax.sample``'s, which draws the same."""

    def __init__(self, seed: int, num: int, shape: tuple[int, ...]) -> None:
        self.keys, self.shape, self.calls = samplers.example_keys(seed + 1, np.arange(num)), shape, 0

    def __call__(self, shape, generator=None, device=None, dtype=None, **_) -> Any:
        import torch

        noise = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, self.calls), self.shape))(self.keys)
        self.calls += 1
        noise = torch.from_numpy(np.array(noise).transpose(0, 3, 1, 2).copy())
        assert tuple(noise.shape) == tuple(shape)
        return noise.to(dtype)


def readme_namespace(out: str) -> dict[str, Any]:
    """The globals after running the first python block of the export's README (its ``sample``)."""
    namespace: dict[str, Any] = {}
    exec(re.findall(r"```python\n(.*?)```", open(os.path.join(out, "README.md")).read(), flags=re.S)[0], namespace)
    return namespace


def _pipeline_images(sample: Any, cond: np.ndarray, latents: np.ndarray, steps: int, seed: int) -> np.ndarray:
    """The README's ``sample`` at ``steps`` with ``latents`` and our re-noising noise (NHWC, [0, 1])."""
    import torch
    from diffusers.schedulers import scheduling_lcm

    noise = OurRenoisingNoise(seed, len(cond), LATENT_SHAPE)
    original = scheduling_lcm.randn_tensor
    scheduling_lcm.randn_tensor = noise
    try:
        images = sample(
            torch.from_numpy((cond.transpose(0, 3, 1, 2) + 1.0) / 2.0), steps=steps, latents=torch.from_numpy(latents)
        )
    finally:
        scheduling_lcm.randn_tensor = original
    assert noise.calls == steps - 1
    return images


def exported_pipeline_errors(
    workdir: str,
    out: str,
    seed: int = 3,
    pipeline: str = "StableDiffusionControlNetPipeline",
    options: SamplingOptions = SamplingOptions(),
) -> dict[int, float]:
    """Exports ``workdir`` (a ``pipeline`` folder with an ``LCMScheduler``), runs its README's diffusers
    code at 1 / 2 / 4 steps (CoDi's re-noising, our noise) and returns the max abs difference to
    ``codi_jax.sample``'s images with ``options`` (its default: float32 compute), on [0, 1]."""
    export.export_workdir(workdir, out, steps=4)
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert index["_class_name"] == pipeline and index["scheduler"] == ["diffusers", "LCMScheduler"], index
    sample = readme_namespace(out)["sample"]
    options = dataclasses.replace(options, seed=seed)
    pre = pretrained.load_conditional(workdir, dtype=options.model_dtype)  # as few_step.run loads it
    cond = np.random.default_rng(0).uniform(-1, 1, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    latents = np.array(samplers.example_noise(seed, np.arange(2), LATENT_SHAPE)).transpose(0, 3, 1, 2).copy()
    errors = {}
    for steps in (1, 2, 4):
        ours = few_step.sample_conditional(pre, cond, None, steps, options)
        theirs = _pipeline_images(sample, cond, latents, steps, seed)
        errors[steps] = float(np.max(np.abs((ours + 1.0) / 2.0 - theirs)))
    return errors
