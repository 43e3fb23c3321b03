"""InstructPix2Pix-format triples (source, edited, instruction): the ``edit_triples`` source keeps
each pair aligned through crops and flips, tokenizes the instruction, and the batch encoder turns
the token ids into the frozen CLIP's context."""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from codi_jax.data import image_files, pipeline, sources, task_spec
from codi_jax.frozen import batch_inputs, encoders

INSTRUCTIONS = ["make it a painting of the sea", "turn the cat into a dog"]


def _write_triples(root: str) -> None:
    rng = np.random.default_rng(0)
    for i, instruction in enumerate(INSTRUCTIONS):
        directory = os.path.join(root, f"{i:07d}")
        os.makedirs(directory)
        with open(os.path.join(directory, "prompt.json"), "w") as f:
            json.dump({"input": "a photo", "edit": instruction, "output": "x"}, f)
        for seed in (11, 12):
            source = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(source).save(os.path.join(directory, f"{seed}_0.png"))
            Image.fromarray(255 - source).save(os.path.join(directory, f"{seed}_1.png"))  # the "edit": inverse


def _config(root: str) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    data = sources.default_data_config()
    data.update(source="edit_triples", folder=root, image_size=32, random_crop=True)
    task = task_spec.default_task_config()
    task.update(name="edit", instructions="text")
    return data, task


def test_listing_and_errors(tmp_path) -> None:
    root = str(tmp_path / "triples")
    _write_triples(root)
    triples = image_files.list_edit_triples(root)
    assert len(triples) == 4 and {t[2] for t in triples} == set(INSTRUCTIONS)
    assert all(s.endswith("_0.png") and e.endswith("_1.png") for s, e, _ in triples)
    os.remove(triples[0][1])
    with pytest.raises(FileNotFoundError, match="no edited image"):
        image_files.list_edit_triples(root)
    with pytest.raises(FileNotFoundError, match="data_config.folder"):
        image_files.list_edit_triples(str(tmp_path / "missing"))
    data, task = _config(root)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        pipeline.build_dataset(data, "train", 2, seed=0, train=True, task_config=task)
    assert task_spec.num_instructions(task) == 0 and task_spec.cond_channels(task) == 3


def test_pairs_stay_aligned_and_prompts_are_tokenized(tmp_path) -> None:
    root = str(tmp_path / "triples")
    _write_triples(root)
    data, task = _config(root)
    tokenize = lambda text: np.asarray([len(text), len(text.split()), 7, 0], np.int32)  # a stand-in tokenizer
    ds = pipeline.build_dataset(data, "train", 4, seed=3, train=True, task_config=task, tokenize=tokenize)
    batch = next(pipeline.numpy_iterator(ds))
    assert batch["image"].shape == batch["cond"].shape == (4, 32, 32, 3) and "instruction" not in batch
    # edited = 255 - source, so in [-1, 1] the target is -cond wherever the same crop / flip was taken
    # (up to the bilinear resize of 8-bit values: one grey level).
    np.testing.assert_allclose(batch["image"], -batch["cond"], atol=2.5 / 255)
    expected = {tuple(tokenize(t)) for t in INSTRUCTIONS}
    assert {tuple(ids) for ids in batch["prompt_ids"]} <= expected


def test_batch_encoder_encodes_each_examples_prompt(tmp_path) -> None:
    pytest.importorskip("transformers")
    from codi_jax.interop import convert
    from tests import tiny_sd

    tiny_sd.make_pipeline(str(tmp_path / "pipeline"))
    convert.convert(convert.ConversionRequest(str(tmp_path / "pipeline"), str(tmp_path / "teacher")))
    from codi_jax.runs import pretrained

    config, _ = pretrained.read_config(str(tmp_path / "teacher"))
    config.task = task_spec.default_task_config()
    config.task.update(name="edit", instructions="text")
    enc, frozen = batch_inputs.load(config)
    tokenize = batch_inputs.tokenizer_of(config, enc)
    ids = np.stack([tokenize(text) for text in INSTRUCTIONS])
    batch = {"cond": np.zeros((2, 64, 64, 3), np.float32), "prompt_ids": ids}
    out = jax.jit(batch_inputs.add_text, static_argnums=2)(frozen, batch, enc.text_model)
    expected = encoders.encode_prompts(enc, INSTRUCTIONS)
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(np.asarray(out["context"]), np.asarray(expected), atol=1e-6 * scale)
    assert out["uncond_context"].shape == expected.shape
