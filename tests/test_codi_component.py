"""Runs diffusers' own classes cannot represent export as the custom component ``codi_model/``
(``codi_jax/interop/codi_model.py``, loaded with ``trust_remote_code=True``): each adapter kind's
PyTorch output equals our ``ConditionalModel``'s on random weights, and the exported README's loop
reproduces our re-noising sampler for the CPU demo's kind of run (a ControlNet on a pixel
``UNet2DModel`` backbone)."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from codi_jax import diffusion  # noqa: E402
from codi_jax.data import task_spec  # noqa: E402
from codi_jax.interop import codi_component, export  # noqa: E402
from codi_jax.models import student  # noqa: E402
from codi_jax.models.unet import UNet  # noqa: E402
from codi_jax.objectives import codi  # noqa: E402
from codi_jax.runs.pretrained import Pretrained  # noqa: E402
from codi_jax.sampling import conditional, samplers  # noqa: E402
from tests.test_export import CROSS_SD1, TINY, _adapter_config, _nchw, _random_params  # noqa: E402

PIXEL = dict(TINY, in_channels=3, out_channels=3)  # a UNet2DModel-style backbone, as the CPU demo's
DEMO = dict(hint_channels=(8, 16), hint_downsamples=0, hint_unit_range=False)  # the demo's hint network
CASES = {
    "demo ControlNet (pixel UNet2DModel)": (PIXEL, dict(kind="controlnet", **DEMO), {}),
    "mu-fusion (full CoDi), pixel": (PIXEL, dict(kind="fusion", **DEMO), {}),
    "T2I adapter, pixel": (PIXEL, dict(kind="t2i", t2i_channels=(8, 16)), {}),
    "CFG-distilled ControlNet with instructions, cross-attention": (
        CROSS_SD1,
        dict(kind="controlnet"),
        dict(num_instructions=3, guidance_embedding=True),
    ),
    "mu-fusion, cross-attention": (CROSS_SD1, dict(kind="fusion"), {}),
}


def _model(backbone: dict, adapter: dict, extra: dict) -> student.AdaptedModel:
    return student.build_adapted_model(UNet(**backbone), _adapter_config(**adapter), cond_channels=3, **extra)


def _inputs(model: student.AdaptedModel, extra: dict) -> dict[str, Any]:
    rng = np.random.RandomState(0)
    backbone = model.backbone
    size, cond_size = 8, 8 * 2 ** getattr(model.module.adapter, "hint_downsamples", 0)
    inputs = {
        "z_t": rng.randn(2, size, size, backbone.in_channels).astype(np.float32),
        "model_t": np.array([3.0, 817.0], np.float32),
        "cond": rng.uniform(-1, 1, (2, cond_size, cond_size, 3)).astype(np.float32),
        "instruction": np.array([2, 0], np.int32) if extra.get("num_instructions") else None,
        "context": None,
    }
    if backbone.cross_attention_dim is not None:
        inputs["context"] = rng.randn(2, 5, backbone.cross_attention_dim).astype(np.float32)
    return inputs


def _params(model: student.AdaptedModel, inputs: dict, extra: dict) -> dict:
    w = {"guidance_scale": jnp.ones((2,))} if extra.get("guidance_embedding") else {}
    args = (inputs["z_t"], inputs["model_t"], inputs["cond"], inputs["instruction"], inputs["context"])
    shapes = jax.eval_shape(lambda: model.module.init(jax.random.PRNGKey(0), *args, **w))["params"]
    return _random_params(shapes, seed=3)  # fusion mus and zero convs random too: nothing passes by being 0


def _load(directory: str) -> Any:
    return diffusers.AutoModel.from_pretrained(directory, subfolder="codi_model", trust_remote_code=True).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_component_matches_our_conditional_unet(case: str, tmp_path) -> None:
    backbone, adapter, extra = CASES[case]
    model = _model(backbone, adapter, extra)
    assert codi_component.diffusers_gap(model.module) is not None  # diffusers' own classes cannot
    inputs = _inputs(model, extra)
    params = _params(model, inputs, extra)
    config = codi_component.component_config(model.module, params, 8)
    codi_component.write(
        str(tmp_path / "codi_model"), config, codi_component.component_state_dict(model.module, params)
    )
    theirs = _load(str(tmp_path))
    w = np.array([1.0, 4.5], np.float32) if extra.get("guidance_embedding") else None
    args = (inputs["z_t"], inputs["model_t"], inputs["cond"], inputs["instruction"], inputs["context"])
    ours = model.module.apply({"params": params}, *args, **({} if w is None else {"guidance_scale": w}))
    with torch.no_grad():
        out = theirs(
            _nchw(inputs["z_t"]),
            torch.from_numpy(inputs["model_t"]),
            _nchw(inputs["cond"]),
            encoder_hidden_states=None if inputs["context"] is None else torch.from_numpy(inputs["context"]),
            guidance_scale=None if w is None else torch.from_numpy(w),
            instruction=None if inputs["instruction"] is None else torch.from_numpy(inputs["instruction"]),
        ).numpy()
    ours = np.asarray(ours).transpose(0, 3, 1, 2)
    scale = float(np.abs(ours).max())
    error = float(np.abs(out - ours).max())
    print(f"{case}: max abs error {error:.3g} at scale {scale:.3g}")
    assert error <= 1e-5 * max(1.0, scale)
    if w is not None:  # the guidance scale matters: w = 1 everywhere is far from [1, 4.5]
        with torch.no_grad():
            at_one = theirs(_nchw(inputs["z_t"]), torch.from_numpy(inputs["model_t"]), _nchw(inputs["cond"]),
                            encoder_hidden_states=torch.from_numpy(inputs["context"]),
                            instruction=torch.from_numpy(inputs["instruction"])).numpy()  # fmt: skip
        assert np.abs(at_one[1] - out[1]).max() > 100 * 1e-5 * max(1.0, scale)


def _pretrained(case: tuple, schedule: diffusion.Schedule, guidance_scale: float, path: str) -> Pretrained:
    """A CoDi run of ``CASES``' kind with random weights, as ``pretrained.load`` gives it."""
    backbone, adapter, extra = case
    model = _model(backbone, adapter, extra)
    params = _params(model, _inputs(model, extra), extra)
    config = ml_collections.ConfigDict()
    config.method = "codi"
    config.data = ml_collections.ConfigDict(dict(image_size=8))
    config.task = task_spec.default_task_config()
    config.adapter = _adapter_config(**adapter)
    config.codi = codi.default_codi_config()
    config.schedule = ml_collections.ConfigDict(dataclasses.asdict(schedule))  # as a run saves it
    config.sample_guidance_scale = guidance_scale
    return Pretrained(model, schedule, "v", params, config, 5, path)


def _demo_pretrained() -> Pretrained:
    case = CASES["demo ControlNet (pixel UNet2DModel)"]
    return _pretrained(case, diffusion.Schedule("cosine"), 1.0, "/runs/demo")  # the demo's schedule


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_demo_run_exports_and_the_readme_loop_is_our_sampler(steps: int, tmp_path) -> None:
    """The CPU demo's kind of run (once refused) exports; the README's loop, given the same initial
    and re-noising noise, equals ``samplers.ddim_sample`` with CoDi's re-noising."""
    pre = _demo_pretrained()
    out = str(tmp_path / "export")
    files = export.export_pretrained(pre, out, steps=steps)
    assert sorted(os.path.relpath(f, out) for f in files) == [
        "README.md",
        "codi_model/codi_model.py",
        "codi_model/config.json",
        "codi_model/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    ]
    readme = open(os.path.join(out, "README.md")).read()
    assert "trust_remote_code=True" in readme and "UNet2DModel-style backbone" in readme
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", readme, flags=re.S):
        exec(block, namespace)  # loading, then the loop

    seed, shape = 2, (8, 8, 3)
    z_init, keys = samplers.example_inputs(seed, np.arange(2), shape, renoise=True)
    cond = np.random.RandomState(1).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    times = conditional.sample_times(pre.config, steps)

    def noise(k: int, _shape) -> Any:
        eps = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, k), shape))(keys)
        return _nchw(np.asarray(eps))

    theirs = namespace["sample"](_nchw(np.asarray(z_init)), cond=_nchw(cond), noise=noise).numpy()
    apply_fn = lambda p, z_t, model_t: pre.model.apply(p, z_t, model_t, jnp.asarray(cond))  # noqa: E731
    ours = samplers.ddim_sample(apply_fn, pre.params, z_init, times, pre.schedule, "v", keys)
    ours = np.asarray(ours).transpose(0, 3, 1, 2)
    error = float(np.abs(theirs - ours).max())
    print(f"demo-like export, README loop vs ddim_sample with re-noising ({steps} steps): max abs error {error:.3g}")
    assert error <= 1e-4 and float(np.abs(ours).max()) <= 1.0


def test_cfg_distilled_export_readme_loop_is_our_guided_sampler(tmp_path) -> None:
    """A CFG-distilled student (ControlNet with the guidance-scale embedding, cross-attention
    backbone) exports as the component; the README's loop with a context and w = 3 equals our
    conditional sampler (one network call per step reading w), re-noising included, at 4 steps."""
    backbone = CROSS_SD1
    case = (backbone, dict(kind="controlnet"), dict(guidance_embedding=True))
    pre = _pretrained(case, diffusion.Schedule("scaled_linear"), 3.0, "/runs/cfg")
    params, config = pre.params, pre.config
    out = str(tmp_path / "export")
    export.export_pretrained(pre, out, steps=4)
    readme = open(os.path.join(out, "README.md")).read()
    assert "guidance_embedding" in readme and "guidance_scale=torch.full((n,), w)" in readme
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", readme, flags=re.S):
        exec(block, namespace)

    rng = np.random.RandomState(4)
    cond = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    context = rng.randn(2, 5, backbone["cross_attention_dim"]).astype(np.float32)
    z_init, keys = samplers.example_inputs(7, np.arange(2), (8, 8, 4), renoise=True)
    w = np.full((2,), 3.0, np.float32)
    text = {"context": jnp.asarray(context), "uncond_context": jnp.zeros_like(context), "guidance_scale": w}
    sampler = conditional.make_conditional_sampler(pre.model, pre.schedule, "v")
    times = conditional.sample_times(config, 4)
    ours = np.asarray(sampler(params, cond, None, z_init, times, keys, text)).transpose(0, 3, 1, 2)

    def noise(k: int, _shape) -> Any:
        return _nchw(np.asarray(jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, k), (8, 8, 4)))(keys)))

    theirs = namespace["sample"](
        _nchw(np.asarray(z_init)),
        cond=_nchw(cond),
        context=torch.from_numpy(context),
        guidance_scale=torch.from_numpy(w),
        noise=noise,
    ).numpy()
    error = float(np.abs(theirs - ours).max())
    print(
        f"CFG-distilled export (w = 3), README loop vs our sampler with re-noising (4 steps): max abs error {error:.3g}"
    )
    assert error <= 1e-4
