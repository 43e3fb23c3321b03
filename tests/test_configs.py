"""Every config in codi_jax/configs/ is valid: known fields, a valid task, and (for conditional runs) an
adapted model that initialises for its task's condition (checked abstractly, no compile)."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from codi_jax import configs
from codi_jax.configs.cpu import tiny_teacher
from codi_jax.data import task_spec
from codi_jax.models import networks
from codi_jax.objectives import codi
from codi_jax.runs import config_checks, config_diff, config_resolution, config_upgrade
from codi_jax.sampling import conditional

ALL_CONFIGS = sorted(  # "group.name", e.g. "cpu.codi_sr4"
    f"{p.parent.name}.{p.stem}" for p in pathlib.Path(configs.__file__).parent.glob("*/*.py") if p.stem != "__init__"
)
SD_CONFIGS = [name for name in ALL_CONFIGS if name.startswith("sd.")]
CONFIG_NAMES = [name for name in ALL_CONFIGS if name not in SD_CONFIGS]


REPO = pathlib.Path(__file__).parent.parent


def _on_committed_checkpoints(name: str) -> bool:
    config = importlib.import_module(f"codi_jax.configs.{name}").get_config()
    paths = [config.get("teacher_workdir") or "", config.get("init_workdir") or ""]
    return any(p.startswith(configs.committed_checkpoint("")) for p in paths)


@pytest.mark.parametrize("name", [n for n in CONFIG_NAMES if _on_committed_checkpoints(n)])
def test_config_resolves_on_the_committed_checkpoints_it_names(name: str, monkeypatch, tmp_path) -> None:
    """A config that starts from a committed teacher / init resolves against it as shipped (a
    clash with the init's saved setup would stop ``codi_jax.train`` before its first step)."""
    monkeypatch.chdir(tmp_path)  # the committed paths are absolute: any working directory
    resolved = config_resolution.resolve(importlib.import_module(f"codi_jax.configs.{name}").get_config())
    assert resolved.teacher_step > 0


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_is_valid(name: str) -> None:
    config = importlib.import_module(f"codi_jax.configs.{name}").get_config()
    method = config_resolution.method_of(config)
    if method == "teacher":
        assert config.model.parametrization in ("v", "eps", "x")
        return
    task_spec.check_task_config(config.task)
    codi.check_codi_config(config.codi)
    assert config.teacher_workdir is not None
    # Resolve the backbone as a teacher would (tiny one), then build and abstractly initialise.
    with config.unlocked():
        config.model = tiny_teacher.get_config().model
        config.schedule = tiny_teacher.get_config().schedule
    model, _ = networks.build_conditional(config)
    size = 16
    cond = jnp.zeros((1, size, size, task_spec.cond_channels(config.task)))
    instruction = jnp.zeros((1,), jnp.int32) if task_spec.num_instructions(config.task) else None
    backbone = jax.eval_shape(
        model.backbone.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1,))
    )
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), backbone["params"], cond, instruction)
    assert set(params) >= {"backbone", "adapter"}
    out = jax.eval_shape(model.apply, params, jnp.zeros((1, size, size, 3)), jnp.zeros((1,)), cond, instruction)
    assert out.shape == (1, size, size, 3)


def test_renoise_default_comes_from_the_codi_section() -> None:
    """CoDi configs re-noise between steps unless ``codi.renoise`` says no; configs saved before the
    field existed get its default (filled in once, by ``config_upgrade``); non-distilled models always
    move by DDIM."""
    config = importlib.import_module("codi_jax.configs.cpu.codi_sr4").get_config()
    assert conditional.renoise_between_steps(config) is True
    config.codi.renoise = False
    assert conditional.renoise_between_steps(config) is False
    old = config.to_dict()
    del old["codi"]["renoise"]
    upgraded = ml_collections.ConfigDict(config_upgrade.upgrade(old))
    assert conditional.renoise_between_steps(upgraded) is codi.default_codi_config().renoise
    finetune = importlib.import_module("codi_jax.configs.cpu.finetune_sr4").get_config()
    assert conditional.renoise_between_steps(finetune) is False


def _teacher_of(name: str, request) -> str:
    """The converted tiny teacher an SD config runs on: SDXL's for ``sd.sdxl_*``, SD3's for ``sd.sd3_*``,
    else SD's."""
    prefixes = {"sd.sdxl": "tiny_sdxl_teacher", "sd.sd3_": "tiny_sd3_teacher"}
    return request.getfixturevalue(next((v for k, v in prefixes.items() if name.startswith(k)), "tiny_sd_teacher"))


@pytest.mark.parametrize("name", SD_CONFIGS)
def test_sd_config_names_missing_paths_and_resolves_on_a_converted_pipeline(name: str, request) -> None:
    tiny_sd_teacher = _teacher_of(name, request)
    config = importlib.import_module(f"codi_jax.configs.{name}").get_config()
    with pytest.raises(ValueError, match="teacher_workdir"):
        config_resolution.resolve(config)
    from tests import tiny_sd

    config.teacher_workdir = tiny_sd_teacher
    config.data.image_size = tiny_sd.IMAGE_SIZE
    config.adapter.hint_channels = tiny_sd.HINT_CHANNELS
    resolved = config_resolution.resolve(config)
    assert resolved.latent.vae and resolved.text.encoder
    assert resolved.model.get("cross_attention_dim") or resolved.model.get("joint_attention_dim")
    if name.startswith("sd.sd3_"):  # the joint DiT, its three encoders, the condition through the VAE
        assert resolved.model.kind == "dit" and resolved.schedule.kind == "flow" and resolved.text.encoder_3
        assert networks.adapter_cond_channels(resolved) == resolved.model.in_channels == 16
    assert resolved.model.dtype == "bfloat16"  # the run's compute choice, not the teacher's float32
    assert resolved.data.color_augment == 0.0  # a user's images keep their colours (edits must)
    if resolved.data.source in ("folder", "edit_triples"):
        from codi_jax.training import loop  # TensorFlow and clu: here only, the module's other tests run without

        with pytest.raises((ValueError, FileNotFoundError), match="data_config.folder"):
            loop.check_input_paths(resolved)
    shapes = networks.param_shapes(resolved)  # abstract init: latent-size input, pixel-size condition, context
    assert set(shapes) >= {"backbone", "adapter"}
    assert ("guidance_embedding_linear_1" in shapes["adapter"]) == bool(resolved.codi.cfg_range)


def test_upgrade_fills_what_an_older_config_lacks_and_keeps_what_it_has() -> None:
    """A saved config from before ``optimizer.decay``, ``data.color_augment``, ``nonfinite`` and
    ``codi.target`` existed: each comes back with the value its absence meant; set fields are kept,
    and sections the run does not have stay absent."""
    old = importlib.import_module("codi_jax.configs.cpu.codi_sr4").get_config().to_dict()
    for section, field in (("optimizer", "decay"), ("data", "color_augment"), ("codi", "target")):
        del old[section][field]
    del old["nonfinite"], old["ema_warmup"]
    old["codi"]["grid_size"] = 20
    new = config_upgrade.upgrade(old)
    assert new["optimizer"]["decay"] == "constant" and new["data"]["color_augment"] == 0.0
    assert new["codi"]["target"] == "ema" and new["codi"]["grid_size"] == 20 and new["ema_warmup"] is False
    assert new["nonfinite"] == config_upgrade.train_state.default_update_policy().to_dict()
    assert "codi" not in config_upgrade.upgrade({"method": "teacher"})  # a teacher has no codi section
    assert "target" not in old["codi"]  # the input is left unchanged


# (field, bad value, the message's start): one case per rule of ``config_checks.check_run_config``.
BAD_FIELDS = [
    ("num_train_steps", 0, "num_train_steps=0: must be at least 1."),
    ("log_every_steps", 0, "log_every_steps=0: must be at least 1."),
    ("checkpoint_every_steps", -1, "checkpoint_every_steps=-1: must be at least 1."),
    ("sample_every_steps", 0, "sample_every_steps=0: must be at least 1."),
    ("keep_checkpoints", 0, "keep_checkpoints=0: must be at least 1 (0 would delete every checkpoint)."),
    ("batch_size", 0, "batch_size=0: must be at least 1."),
    ("ema_decay", 1.5, "ema_decay=1.5: must be in [0, 1]."),
    ("ema_decay", -0.1, "ema_decay=-0.1: must be in [0, 1]."),
    ("optimizer.learning_rate", 0.0, "optimizer.learning_rate=0.0: must be a finite number > 0."),
    ("optimizer.learning_rate", float("inf"), "optimizer.learning_rate=inf: must be a finite number > 0."),
    ("optimizer.learning_rate", float("nan"), "optimizer.learning_rate=nan: must be a finite number > 0."),
    ("optimizer.b1", 1.0, "optimizer.b1=1.0: must be in [0, 1) (at 1 Adam's bias correction"),
    ("optimizer.b2", 1.0, "optimizer.b2=1.0: must be in [0, 1) (at 1 Adam's bias correction"),
    ("optimizer.b2", -0.5, "optimizer.b2=-0.5: must be in [0, 1)"),
    ("optimizer.eps", 0.0, "optimizer.eps=0.0: must be a finite number > 0."),
    ("optimizer.eps", float("inf"), "optimizer.eps=inf: must be a finite number > 0."),
    ("optimizer.weight_decay", -0.1, "optimizer.weight_decay=-0.1: must be a finite number >= 0."),
    ("optimizer.grad_clip_norm", 0.0, "optimizer.grad_clip_norm=0.0: must be a finite number > 0 (0 clips every"),
    ("optimizer.grad_clip_norm", -1.0, "optimizer.grad_clip_norm=-1.0: must be a finite number > 0"),
    ("optimizer.warmup_steps", -1, "optimizer.warmup_steps=-1: must be at least 0."),
    ("optimizer.decay_steps", -1, "optimizer.decay_steps=-1: must be at least 0."),
    ("optimizer.decay", "linear", "optimizer.decay='linear'; valid values: ('constant', 'cosine')."),
    ("optimizer.decay", "cosine", "optimizer.decay='cosine' needs decay_steps (or num_train_steps) > warmup_steps"),
    ("nonfinite.max_param_norm_ratio", 0.0, "nonfinite.max_param_norm_ratio=0.0: must be a finite number > 1 ("),
    ("nonfinite.max_param_norm_ratio", 1.0, "nonfinite.max_param_norm_ratio=1.0: must be a finite number > 1 ("),
    ("nonfinite.max_consecutive", -1, "nonfinite.max_consecutive=-1: must be at least 0."),
]


def _with(config: ml_collections.ConfigDict, field: str, value) -> ml_collections.ConfigDict:
    *section, name = field.split(".")
    (config[section[0]] if section else config)[name] = value
    return config


@pytest.mark.parametrize("field, value, message", BAD_FIELDS, ids=[f"{f}={v}" for f, v, _ in BAD_FIELDS])
def test_out_of_range_field_is_refused_at_resolution(field: str, value, message: str) -> None:
    config = _with(tiny_teacher.get_config(), field, value)
    if field == "optimizer.decay" and value == "cosine":
        config.optimizer.warmup_steps = config.num_train_steps  # the decay would end in the warm-up
    with pytest.raises(ValueError) as error:
        config_resolution.resolve(config)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_range_checks_come_before_the_teacher_is_read() -> None:
    """A CoDi config with no teacher and a bad field: the field is reported, not the teacher."""
    config = importlib.import_module("codi_jax.configs.cpu.tiny_codi").get_config()
    config.teacher_workdir = "/no/such/teacher"
    config.nonfinite.max_param_norm_ratio = 0.0
    with pytest.raises(ValueError, match=r"^nonfinite\.max_param_norm_ratio=0\.0: .*use e\.g\. 2\.0\)\.$"):
        config_resolution.resolve(config)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_shipped_config_passes_the_range_checks(name: str) -> None:
    config = importlib.import_module(f"codi_jax.configs.{name}").get_config()
    config_checks.check_run_config(config_upgrade.upgraded(config))


def test_relative_init_from_is_resolved_to_an_absolute_path(tiny_sd_teacher, tmp_path, monkeypatch) -> None:
    """Orbax restores from absolute paths only: a relative ``adapter.init_from`` (as typed in the
    README's command) is made absolute at resolution, so it is checked and named in full."""
    from tests import tiny_sd

    config = importlib.import_module("codi_jax.configs.sd.sd15_sr4").get_config()
    config.teacher_workdir = tiny_sd_teacher
    config.data.image_size = tiny_sd.IMAGE_SIZE
    config.adapter.hint_channels = tiny_sd.HINT_CHANNELS
    config.adapter.init_from = "runs/no_controlnet"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"adapter.init_from={tmp_path}/runs/no_controlnet: "):
        config_resolution.resolve(config)


def test_absolute_paths_covers_every_path_field() -> None:
    """Each ``PATH_FIELDS`` value becomes absolute (``~`` expanded); empty and absent ones are kept."""
    config: dict = {}
    for field in config_upgrade.PATH_FIELDS:
        *sections, name = field.split(".")
        section = config
        for key in sections:
            section = section.setdefault(key, {})
        section[name] = f"rel/{field}"
    config["data"]["folder"] = "~/images"
    out = config_upgrade.absolute_paths(config)
    flat = config_diff.flat(out)
    assert all(os.path.isabs(flat[field]) for field in config_upgrade.PATH_FIELDS)
    assert flat["teacher_workdir"] == os.path.join(os.getcwd(), "rel", "teacher_workdir")
    assert flat["data.folder"] == os.path.join(os.path.expanduser("~"), "images")
    assert config["data"]["folder"] == "~/images"  # the input is left unchanged
    assert config_upgrade.absolute_paths({"teacher_workdir": "", "data": {}}) == {"teacher_workdir": "", "data": {}}


def test_relative_paths_are_absolute_after_resolution_from_any_cwd(tiny_sd_teacher, tmp_path, monkeypatch) -> None:
    """Every path field given relative to the working directory resolves to an absolute path to the
    same file, before anything loads; a run saved with the relative value resumes (the resume
    comparison sees both sides absolute) and a different folder is still refused."""
    from tests import tiny_sd

    cwd = tmp_path / "somewhere" / "else"
    (tmp_path / "images").mkdir()
    (tmp_path / "tfds").mkdir()
    controlnet = tmp_path / "controlnet"  # what adapter.init_from reads at resolution: adapter.json
    controlnet.mkdir()
    fields = dict(hint_channels=list(tiny_sd.HINT_CHANNELS), hint_downsamples=3, cond_channels=3, output="residuals")
    (controlnet / "adapter.json").write_text(json.dumps(fields))
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    components = os.path.join(tiny_sd_teacher, "components")
    targets = {
        "teacher_workdir": tiny_sd_teacher,
        "data.folder": str(tmp_path / "images"),
        "data.data_dir": str(tmp_path / "tfds"),
        "latent.vae": os.path.join(components, "vae"),
        "text.encoder": os.path.join(components, "text_encoder"),
        "text.tokenizer": os.path.join(components, "tokenizer"),
        "adapter.init_from": str(controlnet),
    }
    config = importlib.import_module("codi_jax.configs.sd.sd15_sr4").get_config()
    config.data.image_size = tiny_sd.IMAGE_SIZE
    config.adapter.hint_channels = tiny_sd.HINT_CHANNELS
    config.latent.vae = config.text.encoder = config.text.tokenizer = ""
    for field, target in targets.items():
        _with(config, field, os.path.relpath(target, cwd))
    assert not any(os.path.isabs(config_diff.flat(config.to_dict())[f]) for f in targets)
    resolved = config_resolution.resolve(config)
    values = config_diff.flat(resolved.to_dict())
    for field, target in targets.items():
        assert os.path.isabs(values[field]) and os.path.samefile(values[field], target), (field, values[field])

    from codi_jax.runs import checkpoint

    saved = config_diff.as_dict(resolved)
    saved["data"]["folder"] = os.path.relpath(targets["data.folder"], cwd)  # as saved before this change
    assert checkpoint.resume_differences(saved, resolved) == ([], [])
    saved["data"]["folder"] = "other_images"
    refused, _ = checkpoint.resume_differences(saved, resolved)
    assert [d.split(":")[0] for d in refused] == ["data.folder"]


def _write_images(folder: pathlib.Path, count: int = 3, size: int = 80) -> None:
    """Smooth random RGB photographs (PNG) larger than the tiny pipeline's 64 px."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(folder / f"{i}.png")


def _write_edit_triples(root: pathlib.Path) -> None:
    """InstructPix2Pix-format triples: ``NNNNNNN/prompt.json`` + ``<seed>_0.png`` (source) / ``_1.png`` (edited)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    for i, instruction in enumerate(("make it a painting of the sea", "turn the cat into a dog")):
        directory = root / f"{i:07d}"
        directory.mkdir(parents=True)
        (directory / "prompt.json").write_text(json.dumps({"input": "a photo", "edit": instruction, "output": "x"}))
        source = rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)
        Image.fromarray(source).save(directory / "5_0.png")
        Image.fromarray(255 - source).save(directory / "5_1.png")


# Shipped SD configs that are another shipped config with a few fields changed, mapped to (that
# config, the config whose values the changed fields take; None: only fields the training test below
# sets itself). Training those two trains these; the test after this table checks the mapping.
DERIVED_SD_CONFIGS = {
    "sd.sd21_sr4": ("sd.sd15_sr4", None),  # SD 2.1's batch size and 768 px; the model is the teacher's
    "sd.sdxl_depth": ("sd.sdxl_sr4", "sd.sd15_depth"),  # SDXL's sections with SD 1.5 depth's task and data
    "sd.sd3_depth": ("sd.sd3_sr4", "sd.sd15_depth"),  # SD3's sections with SD 1.5 depth's task and data
}
TRAINING_TEST_SETS = {"batch_size", "data.image_size"}


def _flat_config(name: str) -> dict:
    return config_diff.flat(importlib.import_module(f"codi_jax.configs.{name}").get_config().to_dict())


@pytest.mark.parametrize("name", sorted(DERIVED_SD_CONFIGS))
def test_derived_sd_config_changes_only_what_a_trained_config_has(name: str) -> None:
    base_name, source_name = DERIVED_SD_CONFIGS[name]
    config, base = _flat_config(name), _flat_config(base_name)
    changed = {f for f in set(config) | set(base) if config.get(f, "<absent>") != base.get(f, "<absent>")}
    assert changed, name
    if source_name is None:
        assert changed <= TRAINING_TEST_SETS, sorted(changed - TRAINING_TEST_SETS)
        return
    source = _flat_config(source_name)
    assert {f: config.get(f) for f in changed} == {f: source.get(f) for f in changed}
    assert {f: v for f, v in config.items() if f.startswith("task.")} == {
        f: v for f, v in source.items() if f.startswith("task.")
    }


# Shipped SD configs trained by another test as users run them (the same fields, sizes made tiny).
TRAINED_ELSEWHERE = {"sd.sd15_sr4": "tests/test_readme_commands.py (the README's train command)"}


def test_configs_trained_elsewhere_are_trained_there() -> None:
    """The README's Stable Diffusion section (run as written by tests/test_readme_commands.py)
    trains the configs ``TRAINED_ELSEWHERE`` names."""
    import re

    readme = (REPO / "README.md").read_text()
    start = readme.index("## Distil Stable Diffusion\n")
    end = readme.find("\n## ", start + 1)
    section = readme[start : end if end > 0 else len(readme)]  # as test_readme_commands.readme_section cuts it
    trained = re.findall(r"python -m codi_jax\.train --config=codi_jax/configs/sd/(\w+)\.py", section)
    assert set(TRAINED_ELSEWHERE) <= {f"sd.{name}" for name in trained}, trained


@pytest.mark.parametrize("name", [n for n in SD_CONFIGS if n not in DERIVED_SD_CONFIGS and n not in TRAINED_ELSEWHERE])
def test_sd_config_trains_as_shipped(name: str, request, tmp_path, caplog) -> None:
    """Each shipped SD config (a derived one through the configs it derives from) trains with only
    its paths filled in and the sizes made tiny (steps, batch, the tiny pipeline's image size, sample
    counts): no field of the method is overridden. About 15 s each with a warm XLA cache, 30-60 s
    cold (one train-step compile per task)."""
    import logging
    import math
    from unittest import mock

    import numpy as np
    import tensorflow_datasets as tfds

    from codi_jax.runs import checkpoint, pretrained
    from codi_jax.training import loop
    from tests import tiny_sd

    config = importlib.import_module(f"codi_jax.configs.{name}").get_config()
    config.teacher_workdir = _teacher_of(name, request)
    config.sharding.fsdp = 1  # SDXL's 8-device FSDP on this machine's devices
    data = contextlib.nullcontext()
    if config.data.source == "tfds":  # nyu_depth_v2: tfds' mock examples, as if prepared in data_dir
        config.data.data_dir = str(tmp_path / "tfds")
        prepared = mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True)
        data = contextlib.ExitStack()
        data.enter_context(tfds.testing.mock_data(num_examples=4))
        data.enter_context(prepared)
    elif config.data.source == "edit_triples":
        _write_edit_triples(tmp_path / "triples")
        config.data.folder = str(tmp_path / "triples")
    else:
        _write_images(tmp_path / "images")
        config.data.folder = str(tmp_path / "images")
    config.data.image_size = tiny_sd.IMAGE_SIZE
    config.update(batch_size=2, num_train_steps=2, log_every_steps=1, checkpoint_every_steps=2)
    config.update(num_sample_images=1, sample_step_counts=(1,))
    workdir = str(tmp_path / "run")
    caplog.set_level(logging.INFO)
    with data:
        state = loop.train_and_evaluate(config, workdir)
    assert int(state.step) == 2
    losses = [float(r.getMessage().split()[3]) for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses
    saved, step = pretrained.read_config(workdir)
    assert step == 2 and saved.method == config.method and saved.task.name == config.task.name
    assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).all_steps() == [2]
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state.params))
