"""Our flax UNet / ControlNet -> diffusers folders: PyTorch loads them and computes what we compute.

Tiny models with random parameters are exported, loaded with diffusers (torch is a test-only
reference) and run on the same inputs (NCHW vs NHWC); errors are measured relative to the
output scale. Round trips through ``convert_diffusers`` give identical parameters. The CLI is
tested on a ``Pretrained`` built here (no training) and, for its refusals, in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from codi_jax import diffusion
from codi_jax.data import task_spec
from codi_jax.interop import export, flax_to_torch
from codi_jax.interop.torch_to_flax import load_diffusers_unet, unet_param_shapes
from codi_jax.models import adapters, lora, student
from codi_jax.models.unet import UNet
from codi_jax.objectives import codi
from codi_jax.runs.pretrained import Pretrained
from codi_jax.sampling import samplers

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(
    block_out_channels=(16, 32),
    layers_per_block=1,
    attention_levels=(False, True),
    attention_head_dim=16,
    norm_num_groups=8,
)
CROSS = dict(TINY, in_channels=4, out_channels=4, cross_attention_dim=8)
# SD 1.x-style: heads per level (4 heads of 8 channels where attention_head_dim alone gives 2 of 16)
# and 1x1-conv transformer projections.
CROSS_SD1 = dict(CROSS, num_attention_heads=(1, 4), use_linear_projection=False)
TIMESTEPS = np.array([3.0, 817.0], np.float32)


def _random_params(shapes: Any, seed: int) -> Any:
    """Every leaf random (norm scales / biases too, so swapped names cannot pass), kernels ~ 1/sqrt(fan_in)."""
    rng = np.random.RandomState(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    values = []
    for path, leaf in leaves:
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            value = rng.randn(*shape) / np.sqrt(np.prod(shape[:-1]))
        elif name == "scale":
            value = 1.0 + 0.2 * rng.randn(*shape)
        else:
            value = 0.2 * rng.randn(*shape)
        values.append(value.astype(np.float32))
    return jax.tree_util.tree_unflatten(treedef, values)


def _check_close(name: str, reference: Any, ours_nhwc: Any) -> None:
    reference = reference.detach().numpy() if hasattr(reference, "detach") else np.asarray(reference)
    ours = np.asarray(ours_nhwc).transpose(0, 3, 1, 2)
    scale = float(np.abs(reference).max())
    error = float(np.abs(ours - reference).max())
    print(f"{name}: max abs error {error:.3g} at scale {scale:.3g}")
    assert error <= 1e-5 * max(1.0, scale), (name, error, scale)


def _nchw(x: np.ndarray) -> Any:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _inputs(channels: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(2, size, size, channels).astype(np.float32)


# ---------------------------------------------------------------- UNets


def test_unet2d_model_export_matches_diffusers(tmp_path) -> None:
    model = UNet(**TINY)
    params = _random_params(unet_param_shapes(model), seed=1)
    path = flax_to_torch.save_unet(model, params, str(tmp_path / "unet"), sample_size=16)
    assert sorted(os.listdir(path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    reference_model = diffusers.UNet2DModel.from_pretrained(path).eval()
    sample = _inputs(3)
    with torch.no_grad():
        reference = reference_model(_nchw(sample), torch.from_numpy(TIMESTEPS)).sample
    ours = jax.jit(model.apply)({"params": params}, sample, TIMESTEPS)
    _check_close("UNet2DModel", reference, ours)

    loaded_model, loaded_params = load_diffusers_unet(path)
    assert loaded_model == model
    jax.tree.map(np.testing.assert_array_equal, loaded_params, params)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging directory left


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(CROSS, mid_attention=False), "mid_attention=False"),
        (dict(TINY, num_attention_heads=(1, 4), mid_attention=True, attention_levels=(True, True)), "channels per"),
    ],
)
def test_unet_configs_diffusers_cannot_represent(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        flax_to_torch.unet_diffusers_config(UNet(**fields))


def test_unet_state_dict_checks_the_tree() -> None:
    model = UNet(**TINY)
    params = _random_params(unet_param_shapes(model), seed=3)
    del params["mid_block"]["resnets_1"]["norm2"]
    with pytest.raises(ValueError, match="mid_block/resnets_1/norm2"):
        flax_to_torch.unet_state_dict(model, params)


# ---------------------------------------------------------------- ControlNet


def _adapter_config(**overrides: Any) -> ml_collections.ConfigDict:
    config = adapters.default_adapter_config()
    config.hint_channels = (8, 16)
    config.hint_downsamples = 1  # diffusers: len(conditioning_embedding_out_channels) - 1
    config.hint_unit_range = True  # the condition in [0, 1], as diffusers' pipelines feed it
    config.update(overrides)
    return config


def _controlnet_model(backbone_fields: dict = CROSS_SD1, **overrides: Any) -> adapters.ConditionalModel:
    return adapters.build_conditional_model(UNet(**backbone_fields), _adapter_config(**overrides), cond_channels=3)


def _controlnet_params(model: adapters.ConditionalModel) -> dict:
    return {
        "backbone": _random_params(unet_param_shapes(model.backbone), seed=4),
        "adapter": _random_params(flax_to_torch.controlnet_param_shapes(model.adapter), seed=5),
    }


def test_unet2d_condition_model_and_controlnet_export_match_diffusers(tmp_path) -> None:
    """A UNet2DConditionModel (cross_attention_dim=8, SD 1.x layout) and its ControlNet: residuals and
    the output with the residuals added, against diffusers' ControlNetModel + UNet2DConditionModel."""
    model = _controlnet_model()
    params = _controlnet_params(model)
    state = flax_to_torch.unet_state_dict(model.backbone, params["backbone"])
    assert state["up_blocks.0.attentions.0.proj_in.weight"].shape == (32, 32, 1, 1)
    unet_path = flax_to_torch.save_unet(model.backbone, params["backbone"], str(tmp_path / "unet"))
    path = flax_to_torch.save_controlnet(model.adapter, params["adapter"], str(tmp_path / "controlnet"))
    reference_unet = diffusers.UNet2DConditionModel.from_pretrained(unet_path).eval()
    assert set(reference_unet.state_dict()) == set(state)
    assert reference_unet.mid_block.attentions[0].transformer_blocks[0].attn1.heads == 4
    reference = diffusers.ControlNetModel.from_pretrained(path).eval()
    sample, cond = _inputs(4), _inputs(3, size=32, seed=2)
    context = np.random.RandomState(3).randn(2, 5, 8).astype(np.float32)
    t, ctx = torch.from_numpy(TIMESTEPS), torch.from_numpy(context)
    with torch.no_grad():
        unit_cond = _nchw((cond + 1.0) / 2.0)  # hint_unit_range: ours maps [-1, 1] to diffusers' [0, 1]
        down, mid = reference(_nchw(sample), t, ctx, controlnet_cond=unit_cond, return_dict=False)
        out = reference_unet(
            _nchw(sample), t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample

    def apply(params, sample, cond, context):
        hooks = model.adapter.apply({"params": params["adapter"]}, sample, TIMESTEPS, cond, None, context)
        return hooks, model.backbone.apply({"params": params["backbone"]}, sample, TIMESTEPS, context, **hooks)

    hooks, ours = jax.jit(apply)(params, sample, cond, context)
    assert len(down) == len(hooks["down_residuals"])
    for k, (theirs, mine) in enumerate(zip(down, hooks["down_residuals"])):
        _check_close(f"ControlNet down residual {k}", theirs, mine)
    _check_close("ControlNet mid residual", mid, hooks["mid_residual"])
    _check_close("UNet2DConditionModel + ControlNet output", out, ours)

    _, loaded_params = load_diffusers_unet(unet_path)
    jax.tree.map(np.testing.assert_array_equal, loaded_params, params["backbone"])
    from codi_jax.interop import torch_to_flax

    if hasattr(torch_to_flax, "load_diffusers_controlnet"):  # the importer, where it exists
        loaded_adapter, loaded = torch_to_flax.load_diffusers_controlnet(path)
        jax.tree.map(np.testing.assert_array_equal, loaded, params["adapter"])
        assert loaded_adapter.hint_downsamples == model.adapter.hint_downsamples


def test_unet_config_round_trips_layouts() -> None:
    """Config-level inverse of ``unet_config_from_diffusers`` for the layouts (no compilation)."""
    from codi_jax.interop.torch_to_flax import unet_config_from_diffusers

    for fields in (CROSS, CROSS_SD1, dict(CROSS_SD1, attention_levels=(True, True), num_attention_heads=(2, 2))):
        model = UNet(**fields)
        config = flax_to_torch.unet_diffusers_config(model)
        assert config["_class_name"] == "UNet2DConditionModel"
        assert config["use_linear_projection"] == model.use_linear_projection
        back = UNet(**unet_config_from_diffusers(config))
        assert flax_to_torch._effective_architecture(back) == flax_to_torch._effective_architecture(model)
    single_heads = UNet(**dict(TINY, attention_head_dim=64))  # one head of all channels everywhere
    assert flax_to_torch.unet_diffusers_config(single_heads)["attention_head_dim"] is None


@pytest.mark.parametrize(
    "backbone_fields, overrides, match",
    [
        (CROSS, dict(kind="fusion"), "cannot represent this adapter"),
        (CROSS, dict(hint_downsamples=0), r"hint_downsamples=0 .*cannot be expressed"),
        (TINY, {}, "UNet2DModel-style backbone"),
        (CROSS, dict(hint_unit_range=False), r"hint_unit_range=False"),
    ],
    ids=["fusion", "hint_downsamples", "unet2d_backbone", "condition_range"],
)
def test_controlnet_refusals(backbone_fields: dict, overrides: dict, match: str) -> None:
    adapter = _controlnet_model(backbone_fields, **overrides).adapter
    with pytest.raises(ValueError, match=match):
        flax_to_torch.controlnet_diffusers_config(adapter)
    with pytest.raises(ValueError, match=match):
        flax_to_torch.controlnet_state_dict(adapter, {})


def test_controlnet_with_instructions_or_guidance_embedding_is_refused() -> None:
    backbone = UNet(**CROSS)
    adapter = adapters.build_conditional_model(backbone, _adapter_config(), 3, num_instructions=4).adapter
    with pytest.raises(ValueError, match="num_instructions=4"):
        flax_to_torch.controlnet_diffusers_config(adapter)
    adapter = adapters.build_conditional_model(backbone, _adapter_config(), 3, guidance_embedding=True).adapter
    with pytest.raises(ValueError, match="guidance-scale"):
        flax_to_torch.controlnet_diffusers_config(adapter)


# ---------------------------------------------------------------- the CLI's library function


def _run_config(method: str, schedule: dict, **adapter: Any) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.method = method
    config.data = ml_collections.ConfigDict(dict(image_size=16))
    config.model = ml_collections.ConfigDict(dict(parametrization="v"))
    config.schedule = ml_collections.ConfigDict(schedule)
    if method != "teacher":
        config.task = task_spec.default_task_config()
        config.adapter = _adapter_config(**adapter)
        config.codi = codi.default_codi_config()
    return config


def _codi_pretrained(**adapter: Any) -> Pretrained:
    config = _run_config("codi", dict(kind="scaled_linear"), lora_rank=2, **adapter)
    backbone = UNet(**CROSS)
    model = student.build_adapted_model(backbone, config.adapter, cond_channels=3)
    params = _controlnet_params(model.module)
    factors = {}  # nonzero LoRA factors on every targeted kernel (numpy: no compilation)
    for keys in lora.target_paths(params["backbone"], config.adapter.lora_targets):
        kernel = traverse_util.flatten_dict(params["backbone"])[keys]
        factors[keys[:-1] + ("lora_a",)] = np.full((int(np.prod(kernel.shape[:-1])), 2), 0.1, np.float32)
        factors[keys[:-1] + ("lora_b",)] = np.full((2, kernel.shape[-1]), 0.1, np.float32)
    params["lora"] = traverse_util.unflatten_dict(factors)
    schedule = diffusion.schedule_from_config(config.schedule)
    return Pretrained(model, schedule, "v", params, config, 7, "/runs/codi")


def test_export_codi_run(tmp_path) -> None:
    pre = _codi_pretrained()
    out = str(tmp_path / "export")
    files = export.export_pretrained(pre, out, steps=4)
    assert sorted(os.path.relpath(f, out) for f in files) == [
        "README.md",
        "controlnet/config.json",
        "controlnet/diffusion_pytorch_model.safetensors",
        "lora/pytorch_lora_weights.safetensors",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    # unet/ is the backbone the run samples with: LoRA merged.
    merged = pre.model.module_params(pre.params)["backbone"]
    conv1 = lambda p: p["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert not np.allclose(conv1(merged), conv1(pre.params["backbone"]))
    _, exported = load_diffusers_unet(os.path.join(out, "unet"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=0), exported, jax.device_get(merged))

    scheduler = diffusers.LCMScheduler.from_pretrained(out, subfolder="scheduler")  # CoDi re-noises
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.beta_schedule == "scaled_linear"
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), pre.schedule.alphas_cumprod(), rtol=1e-6)
    # CoDi's 4-step times on its 50-point grid (k = 50, 37, 24, 11): timesteps 20 k - 1.
    assert export.pipeline_timesteps(pre.config, pre.schedule, 4) == [999, 739, 479, 219]
    scheduler.set_timesteps(timesteps=[999, 739, 479, 219])
    np.testing.assert_array_equal(scheduler.timesteps.numpy(), [999, 739, 479, 219])

    readme = open(os.path.join(out, "README.md")).read()
    assert "ControlNetModel.from_pretrained(path" in readme and "fresh noise between steps" in readme
    for timestep in (999, 739, 479, 219):
        assert f"| {timestep} |" in readme
    namespace = _readme_sampler(readme)
    namespace["unet"] = diffusers.UNet2DConditionModel.from_pretrained(out, subfolder="unet").eval()
    namespace["controlnet"] = diffusers.ControlNetModel.from_pretrained(out, subfolder="controlnet").eval()
    x = namespace["sample"](
        torch.randn(1, 4, 16, 16), torch.zeros(1, 3, 32, 32), torch.zeros(1, 5, 8), torch.Generator().manual_seed(0)
    )
    assert x.shape == (1, 4, 16, 16) and float(x.abs().max()) <= 1.0

    with pytest.raises(FileExistsError, match="not empty"):
        export.export_pretrained(pre, out)
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no staging directory left


@pytest.mark.parametrize("prediction,clip", [("v", True), ("eps", False), ("x", True)])
def test_exported_lcm_scheduler_step_is_our_move(prediction: str, clip: bool, monkeypatch) -> None:
    """One ``LCMScheduler.step`` of the exported config = our move, computed here in NumPy:
    x_hat (clipped in pixel space), then alpha_s x_hat + sigma_s eps with the drawn noise eps,
    and x_hat itself at the last step."""
    from diffusers.schedulers import scheduling_lcm

    schedule = diffusion.Schedule(kind="scaled_linear")
    config = export.scheduler_config(schedule, prediction, clip_sample=clip, renoise=True, grid_size=50)
    scheduler = diffusers.LCMScheduler.from_config(config)
    timesteps = [999, 739, 479, 219]
    scheduler.set_timesteps(timesteps=timesteps)
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda *_, **__: torch.from_numpy(noise))
    bar = schedule.alphas_cumprod().astype(np.float64)
    for i, t in enumerate(timesteps):
        z = 2.0 * rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
        out = 2.0 * rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
        alpha, sigma = np.sqrt(bar[t]), np.sqrt(1.0 - bar[t])
        x_hat = {"v": alpha * z - sigma * out, "eps": (z - sigma * out) / alpha, "x": out}[prediction]
        x_hat = np.clip(x_hat, -1.0, 1.0) if clip else x_hat
        if i + 1 < len(timesteps):
            s = timesteps[i + 1]
            expected = np.sqrt(bar[s]) * x_hat + np.sqrt(1.0 - bar[s]) * noise
        else:
            expected = x_hat
        got = scheduler.step(torch.from_numpy(out), t, torch.from_numpy(z)).prev_sample.numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * max(1.0, float(np.abs(expected).max())))


def test_lora_weights_on_the_teacher_unet_give_the_merged_unet(tmp_path) -> None:
    """``lora/`` (PEFT format) loaded onto the unmerged teacher UNet (diffusers' own LoRA loader)
    computes what the merged ``unet/`` computes: attention and resnet-conv LoRA, scale folded in."""
    pytest.importorskip("peft")
    pre = _codi_pretrained(lora_alpha=3.0)  # scale 3 / 2: a scale not folded in would show
    out = str(tmp_path / "export")
    export.export_pretrained(pre, out, steps=1)
    flax_to_torch.save_unet(pre.model.backbone, pre.params["backbone"], str(tmp_path / "teacher"))
    teacher = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "teacher")).eval()
    merged = diffusers.UNet2DConditionModel.from_pretrained(out, subfolder="unet").eval()
    z, context = torch.from_numpy(_inputs(4, size=8).transpose(0, 3, 1, 2).copy()), torch.randn(2, 5, 8)
    with torch.no_grad():
        before = teacher(z, 500, encoder_hidden_states=context).sample
        teacher.load_lora_adapter(os.path.join(out, "lora", export.LORA_WEIGHTS), prefix="unet")
        with_lora = teacher(z, 500, encoder_hidden_states=context).sample
        reference = merged(z, 500, encoder_hidden_states=context).sample
    scale = float(reference.abs().max())
    assert float((with_lora - reference).abs().max()) <= 1e-5 * max(1.0, scale)
    assert float((before - reference).abs().max()) > 1e-3 * scale  # the LoRA matters


def test_atomic_directory_replaces_or_leaves_untouched(tmp_path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty"):
        with flax_to_torch.atomic_directory(str(target)):
            pass
    with pytest.raises(RuntimeError, match="half-way"):
        with flax_to_torch.atomic_directory(str(target), overwrite=True) as staging:
            open(os.path.join(staging, "new.txt"), "w").close()
            raise RuntimeError("failed half-way")
    assert os.listdir(target) == ["stale.txt"] and os.listdir(tmp_path) == ["out"]
    with flax_to_torch.atomic_directory(str(target), overwrite=True) as staging:
        open(os.path.join(staging, "new.txt"), "w").close()
    assert os.listdir(target) == ["new.txt"] and os.listdir(tmp_path) == ["out"]


def _readme_sampler(readme: str) -> dict:
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(blocks) == 2, "README: a loading and a sampling snippet"
    namespace: dict = {}
    exec(blocks[1], namespace)
    return namespace


def test_export_teacher_readme_sampler_matches_ours(tmp_path) -> None:
    """A cosine-schedule teacher: unet/ + scheduler/ (flagged approximate) and a README loop that
    reproduces ``samplers.ddim_sample`` (deterministic DDIM) exactly."""
    config = _run_config("teacher", dict(kind="cosine"))
    model = UNet(**TINY)
    params = _random_params(unet_param_shapes(model), seed=6)
    pre = Pretrained(model, diffusion.Schedule("cosine"), "v", params, config, 3, "/runs/teacher")
    out = str(tmp_path / "teacher")
    export.export_pretrained(pre, out, steps=3)
    assert sorted(os.listdir(out)) == ["README.md", "scheduler", "unet"]
    assert json.load(open(os.path.join(out, "scheduler", "scheduler_config.json")))["beta_schedule"] == (
        "squaredcos_cap_v2"
    )
    readme = open(os.path.join(out, "README.md")).read()
    assert "**Approximation:**" in readme and "RENOISE = False" in readme

    namespace = _readme_sampler(readme)
    namespace["unet"] = diffusers.UNet2DModel.from_pretrained(out, subfolder="unet").eval()
    z = _inputs(3, seed=4)
    theirs = namespace["sample"](_nchw(z))
    apply_fn = lambda p, z_t, model_t: model.apply({"params": p}, z_t, model_t)
    times = samplers.uniform_times(3)
    ours = jax.jit(samplers.ddim_sample, static_argnums=(0, 4, 5))(apply_fn, params, z, times, pre.schedule, "v")
    _check_close("README DDIM sampler (3 steps)", theirs, ours)


def test_export_refuses_more_steps_than_the_grid() -> None:
    pre = _codi_pretrained()
    with pytest.raises(ValueError, match="exceed the 50-point training grid"):
        export.step_table(pre.config, pre.schedule, 51)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "codi_jax.export", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_refuses_existing_out_and_missing_workdir(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    proc = _cli(f"--run={tmp_path / 'no_run'}", f"--out={out}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert "--overwrite" in proc.stderr and (out / "keep.txt").exists()

    proc = _cli(f"--run={tmp_path / 'no_run'}", f"--out={tmp_path / 'fresh'}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "no checkpoints directory" in proc.stderr
    assert not (tmp_path / "fresh").exists()
