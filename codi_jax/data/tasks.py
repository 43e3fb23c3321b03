"""Conditional tasks: pure per-example functions from a clean image to (condition, target).

Why: CoDi trains a conditional model from image-condition pairs only; every pair here is made
from a clean image inside the tf.data pipeline, with stateless random ops keyed by a
per-example seed, so training streams and held-out sets are deterministic and reproducible.

`apply_task(task_config, example, seed)` takes one preprocessed example (`image` float32
(S, S, 3) in [-1, 1], plus whatever else the source has) and returns it with (all other keys kept):
  image        float32 (S, S, 3) in [-1, 1]: the TARGET the model generates (for `edit`, the
               edited image; for procedural `depth`, the rendered scene);
  cond         float32 (S, S, C) roughly in [-1, 1], at the target's resolution: what the
               adapter's hint network reads (C = `cond_channels(task_config)`);
  instruction  int32 (), `edit` only: the id of the edit in `EDIT_NAMES`.

Tasks (`task.name`, fields of `task_spec.default_task_config()`):
  none      unconditional: the example is returned unchanged, no `cond`.
  sr        super-resolution by `scale`. `degradation='bicubic'`: anti-aliased bicubic (or area)
            downscale; 'realesrgan': Real-ESRGAN's second-order degradation (degradations.py).
            cond = the LR image upsampled back to S x S (bicubic), 3 channels.
  inpaint   free-form brush strokes (random polylines with random width, as in DeepFill v2 / LaMa)
            and/or boxes, grown until a random area fraction in `mask_area_range` is covered.
            cond = concat(image with the hole set to 0, hole) -> 4 channels; the hole channel is
            +1 where pixels are missing and -1 where they are known.
  edge      Canny (Gaussian smoothing, Sobel gradient, non-maximum suppression, hysteresis between
            two thresholds) or thresholded Sobel magnitude: 1 channel, +1 on edges, -1 elsewhere.
  depth     `depth_source='feature'`: the example's `depth` feature normalised per example to
            [-1, 1] with near = +1 (`depth_is_disparity`: larger values are nearer, as in the
            skimage_patches disparity; False for metric depth such as nyu_depth_v2). Examples with
            `has_depth` False are dropped by the pipeline (`filter_missing_depth`).
            `depth_source='procedural'`: a random scene of spheres and boxes in front of a
            background plane, textured with the clean image, rendered with its exact depth
            (procedural.py); the rendered scene is the target and `depth` (when the source has
            one) is replaced by the scene's depth (distance, larger = farther).
            1 channel.
  edit      instructed-editing stand-in: an edit drawn uniformly from the first
            `num_instructions` of `EDIT_NAMES`; cond = the source image, image = the edited one.

Seeds: training folds `TASK_SEED_SALT` into each example's augmentation seed
(`training_task_seed`); evaluation and `degrade_images` use `indexed_task_seed(seed, index)`
with the example's index in the split, so a held-out set's conditions do not depend on batch
size, process count or run.

Graph building: the task code uses explicit tf.cond / tf.switch_case / tf.while_loop, and its entry
points are marked `tf.autograph.experimental.do_not_convert`: AutoGraph re-writing them (tf.data
maps convert by default) made tracing the Real-ESRGAN chain take ~25 s instead of ~1 s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
import tensorflow as tf

from codi_jax.data import degradations, procedural
from codi_jax.data.task_spec import (
    EDIT_NAMES,
    check_task_config,
    cond_channels,
    needs_depth_feature,
    text_instructions,
)

# Edit parameters (in [-1, 1] image units), shared with the tests' NumPy versions.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
TINT_SHIFT = 0.2  # warm: red +, blue -; cool: the opposite
BRIGHTNESS_SHIFT = 0.4
BLUR_TAPS = (1.0, 4.0, 6.0, 4.0, 1.0)  # separable binomial, normalised, reflect padding
POSTERIZE_LEVELS = 4

# Folded into a training example's seed so the task's draws differ from the augmentation's.
TASK_SEED_SALT = 0x7A5C
# Second word of the base seed of evaluation / degrade_images examples.
EVAL_SEED_SALT = 0x3D1E

Example = dict[str, Any]


def example_filter(task_config: ml_collections.ConfigDict) -> Callable[[Any], tf.Tensor] | None:
    """A predicate on raw examples (before decoding) for `tf.data.Dataset.filter`, or None when every
    example is usable. Drops examples whose `has_depth` is False for the depth-feature task."""
    if not (needs_depth_feature(task_config) and task_config.filter_missing_depth):
        return None

    def has_depth(raw: Any) -> tf.Tensor:
        if isinstance(raw, dict) and "has_depth" in raw:
            return tf.cast(raw["has_depth"], tf.bool)
        return tf.constant(True)  # Sources without the flag (nyu_depth_v2) have depth everywhere.

    return has_depth


# --------------------------------------------------------------------------- seeds


def training_task_seed(example_seed: tf.Tensor) -> tf.Tensor:
    """The task seed of a training example, from its augmentation seed."""
    return tf.random.experimental.stateless_fold_in(example_seed, TASK_SEED_SALT)


def indexed_task_seed(seed: int, index: tf.Tensor) -> tf.Tensor:
    """The task seed of example `index` of a held-out split (or of a `degrade_images` batch)."""
    base = tf.constant([seed, EVAL_SEED_SALT], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))


# --------------------------------------------------------------------------- sr


def _resize(image: tf.Tensor, size: int, method: str) -> tf.Tensor:
    # antialias=True selects TF's scale-and-translate kernels, as jax.image.resize (sample.py) uses.
    return tf.image.resize(image, [size, size], method=method, antialias=True)


@tf.autograph.experimental.do_not_convert
def super_resolution_condition(image: tf.Tensor, seed: tf.Tensor, task_config: ml_collections.ConfigDict) -> tf.Tensor:
    """The LR image upsampled back to S x S (bicubic), in [-1, 1]."""
    size = int(image.shape[0])
    scale = int(task_config.scale)
    if size % scale:
        raise ValueError(f"task.scale={scale} does not divide the image size {size}")
    if task_config.degradation == "realesrgan":
        low = degradations.realesrgan_degrade((image + 1.0) / 2.0, seed, task_config.realesrgan, scale) * 2.0 - 1.0
    else:
        low = _resize(image, size // scale, task_config.downsample)
    return tf.clip_by_value(_resize(low, size, "bicubic"), -1.0, 1.0)


# --------------------------------------------------------------------------- inpaint


def _pixel_centres(size: int) -> tf.Tensor:
    """(S*S, 2) pixel centres (x, y) in pixel units, row-major."""
    coords = tf.range(size, dtype=tf.float32) + 0.5
    y, x = tf.meshgrid(coords, coords, indexing="ij")
    return tf.reshape(tf.stack([x, y], -1), [-1, 2])


def stroke_masks(seed: tf.Tensor, size: int, task_config: ml_collections.ConfigDict) -> tf.Tensor:
    """(stroke_max_count, S, S) bool: one random brush stroke each (a polyline of 1..max segments from a
    random start, random directions and lengths, drawn with a round brush of random width)."""
    count, segments = int(task_config.stroke_max_count), int(task_config.stroke_max_segments)
    seeds = degradations.split_seed(seed, 5)
    length_low, length_high = (float(f) * size for f in task_config.stroke_length_range)
    width_low, width_high = (max(1.0, float(f) * size) for f in task_config.stroke_width_range)
    start = degradations.uniform(seeds[0], 0.0, float(size), [count, 1, 2])
    angle = degradations.uniform(seeds[1], 0.0, 2.0 * math.pi, [count, segments])
    length = degradations.uniform(seeds[2], length_low, length_high, [count, segments])
    steps = tf.stack([tf.cos(angle), tf.sin(angle)], -1) * length[..., None]
    vertices = tf.clip_by_value(tf.concat([start, start + tf.cumsum(steps, axis=1)], 1), 0.0, float(size))
    used_segments = tf.random.stateless_uniform([count, 1], seeds[3], 1, segments + 1, tf.int32)
    active = tf.range(segments)[None] < used_segments  # (count, segments)
    width = degradations.uniform(seeds[4], width_low, max(width_low, width_high), [count, 1, 1])

    # Distance of every pixel centre to every segment: (count, segments, pixels).
    first, second = vertices[:, :-1, None, :], vertices[:, 1:, None, :]
    pixels = _pixel_centres(size)[None, None]
    direction = second - first
    along = tf.reduce_sum((pixels - first) * direction, -1) / tf.maximum(tf.reduce_sum(direction * direction, -1), 1e-6)
    closest = first + tf.clip_by_value(along, 0.0, 1.0)[..., None] * direction
    distance = tf.norm(pixels - closest, axis=-1)
    covered = (distance <= width / 2.0) & active[..., None]
    return tf.reshape(tf.reduce_any(covered, axis=1), [count, size, size])


def box_masks(seed: tf.Tensor, size: int, task_config: ml_collections.ConfigDict) -> tf.Tensor:
    """(box_max_count, S, S) bool: one random axis-aligned box each, inside the image."""
    count = int(task_config.box_max_count)
    side_seed, position_seed = degradations.split_seed(seed, 2)
    low, high = (max(1.0, float(f) * size) for f in task_config.box_size_range)
    sides = degradations.uniform(side_seed, low, max(low, high), [count, 2])  # (width, height)
    corner = degradations.uniform(position_seed, 0.0, 1.0, [count, 2]) * (size - sides)
    pixels = _pixel_centres(size)[None]  # (1, P, 2)
    inside = (pixels >= corner[:, None]) & (pixels < (corner + sides)[:, None])
    return tf.reshape(tf.reduce_all(inside, -1), [count, size, size])


def _grow_until(shapes: tf.Tensor, target_area: tf.Tensor) -> tf.Tensor:
    """Union of the first k shapes for the smallest k covering `target_area` (all if none does)."""
    unions = tf.cumsum(tf.cast(shapes, tf.float32), axis=0) > 0.0
    coverage = tf.reduce_mean(tf.cast(unions, tf.float32), axis=[1, 2])
    reached = coverage >= target_area
    first = tf.argmax(tf.cast(reached, tf.int32), output_type=tf.int32)
    index = tf.where(tf.reduce_any(reached), first, tf.shape(shapes)[0] - 1)
    return unions[index]


@tf.autograph.experimental.do_not_convert
def inpainting_mask(seed: tf.Tensor, size: int, task_config: ml_collections.ConfigDict) -> tf.Tensor:
    """(S, S, 1) float32 hole mask, 1 = missing."""
    area_seed, kind_seed, stroke_seed, box_seed = degradations.split_seed(seed, 4)
    target = degradations.uniform(area_seed, *(float(f) for f in task_config.mask_area_range))
    kind = task_config.mask_kind
    box_prob = {"freeform": 0.0, "box": 1.0, "mixed": float(task_config.mask_box_prob)}[kind]
    mask = degradations.either(
        box_prob,
        kind_seed,
        lambda: _grow_until(box_masks(box_seed, size, task_config), target),
        lambda: _grow_until(stroke_masks(stroke_seed, size, task_config), target),
    )
    return tf.cast(mask, tf.float32)[..., None]


def inpainting_condition(image: tf.Tensor, seed: tf.Tensor, task_config: ml_collections.ConfigDict) -> tf.Tensor:
    """concat(image with the hole set to 0, hole as +1 / known as -1): (S, S, 4)."""
    hole = inpainting_mask(seed, int(image.shape[0]), task_config)
    return tf.concat([image * (1.0 - hole), hole * 2.0 - 1.0], axis=-1)


# --------------------------------------------------------------------------- edge

_SOBEL_X = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], np.float32) / 8.0


def _gray(image: tf.Tensor) -> tf.Tensor:
    """(S, S, 1) luma in [0, 1] of an image in [-1, 1]."""
    return tf.reduce_sum((image + 1.0) / 2.0 * tf.constant(LUMA_WEIGHTS), axis=-1, keepdims=True)


def _gradient(image: tf.Tensor, sigma: float) -> tuple[tf.Tensor, tf.Tensor]:
    """(d/dx, d/dy) of the smoothed gray image, each (S, S), per pixel (Sobel / 8), reflect padding
    (so flat borders have no gradient)."""
    gray = _gray(image)
    if sigma > 0:
        gray = degradations.filter2d(gray, degradations.gaussian_kernel(sigma))
    grad_x = degradations.filter2d(gray, _SOBEL_X)[..., 0]
    grad_y = degradations.filter2d(gray, _SOBEL_X.T)[..., 0]
    return grad_x, grad_y


def _shifted(values: tf.Tensor, drow: int, dcol: int) -> tf.Tensor:
    """out[r, c] = values[r + drow, c + dcol], zero outside."""
    padded = tf.pad(values, [[1, 1], [1, 1]])
    height, width = tf.shape(values)[0], tf.shape(values)[1]
    return padded[1 + drow : 1 + drow + height, 1 + dcol : 1 + dcol + width]


@tf.autograph.experimental.do_not_convert
def canny_edges(image: tf.Tensor, sigma: float, low_threshold: float, high_threshold: float) -> tf.Tensor:
    """(S, S) bool Canny edges of an image in [-1, 1]."""
    grad_x, grad_y = _gradient(image, sigma)
    magnitude = tf.sqrt(grad_x * grad_x + grad_y * grad_y)
    # Non-maximum suppression along the gradient direction, quantised to 0/45/90/135 degrees.
    direction = tf.math.floormod(tf.cast(tf.round(tf.atan2(grad_y, grad_x) / (math.pi / 4.0)), tf.int32), 4)
    offsets = ((0, 1), (1, 1), (1, 0), (1, -1))  # (drow, dcol) of each direction bin
    ahead = tf.stack([_shifted(magnitude, dr, dc) for dr, dc in offsets])
    behind = tf.stack([_shifted(magnitude, -dr, -dc) for dr, dc in offsets])
    ahead = tf.gather(tf.transpose(ahead, [1, 2, 0]), direction, batch_dims=2)
    behind = tf.gather(tf.transpose(behind, [1, 2, 0]), direction, batch_dims=2)
    # Strict on one side, so a plateau of two equal maxima (a step between pixels) keeps one pixel.
    is_maximum = (magnitude > ahead) & (magnitude >= behind)
    strong = is_maximum & (magnitude >= high_threshold)
    weak = is_maximum & (magnitude >= low_threshold)

    # Hysteresis: weak pixels join when 8-connected to an edge, until nothing changes.
    def grow(edges: tf.Tensor, _: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        near_edge = tf.nn.max_pool2d(tf.cast(edges, tf.float32)[None, ..., None], 3, 1, "SAME")[0, ..., 0] > 0
        grown = weak & (near_edge | edges)
        return grown, tf.reduce_any(grown != edges)

    size = tf.size(magnitude)
    edges, _ = tf.while_loop(lambda _, changed: changed, grow, (strong, tf.constant(True)), maximum_iterations=size)
    return edges


def sobel_edges(image: tf.Tensor, sigma: float, threshold: float) -> tf.Tensor:
    """(S, S) bool: smoothed Sobel magnitude >= threshold (thick edges, no thinning)."""
    grad_x, grad_y = _gradient(image, sigma)
    return tf.sqrt(grad_x * grad_x + grad_y * grad_y) >= threshold


def edge_condition(image: tf.Tensor, task_config: ml_collections.ConfigDict) -> tf.Tensor:
    """(S, S, 1): +1 on edges, -1 elsewhere."""
    sigma = float(task_config.edge_sigma)
    if task_config.edge_method == "canny":
        edges = canny_edges(image, sigma, float(task_config.edge_low_threshold), float(task_config.edge_high_threshold))
    else:
        edges = sobel_edges(image, sigma, float(task_config.edge_high_threshold))
    return tf.where(edges, 1.0, -1.0)[..., None]


# --------------------------------------------------------------------------- depth


def normalise_depth(depth: tf.Tensor, *, is_disparity: bool) -> tf.Tensor:
    """Per-example min-max normalisation to [-1, 1] with near = +1; a constant map gives 0."""
    depth = tf.cast(depth, tf.float32)
    low, high = tf.reduce_min(depth), tf.reduce_max(depth)
    span = high - low
    nearness = (depth - low) if is_disparity else (high - depth)
    return tf.where(span > 0, nearness / tf.maximum(span, 1e-12) * 2.0 - 1.0, 0.0)


# --------------------------------------------------------------------------- edit


def _edit_functions() -> list[Callable[[tf.Tensor], tf.Tensor]]:
    tint = tf.constant([TINT_SHIFT, 0.0, -TINT_SHIFT])
    taps = tf.constant(BLUR_TAPS) / sum(BLUR_TAPS)
    blur_kernel = taps[:, None] * taps[None, :]

    def posterize(x: tf.Tensor) -> tf.Tensor:
        levels = tf.minimum(tf.floor((x + 1.0) / 2.0 * POSTERIZE_LEVELS), POSTERIZE_LEVELS - 1)
        return levels / (POSTERIZE_LEVELS - 1) * 2.0 - 1.0

    return [
        lambda x: x[:, ::-1],
        lambda x: tf.tile(tf.reduce_sum(x * tf.constant(LUMA_WEIGHTS), -1, keepdims=True), [1, 1, 3]),
        lambda x: -x,
        lambda x: tf.image.rot90(x),
        lambda x: tf.clip_by_value(x + tint, -1.0, 1.0),
        lambda x: tf.clip_by_value(x - tint, -1.0, 1.0),
        lambda x: tf.clip_by_value(x + BRIGHTNESS_SHIFT, -1.0, 1.0),
        lambda x: tf.clip_by_value(x - BRIGHTNESS_SHIFT, -1.0, 1.0),
        lambda x: degradations.filter2d(x, blur_kernel),
        posterize,
    ]


@tf.autograph.experimental.do_not_convert
def apply_edit(image: tf.Tensor, instruction: tf.Tensor, count: int = len(EDIT_NAMES)) -> tf.Tensor:
    """Edit number `instruction` of `EDIT_NAMES` applied to a square (S, S, 3) image in [-1, 1]."""
    functions = _edit_functions()[:count]
    edited = tf.switch_case(tf.cast(instruction, tf.int32), [lambda f=f: f(image) for f in functions])
    return tf.ensure_shape(edited, image.shape)


# --------------------------------------------------------------------------- apply


@tf.autograph.experimental.do_not_convert
def apply_task(task_config: ml_collections.ConfigDict, example: Example, seed: tf.Tensor) -> Example:
    """The example with the task applied (see the module docstring); pure in (example, seed), where
    `seed` is a [2] int32/int64 stateless seed. Runs inside tf.data maps (graph mode)."""
    check_task_config(task_config)
    name = task_config.name
    if name == "none":
        return example
    image = example["image"]
    if image.shape.rank != 3 or image.shape[-1] != 3 or image.shape[0] is None or image.shape[0] != image.shape[1]:
        raise ValueError(f"apply_task needs a square (S, S, 3) image with static S; got shape {image.shape}")
    size = int(image.shape[0])
    seed = tf.convert_to_tensor(seed)
    if seed.dtype not in (tf.int32, tf.int64):
        seed = tf.cast(seed, tf.int64)
    out = dict(example)
    if name == "sr":
        cond = super_resolution_condition(image, seed, task_config)
    elif name == "inpaint":
        cond = inpainting_condition(image, seed, task_config)
    elif name == "edge":
        cond = edge_condition(image, task_config)
    elif name == "depth" and task_config.depth_source == "feature":
        if "depth" not in example:
            raise ValueError(
                "task.name='depth' with task.depth_source='feature' needs examples with a `depth` feature "
                f"(e.g. skimage_patches, tfds nyu_depth_v2); this source gives {sorted(example)}. "
                "Use task.depth_source='procedural' for sources without depth."
            )
        cond = normalise_depth(example["depth"][..., :1], is_disparity=bool(task_config.depth_is_disparity))
    elif name == "depth":
        rendered, depth = procedural.render_procedural(image, seed, task_config.procedural)
        cond = normalise_depth(depth[..., None], is_disparity=False)
        out["image"] = rendered
        if "depth" in example:
            out["depth"] = tf.cast(depth[..., None], example["depth"].dtype)
            if "has_depth" in example:
                out["has_depth"] = tf.ones_like(example["has_depth"])
    elif text_instructions(task_config):  # the data's own pair: cond = its source image
        if "source" not in example:
            raise ValueError(
                "task.instructions='text' needs (source, edited, instruction) examples: data.source='edit_triples'."
            )
        cond = out.pop("source")
    else:  # edit
        count = int(task_config.num_instructions)
        instruction = tf.random.stateless_uniform([], seed, 0, count, tf.int32)
        out["image"] = apply_edit(image, instruction, count)
        out["instruction"] = instruction
        cond = image
    out["cond"] = tf.ensure_shape(tf.cast(cond, tf.float32), [size, size, cond_channels(task_config)])
    return out


def degrade_images(
    task_config: ml_collections.ConfigDict,
    images: np.ndarray,
    seed: int,
    *,
    depth: np.ndarray | None = None,
    indices: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Applies the task to a batch of clean images (N, S, S, 3) in [-1, 1], example i with
    `indexed_task_seed(seed, indices[i])` (default `indices = 0..N-1`; as the eval pipeline does
    with split indices), so a request read in chunks degrades each image as read whole.

    Returns `image` (the target), `cond` and, for `edit`, `instruction`, as NumPy arrays. Used where
    clean images come from outside the pipeline (sampling / evaluating a folder of images). The
    depth-feature task needs `depth` (N, S, S[, 1]).
    """
    check_task_config(task_config)
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2] or not len(images):
        raise ValueError(f"degrade_images needs a non-empty batch (N, S, S, 3) of square images; got {images.shape}")
    if task_config.name == "none":
        return {"image": images}
    features: dict[str, np.ndarray] = {"image": images}
    if needs_depth_feature(task_config):
        if depth is None:
            raise ValueError(
                "task.depth_source='feature' needs the images' depth maps: pass depth= (N, S, S[, 1]), "
                "or use task.depth_source='procedural'"
            )
        features["depth"] = np.asarray(depth, np.float32).reshape(images.shape[:3] + (1,))
    indices = np.arange(len(images)) if indices is None else np.asarray(indices, np.int64)
    ds = tf.data.Dataset.zip(tf.data.Dataset.from_tensor_slices(indices), tf.data.Dataset.from_tensor_slices(features))
    ds = ds.map(lambda index, example: apply_task(task_config, example, indexed_task_seed(seed, index)))
    batch = next(iter(ds.batch(len(images))))
    return {key: batch[key].numpy() for key in ("image", "cond", "instruction") if key in batch}
