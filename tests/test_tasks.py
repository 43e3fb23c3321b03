"""Tests for codi_jax.data.tasks (and degradations / procedural): the conditional tasks and their
integration into the input pipeline. CPU, small images, no network."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import tensorflow as tf
from ml_collections import ConfigDict
from PIL import Image
from test_data import NetworkBlocked, _block_network

from codi_jax.data import degradations, procedural, task_spec, tasks
from codi_jax.data.pipeline import build_dataset, numpy_iterator
from codi_jax.data.sources import default_data_config


def _photo(size: int) -> np.ndarray:
    """A real photograph (astronaut) at size x size, float32 in [-1, 1]."""
    rgb = Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.BICUBIC)
    return np.asarray(rgb, np.float32) / 127.5 - 1.0


def _photos(size: int = 32) -> np.ndarray:
    photo = _photo(size)
    return np.stack([photo, photo[::-1], photo[:, ::-1], np.ascontiguousarray(np.rot90(photo))])


def _task(name: str, **fields: object) -> ConfigDict:
    config = task_spec.default_task_config()
    config.name = name
    for key, value in fields.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    return config


# Tasks with their condition channels; the ones marked random draw from the seed. (Real-ESRGAN's
# contract is checked in its own test: its graph is the slowest to build.)
TASK_CASES = {
    "sr_bicubic": (_task("sr", scale=4), 3, False),
    "inpaint": (_task("inpaint"), 4, True),
    "edge_canny": (_task("edge"), 1, False),
    "edge_sobel": (_task("edge", edge_method="sobel"), 1, False),
    "depth_procedural": (_task("depth", depth_source="procedural"), 1, True),
    "edit": (_task("edit"), 3, True),
}


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("case", sorted(TASK_CASES))
def test_task_contract_and_determinism(case: str) -> None:
    config, channels, random = TASK_CASES[case]
    images = np.repeat(_photos(), 2, axis=0)  # Each photo twice: examples 2i and 2i + 1 differ in seed only.
    out = tasks.degrade_images(config, images, seed=0)
    assert task_spec.cond_channels(config) == channels
    assert out["image"].shape == images.shape and out["image"].dtype == np.float32
    assert out["cond"].shape == images.shape[:3] + (channels,) and out["cond"].dtype == np.float32
    for key in ("image", "cond"):
        assert np.isfinite(out[key]).all()
        assert -1.0 <= out[key].min() and out[key].max() <= 1.0, key
    assert out["cond"].std() > 0.05  # Not a constant.
    assert ("instruction" in out) == (config.name == "edit")
    pairs = [(out[key][0::2], out[key][1::2]) for key in ("image", "cond")]
    same_image_other_seed_differs = [not np.array_equal(*pair) for pair in pairs]
    assert random == any(same_image_other_seed_differs)
    again = tasks.degrade_images(config, images, seed=0)  # A new pipeline, the same seeds.
    for key in out:
        np.testing.assert_array_equal(out[key], again[key])


def test_none_task_and_counts() -> None:
    config = task_spec.default_task_config()
    assert config.name == "none" and task_spec.cond_channels(config) == 0 and task_spec.num_instructions(config) == 0
    example = {"image": tf.zeros([8, 8, 3])}
    assert tasks.apply_task(config, example, tf.constant([0, 0])) is example
    edit = _task("edit", num_instructions=3)
    assert task_spec.num_instructions(edit) == 3 and task_spec.instruction_names(edit) == task_spec.EDIT_NAMES[:3]
    names = task_spec.EDIT_NAMES
    assert len(names) >= 8 and task_spec.default_task_config().num_instructions == len(names)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "colorize"}, r"task.name='colorize'.*'sr'.*'inpaint'.*'edge'.*'depth'.*'edit'"),
        ({"name": "sr", "scale": 1}, r"task.scale=1"),
        ({"name": "sr", "degradation": "gan"}, r"task.degradation='gan'.*realesrgan"),
        (
            {"name": "sr", "degradation": "realesrgan", "realesrgan": {"resize_prob": (1.0, 1.0)}},
            r"realesrgan.resize_prob",
        ),
        (
            {"name": "sr", "degradation": "realesrgan", "realesrgan": {"jpeg_range": (30, 120)}},
            r"realesrgan.jpeg_range",
        ),
        ({"name": "sr", "degradation": "realesrgan", "realesrgan": {"sinc_prob": 1.5}}, r"realesrgan.sinc_prob=1.5"),
        ({"name": "sr", "degradation": "realesrgan", "realesrgan": {"resize_modes": ("nearest",)}}, r"resize_modes"),
        ({"name": "inpaint", "mask_kind": "blob"}, r"task.mask_kind='blob'.*freeform"),
        ({"name": "inpaint", "mask_area_range": (0.6, 0.2)}, r"task.mask_area_range"),
        ({"name": "inpaint", "stroke_max_count": 0}, r"task.stroke_max_count=0"),
        ({"name": "edge", "edge_method": "laplace"}, r"task.edge_method='laplace'"),
        ({"name": "edge", "edge_low_threshold": 0.5, "edge_high_threshold": 0.1}, r"task.edge_low_threshold"),
        ({"name": "depth", "depth_source": "midas"}, r"task.depth_source='midas'"),
        ({"name": "depth", "depth_source": "procedural", "procedural": {"depth_range": (3.0, 1.0)}}, r"depth_range"),
        ({"name": "edit", "num_instructions": 99}, r"task.num_instructions=99"),
    ],
)
def test_bad_options_name_the_field(fields: dict, message: str) -> None:
    config = _task(**fields)
    with pytest.raises(ValueError, match=message):
        task_spec.cond_channels(config)
    with pytest.raises(ValueError, match=message):
        tasks.degrade_images(config, _photos(16), seed=0)


def test_configs_restored_from_json_still_work() -> None:
    """Checkpoints store the config as JSON, which turns tuples into lists."""
    for name in task_spec.TASKS:
        config = _task(name, degradation="realesrgan", depth_source="procedural")
        restored = ConfigDict(json.loads(config.to_json()))
        assert isinstance(restored.mask_area_range, list)
        task_spec.check_task_config(restored)
        assert task_spec.cond_channels(restored) == task_spec.cond_channels(config)
    restored = ConfigDict(json.loads(_task("inpaint").to_json()))
    out = tasks.degrade_images(restored, _photos(16), seed=0)
    np.testing.assert_array_equal(out["cond"], tasks.degrade_images(_task("inpaint"), _photos(16), seed=0)["cond"])


def test_scale_must_divide_the_image_size() -> None:
    with pytest.raises(ValueError, match=r"task.scale=3 does not divide the image size 16"):
        tasks.degrade_images(_task("sr", scale=3), _photos(16), seed=0)


# --------------------------------------------------------------------------- sr


def _pil_resize(image: np.ndarray, size: int, method: int = Image.BICUBIC) -> np.ndarray:
    """PIL float resize, channel by channel (PIL's bicubic down-scaling is anti-aliased)."""
    channels = [np.asarray(Image.fromarray(image[..., c], "F").resize((size, size), method)) for c in range(3)]
    return np.stack(channels, -1)


@pytest.mark.parametrize("scale", [2, 4])
def test_sr_bicubic_equals_pil_down_and_up(scale: int) -> None:
    images = _photos(32)
    cond = tasks.degrade_images(_task("sr", scale=scale), images, seed=0)["cond"]
    for image, got in zip(images, cond, strict=True):
        expected = np.clip(_pil_resize(_pil_resize(image, 32 // scale), 32), -1.0, 1.0)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    # 'area': block means, then bicubic up.
    area = tasks.degrade_images(_task("sr", scale=scale, downsample="area"), images, seed=0)["cond"]
    blocks = images.reshape(4, 32 // scale, scale, 32 // scale, scale, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(area[0], np.clip(_pil_resize(blocks[0], 32), -1.0, 1.0), atol=1e-5)


def _all_stages_off() -> ConfigDict:
    config = task_spec.default_realesrgan_config()
    for field in ("blur_prob", "noise_prob", "jpeg_prob", "second_blur_prob", "noise_prob2", "jpeg_prob2"):
        config[field] = 0.0
    config.final_sinc_prob = 0.0
    config.resize_prob = (0.0, 0.0, 1.0)
    config.resize_prob2 = (0.0, 0.0, 1.0)
    config.resize_modes = ("bicubic",)
    return config


def _degrade(hr01: np.ndarray, config: ConfigDict, seed: int = 0, scale: int = 4) -> np.ndarray:
    run = tf.function(lambda image, s: degradations.realesrgan_degrade(image, s, config, scale))
    return run(tf.constant(hr01), tf.constant([seed, 7], tf.int64)).numpy()


def test_realesrgan_stages_off_is_a_plain_resize_and_each_stage_acts() -> None:
    hr01 = (_photo(32) + 1.0) / 2.0
    off = _all_stages_off()
    plain = tf.image.resize(hr01, [8, 8], method="bicubic", antialias=False).numpy()
    plain = np.round(np.clip(plain, 0.0, 1.0) * 255.0) / 255.0
    np.testing.assert_allclose(_degrade(hr01, off), plain, atol=1e-6)

    stages = {
        "blur_prob": 1.0,
        "noise_prob": 1.0,
        "jpeg_prob": 1.0,
        "second_blur_prob": 1.0,
        "noise_prob2": 1.0,
        "jpeg_prob2": 1.0,
        "final_sinc_prob": 1.0,
        "resize_prob": (0.0, 1.0, 0.0),
    }
    for field, value in stages.items():
        config = off.copy_and_resolve_references()
        config[field] = value
        degraded = _degrade(hr01, config)
        assert degraded.shape == (8, 8, 3) and np.isfinite(degraded).all()
        assert 0.0 <= degraded.min() and degraded.max() <= 1.0
        assert np.abs(degraded - plain).max() > 2.0 / 255.0, field


def test_realesrgan_contract_determinism_and_difference_from_bicubic() -> None:
    images = np.repeat(_photos(32), 2, axis=0)  # Examples 2i and 2i + 1 differ in seed only.
    config = _task("sr", scale=4, degradation="realesrgan")
    out = tasks.degrade_images(config, images, seed=0)
    cond = out["cond"]
    assert cond.shape == (8, 32, 32, 3) and cond.dtype == np.float32
    assert np.isfinite(cond).all() and -1.0 <= cond.min() and cond.max() <= 1.0
    np.testing.assert_array_equal(out["image"], images)  # The target stays clean.
    assert np.abs(cond[0::2] - cond[1::2]).mean(axis=(1, 2, 3)).min() > 0.01  # Seeds differ, so do LRs.
    bicubic = tasks.degrade_images(_task("sr", scale=4), images, seed=0)["cond"]
    assert np.abs(cond - bicubic).mean(axis=(1, 2, 3)).min() > 0.01
    again = tasks.degrade_images(config, images, seed=0)
    np.testing.assert_array_equal(again["cond"], cond)
    # Kernels are capped for tiny images (the pipeline test runs Real-ESRGAN on 16 px patches).
    assert degradations.kernel_size_choices(task_spec.default_realesrgan_config(), 16) == (7, 9, 11)


def test_jpeg_changes_the_image_more_at_low_quality() -> None:
    image = tf.constant((_photo(32) + 1.0) / 2.0)
    seed = tf.constant([0, 0])
    errors = [
        float(tf.reduce_mean(tf.abs(degradations.random_jpeg(image, seed, (quality, quality)) - image)))
        for quality in (10, 95)
    ]
    assert errors[0] > errors[1] > 1e-3


def test_random_kernels_are_normalised_and_shaped() -> None:
    for index, kind in enumerate(task_spec.KERNEL_TYPES):
        weights = [0.0] * len(task_spec.KERNEL_TYPES)
        weights[index] = 1.0
        kernel = degradations.random_mixed_kernel(
            tf.constant([index, 1]),
            size_choices=(7,),
            kernel_prob=weights,
            sigma_range=(0.5, 2.0),
            betag_range=(0.5, 4.0),
            betap_range=(1.0, 2.0),
            sinc_prob=0.0,
        ).numpy()
        assert kernel.shape == (7, 7) and abs(kernel.sum() - 1.0) < 1e-5 and kernel.min() >= 0, kind
        assert kernel[3, 3] == kernel.max(), kind  # Peak at the centre.
        if "iso" in kind and "aniso" not in kind:
            np.testing.assert_allclose(kernel, kernel.T, atol=1e-6)  # Isotropic: symmetric.
    sinc = degradations.sinc_kernel(21, tf.constant(11), tf.constant(np.pi / 4)).numpy()
    assert abs(sinc.sum() - 1.0) < 1e-5 and sinc.min() < 0  # Ringing lobes.
    assert not sinc[:5].any() and not sinc[:, -5:].any()  # Zero outside the drawn 11 x 11 size.


# --------------------------------------------------------------------------- inpaint


@pytest.mark.parametrize("kind", task_spec.MASK_KINDS)
def test_inpaint_cond_masks_exactly_and_area_is_in_range(kind: str) -> None:
    config = _task("inpaint", mask_kind=kind, mask_area_range=(0.1, 0.4))
    images = np.repeat(_photos(32), 16, axis=0)
    out = tasks.degrade_images(config, images, seed=0)
    cond = out["cond"]
    hole_channel = cond[..., 3]
    assert set(np.unique(hole_channel)) <= {-1.0, 1.0}
    hole = hole_channel > 0
    assert not cond[..., :3][hole].any()  # Missing pixels are exactly 0.
    np.testing.assert_array_equal(cond[..., :3][~hole], images[~hole])  # Known pixels untouched.
    np.testing.assert_array_equal(out["image"], images)
    ratios = hole.mean(axis=(1, 2))
    assert 0.1 <= ratios.mean() <= 0.4, ratios.mean()
    assert (ratios > 0).all() and (ratios < 0.9).all()
    assert len({mask.tobytes() for mask in hole}) == len(hole)  # Every example its own mask.


def test_box_masks_are_rectangles() -> None:
    boxes = tasks.box_masks(tf.constant([3, 4]), 32, _task("inpaint")).numpy()
    for box in boxes:
        rows, cols = np.nonzero(box)
        assert box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()


# --------------------------------------------------------------------------- edge


def test_canny_finds_a_vertical_step_and_nothing_else() -> None:
    step = -np.ones((16, 16, 3), np.float32)
    step[:, 8:] = 1.0  # Step between columns 7 and 8.
    flat = np.zeros_like(step)
    images = np.stack([step, np.ascontiguousarray(step.transpose(1, 0, 2)), flat])
    for sigma in (0.0, 1.0):
        edges = tasks.degrade_images(_task("edge", edge_sigma=sigma), images, seed=0)["cond"][..., 0] > 0
        rows, cols = np.nonzero(edges[0])
        assert set(cols) <= {7, 8}, (sigma, sorted(set(cols)))
        assert sorted(rows) == list(range(16))  # One pixel per row: thin and unbroken.
        np.testing.assert_array_equal(edges[1], edges[0].T)  # Transposed image, transposed edges.
        assert not edges[2].any()  # A flat image has none.
    # Sobel: a thicker band around the step, nothing far from it.
    sobel = tasks.degrade_images(_task("edge", edge_method="sobel"), images[:1], seed=0)["cond"][0, ..., 0] > 0
    band = sorted(set(np.nonzero(sobel)[1]))
    assert {7, 8} <= set(band) and min(band) >= 5 and max(band) <= 10


def test_canny_hysteresis_keeps_weak_edges_connected_to_strong_ones() -> None:
    # A step whose contrast fades along the rows: strong at the top, weak below.
    contrast = np.linspace(1.0, 0.15, 16, dtype=np.float32)[:, None]
    image = np.zeros((1, 16, 16, 3), np.float32)
    image[0, :, 8:] = contrast[..., None]
    image[0, :, :8] = -contrast[..., None]
    config = _task("edge", edge_sigma=0.0, edge_low_threshold=0.05, edge_high_threshold=0.4)
    edges = tasks.degrade_images(config, image, seed=0)["cond"][0, ..., 0] > 0
    # The step in gray is `contrast`, its unsmoothed Sobel magnitude ~contrast / 2 (0.5 .. 0.075): only
    # the top rows are strong by themselves, hysteresis follows the line down to the low threshold.
    assert edges.sum(axis=1).tolist() == [1] * 16
    no_hysteresis = _task("edge", edge_sigma=0.0, edge_low_threshold=0.4, edge_high_threshold=0.4)
    strong_only = tasks.degrade_images(no_hysteresis, image, seed=0)["cond"][0, ..., 0] > 0
    assert 0 < strong_only.sum() < 16


# --------------------------------------------------------------------------- depth


def test_depth_from_feature_is_the_normalised_feature() -> None:
    images = _photos(16)
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.5, 3.0, (4, 16, 16)).astype(np.float32)
    depth[3] = 2.0  # A constant map.
    for is_disparity in (True, False):
        config = _task("depth", depth_is_disparity=is_disparity)
        out = tasks.degrade_images(config, images, seed=0, depth=depth)
        low, high = depth.min(axis=(1, 2), keepdims=True), depth.max(axis=(1, 2), keepdims=True)
        nearness = (depth - low) if is_disparity else (high - depth)
        expected = np.where(high > low, nearness / np.maximum(high - low, 1e-12) * 2.0 - 1.0, 0.0)
        np.testing.assert_allclose(out["cond"][..., 0], expected, atol=1e-6)
        np.testing.assert_array_equal(out["image"], images)
    with pytest.raises(ValueError, match="depth"):
        tasks.degrade_images(_task("depth"), images, seed=0)


def _flat_texture() -> np.ndarray:
    """16 x 16 texture: red columns 0-4, green 5-10, blue 11-15 (in [-1, 1])."""
    texture = -np.ones((16, 16, 3), np.float32)
    texture[:, :5, 0] = texture[:, 5:11, 1] = texture[:, 11:, 2] = 1.0
    return texture


def _scene(**layers: list) -> dict:
    return {key: tf.constant(value, tf.int32 if key == "kind" else None) for key, value in layers.items()}


def test_procedural_nearer_boxes_occlude_farther_ones() -> None:
    red, green, blue = (2.5, 8.5), (7.5, 8.5), (13.5, 8.5)  # Texture pixel centres of each colour.
    u = (np.arange(16) + 0.5) / 16 * 2 - 1
    in_a, in_b = np.abs(u + 0.25) <= 0.5, np.abs(u - 0.25) <= 0.5  # Columns of box A / box B.
    in_rows = np.abs(u) <= 0.5
    for depth_a, depth_b in ((2.0, 3.0), (3.0, 2.0)):
        scene = _scene(
            kind=[procedural.PLANE, procedural.BOX, procedural.BOX],
            active=[True, True, True],
            center=[[0.0, 0.0], [-0.25, 0.0], [0.25, 0.0]],
            extent=[[1.0, 1.0], [0.5, 0.5], [0.5, 0.5]],
            depth=[4.0, depth_a, depth_b],
            slope=[[0.0, 0.0]] * 3,
            tex_offset=[blue, red, green],
            tex_scale=[0.0, 0.0, 0.0],  # Each layer one flat colour.
            light=[0.0, 0.0, -1.0],
        )
        image, depth = (t.numpy() for t in procedural.render_scene(tf.constant(_flat_texture()), scene, 16))
        # Expected z-buffer, written out: per pixel the nearest covering layer.
        layer_depth = np.full((3, 16, 16), np.inf)
        layer_depth[0] = 4.0
        layer_depth[1][np.ix_(in_rows, in_a)] = depth_a
        layer_depth[2][np.ix_(in_rows, in_b)] = depth_b
        colours = np.array([[-1, -1, 1], [1, -1, -1], [-1, 1, -1]], np.float32)
        np.testing.assert_allclose(depth, layer_depth.min(0), atol=1e-6)
        np.testing.assert_allclose(image, colours[layer_depth.argmin(0)], atol=1e-5)
        overlap = np.ix_(in_rows, in_a & in_b)
        assert (image[overlap] == (colours[1] if depth_a < depth_b else colours[2])).all()
        # The depth condition: nearest = +1, background = -1.
        cond = tasks.normalise_depth(depth, is_disparity=False).numpy()
        assert cond[overlap].min() == 1.0 and cond[0, 0] == -1.0


def test_procedural_sphere_depth_and_shading() -> None:
    scene = _scene(
        kind=[procedural.PLANE, procedural.SPHERE, procedural.BOX],
        active=[True, True, False],  # The inactive box must not show.
        center=[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
        extent=[[1.0, 1.0], [0.5, 0.5], [0.9, 0.9]],
        depth=[4.0, 2.0, 1.0],
        slope=[[0.0, 0.0]] * 3,
        tex_offset=[[8.0, 8.0]] * 3,
        tex_scale=[0.0, 0.0, 0.0],
        light=[0.0, 0.0, -1.0],
    )
    white = tf.ones([16, 16, 3])
    image, depth = (t.numpy() for t in procedural.render_scene(white, scene, 16, ambient=0.2))
    coords = (np.arange(16) + 0.5) / 16 * 2 - 1
    rho = np.hypot(*np.meshgrid(coords, coords, indexing="ij")) / 0.5
    on_sphere = rho < 1
    np.testing.assert_allclose(depth[on_sphere], 2.0 - 0.5 * np.sqrt(1 - rho[on_sphere] ** 2), atol=1e-5)
    np.testing.assert_allclose(depth[~on_sphere], 4.0)
    # Lambert with the light at the camera: brightness = ambient + (1 - ambient) * cos(normal, view).
    brightness = (image[..., 0] + 1) / 2
    np.testing.assert_allclose(brightness[on_sphere], 0.2 + 0.8 * np.sqrt(1 - rho[on_sphere] ** 2), atol=1e-5)
    np.testing.assert_allclose(brightness[~on_sphere], 1.0, atol=1e-6)


def test_procedural_task_renders_textured_scenes_with_exact_depth() -> None:
    images = np.repeat(_photos(32), 4, axis=0)
    out = tasks.degrade_images(_task("depth", depth_source="procedural"), images, seed=0)
    cond, rendered = out["cond"], out["image"]
    assert (cond.max(axis=(1, 2, 3)) == 1.0).all() and (cond.min(axis=(1, 2, 3)) == -1.0).all()
    assert not np.array_equal(rendered, images)
    # Photographic colours: rendered colours come from the input (shaded), not flat fills.
    assert rendered.std(axis=(1, 2)).mean() > 0.1
    scenes = procedural.sample_scene(tf.constant([0, 1]), task_spec.default_procedural_config(), 32)
    assert scenes["kind"].numpy()[0] == procedural.PLANE and scenes["active"].numpy()[0]
    assert (scenes["depth"].numpy()[0] > scenes["depth"].numpy()[1:]).all()  # Background is farthest.


# --------------------------------------------------------------------------- edit


def _numpy_edit(image: np.ndarray, name: str) -> np.ndarray:
    luma = np.array(tasks.LUMA_WEIGHTS, np.float32)
    tint = np.array([tasks.TINT_SHIFT, 0.0, -tasks.TINT_SHIFT], np.float32)
    if name == "flip_horizontal":
        return image[:, ::-1]
    if name == "grayscale":
        return np.repeat((image * luma).sum(-1, keepdims=True), 3, axis=-1)
    if name == "invert":
        return -image
    if name == "rotate_90":
        return np.rot90(image, 1, axes=(0, 1))
    if name in ("warm_tint", "cool_tint"):
        return np.clip(image + (tint if name == "warm_tint" else -tint), -1, 1)
    if name in ("brighten", "darken"):
        return np.clip(image + (tasks.BRIGHTNESS_SHIFT if name == "brighten" else -tasks.BRIGHTNESS_SHIFT), -1, 1)
    if name == "blur":
        taps = np.array(tasks.BLUR_TAPS, np.float32) / sum(tasks.BLUR_TAPS)
        padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), mode="reflect")
        size = image.shape[0]
        return sum(taps[dy] * taps[dx] * padded[dy : dy + size, dx : dx + size] for dy in range(5) for dx in range(5))
    if name == "posterize":
        levels = tasks.POSTERIZE_LEVELS
        return np.minimum(np.floor((image + 1) / 2 * levels), levels - 1) / (levels - 1) * 2 - 1
    raise AssertionError(name)


def test_each_edit_equals_numpy() -> None:
    image = _photo(16)
    for instruction, name in enumerate(task_spec.EDIT_NAMES):
        got = tasks.apply_edit(tf.constant(image), tf.constant(instruction)).numpy()
        np.testing.assert_allclose(got, _numpy_edit(image, name), atol=1e-5, err_msg=name)
        assert not np.allclose(got, image), name  # Every edit changes the image.


def test_edit_task_pairs_source_and_edited_image() -> None:
    images = np.repeat(_photos(16), 8, axis=0)
    out = tasks.degrade_images(_task("edit", num_instructions=4), images, seed=0)
    np.testing.assert_array_equal(out["cond"], images)
    assert out["instruction"].dtype == np.int32 and set(out["instruction"]) == {0, 1, 2, 3}
    for source, edited, instruction in zip(out["cond"], out["image"], out["instruction"], strict=True):
        np.testing.assert_allclose(edited, _numpy_edit(source, task_spec.EDIT_NAMES[instruction]), atol=1e-5)


# --------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def patches16(tmp_path_factory: pytest.TempPathFactory) -> ConfigDict:
    """A data config on skimage_patches/patches16, built offline into a temporary data_dir."""
    config = default_data_config()
    config.update(data_dir=str(tmp_path_factory.mktemp("tfds_tasks")), image_size=16, shuffle_buffer=64)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _block_network(monkeypatch)
        build_dataset(config, "test", 4, seed=0, train=False)  # Builds the dataset.
    return config


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    _block_network(monkeypatch)
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("example.com", 80))


PIPELINE_CASES = {
    "sr": (_task("sr", scale=2), 3),
    "sr_realesrgan": (_task("sr", scale=4, degradation="realesrgan"), 3),
    "inpaint": (_task("inpaint"), 4),
    "edge": (_task("edge"), 1),
    "depth": (_task("depth"), 1),
    "depth_procedural": (_task("depth", depth_source="procedural"), 1),
    "edit": (_task("edit"), 3),
}


@pytest.mark.parametrize("case", sorted(PIPELINE_CASES))
def test_build_dataset_with_task(case: str, patches16: ConfigDict, offline: None) -> None:
    task_config, channels = PIPELINE_CASES[case]
    train = build_dataset(patches16, "train", 8, seed=0, train=True, task_config=task_config)
    batch = next(numpy_iterator(train))
    assert batch["image"].shape == (8, 16, 16, 3) and batch["cond"].shape == (8, 16, 16, channels)
    assert batch["cond"].dtype == np.float32 and -1.0 <= batch["cond"].min() and batch["cond"].max() <= 1.0
    assert {"depth", "has_depth", "scale"} <= set(batch)  # The source's keys are kept.
    assert ("instruction" in batch) == (task_config.name == "edit")
    if case == "depth":
        assert batch["has_depth"].all()  # Examples without depth were filtered out.
        expected = tasks.normalise_depth(tf.constant(batch["depth"][0]), is_disparity=True).numpy()
        np.testing.assert_allclose(batch["cond"][0], expected, atol=1e-6)
    if case == "inpaint":  # The training stream with a random task is reproducible.
        again = build_dataset(patches16, "train", 8, seed=0, train=True, task_config=task_config)
        again = next(numpy_iterator(again))
        for key in batch:
            np.testing.assert_array_equal(batch[key], again[key])


def _real_examples(batches: list[dict]) -> dict[str, np.ndarray]:
    keep = np.concatenate([batch["mask"] for batch in batches])
    return {key: np.concatenate([batch[key] for batch in batches])[keep] for key in batches[0]}


def test_eval_conditions_are_fixed_across_runs_batch_sizes_and_processes(patches16: ConfigDict, offline: None) -> None:
    task_config = _task("inpaint")
    split = "test[:21]"

    def run(batch_size: int, **kwargs: int) -> list[dict]:
        ds = build_dataset(patches16, split, batch_size, seed=5, train=False, task_config=task_config, **kwargs)
        return list(numpy_iterator(ds))

    by_8, by_8_again, by_16 = run(8), run(8), run(16)
    assert len(by_8) == 3 and len(by_16) == 2
    for first, second in zip(by_8, by_8_again, strict=True):
        for key in first:
            np.testing.assert_array_equal(first[key], second[key])
    real_8, real_16 = _real_examples(by_8), _real_examples(by_16)
    assert len(real_8["cond"]) == 21
    for key in ("image", "cond"):
        np.testing.assert_array_equal(real_8[key], real_16[key])
    # Two processes: each example gets the same condition as in the single-process run.
    cond_of = {image.tobytes(): cond for image, cond in zip(real_8["image"], real_8["cond"], strict=True)}
    seen = 0
    for index in range(2):
        shard = _real_examples(run(8, process_index=index, process_count=2))
        for image, cond in zip(shard["image"], shard["cond"], strict=True):
            np.testing.assert_array_equal(cond, cond_of[image.tobytes()])
            seen += 1
    assert seen == 21
    # Another seed, other conditions.
    other = build_dataset(patches16, split, 8, seed=6, train=False, task_config=task_config)
    assert not np.array_equal(next(numpy_iterator(other))["cond"], by_8[0]["cond"])


def test_eval_padding_has_zero_cond_and_instruction(patches16: ConfigDict, offline: None) -> None:
    ds = build_dataset(patches16, "test[:10]", 8, seed=0, train=False, task_config=_task("edit"))
    batches = list(numpy_iterator(ds))
    assert len(batches) == 2
    last = batches[1]
    assert last["mask"].sum() == 2
    padding = ~last["mask"]
    assert last["cond"].shape == (8, 16, 16, 3) and not last["cond"][padding].any()
    assert last["instruction"].dtype == np.int32 and not last["instruction"][padding].any()
    assert not last["image"][padding].any()
    # The edit is applied to the real examples: image = edit(cond).
    real = _real_examples(batches)
    for source, edited, instruction in zip(real["cond"], real["image"], real["instruction"], strict=True):
        np.testing.assert_allclose(edited, _numpy_edit(source, task_spec.EDIT_NAMES[instruction]), atol=1e-5)


def test_pipeline_without_task_is_unchanged_and_errors_name_the_problem(patches16: ConfigDict, tmp_path: Path) -> None:
    plain = next(numpy_iterator(build_dataset(patches16, "test", 4, seed=0, train=False)))
    none = next(numpy_iterator(build_dataset(patches16, "test", 4, seed=0, train=False, task_config=_task("none"))))
    assert set(plain) == set(none) and "cond" not in none
    for key in plain:
        np.testing.assert_array_equal(plain[key], none[key])
    with pytest.raises(ValueError, match=r"task.name='colorize'"):
        build_dataset(patches16, "train", 4, seed=0, train=True, task_config=_task("colorize"))
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "noise.png")
    folder = default_data_config()
    folder.update(source="folder", folder=str(tmp_path), image_size=16)
    with pytest.raises(ValueError, match=r"depth_source='feature'.*folder"):
        build_dataset(folder, "train", 2, seed=0, train=True, task_config=_task("depth"))
    # A folder works with the procedural depth stand-in.
    procedural_depth = _task("depth", depth_source="procedural")
    batch = next(numpy_iterator(build_dataset(folder, "x", 2, seed=0, train=False, task_config=procedural_depth)))
    assert batch["cond"].shape == (2, 16, 16, 1) and batch["mask"].tolist() == [True, False]
    assert batch["cond"][0].max() == 1.0 and not batch["cond"][1].any()
