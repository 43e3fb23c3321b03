"""Input pipelines: tf.data datasets of `{"image": float32 NHWC in [-1, 1], ...}` batches.

Sources (`data_config.source`):
  skimage_patches  the offline `skimage_patches/patches{image_size}` tfds dataset, built on the
                   fly into `data_dir` when missing (no network is ever used).
  tfds             any prepared tfds dataset (`tfds_name`, e.g. 'div2k/bicubic_x4',
                   'nyu_depth_v2', 'imagenette'); never downloads, raises if not prepared.
  folder           a directory of png/jpg/jpeg/bmp/webp images, searched recursively; with
                   `build_dataset(tokenize=...)` (a text-conditioned run) each image's caption
                   (`metadata.jsonl` or `.txt` sidecars: codi_jax.data.captions) becomes its
                   `prompt_ids`.
  edit_triples     InstructPix2Pix's layout under `folder`: one directory per instruction with
                   `prompt.json` (its `edit` is the instruction) and image pairs `<seed>_0.<ext>`
                   (source) / `<seed>_1.<ext>` (edited); one example per pair, with `source` and
                   `prompt_ids` (the instruction's token ids, from `build_dataset(tokenize=...)`).
With `tokenize`, a tfds source's string feature `caption_key` becomes `prompt_ids` too ('' = none).

Batches hold the local (per-process) batch, `global_batch_size // process_count` examples:
  image      float32 (B, S, S, 3) in [-1, 1]
  depth      float32 (B, S, S, 1), when the source has a `depth` feature; cropped, resized and
             flipped together with the image (values kept as stored)
  has_depth  bool (B,), when the source has `depth`
  micro_cond float32 (B, 6), with `build_dataset(micro_conditioning=True)` (SDXL backbones): the
             example's original (height, width), its crop's (top, left) in the resized image (as if
             flipped before cropping, as diffusers' SDXL training scripts do) and the target
             (height, width), in pixels: SDXL's `add_time_ids`
  mask       bool (B,), eval only: False marks padding examples (zeros) that fill the last batch
  prompt_ids int32 (B, L), where examples bring their own prompt (captions, edit instructions):
             its token ids; training replaces it by the empty prompt's with probability
             `drop_prob` (classifier-free guidance), keyed by the example's augmentation seed;
             eval examples keep their own (no dropout)
  plus any other scalar numeric feature of a tfds source (e.g. `label`, `scale`); strings
  (e.g. `source`) are dropped.
With `task_config` (codi_jax.data.tasks), the task is applied per example after preprocessing
and before batching: `image` becomes the task's target and `cond` (B, S, S, C) float32 (and
`instruction` (B,) int32 for `edit`) are added; eval padding has zero `cond` / `instruction`.
Examples the task cannot use (depth task: `has_depth` False) are dropped before repeating, so
batches stay full. Task randomness: training folds a constant into each example's augmentation
seed; eval uses (seed, the example's index in the split), so a held-out set's conditions are
the same in every run, for every batch size and process count.

Training: an endless stream of this process's examples, epoch after epoch, each epoch a fresh
permutation of the records keyed by (seed, process_index, epoch), augmented with stateless
random ops keyed by (seed, process_index, stream position), so the stream is the same on every
run. Records are read by random access (folder / edit_triples file lists; tfds datasets stored
as ArrayRecord, as skimage_patches is), so `build_dataset(start_batch=k)` (a resumed run) costs
what batch 0 costs and yields exactly what an uninterrupted stream yields from batch k.
TFRecord-stored tfds datasets have no random access: they are read in file order through a
`shuffle_buffer` and a resumed run reads (without decoding) the examples before k, with a warning;
`tfds build <name> --file_format=array_record` gives them random access.

Eval (train=False): one deterministic pass, no augmentation, and the last batch is padded
(mask=False) so that every process yields the same number of batches and no example is dropped.

Geometry for tfds / folder images: by default the shorter side is resized to `image_size`
(anti-aliased bilinear) and the centre is cropped; with `random_crop=True` a random
`image_size` crop is taken at native resolution when training (centre crop in eval; images
smaller than `image_size` are resized up first). Grayscale images are replicated to RGB and
images with alpha are composited over white.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from codi_jax.data import captions, skimage_patches, task_spec, tasks
from codi_jax.data.image_files import (
    check_image_headers,
    list_edit_triples,
    list_image_files,
    load_image_rgb,
)
from codi_jax.data.sources import SOURCES

# TF only feeds the host pipeline; it must not allocate GPU memory that JAX needs.
try:
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # Devices already initialised, or no GPU support.
    pass

logger = logging.getLogger(__name__)

Batch = dict[str, Any]


# --------------------------------------------------------------------------- image ops


def _composite_over_white(rgb: tf.Tensor, alpha: tf.Tensor) -> tf.Tensor:
    return rgb * alpha + (1.0 - alpha)


def _to_rgb_float(image: tf.Tensor) -> tf.Tensor:
    """uint8/uint16 HxWxC (C in 1..4) -> float32 HxWx3 in [0, 1]."""
    image = tf.image.convert_image_dtype(image, tf.float32)
    branches = [
        lambda: tf.tile(image[..., :1], [1, 1, 3]),  # gray
        lambda: _composite_over_white(tf.tile(image[..., :1], [1, 1, 3]), image[..., 1:2]),
        lambda: image[..., :3],  # rgb
        lambda: _composite_over_white(image[..., :3], image[..., 3:4]),  # rgba
    ]
    channels = image.shape[-1]
    if channels is not None:  # Static: pick the branch in Python, no graph switch.
        if not 1 <= channels <= 4:
            raise ValueError(f"images must have 1 to 4 channels, got shape {image.shape}")
        return branches[channels - 1]()
    rgb = tf.switch_case(tf.clip_by_value(tf.shape(image)[-1] - 1, 0, 3), branches)
    return tf.ensure_shape(rgb, [None, None, 3])


def _resize_shorter_side(image: tf.Tensor, size: int, *, only_up: bool) -> tf.Tensor:
    """Resizes so the shorter side is `size` (with `only_up`, only when it is smaller)."""
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = size / tf.minimum(height, width)
    if only_up:
        scale = tf.maximum(scale, 1.0)
    new_height = tf.maximum(tf.cast(tf.math.round(height * scale), tf.int32), size)
    new_width = tf.maximum(tf.cast(tf.math.round(width * scale), tf.int32), size)
    # Anti-aliasing matters when downscaling large photos to tiny training sizes.
    return tf.image.resize(image, [new_height, new_width], method="bilinear", antialias=True)


def _center_offset(image: tf.Tensor, size: int) -> tf.Tensor:
    shape = tf.shape(image)
    return tf.stack([(shape[0] - size) // 2, (shape[1] - size) // 2])


def _random_offset(image: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
    """The (top, left) ``tf.image.stateless_random_crop(image, [size, size, C], seed)`` crops at."""
    shape = tf.shape(image)
    limit = shape - tf.stack([size, size, shape[2]]) + 1
    offset = tf.random.stateless_uniform([3], seed, maxval=tf.int32.max, dtype=tf.int32) % limit
    return offset[:2]


def _fit_to_size(
    image: tf.Tensor, size: int, *, random_crop: bool, train: bool, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Crops/resizes an HxWxC float image to size x size x C. Also returns the crop's (top, left)
    in the resized image and that image's width (SDXL's micro-conditioning reads them)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image, tf.zeros([2], tf.int32), tf.constant(size)  # already the right size (skimage patches)
    image = _resize_shorter_side(image, size, only_up=random_crop)
    offset = _random_offset(image, size, seed) if random_crop and train else _center_offset(image, size)
    return image[offset[0] : offset[0] + size, offset[1] : offset[1] + size], offset, tf.shape(image)[1]


def _random_flip(image: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``tf.image.stateless_random_flip_left_right(image, seed)`` and whether it flipped."""
    flip = tf.random.stateless_uniform([], seed, minval=0, maxval=1.0) < 0.5
    return tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image), flip


def _micro_conditioning(original: tf.Tensor, offset: tf.Tensor, width: tf.Tensor, flip: tf.Tensor, size: int):
    """SDXL's six size ids of one example, as diffusers' SDXL training scripts compute them
    (they flip before cropping): original (height, width), the crop's (top, left) in the resized,
    flipped image, target (height, width)."""
    left = tf.where(flip, width - offset[1] - size, offset[1])
    ids = tf.stack([original[0], original[1], offset[0], left, size, size])
    return tf.cast(ids, tf.float32)


# Colour augmentation: of the recoloured examples this share is made grey; the others get a
# uniformly random hue rotation (the whole circle) and a saturation scale in SATURATION_RANGE.
GREY_SHARE = 0.25
SATURATION_RANGE = (0.5, 1.5)


def _recolor(rgb: tf.Tensor, seed: tf.Tensor, probability: float) -> tf.Tensor:
    """With ``probability``, a new colouring of an HxWx3 float image in [0, 1] (stateless in
    ``seed``): grey (ITU-R 601 luma) or a random hue rotation and saturation scale."""
    draws = tf.random.stateless_uniform([4], seed)
    grey = tf.tile(tf.image.rgb_to_grayscale(rgb), [1, 1, 3])
    low, high = SATURATION_RANGE
    tinted = tf.image.adjust_saturation(tf.image.adjust_hue(rgb, draws[2] - 0.5), low + (high - low) * draws[3])
    recolored = tf.where(draws[1] < GREY_SHARE, grey, tinted)
    return tf.where(draws[0] < probability, recolored, rgb)


def _preprocess(
    example: Batch,
    seed: tf.Tensor | None,
    *,
    image_size: int,
    train: bool,
    random_flip: bool,
    random_crop: bool,
    color_augment: float = 0.0,
    micro_conditioning: bool = False,
) -> Batch:
    """Geometry + value range for one example: {"image": uint8 HxWxC, "depth"?: ...}; with
    ``micro_conditioning``, also its ``micro_cond`` (SDXL's size ids of the real crop)."""
    rgb = _to_rgb_float(example["image"])
    has_source = "source" in example  # an edit pair: same crop / flip as the edited image
    if train and seed is not None and color_augment > 0:
        if has_source:
            raise ValueError("data.color_augment would change an edit's colours; it is for image-only data")
        # Its own stream (fold_in), so crops and flips are the same with or without it.
        rgb = _recolor(rgb, tf.random.experimental.stateless_fold_in(seed, 1), color_augment)
    has_depth = "depth" in example
    if has_depth:
        depth = tf.cast(example["depth"], tf.float32)
        if depth.shape.rank == 2:
            depth = depth[..., None]
        depth = depth[..., :1]
        # Align depth with the image before the joint transform (sizes may differ).
        same_size = rgb.shape[:2].is_fully_defined() and depth.shape[:2] == rgb.shape[:2]
        if not same_size:
            depth = tf.image.resize(depth, tf.shape(rgb)[:2], method="bilinear")
        joint = tf.concat([rgb, depth], axis=-1)  # Same crop / flip for both.
    else:
        joint = rgb
    if has_source:
        source = _to_rgb_float(example["source"])
        source = tf.image.resize(source, tf.shape(rgb)[:2], method="bilinear", antialias=True)
        joint = tf.concat([joint, source], axis=-1)
    augment = train and seed is not None
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2)) if augment else (None, None)
    original = tf.shape(rgb)[:2]
    joint, offset, width = _fit_to_size(joint, image_size, random_crop=random_crop, train=augment, seed=crop_seed)
    flip = tf.constant(False)
    if augment and random_flip:
        joint, flip = _random_flip(joint, flip_seed)
    channels = 3 + int(has_depth) + 3 * int(has_source)
    joint = tf.ensure_shape(joint, [image_size, image_size, channels])

    out = {key: value for key, value in example.items() if key not in ("image", "depth", "source")}
    if has_source:
        out["source"] = tf.clip_by_value(joint[..., channels - 3 :] * 2.0 - 1.0, -1.0, 1.0)
    out["image"] = tf.clip_by_value(joint[..., :3] * 2.0 - 1.0, -1.0, 1.0)
    if has_depth:
        out["depth"] = joint[..., 3:]
        out.setdefault("has_depth", tf.constant(True))
    if micro_conditioning:
        out["micro_cond"] = _micro_conditioning(original, offset, width, flip, image_size)
    return out


class Records(NamedTuple):
    """Random access to this process's share of a split: ``read(index)`` maps an int64 scalar in
    ``[0, size)`` to one raw example (what the source's ``decode`` turns into an image)."""

    size: int
    read: Callable[[tf.Tensor], Any]


class Source(NamedTuple):
    """A split as this process reads it: random access (``records``) or, for TFRecord-stored tfds
    datasets, only a sequential ``examples`` stream (shuffled when training); ``decode`` turns a
    raw example into ``{"image": uint8, ...}``; ``num_examples`` counts the whole split (eval);
    ``prompts``: decoded examples carry their own ``prompt_ids``."""

    records: Records | None
    examples: tf.data.Dataset | None
    decode: Callable[[Any], Batch]
    num_examples: int | None
    prompts: bool = False


def _epoch_order(seed: int, process_index: int, epoch: tf.Tensor, size: int) -> tf.Tensor:
    """A permutation of ``range(size)``, a function of (seed, process_index, epoch) only."""
    base = tf.constant([seed, process_index], tf.int64)
    key = tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64))  # dtype sets the key
    scores = tf.random.stateless_uniform([size], key, minval=None, maxval=None, dtype=tf.int64)
    return tf.argsort(scores, stable=True)


def training_indices(size: int, *, seed: int, process_index: int, start: int) -> tf.data.Dataset:
    """Record indices of this process's training examples from stream position ``start`` on:
    epoch ``e`` visits the records in the order ``_epoch_order(seed, process_index, e)``. Starting
    at any position costs one permutation, whatever the position."""
    first_epoch, offset = divmod(int(start), size)
    head = tf.data.Dataset.from_tensor_slices(_epoch_order(seed, process_index, first_epoch, size)[offset:])
    tail = tf.data.Dataset.range(first_epoch + 1, 2**62).flat_map(
        lambda epoch: tf.data.Dataset.from_tensor_slices(_epoch_order(seed, process_index, epoch, size))
    )
    return head.concatenate(tail)


def _example_seeds(seed: int, process_index: int, start: int = 0) -> tf.data.Dataset:
    """Per-example stateless seeds: fold the example's stream position into (seed, process_index)."""
    base = tf.constant([seed, process_index], tf.int64)
    return tf.data.Dataset.range(int(start), 2**62).map(
        lambda index: tf.random.experimental.stateless_fold_in(base, index)
    )


def _kept_records(records: Records, keep: Callable[[Any], tf.Tensor]) -> Records:
    """The records ``keep`` accepts (one pass over the split, before training starts)."""
    flags = tf.data.Dataset.range(records.size).map(
        lambda i: keep(records.read(i)), num_parallel_calls=tf.data.AUTOTUNE
    )
    kept = np.flatnonzero(np.fromiter(flags.as_numpy_iterator(), bool, records.size)).astype(np.int64)
    if not kept.size:
        raise ValueError("no training example passes the task's filter (e.g. no example has depth)")
    table = tf.constant(kept)
    return Records(int(kept.size), lambda index: records.read(tf.gather(table, index)))


# --------------------------------------------------------------------------- sources


def _skimage_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    size = int(data_config.image_size)
    if size not in skimage_patches.PATCH_SIZES:
        raise ValueError(
            f"data_config.image_size={size}: skimage_patches has no config patches{size}; "
            f"available sizes {skimage_patches.PATCH_SIZES} (add one to "
            "skimage_patches.PATCH_SIZES)"
        )

    def make_builder() -> tfds.core.DatasetBuilder:
        return skimage_patches.SkimagePatches(config=f"patches{size}", data_dir=data_config.data_dir or None)

    builder = make_builder()
    # Several processes: process 0 builds (a shared data_dir must not see racing writers), the
    # others wait for it and then read. Every process reaches the barrier, built or not.
    if jax.process_index() == 0 and not builder.is_prepared():
        # Offline build from files inside scikit-image; GCS explicitly off.
        logger.info("Building skimage_patches/patches%d into %s", size, builder.data_dir)
        builder.download_and_prepare(file_format=skimage_patches.FILE_FORMAT, download_config=skimage_patches.OFFLINE)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"codi_jax: skimage_patches/patches{size} prepared")
        builder = make_builder()
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"Process {jax.process_index()}: skimage_patches/patches{size} is not in {builder.data_dir} after "
                "process 0 prepared it; data_config.data_dir must be shared storage (or prepare it on every host)."
            )
    return builder


def _tfds_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    name = data_config.tfds_name
    if not name:
        raise ValueError("data_config.source='tfds' needs data_config.tfds_name (e.g. 'div2k')")
    data_dir = data_config.data_dir or None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        first_line = str(error).splitlines()[0]  # The rest lists every tfds dataset.
        raise ValueError(f"data_config.tfds_name={name!r}: {first_line}") from error
    if not builder.is_prepared():
        where = data_dir or tfds.core.constants.DATA_DIR
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared in {builder.data_dir}. This pipeline never "
            f"downloads: prepare it first with `tfds build {name} --data_dir {where}` (on a "
            "machine with network or manual downloads) or copy an already prepared copy into "
            f"data_dir={where!r}."
        )
    return builder


def _num_examples(builder: tfds.core.DatasetBuilder, split: str, image_key: str) -> int:
    """Size of a (sub)split, from metadata when possible, else by counting."""
    try:
        return int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError, TypeError):
        pass
    if _has_random_access(builder):
        return len(builder.as_data_source(split=split))
    ds = builder.as_dataset(split=split, decoders=_skip_image_decoding(builder, image_key))
    count = int(ds.cardinality())
    if count < 0:
        count = int(ds.reduce(0, lambda n, _: n + 1))
    return count


def _dtype_and_shape(feature: Any) -> tuple[np.dtype | None, tuple]:
    """(numpy dtype, shape) of a leaf feature; (None, ()) for dicts / sequences / text."""
    try:
        return np.dtype(feature.np_dtype), tuple(feature.shape)
    except (AttributeError, TypeError):
        return None, ()


def _skip_image_decoding(builder: tfds.core.DatasetBuilder, image_key: str) -> dict | None:
    """Keep images encoded until after the shuffle buffer (which then holds bytes, not pixels)."""
    feature = builder.info.features[image_key]
    if isinstance(feature, tfds.features.Image):
        return {image_key: tfds.decode.SkipDecoding()}
    return None


def _tfds_examples(
    builder: tfds.core.DatasetBuilder,
    split: str,
    *,
    image_key: str,
    train: bool,
    seed: int,
    process_index: int,
    process_count: int,
    shuffle_buffer: int,
    caption_key: str = "",
    tokenize: Callable | None = None,
) -> Source:
    """This process's share of a tfds split (random access when stored as ArrayRecord); with
    ``caption_key``, the string feature tokenised into ``prompt_ids``."""
    features = builder.info.features
    if image_key not in features:
        raise ValueError(
            f"data_config.image_key={image_key!r} is not a feature of {builder.info.full_name}; "
            f"features: {sorted(features.keys())}"
        )
    image_feature = features[image_key]
    if not np.issubdtype(np.dtype(image_feature.np_dtype), np.integer):
        raise ValueError(
            f"feature {image_key!r} of {builder.info.full_name} has dtype "
            f"{image_feature.np_dtype}; expected an integer (uint8/uint16) image"
        )
    # What travels with the image: depth (spatial) and scalar numeric features.
    keep = [image_key]
    for key, feature in features.items():
        dtype, shape = _dtype_and_shape(feature)
        if key == image_key or dtype is None or dtype.kind not in "biuf":  # Text, dicts, ...
            continue
        if (key == "depth" and len(shape) in (2, 3)) or shape == ():
            keep.append(key)

    process_split = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count)
    decoders = _skip_image_decoding(builder, image_key)
    decode = _tfds_decoder(image_key, features[image_key], decoders is not None)
    if caption_key:
        _check_caption_feature(builder, caption_key)
        keep.append(caption_key)
        decode = _with_prompt_ids(decode, caption_key, tokenize)
    num_examples = None if train else _num_examples(builder, split, image_key)
    if _has_random_access(builder):
        records = _tfds_records(builder, process_split, keep, decoders)
        return Source(records, None, decode, num_examples, bool(caption_key))
    ds = builder.as_dataset(
        split=process_split,
        shuffle_files=train,
        decoders=decoders,
        read_config=tfds.ReadConfig(shuffle_seed=seed, add_tfds_id=False),
    )
    ds = ds.map(lambda example: {key: example[key] for key in keep})
    if train:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return Source(None, ds, decode, num_examples, bool(caption_key))


def _is_string_feature(feature: Any) -> bool:
    return getattr(feature, "dtype", None) == tf.string and tuple(getattr(feature, "shape", (None,))) == ()


def _check_caption_feature(builder: tfds.core.DatasetBuilder, caption_key: str) -> None:
    """``caption_key`` is a scalar string feature of the dataset (one line naming the features if not)."""
    features = builder.info.features
    if caption_key not in features:
        raise ValueError(
            f"data.caption_key={caption_key!r} is not a feature of {builder.info.full_name}; features: "
            f"{sorted(features.keys())} (data.caption_key='' trains on the fixed text.prompt)"
        )
    if not _is_string_feature(features[caption_key]):
        raise ValueError(
            f"data.caption_key={caption_key!r}: feature of {builder.info.full_name} is {features[caption_key]!r}, "
            "not one string per example"
        )


def _token_ids(text: tf.Tensor, tokenize: Callable, length: int) -> tf.Tensor:
    """A string's token ids, int32 (length,), from the run's tokenizer (Python, in the pipeline)."""
    ids = tf.numpy_function(lambda t: np.asarray(tokenize(t.decode()), np.int32), [text], tf.int32, stateful=False)
    return tf.ensure_shape(ids, [length])


def _with_prompt_ids(decode: Callable[[Any], Batch], text_key: str, tokenize: Callable) -> Callable[[Any], Batch]:
    """``decode`` with the raw example's string ``text_key`` replaced by its ``prompt_ids``."""
    length = len(tokenize(""))

    def decode_with_prompt(raw: Batch) -> Batch:
        raw = dict(raw)
        text = raw.pop(text_key)
        return {**decode(raw), "prompt_ids": _token_ids(text, tokenize, length)}

    return decode_with_prompt


def _tfds_decoder(image_key: str, image_feature: Any, encoded: bool) -> Callable[[Batch], Batch]:
    """Decodes the (possibly still encoded) image of a raw tfds example into ``example["image"]``."""
    image_dtype = tf.as_dtype(image_feature.np_dtype)
    image_shape = tuple(image_feature.shape)

    def decode(example: Batch) -> Batch:
        example = dict(example)
        image = example.pop(image_key)
        if encoded:
            # Decode to the feature's channel count and static shape when known, so that fixed
            # size images (skimage patches) skip resizing and channel switching.
            channels = image_shape[-1] if len(image_shape) == 3 and image_shape[-1] else 0
            image = tf.io.decode_image(image, channels=channels, dtype=image_dtype, expand_animations=False)
            image = tf.ensure_shape(image, image_shape if channels else [None, None, None])
        elif image.shape.rank == 2:
            image = image[..., None]
        example["image"] = image
        return example

    return decode


def _has_random_access(builder: tfds.core.DatasetBuilder) -> bool:
    return str(builder.info.file_format) in ("FileFormat.ARRAY_RECORD", "array_record")


def _tfds_records(builder: tfds.core.DatasetBuilder, split: str, keep: list[str], decoders: dict | None) -> Records:
    """Random access to an ArrayRecord-stored tfds split; images stay encoded until ``decode``."""
    source = builder.as_data_source(split=split, decoders=decoders)
    specs = {}
    for key in keep:
        if (decoders and key in decoders) or _is_string_feature(builder.info.features[key]):
            specs[key] = (tf.string, ())
        else:
            feature = builder.info.features[key]
            specs[key] = (tf.as_dtype(feature.np_dtype), tuple(feature.shape))

    def fetch(index: np.ndarray) -> list[np.ndarray]:
        example = source[int(index)]
        return [np.asarray(example[key], dtype.as_numpy_dtype) for key, (dtype, _) in specs.items()]

    def read(index: tf.Tensor) -> Batch:
        values = tf.numpy_function(fetch, [index], [dtype for dtype, _ in specs.values()], stateful=False)
        return {key: tf.ensure_shape(value, shape) for (key, (_, shape)), value in zip(specs.items(), values)}

    return Records(len(source), read)


def _folder_examples(
    data_config: ml_collections.ConfigDict, *, tokenize: Callable | None, process_index: int, process_count: int
) -> Source:
    """The folder's images; with ``tokenize`` (a text run), their captions as ``prompt_ids``
    (none where the folder has no captions: ``captions.folder_captions``)."""
    paths = list_image_files(data_config.folder)
    check_image_headers(paths)
    texts = None
    if tokenize is not None:
        texts = captions.folder_captions(data_config.folder, paths, data_config.caption_key)
    share = _process_share(list(range(len(paths))), process_index, process_count, data_config.folder)
    columns = {"path": tf.constant([paths[i] for i in share])}
    if texts is not None:
        columns["caption"] = tf.constant([texts[i] for i in share])

    def decode(raw: Batch) -> Batch:
        image = tf.numpy_function(lambda p: load_image_rgb(p.decode()), [raw["path"]], tf.uint8, stateful=False)
        return {"image": tf.ensure_shape(image, [None, None, 3])}

    if texts is not None:
        decode = _with_prompt_ids(decode, "caption", tokenize)
    read = lambda index: {key: tf.gather(column, index) for key, column in columns.items()}
    return Source(Records(len(share), read), None, decode, len(paths), texts is not None)


def _process_share(items: list, process_index: int, process_count: int, folder: str) -> list:
    """Round robin: process p reads items p, p + P, p + 2P, ..."""
    share = items[process_index::process_count]
    if not share:
        raise ValueError(f"data_config.folder={folder!r}: {len(items)} examples cannot feed {process_count} processes")
    return share


def _triple_examples(
    data_config: ml_collections.ConfigDict, *, tokenize: Any, process_index: int, process_count: int
) -> Source:
    if tokenize is None:
        raise ValueError("data_config.source='edit_triples' needs a tokenizer: a text-conditioned run (config.text)")
    triples = list_edit_triples(data_config.folder)
    share = _process_share(triples, process_index, process_count, data_config.folder)
    columns = {key: tf.constant([t[i] for t in share]) for i, key in enumerate(("source", "edited", "instruction"))}

    def decode(raw: dict) -> Batch:
        load = lambda key: tf.ensure_shape(
            tf.numpy_function(lambda p: load_image_rgb(p.decode()), [raw[key]], tf.uint8, stateful=False),
            [None, None, 3],
        )
        return {"image": load("edited"), "source": load("source")}

    read = lambda index: {key: tf.gather(column, index) for key, column in columns.items()}
    return Source(
        Records(len(share), read), None, _with_prompt_ids(decode, "instruction", tokenize), len(triples), True
    )


# --------------------------------------------------------------------------- public API


def build_dataset(
    data_config: ml_collections.ConfigDict,
    split: str,
    global_batch_size: int,
    *,
    seed: int,
    train: bool,
    process_index: int = 0,
    process_count: int = 1,
    task_config: ml_collections.ConfigDict | None = None,
    tokenize: Any = None,
    drop_prob: float = 0.0,
    start_batch: int = 0,
    micro_conditioning: bool = False,
) -> tf.data.Dataset:
    """Batched dataset of this process's share of `split` (see the module docstring); with
    `task_config`, every example carries the task's `cond` (see codi_jax.data.tasks).
    `tokenize(text) -> int ids` (a text-conditioned run's tokenizer) turns `edit_triples`
    instructions and captions (folder, tfds `caption_key`) into `prompt_ids`; training replaces an
    example's with the empty prompt's with probability `drop_prob` (`text.drop_prob`).
    Training streams start at batch `start_batch` (a resumed run's step): by random access, at
    the cost of batch 0, except for TFRecord-stored tfds datasets, which read the examples before it.
    `micro_conditioning` (SDXL backbones): every example also carries `micro_cond`."""
    if task_config is not None:
        task_spec.check_task_config(task_config)
        if task_config.name == "none":
            task_config = None  # Unconditional: exactly the plain pipeline.
    if data_config.source not in SOURCES:
        raise ValueError(f"data_config.source={data_config.source!r}; valid values: {SOURCES}")
    color_augment = float(data_config.get("color_augment", 0.0))  # saved configs may predate the field
    if not 0.0 <= color_augment <= 1.0:
        raise ValueError(f"data.color_augment={data_config.color_augment} must be a share in [0, 1]")
    if global_batch_size % process_count or global_batch_size < process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of process_count={process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    local_batch_size = global_batch_size // process_count
    shard = {"process_index": process_index, "process_count": process_count}
    source, index_offset, index_stride = _split_source(data_config, split, train, seed, task_config, tokenize, shard)
    drop = None
    if train and drop_prob > 0:
        if not source.prompts:
            raise ValueError(
                f"text.drop_prob={drop_prob}: the examples of data.source={data_config.source!r} have no caption "
                "or instruction of their own to drop (the fixed text.prompt is never dropped)"
            )
        drop = _prompt_dropout(float(drop_prob), tokenize)

    def preprocess(raw: Any, example_seed: tf.Tensor | None) -> Batch:
        example = _preprocess(
            source.decode(raw),
            example_seed,
            image_size=int(data_config.image_size),
            train=train,
            random_flip=bool(data_config.random_flip),
            random_crop=bool(data_config.random_crop),
            color_augment=color_augment,
            micro_conditioning=micro_conditioning,
        )
        return example if drop is None else drop(example, example_seed)

    if train:
        ds = _training_examples(source, task_config, preprocess, seed, process_index, start_batch * local_batch_size)
    else:
        ds = _eval_examples(source, task_config, preprocess, seed, index_offset, index_stride)
        ds = _pad_for_eval(ds, source.num_examples, global_batch_size, local_batch_size)
    ds = ds.batch(local_batch_size, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True  # Parallel maps keep order: reproducible batches.
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def _split_source(
    data_config: ml_collections.ConfigDict,
    split: str,
    train: bool,
    seed: int,
    task_config: Any,
    tokenize: Callable | None,
    shard: dict[str, int],
) -> tuple[Source, int, int]:
    """``(source, index_offset, index_stride)``: the split as this process reads it, and where its
    examples sit in the whole split (eval task seeds use index = offset + stride * local index)."""
    if data_config.source == "folder":
        if task_config is not None and task_spec.needs_depth_feature(task_config):
            raise ValueError(
                "task.depth_source='feature' needs a source with a `depth` feature; data_config.source='folder' "
                "has none (use task.depth_source='procedural')"
            )
        source = _folder_examples(data_config, tokenize=tokenize, **shard)
        return source, shard["process_index"], shard["process_count"]  # Round robin.
    if data_config.source == "edit_triples":
        return _triple_examples(data_config, tokenize=tokenize, **shard), shard["process_index"], shard["process_count"]
    if data_config.source == "skimage_patches":
        builder, image_key, caption_key = _skimage_builder(data_config), "image", ""
    else:
        builder, image_key = _tfds_builder(data_config), data_config.image_key
        caption_key = data_config.caption_key if tokenize is not None else ""
    source = _tfds_examples(
        builder,
        split,
        image_key=image_key,
        train=train,
        seed=seed,
        shuffle_buffer=data_config.shuffle_buffer,
        caption_key=caption_key,
        tokenize=tokenize,
        **shard,
    )
    index_offset = 0
    if task_config is not None and not train:
        index_offset = _process_split_offset(builder, split, image_key, shard["process_index"], shard["process_count"])
    return source, index_offset, 1


# fold_in tag of an example's caption dropout draw (its augmentation seed's own stream)
PROMPT_DROP_SALT = 0x6D70


def _prompt_dropout(drop_prob: float, tokenize: Callable) -> Callable[[Batch, tf.Tensor], Batch]:
    """``(example, example_seed) -> example`` whose ``prompt_ids`` are the empty prompt's with
    probability ``drop_prob``, a function of the example's augmentation seed only (so of the run's
    seed and the example's stream position: a resumed stream drops what an uninterrupted one does)."""
    empty = tf.constant(np.asarray(tokenize(""), np.int32))

    def drop(example: Batch, example_seed: tf.Tensor) -> Batch:
        draw = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(example_seed, PROMPT_DROP_SALT))
        return {**example, "prompt_ids": tf.where(draw < drop_prob, empty, example["prompt_ids"])}

    return drop


def _training_examples(
    source: Source, task_config: Any, preprocess: Callable, seed: int, process_index: int, start: int
) -> tf.data.Dataset:
    """The endless augmented training stream from example position ``start``. Sources without
    random access skip to it before decoding: the examples before it are read, not decoded."""
    keep_example = None if task_config is None else tasks.example_filter(task_config)
    records = source.records
    if records is None:
        ds = source.examples
        if keep_example is not None:
            ds = ds.filter(keep_example)  # Before repeat: an empty result ends instead of spinning.
        ds = tf.data.Dataset.zip(ds.repeat(), _example_seeds(seed, process_index)).skip(start)
        if start:
            logger.warning(
                "Resuming at example %d of a TFRecord-stored tfds dataset reads every example before it; "
                "prepare it with `tfds build <name> --file_format=array_record` to resume by random access.",
                start,
            )
    else:
        if keep_example is not None:
            records = _kept_records(records, keep_example)
        indices = training_indices(records.size, seed=seed, process_index=process_index, start=start)
        raw = indices.map(records.read, num_parallel_calls=tf.data.AUTOTUNE)
        ds = tf.data.Dataset.zip(raw, _example_seeds(seed, process_index, start))

    def example(raw: Any, example_seed: tf.Tensor) -> Batch:
        if task_config is None:
            return preprocess(raw, example_seed)
        return tasks.apply_task(task_config, preprocess(raw, example_seed), tasks.training_task_seed(example_seed))

    return ds.map(example, num_parallel_calls=tf.data.AUTOTUNE)


def _eval_examples(
    source: Source, task_config: Any, preprocess: Callable, seed: int, index_offset: int, index_stride: int
) -> tf.data.Dataset:
    """One deterministic pass over the split, unaugmented, before padding."""
    if source.records is None:
        ds = source.examples
    else:
        ds = tf.data.Dataset.range(source.records.size).map(source.records.read, num_parallel_calls=tf.data.AUTOTUNE)
    if task_config is None:
        return ds.map(lambda raw: preprocess(raw, None), num_parallel_calls=tf.data.AUTOTUNE)
    keep_example = tasks.example_filter(task_config)
    ds = ds.enumerate()  # Before filtering: indices are positions in the split.
    if keep_example is not None:
        ds = ds.filter(lambda index, raw: keep_example(raw))

    def indexed_task(index: tf.Tensor, raw: Any) -> Batch:
        task_seed = tasks.indexed_task_seed(seed, index_offset + index_stride * index)
        return tasks.apply_task(task_config, preprocess(raw, None), task_seed)

    # Padding counts come from the unfiltered size, so every process still yields the same
    # number of batches (filtered-out examples become padding).
    return ds.map(indexed_task, num_parallel_calls=tf.data.AUTOTUNE)


def _process_split_offset(
    builder: tfds.core.DatasetBuilder, split: str, image_key: str, process_index: int, process_count: int
) -> int:
    """Index in `split` of the first example of this process's contiguous share of it."""
    return sum(
        _num_examples(
            builder,
            tfds.split_for_jax_process(split, process_index=index, process_count=process_count),
            image_key,
        )
        for index in range(process_index)
    )


def _pad_for_eval(
    ds: tf.data.Dataset, num_examples: int, global_batch_size: int, local_batch_size: int
) -> tf.data.Dataset:
    """Adds `mask` and pads with masked zeros to ceil(N / global_batch) local batches."""
    ds = ds.map(lambda example: {**example, "mask": tf.constant(True)})
    zeros = tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype), ds.element_spec)
    padding = tf.data.Dataset.from_tensors(zeros).repeat()
    # Every process's shard holds at most ceil(N / P) <= num_batches * local_batch examples.
    num_batches = math.ceil(num_examples / global_batch_size)
    return ds.concatenate(padding).take(num_batches * local_batch_size)


def numpy_iterator(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    """Iterates a dataset as dicts of numpy arrays."""
    return iter(tfds.as_numpy(ds))


def to_global_batch(local_batch: dict, sharding: jax.sharding.Sharding) -> dict:
    """Assembles per-process batches into global jax.Arrays split along the batch axis."""
    return jax.tree.map(
        lambda array: jax.make_array_from_process_local_data(sharding, np.asarray(array)),
        local_batch,
    )
