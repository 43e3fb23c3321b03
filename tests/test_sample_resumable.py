"""``sample --skip_existing``: the route for large sets. Inputs are read, sampled and written a
chunk at a time; what ``--out`` holds is kept and skipped, so a rerun resumes; input i gets the
degradation and noise it gets in one whole request (the committed fine-tuned x4 SR run)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from codi_jax.sampling import few_step
from codi_jax.sampling.options import SamplingOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = os.path.join(REPO, "checkpoints", "finetune_sr4_color")  # committed conditional run (32 px, x4 SR)
NUM = 4


def _pixels(folder: str, names: list[str]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(os.path.join(folder, name))) for name in names]).astype(int)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.RandomState(0)
    for i in range(NUM):
        Image.fromarray(rng.randint(0, 256, (32, 32, 3), np.uint8)).save(folder / f"im{i}.png")
    return str(folder)


def test_chunks_equal_one_request_and_a_rerun_fills_only_the_gaps(photos, tmp_path, capsys) -> None:
    options = SamplingOptions(seed=3, batch_size=2, renoise=True)
    names = [f"im{i}_{k}steps.png" for i in range(NUM) for k in (1, 2)]
    whole = str(tmp_path / "whole")
    # one request: all inputs, then the grid
    few_step.run(few_step.SampleRequest(FINETUNE, photos, whole, (1, 2)), options)
    chunked = str(tmp_path / "chunked")
    written = few_step.run_resumable(few_step.SampleRequest(FINETUNE, photos, chunked, (1, 2)), options, chunk_size=3)
    assert sorted(os.path.basename(p) for p in written) == sorted(names)
    assert not os.path.exists(os.path.join(chunked, "grid.png"))
    diff = np.abs(_pixels(whole, names) - _pixels(chunked, names))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99  # same noise and degradation per input
    assert np.abs(_pixels(whole, names[:1]) - _pixels(whole, names[2:3])).mean() > 5  # inputs differ

    # A stopped run: two samples missing, one replaced by the user. The rerun writes the two, keeps the third.
    before = _pixels(chunked, names)
    os.remove(os.path.join(chunked, names[3]))  # im1's 2-step sample
    os.remove(os.path.join(chunked, names[6]))  # im3's 1-step sample
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(os.path.join(chunked, names[0]))
    capsys.readouterr()
    again = few_step.run_resumable(few_step.SampleRequest(FINETUNE, photos, chunked, (1, 2)), options, chunk_size=3)
    assert sorted(os.path.basename(p) for p in again) == sorted([names[3], names[6]])
    assert "2 of 4 inputs already sampled" in capsys.readouterr().out
    after = _pixels(chunked, names)
    np.testing.assert_array_equal(after[[3, 6]], before[[3, 6]])  # the same samples again
    assert after[0].max() == 0  # an existing file is never overwritten
    request = few_step.SampleRequest(FINETUNE, photos, chunked, (1, 2))
    assert few_step.run_resumable(request, options) == []  # nothing left to do


def test_skip_existing_and_overwrite_contradict(photos, tmp_path) -> None:
    with pytest.raises(ValueError, match="--overwrite and --skip_existing"):
        few_step.check_request(
            few_step.SampleRequest(FINETUNE, photos, str(tmp_path), (1,), overwrite=True, skip_existing=True)
        )
