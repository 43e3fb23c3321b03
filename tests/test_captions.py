"""Captions as per-example prompts: an image folder's ``metadata.jsonl`` or ``.txt`` sidecars, a
tfds dataset's string feature, tokenised in the input pipeline into ``prompt_ids`` (equal to
transformers' ``CLIPTokenizer`` on the same folder), dropped to the empty prompt with
``text.drop_prob`` as a function of the seed and the stream position (resume stays exact), the
refusals in one line each, and a tiny latent text run that trains on a captioned folder with the
frozen CLIP's encoding of each example's own caption."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from codi_jax.data import captions, pipeline, sources
from codi_jax.runs import config_resolution, config_upgrade
from tests import tiny_sd

transformers = pytest.importorskip("transformers")

# One colour per image, so a training example's caption can be checked against its pixels.
IMAGES = {
    "red.png": ((255, 0, 0), "a photo of a cat"),
    "green.png": ((0, 255, 0), "the sea at sunset, highly detailed"),
    "sub/blue.png": ((0, 0, 255), "café naïve résumé"),
    "white.png": ((255, 255, 255), ""),  # an empty caption is a caption
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    """A tiny CLIP tokenizer folder (tests/tiny_sd.py's BPE), as a pipeline's ``tokenizer/``."""
    directory = str(tmp_path_factory.mktemp("tokenizer"))
    vocab_file, merges_file, _ = tiny_sd.write_bpe_files(os.path.join(directory, "_bpe"))
    tok = transformers.CLIPTokenizer(vocab_file, merges_file, pad_token="<|endoftext|>", model_max_length=16)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenize(tokenizer_dir: str):
    """Our tokenizer (codi_jax.models.clip_tokenizer), as a run's ``tokenizer_of`` gives it."""
    from codi_jax.models.clip_tokenizer import load_clip_tokenizer

    tok = load_clip_tokenizer(tokenizer_dir)
    return lambda text: tok([text]).input_ids[0]


def _reference_ids(tokenizer_dir: str, texts: list[str]) -> np.ndarray:
    """transformers' tokenisation, padded as SD pipelines pad."""
    tok = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    return np.asarray(tok(texts, padding="max_length", max_length=16, truncation=True).input_ids)


def _write_folder(root: Path, *, size: int = 20) -> Path:
    for name, (colour, _) in IMAGES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size + 4, size), colour).save(root / name)
    return root


def _write_metadata(root: Path, lines: list[str] | None = None, key: str = "text") -> None:
    if lines is None:
        lines = [json.dumps({"file_name": name, key: text}) for name, (_, text) in IMAGES.items()]
    (root / captions.METADATA).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_sidecars(root: Path, suffix: str = "") -> None:
    for name, (_, text) in IMAGES.items():
        (root / name).with_suffix(".txt").write_text(f"  {text}{suffix}\n", encoding="utf-8")


def _config(folder: Path, **fields) -> ml_collections.ConfigDict:
    config = sources.default_data_config()
    config.update(source="folder", folder=str(folder), image_size=8, **fields)
    return config


def _eval_batch(config, tokenize) -> dict:
    ds = pipeline.build_dataset(config, "unused", len(IMAGES), seed=0, train=False, tokenize=tokenize)
    return next(pipeline.numpy_iterator(ds))


def test_metadata_captions_are_tokenised_as_transformers_does(tmp_path, tokenizer_dir, tokenize) -> None:
    root = _write_folder(tmp_path / "images")
    _write_metadata(root)
    batch = _eval_batch(_config(root), tokenize)
    order = sorted(str(root / name) for name in IMAGES)  # what the folder source reads, in order
    expected = [IMAGES[os.path.relpath(path, root)][1] for path in order]
    np.testing.assert_array_equal(batch["prompt_ids"], _reference_ids(tokenizer_dir, expected))
    # Without a tokenizer (a run without text) the captions are not read at all.
    assert "prompt_ids" not in _eval_batch(_config(root), None)
    assert "prompt_ids" not in _eval_batch(_config(root, caption_key=""), tokenize)  # captions off
    # Another column name; .txt sidecars beside a metadata.jsonl are not read (metadata wins).
    _write_sidecars(root, suffix=" with a dog")
    _write_metadata(root, key="caption")
    batch = _eval_batch(_config(root, caption_key="caption"), tokenize)
    np.testing.assert_array_equal(batch["prompt_ids"], _reference_ids(tokenizer_dir, expected))


def test_sidecar_captions_and_the_folder_without_captions(tmp_path, tokenizer_dir, tokenize) -> None:
    root = _write_folder(tmp_path / "images")
    assert "prompt_ids" not in _eval_batch(_config(root), tokenize)  # no captions: the fixed prompt
    assert not captions.has_captions(_config(root))
    _write_sidecars(root)
    assert captions.has_captions(_config(root)) and not captions.has_captions(_config(root, caption_key=""))
    batch = _eval_batch(_config(root), tokenize)
    order = sorted(str(root / name) for name in IMAGES)
    expected = [IMAGES[os.path.relpath(path, root)][1] for path in order]  # stripped of whitespace
    np.testing.assert_array_equal(batch["prompt_ids"], _reference_ids(tokenizer_dir, expected))


def _drop_rate_batches(config, tokenize, count: int, start: int = 0, seed: int = 5) -> list[dict]:
    ds = pipeline.build_dataset(
        config, "unused", 64, seed=seed, train=True, tokenize=tokenize, drop_prob=0.3, start_batch=start
    )
    return [batch for batch, _ in zip(pipeline.numpy_iterator(ds), range(count))]


def _colour_captions(images: np.ndarray) -> list[str]:
    """The caption of each training example's image, known by its colour."""
    colours = np.round((images.mean((1, 2)) + 1.0) * 127.5)
    by_colour = list(IMAGES.values())
    return [by_colour[int(np.argmin([np.abs(colour - c).sum() for c, _ in by_colour]))][1] for colour in colours]


def test_drop_prob_rate_determinism_and_resume(tmp_path, tokenize) -> None:
    root = _write_folder(tmp_path / "images")
    _write_metadata(root)
    config = _config(root)
    batches = _drop_rate_batches(config, tokenize, 8)  # 512 examples
    ids = np.concatenate([b["prompt_ids"] for b in batches])
    own = np.stack([tokenize(text) for text in _colour_captions(np.concatenate([b["image"] for b in batches]))])
    empty = tokenize("")
    kept, dropped = (ids == own).all(axis=1), (ids == empty).all(axis=1)
    assert (kept | dropped).all()  # each example has its own caption, or the empty prompt
    droppable = ~(own == empty).all(axis=1)  # white's own caption is the empty one
    rate = dropped[droppable].mean()
    assert abs(rate - 0.3) < 0.08, rate  # 3 sigma of a binomial share over ~384 examples is 0.07
    again = _drop_rate_batches(config, tokenize, 8)
    resumed = _drop_rate_batches(config, tokenize, 3, start=5)
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a["prompt_ids"], b["prompt_ids"])
    for a, b in zip(batches[5:], resumed):
        np.testing.assert_array_equal(a["prompt_ids"], b["prompt_ids"])
        np.testing.assert_array_equal(a["image"], b["image"])
    other_seed = np.concatenate([b["prompt_ids"] for b in _drop_rate_batches(config, tokenize, 8, seed=6)])
    assert not np.array_equal(other_seed, ids)
    # Eval examples keep their own caption (no dropout), whatever drop_prob says.
    ds = pipeline.build_dataset(config, "unused", 4, seed=0, train=False, tokenize=tokenize, drop_prob=1.0)
    batch = next(pipeline.numpy_iterator(ds))
    expected = np.stack([tokenize(text) for text in _colour_captions(batch["image"])])
    np.testing.assert_array_equal(batch["prompt_ids"], expected)


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"file_name": "red.png", "text": "a"}', "{not json"], r"metadata\.jsonl line 2: not JSON"),
        (['["red.png", "a"]'], r"metadata\.jsonl line 1: expected a JSON object, got list"),
        (['{"file_name": "red.png"}'], r"metadata\.jsonl line 1: 'text' must be a string, is missing \(keys: "),
        (['{"file_name": "red.png", "text": 3}'], r"line 1: 'text' must be a string, is a int"),
        (['{"file_name": "red.png", "text": "a"}', "", '{"file_name": "./red.png", "text": "b"}'], r"line 3: .*line 1"),
        (
            [json.dumps({"file_name": n, "text": "x"}) for n in IMAGES] + ['{"file_name": "gone.png", "text": "x"}'],
            r"metadata\.jsonl: 1 file_name entries do not exist: gone\.png$",
        ),
        (
            ['{"file_name": "red.png", "text": "a"}'],
            r"3 of 4 images have no caption in .*metadata\.jsonl \(column "
            r"'text'\), the first: .*green\.png \(caption every image, or set data\.caption_key=''",
        ),
    ],
    ids=["not-json", "not-object", "no-caption", "not-string", "duplicate", "missing-file", "uncaptioned"],
)
def test_metadata_refusals_name_file_and_line(tmp_path, tokenize, lines, message) -> None:
    root = _write_folder(tmp_path / "images")
    _write_metadata(root, lines)
    with pytest.raises(ValueError, match=message) as error:
        pipeline.build_dataset(_config(root), "train", 2, seed=0, train=True, tokenize=tokenize)
    assert "\n" not in str(error.value)


def test_sidecar_and_drop_prob_refusals(tmp_path, tokenize) -> None:
    root = _write_folder(tmp_path / "images")
    with pytest.raises(ValueError, match=r"text\.drop_prob=0\.1: .*folder.* no caption"):
        pipeline.build_dataset(_config(root), "train", 2, seed=0, train=True, tokenize=tokenize, drop_prob=0.1)
    (root / "green.txt").write_text("the sea")
    with pytest.raises(
        ValueError, match=r"^3 of 4 images have no caption in a \.txt sidecar, the first: .*red\.png \(caption every"
    ):
        pipeline.build_dataset(_config(root), "train", 2, seed=0, train=True, tokenize=tokenize)


class CaptionedTiny(tfds.core.GeneratorBasedBuilder):
    """Four solid-colour images with a caption each (a tfds dataset with a string feature)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"image": tfds.features.Image(shape=(12, 12, 3)), "caption": tfds.features.Text()}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager) -> dict:
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, (colour, text) in enumerate(IMAGES.values()):
            yield i, {"image": np.full((12, 12, 3), colour, np.uint8), "caption": text}


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_tfds_caption_feature(tmp_path, tokenizer_dir, tokenize, file_format) -> None:
    CaptionedTiny(data_dir=str(tmp_path)).download_and_prepare(
        file_format=file_format, download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    config = sources.default_data_config()
    config.update(
        source="tfds", tfds_name="captioned_tiny", data_dir=str(tmp_path), image_size=8, caption_key="caption"
    )
    ds = pipeline.build_dataset(config, "train", 4, seed=0, train=False, tokenize=tokenize)
    batch = next(pipeline.numpy_iterator(ds))
    colours = [tuple(np.round((image.mean((0, 1)) + 1) * 127.5).astype(int)) for image in batch["image"]]
    by_colour = {colour: text for colour, text in IMAGES.values()}
    expected = [by_colour[min(by_colour, key=lambda c: np.abs(np.subtract(c, colour)).sum())] for colour in colours]
    np.testing.assert_array_equal(batch["prompt_ids"], _reference_ids(tokenizer_dir, expected))
    train = next(
        pipeline.numpy_iterator(pipeline.build_dataset(config, "train", 4, seed=0, train=True, tokenize=tokenize))
    )
    assert train["prompt_ids"].shape == (4, 16) and "caption" not in train
    config.caption_key = "text"
    with pytest.raises(
        ValueError,
        match=r"^data\.caption_key='text' is not a feature of captioned_tiny.*"
        r"features: \['caption', 'image'\]",
    ):
        pipeline.build_dataset(config, "train", 4, seed=0, train=True, tokenize=tokenize)


def test_drop_prob_range_and_upgrade(tmp_path) -> None:
    from codi_jax.configs.cpu import tiny_teacher

    config = tiny_teacher.get_config()
    config.text = ml_collections.ConfigDict({"prompt": "", "drop_prob": 1.5})
    with pytest.raises(ValueError, match=r"^text\.drop_prob=1\.5: must be in \[0, 1\]\.$"):
        config_resolution.resolve(config)
    old = tiny_teacher.get_config().to_dict()
    old["text"] = {"prompt": "x"}
    new = config_upgrade.upgrade(old)
    # A config saved before the fields: no captions read, nothing dropped (as it trained).
    assert new["data"]["caption_key"] == "" and new["text"]["drop_prob"] == 0.0
    assert sources.default_data_config().caption_key == "text"


# --------------------------------------------------------------------------- end to end


def _run_config(teacher: str, folder: Path):
    from codi_jax.configs.cpu import tiny_codi

    config = tiny_codi.get_config()
    config.teacher_workdir = teacher
    config.data.update(source="folder", folder=str(folder), image_size=tiny_sd.IMAGE_SIZE, color_augment=0.0)
    config.data.caption_key = "text"
    config.text = ml_collections.ConfigDict({"drop_prob": 0.5})
    config.task.scale = 4
    config.adapter.update(hint_channels=tiny_sd.HINT_CHANNELS, hint_downsamples=3)
    config.update(batch_size=4, num_train_steps=2, checkpoint_every_steps=2, log_every_steps=1)
    config.update(num_sample_images=2, sample_step_counts=(1,), sample_every_steps=100)
    return config


def test_latent_text_run_trains_on_its_captions(tiny_sd_teacher, tmp_path) -> None:
    """Two steps of a tiny latent text run on a captioned folder; the context the step is given for
    each example is the frozen CLIP's encoding of its own caption (or of "" where dropped)."""
    from codi_jax import sharding
    from codi_jax.frozen import batch_inputs, encoders
    from codi_jax.training import loop

    root = _write_folder(tmp_path / "images", size=tiny_sd.IMAGE_SIZE)
    _write_metadata(root)
    config = config_resolution.resolve(_run_config(tiny_sd_teacher, root))
    assert batch_inputs.example_prompts(config) and config.text.encoder
    enc, frozen = batch_inputs.load(config)  # as the run's recipe loads them
    tokenize = batch_inputs.tokenizer_of(config, enc)
    batch = next(loop.local_batches(config, config.task, 0, tokenize))  # the run's first batch
    out = jax.jit(batch_inputs.add_text, static_argnums=2)(frozen, batch, enc.text_model)
    own = _colour_captions(batch["image"])
    kept = [np.array_equal(ids, tokenize(text)) for ids, text in zip(batch["prompt_ids"], own)]
    texts = [text if keep else "" for text, keep in zip(own, kept)]
    for ids, text in zip(batch["prompt_ids"], texts):
        np.testing.assert_array_equal(ids, tokenize(text))  # its own caption, or dropped
    assert {bool(keep) for text, keep in zip(own, kept) if text} == {True, False}  # this seed: both
    expected = np.asarray(encoders.encode_prompts(enc, texts))
    np.testing.assert_allclose(np.asarray(out["context"]), expected, atol=1e-6 * np.abs(expected).max())

    workdir = str(tmp_path / "run")
    state = loop.train_and_evaluate(_run_config(tiny_sd_teacher, root), workdir)
    assert int(sharding.to_host(state.step)) == 2
    assert os.path.exists(os.path.join(workdir, "samples", "step_0000002.png"))


def test_run_refuses_bad_captions_before_loading_anything(tiny_sd_teacher, tmp_path) -> None:
    """``train`` checks the folder's captions and ``text.drop_prob`` with its input paths, before
    any weight is loaded or anything compiled."""
    from codi_jax.training import loop

    root = _write_folder(tmp_path / "images", size=tiny_sd.IMAGE_SIZE)
    config = config_resolution.resolve(_run_config(tiny_sd_teacher, root))  # drop_prob 0.5, no captions
    with pytest.raises(ValueError, match=r"^text\.drop_prob=0\.5: the data has no captions or instructions"):
        loop.check_input_paths(config)
    config.text.drop_prob = 0.0
    loop.check_input_paths(config)  # no captions: the fixed text.prompt
    (root / "red.txt").write_text("a red square")
    with pytest.raises(ValueError, match=r"^3 of 4 images have no caption in a \.txt sidecar"):
        loop.check_input_paths(config)
