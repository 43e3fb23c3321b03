"""Tests for codi_jax.data: the offline skimage_patches builder and the input pipelines."""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import jax
import numpy as np
import pytest
import skimage.data
import tensorflow as tf
import tensorflow_datasets as tfds
from ml_collections import ConfigDict
from PIL import Image

from codi_jax.data import pipeline, skimage_patches
from codi_jax.data.pipeline import build_dataset, numpy_iterator, to_global_batch
from codi_jax.data.sources import default_data_config


class NetworkBlocked(RuntimeError):
    pass


def _block_network(monkeypatch: pytest.MonkeyPatch) -> list:
    """Makes every connection attempt raise; returns the list of attempts (in case a library
    swallows the exception)."""
    attempts: list = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise NetworkBlocked(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.fixture(scope="module")
def offline_build(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Builds skimage_patches/patches32 from scratch, through the pipeline, with no network."""
    data_dir = tmp_path_factory.mktemp("tfds_offline")
    config = default_data_config()
    config.data_dir = str(data_dir)
    with pytest.MonkeyPatch.context() as monkeypatch:
        attempts = _block_network(monkeypatch)
        with pytest.raises(NetworkBlocked):  # The block is real, so the build below is offline.
            socket.create_connection(("example.com", 80))
        attempts.clear()
        start = time.perf_counter()
        ds = build_dataset(config, "test", 8, seed=0, train=False)
        first = next(numpy_iterator(ds))
        seconds = time.perf_counter() - start
    return {
        "data_dir": str(data_dir),
        "config": config,
        "seconds": seconds,
        "first": first,
        "network_attempts": list(attempts),
    }


@pytest.fixture()
def data_config(offline_build: dict) -> ConfigDict:
    config = offline_build["config"].copy_and_resolve_references()
    config.shuffle_buffer = 512  # Filling the default 10k buffer would dominate test time.
    return config


def _builder(data_dir: str, size: int = 32) -> tfds.core.DatasetBuilder:
    return skimage_patches.SkimagePatches(config=f"patches{size}", data_dir=data_dir)


def _records(builder: tfds.core.DatasetBuilder, split: str) -> Iterator[dict]:
    """Every example of a split with `source` as str; the PNGs and zlib depth maps stay encoded."""
    skip = {"image": tfds.decode.SkipDecoding(), "depth": tfds.decode.SkipDecoding()}
    source = builder.as_data_source(split=split, decoders=skip)
    for index in range(len(source)):
        example = dict(source[index])
        example["source"] = example["source"].decode()
        yield example


# --------------------------------------------------------------------------- builder


def test_builds_offline_and_fast(offline_build: dict) -> None:
    builder = _builder(offline_build["data_dir"])
    assert builder.is_prepared()
    assert offline_build["network_attempts"] == []
    assert offline_build["seconds"] < 60, offline_build["seconds"]
    splits = builder.info.splits
    assert splits["train"].num_examples > 9_000
    assert splits["test"].num_examples > 1_000
    # No (photo, scale) contributes more than the cap: large photos do not dominate.
    counts: dict = {}
    for example in _records(builder, "train"):
        key = (example["source"], example["scale"])
        counts[key] = counts.get(key, 0) + 1
    assert max(counts.values()) == skimage_patches.MAX_PATCHES_PER_SCALE
    assert len({source for source, _ in counts}) == len(skimage_patches.TRAIN_PHOTOS)


def test_patch_shapes_and_dtypes(offline_build: dict) -> None:
    builder = _builder(offline_build["data_dir"])
    example = builder.as_data_source(split="train")[0]  # ArrayRecord: random access.
    assert example["image"].shape == (32, 32, 3)
    assert example["image"].dtype == np.uint8
    assert example["depth"].shape == (32, 32, 1)
    assert example["depth"].dtype == np.float32
    assert isinstance(example["scale"], int | np.integer)
    assert isinstance(example["has_depth"], bool | np.bool_)
    assert example["image"].std() >= skimage_patches.MIN_PATCH_STD  # Flat patches are dropped.


def test_split_is_disjoint_by_source(offline_build: dict) -> None:
    builder = _builder(offline_build["data_dir"])
    sources = {split: {example["source"] for example in _records(builder, split)} for split in ("train", "test")}
    assert sources["test"] == set(skimage_patches.TEST_PHOTOS) == {"chelsea", "coffee"}
    assert sources["train"] == set(skimage_patches.TRAIN_PHOTOS)
    assert not sources["train"] & sources["test"]


def test_patches_are_multiscale_deterministic_and_carry_depth() -> None:
    first = list(skimage_patches.iter_patches("motorcycle", 64))
    second = list(skimage_patches.iter_patches("motorcycle", 64))
    assert [key for key, _ in first] == [key for key, _ in second]
    assert first[7][1]["image"] == second[7][1]["image"]  # Same PNG bytes.
    # The PNG holds exactly the photo's pixels at the position named by the key.
    key, example = next((k, e) for k, e in first if k.startswith("motorcycle/x1/"))
    top, left = (int(v) for v in key.rsplit("/", 1)[1].split("_"))
    photo = skimage.data.stereo_motorcycle()[0]
    decoded = np.asarray(Image.open(io.BytesIO(example["image"])))
    np.testing.assert_array_equal(decoded, photo[top : top + 64, left : left + 64])
    assert {example["scale"] for _, example in first} == {1, 2}  # 500 px: x1, x2 (250 >= 128).
    depths = np.stack([example["depth"] for _, example in first])
    assert all(example["has_depth"] for _, example in first)
    assert depths.shape[1:] == (64, 64, 1)
    assert 0.0 <= depths.min() and depths.max() <= 1.0 and depths.max() > 0.5
    others = list(skimage_patches.iter_patches("chelsea", 64))
    assert not any(example["has_depth"] for _, example in others)
    assert all(not example["depth"].any() for _, example in others)


def test_patches64_builds(tmp_path: Path) -> None:
    builder = _builder(str(tmp_path), 64)
    builder.download_and_prepare(file_format=skimage_patches.FILE_FORMAT, download_config=skimage_patches.OFFLINE)
    example = builder.as_data_source(split="test")[0]
    assert example["image"].shape == (64, 64, 3) and example["image"].dtype == np.uint8
    assert builder.info.splits["test"].num_examples > 200


# --------------------------------------------------------------------------- pipeline


def _first_batch(config: ConfigDict, seed: int, batch_size: int = 16) -> dict:
    return next(numpy_iterator(build_dataset(config, "train", batch_size, seed=seed, train=True)))


def test_train_batches_range_layout_and_determinism(data_config: ConfigDict) -> None:
    batch_a = _first_batch(data_config, seed=0)
    batch_b = _first_batch(data_config, seed=0)
    batch_c = _first_batch(data_config, seed=1)
    image = batch_a["image"]
    assert image.shape == (16, 32, 32, 3) and image.dtype == np.float32
    assert -1.0 <= image.min() < -0.5 and 0.5 < image.max() <= 1.0
    assert set(batch_a) >= {"image", "depth", "has_depth"}
    assert "source" not in batch_a and "mask" not in batch_a
    for key in batch_a:
        np.testing.assert_array_equal(batch_a[key], batch_b[key])
    assert not np.array_equal(batch_a["image"], batch_c["image"])


def _batches(config: ConfigDict, split: str, count: int, start: int = 0, **kwargs) -> list[dict]:
    stream = numpy_iterator(build_dataset(config, split, 8, seed=3, train=True, start_batch=start, **kwargs))
    return [next(stream) for _ in range(count)]


def test_training_stream_resumes_at_any_batch_and_epochs_are_permutations(data_config: ConfigDict) -> None:
    data_config.random_flip = False  # Patches are stored at their size: examples are the records.
    split = "train[:20]"  # 2.5 batches of 8 per epoch: batches straddle epochs.
    uninterrupted = _batches(data_config, split, 7)
    for start in (1, 2, 5):
        for offset, batch in enumerate(_batches(data_config, split, 7 - start, start=start)):
            for key in batch:
                np.testing.assert_array_equal(batch[key], uninterrupted[start + offset][key])
    stream = np.concatenate([batch["image"] for batch in uninterrupted])
    records = list(numpy_iterator(build_dataset(data_config, split, 20, seed=0, train=False)))[0]["image"]
    epochs = [stream[20 * e : 20 * (e + 1)] for e in range(2)]
    for epoch in epochs:  # Every record exactly once per epoch.
        assert sorted(x.tobytes() for x in epoch) == sorted(x.tobytes() for x in records)
    assert not np.array_equal(epochs[0], epochs[1])  # A fresh order each epoch.


def test_color_augment_recolours_a_share_and_keeps_geometry(data_config: ConfigDict) -> None:
    """Recoloured examples are grey (ITU-R 601 luma of the original, by NumPy) or keep each pixel's
    HSV value max(R, G, B) (hue rotation and saturation scaling do not change it); crops / flips and
    the other examples are the stream without the option."""
    split = "train[:64]"
    plain_config = data_config.copy_and_resolve_references()
    del plain_config.color_augment  # configs saved before the field: the same stream as 0
    plain = np.concatenate([b["image"] for b in _batches(plain_config, split, 8)])
    data_config.color_augment = 0.0
    off = np.concatenate([b["image"] for b in _batches(data_config, split, 8)])
    np.testing.assert_array_equal(off, plain)
    data_config.color_augment = 1.0
    on = (np.concatenate([b["image"] for b in _batches(data_config, split, 8)]) + 1) / 2
    original = (plain + 1) / 2
    luma = original @ np.array([0.2989, 0.5870, 0.1140], np.float32)
    grey = np.ptp(on, axis=-1).max(axis=(1, 2)) < 1e-6
    assert 4 <= grey.sum() <= 32, grey.sum()  # GREY_SHARE = 1/4 of 64
    np.testing.assert_allclose(on[grey][..., 0], luma[grey], atol=2e-3)  # uint8 rounding in TF's op
    np.testing.assert_allclose(on[~grey].max(-1), original[~grey].max(-1), atol=1e-5)
    mean_shift = np.abs(on[~grey].mean((1, 2)) - original[~grey].mean((1, 2))).max(-1)
    assert np.median(mean_shift) > 0.02, mean_shift  # the colours did change
    data_config.color_augment = 0.5
    half = np.concatenate([b["image"] for b in _batches(data_config, split, 8)])
    changed = np.any(half != plain, axis=(1, 2, 3))
    assert 16 <= changed.sum() <= 48, changed.sum()
    data_config.color_augment = 1.5
    with pytest.raises(ValueError, match="color_augment=1.5 must be a share in"):
        build_dataset(data_config, split, 8, seed=0, train=True)


def test_resumed_stream_reads_only_what_it_yields(tmp_path: Path) -> None:
    """Starting at batch 1000 decodes about one batch of files, not the 8,000 examples before it."""
    for index in range(5):
        Image.fromarray(np.full((8, 8, 3), 40 * index, np.uint8)).save(tmp_path / f"{index}.png")
    config = _folder_config(tmp_path)
    config.update(image_size=8)
    reads = []
    real_load = pipeline.load_image_rgb

    def counting_load(path: str) -> np.ndarray:
        reads.append(path)
        return real_load(path)

    with mock.patch.object(pipeline, "load_image_rgb", counting_load):
        resumed = _batches(config, "train", 1, start=1000)[0]
        assert len(reads) < 8 * 50, len(reads)  # Prefetching reads a few batches ahead, no more.
        reads.clear()
        replayed = _batches(config, "train", 1001)[-1]
    assert len(reads) >= 8 * 1001
    for key in resumed:
        np.testing.assert_array_equal(resumed[key], replayed[key])


def test_tfrecord_tfds_dataset_replays_to_the_resumed_batch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No random access in TFRecord files: the same batches, by skipping, with a warning."""
    _builder(str(tmp_path), 64).download_and_prepare(file_format="tfrecord", download_config=skimage_patches.OFFLINE)
    config = default_data_config()
    config.update(source="tfds", tfds_name="skimage_patches/patches64", data_dir=str(tmp_path), image_size=64)
    config.shuffle_buffer = 64
    uninterrupted = [next(numpy_iterator(build_dataset(config, "train", 4, seed=0, train=True).skip(3)))]
    with caplog.at_level("WARNING"):
        resumed = next(numpy_iterator(build_dataset(config, "train", 4, seed=0, train=True, start_batch=3)))
    for key in resumed:
        np.testing.assert_array_equal(resumed[key], uninterrupted[0][key])
    assert "file_format=array_record" in caplog.text


def test_training_shards_of_two_processes_are_disjoint_per_epoch(tmp_path: Path) -> None:
    for index in range(6):
        Image.fromarray(np.full((8, 8, 3), 40 * index, np.uint8)).save(tmp_path / f"{index}.png")
    config = _folder_config(tmp_path)
    config.update(image_size=8, random_flip=False)
    shards = []
    for process in range(2):
        stream = numpy_iterator(
            build_dataset(config, "train", 6, seed=0, train=True, process_index=process, process_count=2, start_batch=4)
        )
        shards.append({float(image.mean()) for image in next(stream)["image"]})
    assert len(shards[0]) == len(shards[1]) == 3 and not shards[0] & shards[1]


def test_eval_pass_is_deterministic_padded_and_finite(data_config: ConfigDict, offline_build: dict) -> None:
    num_test = _builder(offline_build["data_dir"]).info.splits["test"].num_examples
    runs = []
    for _ in range(2):
        batches = list(numpy_iterator(build_dataset(data_config, "test", 256, seed=0, train=False)))
        runs.append(batches)
    assert len(runs[0]) == -(-num_test // 256)  # ceil: no example dropped.
    for first, second in zip(runs[0], runs[1], strict=True):
        np.testing.assert_array_equal(first["image"], second["image"])
    masks = np.concatenate([batch["mask"] for batch in runs[0]])
    images = np.concatenate([batch["image"] for batch in runs[0]])
    assert masks.sum() == num_test and masks[:num_test].all()
    assert np.isfinite(images).all()
    assert not images[~masks].any()  # Padding is zeros.
    # Eval is not augmented: the first batch equals the one the offline build produced.
    np.testing.assert_array_equal(images[:8], offline_build["first"]["image"])


def test_eval_sharded_over_processes_covers_split_once(data_config: ConfigDict) -> None:
    split = "test[:301]"  # A sub-split: 301 examples, not a multiple of the batch.
    per_process = []
    for index in range(2):
        ds = build_dataset(data_config, split, 64, seed=0, train=False, process_index=index, process_count=2)
        per_process.append(list(numpy_iterator(ds)))
    assert len(per_process[0]) == len(per_process[1]) == 5  # Same number of steps everywhere.
    assert per_process[0][0]["image"].shape[0] == 32  # Local batch.
    single = list(numpy_iterator(build_dataset(data_config, split, 64, seed=0, train=False)))

    def real_images(batches: list[dict]) -> set[bytes]:
        return {
            image.tobytes()
            for batch in batches
            for image, keep in zip(batch["image"], batch["mask"], strict=True)
            if keep
        }

    shards = [real_images(batches) for batches in per_process]
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == real_images(single)
    assert len(real_images(single)) == 301


def test_tfds_source_reads_prepared_dataset_by_name(data_config: ConfigDict) -> None:
    data_config.source = "tfds"
    data_config.tfds_name = "skimage_patches/patches32"
    by_name = next(numpy_iterator(build_dataset(data_config, "test", 8, seed=0, train=False)))
    data_config.source = "skimage_patches"
    direct = next(numpy_iterator(build_dataset(data_config, "test", 8, seed=0, train=False)))
    np.testing.assert_array_equal(by_name["image"], direct["image"])
    np.testing.assert_array_equal(by_name["depth"], direct["depth"])


def test_tfds_source_never_downloads(tmp_path: Path) -> None:
    config = default_data_config()
    config.update(source="tfds", tfds_name="div2k/bicubic_x4", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"div2k/bicubic_x4.*tfds build"):
        build_dataset(config, "train", 4, seed=0, train=True)


def test_tfds_source_mocked_div2k_and_nyu_depth(tmp_path: Path) -> None:
    config = default_data_config()
    config.update(source="tfds", data_dir=str(tmp_path), image_size=16)
    prepared = mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True)
    with tfds.testing.mock_data(num_examples=5), prepared:
        config.update(tfds_name="div2k/bicubic_x4", image_key="hr")
        train = _first_batch(config, seed=0, batch_size=4)
        assert train["image"].shape == (4, 16, 16, 3)
        assert -1.0 <= train["image"].min() and train["image"].max() <= 1.0
        batches = list(numpy_iterator(build_dataset(config, "validation", 4, seed=0, train=False)))
        assert [batch["mask"].sum() for batch in batches] == [4, 1]

        config.update(tfds_name="nyu_depth_v2", image_key="image", random_crop=True)
        train = _first_batch(config, seed=0, batch_size=2)
        assert train["image"].shape == (2, 16, 16, 3)
        assert train["depth"].shape == (2, 16, 16, 1) and train["has_depth"].all()


def test_unknown_source_and_bad_size(data_config: ConfigDict) -> None:
    data_config.source = "webdataset"
    with pytest.raises(ValueError, match="skimage_patches.*tfds.*folder"):
        build_dataset(data_config, "train", 4, seed=0, train=True)
    data_config.update(source="tfds", tfds_name="no_such_dataset_xyz")
    with pytest.raises(ValueError, match="tfds_name='no_such_dataset_xyz'"):
        build_dataset(data_config, "train", 4, seed=0, train=True)
    data_config.source = "skimage_patches"
    data_config.image_size = 48
    with pytest.raises(ValueError, match="patches48"):
        build_dataset(data_config, "train", 4, seed=0, train=True)


# --------------------------------------------------------------------------- folder source


def _write_images(folder: Path) -> list[Path]:
    """Solid-colour images in several modes/formats; returns them in sorted-path order."""
    (folder / "sub").mkdir(parents=True)
    paths = [
        folder / "a_rgb.png",
        folder / "b_gray.png",
        folder / "c_transparent.png",
        folder / "sub" / "d_photo.jpg",
    ]
    Image.new("RGB", (40, 24), (255, 0, 0)).save(paths[0])
    Image.new("L", (24, 30), 0).save(paths[1])
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(paths[2])  # Fully transparent black.
    Image.new("RGB", (64, 48), (0, 0, 255)).save(paths[3], quality=95)
    (folder / "notes.txt").write_text("not an image")
    return paths


def _folder_config(folder: Path) -> ConfigDict:
    config = default_data_config()
    config.update(source="folder", folder=str(folder), image_size=16)
    return config


def test_folder_source_converts_modes(tmp_path: Path) -> None:
    _write_images(tmp_path)
    config = _folder_config(tmp_path)
    (batch,) = list(numpy_iterator(build_dataset(config, "unused", 4, seed=0, train=False)))
    images = batch["image"]
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.float32 and batch["mask"].all()
    np.testing.assert_allclose(images[0].reshape(-1, 3).mean(0), [1, -1, -1], atol=1e-5)
    np.testing.assert_allclose(images[1], -1.0, atol=1e-5)  # Gray 0 -> black RGB.
    np.testing.assert_allclose(images[2], 1.0, atol=1e-5)  # Transparent over white.
    np.testing.assert_allclose(images[3].reshape(-1, 3).mean(0), [-1, -1, 1], atol=0.05)

    train = _first_batch(config, seed=3, batch_size=4)
    assert train["image"].shape == (4, 16, 16, 3)
    again = _first_batch(config, seed=3, batch_size=4)
    np.testing.assert_array_equal(train["image"], again["image"])


def test_folder_random_flip_and_crop(tmp_path: Path) -> None:
    # Left half black, right half white: a flip is visible, a 16-px crop of 32 px is too.
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, 32:] = 255
    Image.fromarray(pixels).save(tmp_path / "half.png")
    config = _folder_config(tmp_path)
    config.update(image_size=32)

    flipped = _first_batch(config, seed=0, batch_size=16)["image"]
    left_is_dark = flipped[:, :, 0, 0].mean(axis=1) < 0
    assert left_is_dark.any() and not left_is_dark.all()

    config.random_flip = False
    plain = _first_batch(config, seed=0, batch_size=16)["image"]
    assert (plain[:, :, 0, 0] < 0).all()

    config.update(random_crop=True, image_size=16)
    crops = _first_batch(config, seed=0, batch_size=16)["image"]
    assert len({crop.tobytes() for crop in crops}) > 1  # Different random offsets.


@pytest.mark.parametrize("shape", [(40, 24, 3), (33, 70, 4), (16, 16, 7)])
def test_crop_offsets_and_flip_are_tensorflows(shape: tuple) -> None:
    """Our crop offset / flip (which the micro-conditioning reads) are TF's stateless ops, so the
    training stream is the one it always was."""
    image = tf.random.stateless_uniform(shape, [1, 2])
    for seed in ([0, 0], [3, 7], [123, 456], [-5, 2**30]):
        seed = tf.constant(seed, tf.int64)
        top, left = pipeline._random_offset(image, 16, seed).numpy()
        expected = tf.image.stateless_random_crop(image, [16, 16, shape[2]], seed)
        np.testing.assert_array_equal(image[top : top + 16, left : left + 16], expected)
        flipped, _ = pipeline._random_flip(image, seed)
        np.testing.assert_array_equal(flipped, tf.image.stateless_random_flip_left_right(image, seed))


def test_micro_conditioning_names_the_real_crop(tmp_path: Path) -> None:
    """Each example's (original size, crop top-left, target size) describe its pixels: the image is
    the crop at the recorded (top, left) of the resized original, flipped first where it was
    flipped (diffusers' SDXL scripts flip, then crop)."""
    rng = np.random.default_rng(0)
    sizes = [(40, 24), (24, 64), (50, 50)]  # (height, width)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(tmp_path / f"{i}.png")
    config = _folder_config(tmp_path)
    config.update(random_crop=True, image_size=16)
    batch = next(numpy_iterator(build_dataset(config, "train", 24, seed=1, train=True, micro_conditioning=True)))
    assert batch["micro_cond"].shape == (24, 6) and batch["micro_cond"].dtype == np.float32
    flips = set()
    for image, ids in zip(batch["image"], batch["micro_cond"].astype(int)):
        (h, w), (top, left), target = ids[:2], ids[2:4], ids[4:]
        assert (h, w) in sizes and tuple(target) == (16, 16)
        original = np.asarray(Image.open(tmp_path / f"{sizes.index((h, w))}.png"), np.float32) / 255.0
        resized = pipeline._resize_shorter_side(tf.constant(original), 16, only_up=True).numpy()
        assert 0 <= top <= resized.shape[0] - 16 and 0 <= left <= resized.shape[1] - 16
        matches = [
            np.abs(view[top : top + 16, left : left + 16] * 2 - 1 - image).max() < 1e-6
            for view in (resized, resized[:, ::-1])
        ]
        assert any(matches)
        flips.add(matches.index(True))
    assert flips == {0, 1}
    plain = next(numpy_iterator(build_dataset(config, "train", 24, seed=1, train=True)))
    assert "micro_cond" not in plain
    np.testing.assert_array_equal(plain["image"], batch["image"])


def test_folder_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing_dir"
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        build_dataset(_folder_config(missing), "train", 2, seed=0, train=True)

    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="empty_dir"):
        build_dataset(_folder_config(empty), "train", 2, seed=0, train=True)

    garbage = tmp_path / "garbage"
    _write_images(garbage)
    (garbage / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match="broken.png"):
        build_dataset(_folder_config(garbage), "train", 2, seed=0, train=True)

    # A valid header with truncated pixel data passes the up-front check; decoding names it.
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(truncated / "cut.png")
    data = (truncated / "cut.png").read_bytes()
    (truncated / "cut.png").write_bytes(data[: len(data) // 2])
    ds = build_dataset(_folder_config(truncated), "train", 1, seed=0, train=False)
    with pytest.raises(tf.errors.OpError, match="cut.png"):
        next(numpy_iterator(ds))


# --------------------------------------------------------------------------- global batch


def test_to_global_batch_on_cpu_mesh() -> None:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    local = {
        "image": np.arange(4 * 2 * 2 * 3, dtype=np.float32).reshape(4, 2, 2, 3),
        "mask": np.array([True, True, False, True]),
    }
    global_batch = to_global_batch(local, sharding)
    assert set(global_batch) == {"image", "mask"}
    for key, array in global_batch.items():
        assert isinstance(array, jax.Array)
        assert array.shape == local[key].shape  # One process: global == local.
        assert array.sharding == sharding
        np.testing.assert_array_equal(np.asarray(array), local[key])
