"""``python -m codi_jax.convert``: a local diffusers pipeline / UNet folder (+ ControlNet) -> a teacher workdir.

One tiny random Stable Diffusion pipeline (``tests.tiny_sd``) is converted once per module; the
workdir's teacher (``pretrained.load_teacher``) must compute what the PyTorch UNet computes
(errors relative to the output scale), the saved config must hold the fields codi runs read, the
frozen parts must be byte copies our loaders read, and the ControlNet must restore to the
parameters ``load_diffusers_controlnet`` gives. The CLI runs in a subprocess (success, refusals).
"""

from __future__ import annotations

import filecmp
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np
import pytest

from codi_jax import sharding
from codi_jax.interop import convert, torch_to_flax
from codi_jax.models import clip_text, clip_tokenizer
from codi_jax.runs import checkpoint, config_resolution, pretrained
from tests import tiny_sd

# The references: every test but the scheduler refusals goes through `_requires_torch`, which skips
# where torch, diffusers or safetensors is not installed.
torch = pytest.importorskip("torch") if importlib.util.find_spec("torch") else None
diffusers = pytest.importorskip("diffusers") if importlib.util.find_spec("diffusers") else None


def _requires_torch() -> None:
    for name in ("torch", "diffusers", "safetensors"):
        pytest.importorskip(name)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMESTEPS = np.array([3.0, 817.0], np.float32)
PIXEL_UNET = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8,
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Any]:
    _requires_torch()
    root = tmp_path_factory.mktemp("convert")
    pipe = tiny_sd.make_pipeline(str(root / "pipe"))
    tiny_sd.make_controlnet(pipe.unet, str(root / "controlnet"))
    out = str(root / "teacher")
    summary = convert.convert(convert.ConversionRequest(str(root / "pipe"), out, controlnet=str(root / "controlnet")))
    print("\n".join(convert.summary_lines(summary)))
    return dict(root=root, pipe=pipe, out=out, summary=summary)


def _compare(reference: np.ndarray, ours: Any, what: str, rel: float = 1e-5) -> None:
    """max |ours - reference| <= rel * max(1, max |reference|), ours NHWC vs reference NCHW."""
    ours = np.asarray(ours).transpose(0, 3, 1, 2)
    assert ours.shape == reference.shape, (what, ours.shape, reference.shape)
    error, scale = float(np.max(np.abs(ours - reference))), float(np.max(np.abs(reference)))
    print(f"{what}: max abs err {error:.3g} (max |ref| {scale:.3g})")
    assert error <= rel * max(1.0, scale), (what, error, scale)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "codi_jax.convert", *args], cwd=REPO, capture_output=True, text=True, timeout=180
    )


def _assert_one_line_refusal(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_teacher_matches_pytorch_unet(converted: dict[str, Any]) -> None:
    pre = pretrained.load_teacher(converted["out"])
    assert (pre.step, pre.parametrization, pre.schedule.kind) == (0, "eps", "scaled_linear")
    rng = np.random.RandomState(0)
    sample = rng.randn(2, 4, tiny_sd.LATENT_SIZE, tiny_sd.LATENT_SIZE).astype(np.float32)
    context = rng.randn(2, 5, tiny_sd.CROSS_ATTENTION_DIM).astype(np.float32)
    with torch.no_grad():
        args = (torch.from_numpy(sample), torch.from_numpy(TIMESTEPS), torch.from_numpy(context))
        reference = converted["pipe"].unet(*args).sample.numpy()
    ours = jax.jit(pre.model.apply)({"params": pre.params}, sample.transpose(0, 2, 3, 1), TIMESTEPS, context)
    _compare(reference, ours, "converted SD UNet (load_teacher)")
    torch_count = sum(p.numel() for p in converted["pipe"].unet.parameters())
    assert converted["summary"].param_counts["unet"] == torch_count


def test_saved_config_fields(converted: dict[str, Any]) -> None:
    out, root = converted["out"], converted["root"]
    config, step = pretrained.read_config(out)
    assert step == 0 and config.method == "teacher"
    unet_config = json.load(open(root / "pipe" / "unet" / "config.json"))
    fields = torch_to_flax.unet_config_from_diffusers(unet_config)
    model = config.model.to_dict()
    assert {k: model[k] for k in fields} == {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    assert (model["parametrization"], model["dtype"], model["remat"], model["conv_impl"]) == (
        "eps",
        "float32",
        False,
        "auto",
    )
    assert config.schedule.to_dict() == dict(
        kind="scaled_linear", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012
    )
    assert config.data.image_size == tiny_sd.IMAGE_SIZE  # the UNet's sample_size x the VAE's 8
    components = os.path.join(out, "components")
    assert config.latent.to_dict() == dict(vae=os.path.join(components, "vae"), encode="sample")
    assert config.text.to_dict() == dict(
        encoder=os.path.join(components, "text_encoder"),
        tokenizer=os.path.join(components, "tokenizer"),
        encoder_2="",  # SDXL's second encoder: none
        tokenizer_2="",
        encoder_3="",  # SD3's T5: none
        tokenizer_3="",
        max_sequence_length=256,
        force_zeros_for_empty_prompt=False,  # SD 1.x / 2.x encode the empty negative prompt
        prompt="",
        negative_prompt="",
        drop_prob=0.0,
        max_length=tiny_sd.MAX_LENGTH,
    )
    assert config.source.to_dict() == dict(diffusers=str(root / "pipe"), controlnet=str(root / "controlnet"))
    saved = checkpoint.Checkpointer(pretrained.checkpoint_dir(out), read_only=True)
    assert sorted(saved.saved_tree(0)) == ["ema_params", "step"]  # the minimal state: the UNet once
    saved.close()
    # A codi run with config.teacher_workdir=OUT takes the teacher's model / schedule / frozen parts.
    from codi_jax.configs.cpu import codi_sr4

    codi_config = codi_sr4.get_config()
    codi_config.teacher_workdir = out
    resolved = config_resolution.resolve(codi_config)
    assert resolved.model.to_dict() == model and resolved.schedule.to_dict() == config.schedule.to_dict()


def test_components_are_byte_copies_that_load(converted: dict[str, Any]) -> None:
    pipe_dir, components = converted["root"] / "pipe", os.path.join(converted["out"], "components")
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        comparison = filecmp.dircmp(pipe_dir / name, os.path.join(components, name))
        assert not (comparison.left_only or comparison.right_only or comparison.diff_files), name
        for file in comparison.common_files:
            assert filecmp.cmp(pipe_dir / name / file, os.path.join(components, name, file), shallow=False)
    assert filecmp.cmp(pipe_dir / "model_index.json", os.path.join(components, "model_index.json"), shallow=False)
    config, _ = pretrained.read_config(converted["out"])
    _, vae_params = torch_to_flax.load_diffusers_vae(config.latent.vae)
    _, text_params = clip_text.load_clip_text(config.text.encoder)
    tokenizer = clip_tokenizer.load_clip_tokenizer(config.text.tokenizer)
    counts = converted["summary"].param_counts
    assert (
        counts["vae"] == convert.count_params(vae_params) == sum(p.numel() for p in converted["pipe"].vae.parameters())
    )
    assert counts["text_encoder"] == convert.count_params(text_params)
    prompt = "a photo of a cat"
    expected = converted["pipe"].tokenizer(prompt, padding="max_length", max_length=tiny_sd.MAX_LENGTH).input_ids
    assert tokenizer(prompt).input_ids[0].tolist() == list(expected)


def test_controlnet_restores_into_shardings(converted: dict[str, Any]) -> None:
    assert convert.controlnet_adapter_fields(converted["out"]) == dict(
        hint_channels=tiny_sd.HINT_CHANNELS, hint_downsamples=3, cond_channels=3, output="residuals"
    )
    adapter, reference = torch_to_flax.load_diffusers_controlnet(str(converted["root"] / "controlnet"))
    shapes = torch_to_flax.controlnet_param_shapes(adapter)
    mesh = sharding.make_mesh(devices=jax.local_devices()[:1])
    abstract = checkpoint.abstract_like(shapes, sharding.tree_shardings(shapes, mesh))
    restored = convert.restore_controlnet(converted["out"], abstract)
    errors = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), restored, reference)
    print(f"ControlNet params: max abs err {max(jax.tree.leaves(errors)):.3g}")
    jax.tree.map(np.testing.assert_array_equal, restored, reference)
    jax.tree.map(lambda a, s: a.sharding == s.sharding or pytest.fail("sharding"), restored, abstract)
    assert converted["summary"].param_counts["controlnet"] == convert.count_params(reference)

    wrong = dict(abstract, conv_in=dict(abstract["conv_in"], bias=jax.ShapeDtypeStruct((5,), np.float32)))
    with pytest.raises(ValueError, match="leaf conv_in/bias is"):
        convert.restore_controlnet(os.path.join(converted["out"], "controlnet"), wrong)


def test_cli_converts_and_refuses(converted: dict[str, Any], tmp_path) -> None:
    root, out = converted["root"], str(tmp_path / "cli_teacher")
    start = time.perf_counter()
    proc = _cli(f"--diffusers={root / 'pipe'}", f"--out={out}", f"--controlnet={root / 'controlnet'}")
    print(f"CLI convert (with --controlnet): {time.perf_counter() - start:.1f} s wall\n{proc.stdout}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parameters -> checkpoints/0" in proc.stdout and "controlnet:" in proc.stdout
    assert pretrained.read_config(out)[0].source.controlnet == str(root / "controlnet")

    proc = _cli(f"--diffusers={root / 'pipe'}", f"--out={out}")
    _assert_one_line_refusal(proc, "--overwrite", out)
    _assert_one_line_refusal(_cli(f"--diffusers={tmp_path / 'nowhere'}", f"--out={tmp_path / 'o'}"), "nowhere")
    _assert_one_line_refusal(_cli(f"--out={tmp_path / 'o'}"), "--diffusers")

    sdxl = tmp_path / "sdxl_pipe"  # a pipeline whose UNet asks for SDXL's added embeddings
    shutil.copytree(root / "pipe", sdxl)
    config = json.load(open(sdxl / "unet" / "config.json"))
    json.dump(dict(config, addition_embed_type="text_time"), open(sdxl / "unet" / "config.json", "w"))
    _assert_one_line_refusal(_cli(f"--diffusers={sdxl}", f"--out={tmp_path / 'o'}"), "addition_embed_type")
    assert not os.path.exists(tmp_path / "o")

    # --overwrite replaces the workdir atomically (here: without the ControlNet).
    convert.convert(convert.ConversionRequest(str(root / "pipe"), out, overwrite=True))
    assert not os.path.exists(os.path.join(out, "controlnet"))
    assert pretrained.read_config(out)[0].source.controlnet == ""
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []


@pytest.mark.parametrize(
    "override, field",
    [
        (dict(beta_schedule="squaredcos_cap_v2"), "beta_schedule"),
        (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
        (dict(trained_betas=[0.1, 0.2]), "trained_betas"),
        (dict(prediction_type="flow"), "prediction_type"),
        (dict(variance_type="learned_range"), "variance_type"),
    ],
)
def test_unsupported_schedulers(override: dict[str, Any], field: str) -> None:
    config = dict(tiny_sd.SCHEDULER, _class_name="DDIMScheduler", **override)
    with pytest.raises(ValueError, match=field):
        convert.schedule_from_scheduler_config(config)


def test_refusals_before_loading(converted: dict[str, Any], tmp_path) -> None:
    root = converted["root"]
    controlnet = tmp_path / "controlnet"
    shutil.copytree(root / "controlnet", controlnet)
    config = json.load(open(controlnet / "config.json"))
    json.dump(dict(config, cross_attention_dim=24), open(controlnet / "config.json", "w"))
    with pytest.raises(ValueError, match="cross_attention_dim=24 differs from the UNet's cross_attention_dim=32"):
        convert.convert(convert.ConversionRequest(str(root / "pipe"), str(tmp_path / "o"), controlnet=str(controlnet)))

    pipe = tmp_path / "pipe"
    shutil.copytree(root / "pipe", pipe)
    shutil.rmtree(pipe / "vae")
    with pytest.raises(FileNotFoundError, match="Missing vae folder"):
        convert.convert(convert.ConversionRequest(str(pipe), str(tmp_path / "o")))
    lone = tmp_path / "lone" / "unet"
    shutil.copytree(root / "pipe" / "unet", lone)
    with pytest.raises(FileNotFoundError, match="No scheduler config"):
        convert.convert(convert.ConversionRequest(str(lone), str(tmp_path / "o")))
    with pytest.raises(ValueError, match="holds the input"):  # --overwrite would delete the input
        convert.convert(convert.ConversionRequest(str(pipe / "unet"), str(pipe), overwrite=True))
    assert os.path.isdir(pipe / "unet")
    assert not os.path.exists(tmp_path / "o")


def test_pixel_unet_folder(tmp_path) -> None:
    _requires_torch()
    torch.manual_seed(0)
    unet = tiny_sd.perturbed(diffusers.UNet2DModel(**PIXEL_UNET), seed=3, scale=0.05)
    unet.save_pretrained(str(tmp_path / "ddpm" / "unet"), safe_serialization=True)
    scheduler = diffusers.DDPMScheduler(beta_schedule="linear", prediction_type="v_prediction")
    scheduler.save_pretrained(str(tmp_path / "ddpm" / "scheduler"))  # found beside the UNet folder
    out = str(tmp_path / "teacher")
    summary = convert.convert(convert.ConversionRequest(str(tmp_path / "ddpm" / "unet"), out))
    print("\n".join(convert.summary_lines(summary)))
    pre = pretrained.load_teacher(out)
    config = pre.config
    assert (config.latent.vae, config.text.encoder, config.text.tokenizer, config.text.max_length) == ("", "", "", 0)
    assert (config.data.image_size, pre.parametrization) == (16, "v")
    assert config.schedule.to_dict() == dict(kind="linear", num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02)
    assert sorted(os.listdir(os.path.join(out, "components"))) == ["scheduler"]
    sample = np.random.RandomState(0).randn(2, 3, 16, 16).astype(np.float32)
    with torch.no_grad():
        reference = unet(torch.from_numpy(sample), torch.from_numpy(TIMESTEPS)).sample.numpy()
    ours = jax.jit(pre.model.apply)({"params": pre.params}, sample.transpose(0, 2, 3, 1), TIMESTEPS)
    _compare(reference, ours, "converted UNet2DModel (load_teacher)")


def test_input_faults_are_one_readable_error(converted: dict[str, Any], tmp_path) -> None:
    """Faults met in published pipelines: an fp16-variant-only UNet names the variant, a truncated
    safetensors file is one ValueError, and a pipeline's text-conditioned ``unet/`` folder passed
    alone is refused, pointing at the pipeline (it used to convert as a pixel teacher)."""
    pipe = tmp_path / "pipe"
    shutil.copytree(converted["root"] / "pipe", pipe)
    weights = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(
        ValueError, match=f"--diffusers={pipe}/unet is a text-conditioned UNet .*pass --diffusers={pipe}\\."
    ):
        convert.convert(convert.ConversionRequest(str(pipe / "unet"), str(tmp_path / "o")))
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    nested = tmp_path / "new" / "runs" / "teacher"  # the weights fail after the checks: no folder is left
    with pytest.raises(ValueError, match=f"{weights} is not a readable safetensors file"):
        convert.convert(convert.ConversionRequest(str(pipe), str(nested)))
    assert not os.path.exists(tmp_path / "new")
    variant = pipe / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    os.rename(weights, variant)  # the only weights are a variant: read (and here found truncated)
    with pytest.raises(ValueError, match=f"{variant} is not a readable safetensors file"):
        convert.convert(convert.ConversionRequest(str(pipe), str(tmp_path / "o")))
    os.remove(variant)
    with pytest.raises(FileNotFoundError, match="Missing UNet weights .*diffusion_pytorch_model.safetensors"):
        convert.convert(convert.ConversionRequest(str(pipe), str(tmp_path / "o")))
    assert not os.path.exists(tmp_path / "o")
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------
# Weights that exist only as a diffusers / transformers variant (``*.fp16.safetensors``, a
# ``*.safetensors.index.fp16.json`` and its shards, bf16), written by diffusers' own save_pretrained.
# ---------------------------------------------------------------------------------------------


def _save_variant(converted: dict[str, Any], directory: str, dtype: Any, variant: str) -> None:
    """The tiny pipeline (and its ControlNet, in ``directory``_controlnet) saved by diffusers as ``variant`` only."""
    root = converted["root"]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(root / "pipe"), dtype=dtype)
    pipe.save_pretrained(directory, variant=variant, safe_serialization=True)
    controlnet = diffusers.ControlNetModel.from_pretrained(str(root / "controlnet"), dtype=dtype)
    controlnet.save_pretrained(directory + "_controlnet", variant=variant, safe_serialization=True)


@pytest.fixture(scope="module")
def fp16_pipeline(converted: dict[str, Any]) -> str:
    directory = str(converted["root"] / "pipe_fp16")
    _save_variant(converted, directory, torch.float16, "fp16")
    return directory


def _torch_unet(directory: str, variant: str) -> Any:
    """The reference: diffusers' UNet loaded with ``variant``, cast to float32."""
    return diffusers.UNet2DConditionModel.from_pretrained(directory, subfolder="unet", variant=variant).float().eval()


def _unet_output(unet: Any) -> np.ndarray:
    rng = np.random.RandomState(0)
    sample = rng.randn(2, 4, tiny_sd.LATENT_SIZE, tiny_sd.LATENT_SIZE).astype(np.float32)
    context = rng.randn(2, 5, tiny_sd.CROSS_ATTENTION_DIM).astype(np.float32)
    if isinstance(unet, torch.nn.Module):  # a PyTorch UNet
        with torch.no_grad():
            return unet(torch.from_numpy(sample), torch.from_numpy(TIMESTEPS), torch.from_numpy(context)).sample.numpy()
    pre = unet  # a converted teacher (pretrained.load_teacher)
    ours = jax.jit(pre.model.apply)({"params": pre.params}, sample.transpose(0, 2, 3, 1), TIMESTEPS, context)
    return np.asarray(ours).transpose(0, 3, 1, 2)


def _assert_variant_teacher(out: str, reference_unet: Any, plain_unet: Any) -> None:
    """The teacher computes what the variant UNet (upcast) computes, distinguishably from the plain
    float32 one, and every converted leaf is float32."""
    pre = pretrained.load_teacher(out)
    assert {np.asarray(leaf).dtype for leaf in jax.tree.leaves(pre.params)} == {np.dtype(np.float32)}
    reference, ours, plain = _unet_output(reference_unet), _unet_output(pre), _unet_output(plain_unet)
    scale = max(1.0, float(np.max(np.abs(reference))))
    error, rounding = float(np.max(np.abs(ours - reference))), float(np.max(np.abs(plain - reference)))
    print(f"variant teacher: max abs err {error:.3g} vs the variant, the variant's rounding {rounding:.3g}")
    assert error <= 1e-5 * scale < rounding, (error, rounding, scale)
    config, _ = pretrained.read_config(out)
    for params in (
        torch_to_flax.load_diffusers_vae(config.latent.vae)[1],
        clip_text.load_clip_text(config.text.encoder)[1],
    ):
        assert {np.asarray(leaf).dtype for leaf in jax.tree.leaves(params)} == {np.dtype(np.float32)}


def test_fp16_variant_pipeline_converts(converted: dict[str, Any], fp16_pipeline: str, tmp_path) -> None:
    """A pipeline (and ControlNet) saved only as the fp16 variant converts without a flag: each part
    uses its one variant, upcast to float32 masters, and the summary names the variant."""
    out = str(tmp_path / "teacher")
    summary = convert.convert(convert.ConversionRequest(fp16_pipeline, out, controlnet=fp16_pipeline + "_controlnet"))
    lines = convert.summary_lines(summary)
    print("\n".join(lines))
    assert summary.plan.source.variants == dict(controlnet="fp16", unet="fp16", vae="fp16", text_encoder="fp16")
    assert "  weights variant fp16 read for unet, vae, text_encoder, controlnet (upcast to float32)" in lines
    _assert_variant_teacher(out, _torch_unet(fp16_pipeline, "fp16"), converted["pipe"].unet)
    for name, weights in (("vae", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        assert sorted(os.listdir(os.path.join(out, "components", name))) == ["config.json", weights]
    reference = diffusers.ControlNetModel.from_pretrained(fp16_pipeline + "_controlnet", variant="fp16").float()
    adapter, _ = torch_to_flax.load_diffusers_controlnet(str(converted["root"] / "controlnet"))
    shapes = torch_to_flax.controlnet_param_shapes(adapter)
    mesh = sharding.make_mesh(devices=jax.local_devices()[:1])
    restored = convert.restore_controlnet(out, checkpoint.abstract_like(shapes, sharding.tree_shardings(shapes, mesh)))
    assert {np.asarray(leaf).dtype for leaf in jax.tree.leaves(restored)} == {np.dtype(np.float32)}
    kernel = reference.controlnet_cond_embedding.conv_in.weight.detach().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(np.asarray(restored["controlnet_cond_embedding"]["conv_in"]["kernel"]), kernel)


def test_cli_variant_flag_reads_sharded_variants(converted: dict[str, Any], fp16_pipeline: str, tmp_path) -> None:
    """``--variant=fp16`` reads an index (``*.safetensors.index.fp16.json``) and its shards; the copied
    text encoder keeps the shards under the plain index name."""
    sharded = tmp_path / "sharded"
    shutil.copytree(fp16_pipeline, sharded)
    for name, model_class in (("unet", diffusers.UNet2DConditionModel), ("text_encoder", None)):
        shutil.rmtree(sharded / name)
        if model_class is None:
            import transformers

            model_class = transformers.CLIPTextModel
        kwargs = dict(subfolder=name, variant="fp16", dtype=torch.float16)
        model = model_class.from_pretrained(fp16_pipeline, **kwargs)
        model.save_pretrained(str(sharded / name), variant="fp16", max_shard_size="40KB")
    unet_files = os.listdir(sharded / "unet")
    assert "diffusion_pytorch_model.safetensors.index.fp16.json" in unet_files and len(unet_files) > 3
    out = str(tmp_path / "teacher")
    proc = _cli(f"--diffusers={sharded}", f"--out={out}", "--variant=fp16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "weights variant fp16 read for unet, vae, text_encoder (upcast to float32)" in proc.stdout, proc.stdout
    _assert_variant_teacher(out, _torch_unet(str(sharded), "fp16"), converted["pipe"].unet)
    copied = sorted(os.listdir(os.path.join(out, "components", "text_encoder")))
    shards = sorted(n for n in os.listdir(sharded / "text_encoder") if n.startswith("model.fp16-"))
    assert len(shards) > 1 and copied == sorted(["config.json", "model.safetensors.index.json", *shards])


def test_variant_refusals_and_bf16(converted: dict[str, Any], fp16_pipeline: str, tmp_path) -> None:
    """A ``--variant`` a part lacks names the file expected; several variants without ``--variant`` are
    named; both refusals are one line, exit 2, and leave no folder. bf16 weights convert with ``--variant``."""
    out = tmp_path / "new" / "teacher"
    proc = _cli(f"--diffusers={fp16_pipeline}", f"--out={out}", "--variant=bf16")
    expected = os.path.join(fp16_pipeline, "unet", "diffusion_pytorch_model.bf16.safetensors")
    _assert_one_line_refusal(proc, f"Missing UNet weights {expected} for --variant=bf16", "variant fp16")
    multi = str(tmp_path / "multi")
    _save_variant(converted, multi, torch.bfloat16, "bf16")
    shutil.copytree(fp16_pipeline, multi, dirs_exist_ok=True)  # fp16 and bf16, no plain weights
    proc = _cli(f"--diffusers={multi}", f"--out={out}")
    _assert_one_line_refusal(proc, "holds no plain weights but the variants bf16, fp16", "--variant=")
    assert not os.path.exists(tmp_path / "new")
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []

    summary = convert.convert(convert.ConversionRequest(multi, str(out), variant="bf16"))
    assert summary.plan.source.variants == dict(unet="bf16", vae="bf16", text_encoder="bf16")
    _assert_variant_teacher(str(out), _torch_unet(multi, "bf16"), converted["pipe"].unet)
