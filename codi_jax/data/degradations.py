"""Real-ESRGAN's second-order degradation (Wang et al., ICCV-W 2021), one example at a time in TF ops.

Why: real-world super-resolution (the paper's DF2K setting) is trained on LR images made by a
random chain of blur, resize, noise and JPEG applied twice, not by a clean bicubic downscale.
This module reproduces that chain (basicsr's `RealESRGANDataset` kernels + `RealESRGANModel.feed_data`)
with stateless random ops, so that it runs inside a tf.data map and is a pure function of a seed.

    stage 1: blur (random kernel) -> random resize (up / down / keep, random interpolation)
             -> Gaussian or Poisson noise (colour or gray) -> JPEG (random quality)
    stage 2: blur (with `second_blur_prob`) -> random resize towards the LR size -> noise
    final:   in random order, [resize to LR size + sinc filter] and [JPEG]; then round to 1/255

Every probability and range is a field of `task_spec.default_realesrgan_config()` with Real-ESRGAN's
default (options/train_realesrgan_x4plus.yml). Fields that Real-ESRGAN does not have (its stage
is always on) are probabilities defaulting to 1.0, so each stage can be switched off: with all
stage probabilities 0, `resize_prob=resize_prob2=(0, 0, 1)` and a single `resize_modes` entry the
result is a plain (8-bit rounded) resize to the LR size.

Differences from the reference, on purpose:
  * the target is the clean image, not the unsharp-masked one Real-ESRGAN trains against;
  * JPEG quality is an integer (TF's encoder) and the encoder is libjpeg, not DiffJPEG;
  * TF's bicubic uses the Keys kernel with a=-0.5 (PyTorch's uses a=-0.75);
  * kernel sizes are capped at `max_kernel_size_fraction` of the image side, so tiny training
    patches (16-32 px) do not get kernels wider than themselves (21 px at 256 px is ~8% of the
    side). Blur sigmas keep their meaning in HR pixels, so their effect relative to the LR pixel
    grid is the same as in Real-ESRGAN at any patch size;
  * reflect padding works for any image size (intermediate images can be a few pixels wide).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import ml_collections
import tensorflow as tf


def kernel_size_choices(config: ml_collections.ConfigDict, image_size: int) -> tuple[int, ...]:
    """The odd kernel sizes drawn from, after capping them for `image_size` (see the module docstring)."""
    low, high = (int(s) for s in config.kernel_size_range)
    cap = max(3, int(config.max_kernel_size_fraction * image_size))
    cap -= 1 - cap % 2  # Largest odd size <= cap.
    high = min(high, cap)
    low = min(low, high)
    return tuple(range(low, high + 1, 2))


# --------------------------------------------------------------------------- random helpers


def split_seed(seed: tf.Tensor, count: int) -> list[tf.Tensor]:
    """`count` independent stateless seeds derived from one."""
    return tf.unstack(tf.random.experimental.stateless_split(seed, count))


def uniform(seed: tf.Tensor, low: float, high: float, shape: Sequence[int] = ()) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed, minval=low, maxval=high)


def choose(seed: tf.Tensor, weights: Sequence[float]) -> tf.Tensor:
    """An int32 index drawn with probabilities proportional to `weights` (zero weights never)."""
    total = float(sum(weights))
    cumulative = tf.constant([sum(weights[: i + 1]) / total for i in range(len(weights) - 1)], tf.float32)
    draw = uniform(seed, 0.0, 1.0)
    return tf.reduce_sum(tf.cast(cumulative <= draw, tf.int32))


def either(
    probability: float, seed: tf.Tensor, if_drawn: Callable[[], tf.Tensor], otherwise: Callable[[], tf.Tensor]
) -> tf.Tensor:
    """`if_drawn()` with the given probability, else `otherwise()`; decided in Python (no graph
    branch, nothing random drawn) when the probability is 0 or 1."""
    if probability <= 0.0:
        return otherwise()
    if probability >= 1.0:
        return if_drawn()
    return tf.cond(uniform(seed, 0.0, 1.0) < probability, if_drawn, otherwise)


def with_probability(
    probability: float, seed: tf.Tensor, apply: Callable[[tf.Tensor], tf.Tensor], image: tf.Tensor
) -> tf.Tensor:
    """`apply(image)` with the given probability, else `image`."""
    return either(probability, seed, lambda: apply(image), lambda: tf.identity(image))


# --------------------------------------------------------------------------- filtering


def mirror_index(index: tf.Tensor, length: tf.Tensor) -> tf.Tensor:
    """Maps any integer position onto [0, length) by mirroring at the borders without repeating the
    edge (`... c b | a b c | b a ...`); valid for any length >= 1 and any distance outside."""
    period = tf.maximum(2 * (length - 1), 1)
    folded = tf.math.floormod(index, period)
    return tf.where(folded < length, folded, period - folded)


def reflect_indices(length: tf.Tensor, pad: int) -> tf.Tensor:
    """Indices of an axis reflect-padded by `pad` on both sides, also when `pad` exceeds the length."""
    return mirror_index(tf.range(-pad, length + pad), length)


def reflect_pad(image: tf.Tensor, pad: int) -> tf.Tensor:
    """Reflect-pads the two spatial axes of an HxWxC image by `pad` pixels."""
    if pad == 0:
        return image
    shape = tf.shape(image)
    image = tf.gather(image, reflect_indices(shape[0], pad), axis=0)
    return tf.gather(image, reflect_indices(shape[1], pad), axis=1)


def filter2d(image: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """Correlates every channel of an HxWxC image with a KxK kernel (K odd, static), reflect padding
    (basicsr's `filter2D`)."""
    size = int(kernel.shape[0])
    channels = int(image.shape[-1])
    padded = reflect_pad(image, size // 2)
    weights = tf.tile(tf.cast(kernel, tf.float32)[:, :, None, None], [1, 1, channels, 1])
    return tf.nn.depthwise_conv2d(padded[None], weights, [1, 1, 1, 1], "VALID")[0]


def gaussian_kernel(sigma: float) -> tf.Tensor:
    """Normalised isotropic Gaussian, radius ceil(3 sigma)."""
    radius = max(1, math.ceil(3.0 * sigma))
    axis = tf.range(-radius, radius + 1, dtype=tf.float32)
    profile = tf.exp(-0.5 * tf.square(axis / sigma))
    kernel = profile[:, None] * profile[None, :]
    return kernel / tf.reduce_sum(kernel)


# --------------------------------------------------------------------------- kernels


def _kernel_grid(size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(x, y) offsets from the centre of a size x size kernel: x along columns, y along rows."""
    axis = tf.range(-(size // 2), size // 2 + 1, dtype=tf.float32)
    rows, cols = tf.meshgrid(axis, axis, indexing="ij")
    return cols, rows


def _support(size: int, kernel_size: tf.Tensor) -> tf.Tensor:
    """True inside the centred kernel_size x kernel_size window of the size x size grid (basicsr
    zero-pads every kernel to the largest size)."""
    x, y = _kernel_grid(size)
    half = tf.cast(kernel_size // 2, tf.float32)
    return (tf.abs(x) <= half) & (tf.abs(y) <= half)


def _normalised(kernel: tf.Tensor, support: tf.Tensor) -> tf.Tensor:
    kernel = tf.where(support, kernel, 0.0)
    return kernel / tf.reduce_sum(kernel)


def sinc_kernel(size: int, kernel_size: tf.Tensor, cutoff: tf.Tensor) -> tf.Tensor:
    """basicsr's `circular_lowpass_kernel`: a 2-D sinc (Airy) low-pass with cutoff frequency `cutoff`
    (radians per pixel), which causes ringing and overshoot artefacts."""
    x, y = _kernel_grid(size)
    radius = tf.sqrt(x * x + y * y)
    safe_radius = tf.where(radius > 0, radius, 1.0)
    kernel = cutoff * tf.math.special.bessel_j1(cutoff * safe_radius) / (2.0 * math.pi * safe_radius)
    kernel = tf.where(radius > 0, kernel, cutoff * cutoff / (4.0 * math.pi))
    return _normalised(kernel, _support(size, kernel_size))


def _random_beta(seed: tf.Tensor, beta_range: Sequence[float]) -> tf.Tensor:
    """basicsr: beta < 1 and beta > 1 are equally likely."""
    side_seed, low_seed, high_seed = split_seed(seed, 3)
    below_one = uniform(low_seed, float(beta_range[0]), 1.0)
    above_one = uniform(high_seed, 1.0, float(beta_range[1]))
    return tf.where(uniform(side_seed, 0.0, 1.0) < 0.5, below_one, above_one)


@tf.autograph.experimental.do_not_convert
def random_mixed_kernel(
    seed: tf.Tensor,
    *,
    size_choices: Sequence[int],
    kernel_prob: Sequence[float],
    sigma_range: Sequence[float],
    betag_range: Sequence[float],
    betap_range: Sequence[float],
    sinc_prob: float,
) -> tf.Tensor:
    """One random blur kernel of static shape (max(size_choices),) * 2, zero outside its drawn size.

    Types (KERNEL_TYPES): Gaussian, generalized Gaussian exp(-0.5 q^beta) and plateau 1 / (1 + q^beta),
    each isotropic or anisotropic (two sigmas, random rotation), where q is the Mahalanobis norm of
    the offset; with probability `sinc_prob` a sinc kernel instead (cutoff in [pi/3, pi] for kernels
    smaller than 13 px, [pi/5, pi] otherwise).
    """
    size = max(size_choices)
    seeds = split_seed(seed, 10)
    choices = tf.constant(list(size_choices), tf.int32)
    kernel_size = tf.gather(choices, tf.random.stateless_uniform([], seeds[0], 0, len(size_choices), tf.int32))
    support = _support(size, kernel_size)

    kind = choose(seeds[1], kernel_prob)
    isotropic = kind % 2 == 0
    family = kind // 2  # 0 Gaussian, 1 generalized Gaussian, 2 plateau
    sigma_x = uniform(seeds[2], *sigma_range)
    sigma_y = tf.where(isotropic, sigma_x, uniform(seeds[3], *sigma_range))
    theta = tf.where(isotropic, 0.0, uniform(seeds[4], -math.pi, math.pi))
    beta = tf.gather(
        tf.stack([tf.constant(1.0), _random_beta(seeds[5], betag_range), _random_beta(seeds[6], betap_range)]),
        family,
    )
    x, y = _kernel_grid(size)
    cos, sin = tf.cos(theta), tf.sin(theta)
    # q = x^T Sigma^-1 x with Sigma = R diag(sx^2, sy^2) R^T (basicsr's sigma_matrix2).
    q = tf.square((cos * x + sin * y) / sigma_x) + tf.square((cos * y - sin * x) / sigma_y)
    q_beta = tf.pow(q, beta)
    kernel = tf.where(family == 2, 1.0 / (q_beta + 1.0), tf.exp(-0.5 * q_beta))
    kernel = _normalised(kernel, support)

    if sinc_prob <= 0.0:
        return kernel
    low_cutoff = tf.where(kernel_size < 13, math.pi / 3.0, math.pi / 5.0)
    cutoff = low_cutoff + uniform(seeds[7], 0.0, 1.0) * (math.pi - low_cutoff)
    use_sinc = uniform(seeds[8], 0.0, 1.0) < sinc_prob
    return tf.where(use_sinc, sinc_kernel(size, kernel_size, cutoff), kernel)


# --------------------------------------------------------------------------- stages


def _resize(image: tf.Tensor, size: tf.Tensor, mode: str) -> tf.Tensor:
    # PyTorch's F.interpolate (which Real-ESRGAN uses) does not anti-alias bilinear / bicubic.
    return tf.image.resize(image, size, method=mode, antialias=False)


@tf.autograph.experimental.do_not_convert
def random_resize(image: tf.Tensor, size: tf.Tensor, seed: tf.Tensor, modes: Sequence[str]) -> tf.Tensor:
    """Resizes to `size` ([2] int32) with an interpolation drawn uniformly from `modes`; a no-op when
    the size is unchanged (every mode is the identity then)."""

    def resize() -> tf.Tensor:
        if len(modes) == 1:
            return _resize(image, size, modes[0])
        index = tf.random.stateless_uniform([], seed, 0, len(modes), tf.int32)
        return tf.switch_case(index, [lambda mode=mode: _resize(image, size, mode) for mode in modes])

    unchanged = tf.reduce_all(tf.shape(image)[:2] == size)
    return tf.cond(unchanged, lambda: tf.identity(image), resize)


def _random_scale(seed: tf.Tensor, direction_prob: Sequence[float], scale_range: Sequence[float]) -> tf.Tensor:
    direction_seed, scale_seed = split_seed(seed, 2)
    direction = choose(direction_seed, direction_prob)
    up = uniform(scale_seed, 1.0, float(scale_range[1]))
    down = uniform(scale_seed, float(scale_range[0]), 1.0)
    return tf.gather(tf.stack([up, down, tf.constant(1.0)]), direction)


def _gaussian_noise(image: tf.Tensor, seed: tf.Tensor, sigma_range: Sequence[float], gray_prob: float) -> tf.Tensor:
    sigma_seed, gray_seed, noise_seed = split_seed(seed, 3)
    sigma = uniform(sigma_seed, *sigma_range) / 255.0
    shape = tf.shape(image)

    def noise(channels: int) -> Callable[[], tf.Tensor]:
        return lambda: tf.random.stateless_normal(tf.concat([shape[:2], [channels]], 0), noise_seed) * sigma

    return tf.clip_by_value(image + either(gray_prob, gray_seed, noise(1), noise(3)), 0.0, 1.0)


def _poisson_noise_of(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """basicsr's `generate_poisson_noise_pt` (scale 1): the 8-bit image's levels are counted, rounded
    up to a power of two, and used as the photon count per unit intensity."""
    levels = tf.clip_by_value(tf.round(image * 255.0), 0.0, 255.0)
    quantised = levels / 255.0
    unique_levels = tf.cast(tf.size(tf.unique(tf.reshape(levels, [-1]))[0]), tf.float32)
    counts = tf.pow(2.0, tf.math.ceil(tf.math.log(unique_levels) / math.log(2.0)))
    photons = tf.random.stateless_poisson(tf.shape(quantised), seed, lam=quantised * counts, dtype=tf.float32)
    return photons / counts - quantised


def _poisson_noise(image: tf.Tensor, seed: tf.Tensor, scale_range: Sequence[float], gray_prob: float) -> tf.Tensor:
    scale_seed, gray_seed, noise_seed = split_seed(seed, 3)
    scale = uniform(scale_seed, *scale_range)

    def gray_noise() -> tf.Tensor:
        return _poisson_noise_of(tf.image.rgb_to_grayscale(image), noise_seed)

    def colour_noise() -> tf.Tensor:
        return _poisson_noise_of(image, noise_seed)

    return tf.clip_by_value(image + either(gray_prob, gray_seed, gray_noise, colour_noise) * scale, 0.0, 1.0)


@tf.autograph.experimental.do_not_convert
def random_noise(
    image: tf.Tensor,
    seed: tf.Tensor,
    *,
    gaussian_prob: float,
    sigma_range: Sequence[float],
    poisson_scale_range: Sequence[float],
    gray_prob: float,
) -> tf.Tensor:
    """Gaussian noise (sigma in 8-bit levels) with probability `gaussian_prob`, else Poisson noise;
    in both cases the same noise for all channels with probability `gray_prob`. Clipped to [0, 1]."""
    kind_seed, noise_seed = split_seed(seed, 2)
    gaussian = lambda: _gaussian_noise(image, noise_seed, sigma_range, gray_prob)
    poisson = lambda: _poisson_noise(image, noise_seed, poisson_scale_range, gray_prob)
    return either(gaussian_prob, kind_seed, gaussian, poisson)


def random_jpeg(image: tf.Tensor, seed: tf.Tensor, quality_range: Sequence[int]) -> tf.Tensor:
    """JPEG round trip at an integer quality drawn uniformly from `quality_range` (inclusive)."""
    quality = tf.random.stateless_uniform([], seed, int(quality_range[0]), int(quality_range[1]) + 1, tf.int32)
    compressed = tf.image.adjust_jpeg_quality(tf.clip_by_value(image, 0.0, 1.0), quality)
    return tf.reshape(compressed, tf.shape(image))


# A stage's keywords -> the config fields of stage 1 (stage 2's end in "2"; its blur_prob is second_blur_prob).
_KERNEL_FIELDS = dict(
    kernel_prob="kernel_prob",
    sigma_range="blur_sigma",
    betag_range="betag_range",
    betap_range="betap_range",
    sinc_prob="sinc_prob",
)
_NOISE_FIELDS = dict(
    gaussian_prob="gaussian_noise_prob",
    sigma_range="noise_range",
    poisson_scale_range="poisson_scale_range",
    gray_prob="gray_noise_prob",
)
_STAGE_FIELDS = ("resize_prob", "resize_range", "noise_prob", "jpeg_prob", "jpeg_range")


def _stage_fields(config: ml_collections.ConfigDict, second: bool) -> dict:
    """One degradation stage's settings: ranges and probability vectors as tuples, probabilities as floats."""
    suffix = "2" if second else ""

    def read(field: str) -> tuple | float:
        value = config[field + suffix]
        return tuple(value) if isinstance(value, Sequence) else float(value)

    return {
        "kernel": {key: read(field) for key, field in _KERNEL_FIELDS.items()},
        "blur_prob": float(config.second_blur_prob if second else config.blur_prob),
        "noise": {key: read(field) for key, field in _NOISE_FIELDS.items()},
        **{field: read(field) for field in _STAGE_FIELDS},
    }


@tf.autograph.experimental.do_not_convert
def realesrgan_degrade(image: tf.Tensor, seed: tf.Tensor, config: ml_collections.ConfigDict, scale: int) -> tf.Tensor:
    """The LR image (S/scale, S/scale, 3) in [0, 1] of one HR image (S, S, 3) in [0, 1]."""
    size = int(image.shape[0])
    low_size = size // scale
    modes = tuple(config.resize_modes)
    size_choices = kernel_size_choices(config, size)
    seeds = iter(split_seed(seed, 24))

    def blur(fields: dict) -> Callable[[tf.Tensor], tf.Tensor]:
        kernel_seed = next(seeds)
        return lambda x: filter2d(x, random_mixed_kernel(kernel_seed, size_choices=size_choices, **fields["kernel"]))

    def noise(fields: dict) -> Callable[[tf.Tensor], tf.Tensor]:
        noise_seed = next(seeds)
        return lambda x: random_noise(x, noise_seed, **fields["noise"])

    def jpeg(quality_range: Sequence[int]) -> Callable[[tf.Tensor], tf.Tensor]:
        jpeg_seed = next(seeds)
        return lambda x: random_jpeg(x, jpeg_seed, quality_range)

    def resize(x: tf.Tensor, base: int, fields: dict) -> tf.Tensor:
        factor = _random_scale(next(seeds), fields["resize_prob"], fields["resize_range"])
        new_size = tf.maximum(tf.cast(tf.floor(base * factor), tf.int32), 1)
        return random_resize(x, tf.stack([new_size, new_size]), next(seeds), modes)

    out = image
    for second in (False, True):
        stage = _stage_fields(config, second)
        out = with_probability(stage["blur_prob"], next(seeds), blur(stage), out)
        # Stage 2's resize goes to the LR size times a random factor.
        out = resize(out, low_size if second else size, stage)
        out = with_probability(stage["noise_prob"], next(seeds), noise(stage), out)
        if not second:  # Stage 2's JPEG is part of the final step.
            out = with_probability(stage["jpeg_prob"], next(seeds), jpeg(stage["jpeg_range"]), out)

    # Final: [resize to the LR size + sinc filter] and [JPEG], in random order.
    final_resize_seed, sinc_seed, sinc_prob_seed, jpeg_prob_seed, order_seed = (next(seeds) for _ in range(5))
    final_jpeg = jpeg(tuple(config.jpeg_range2))

    def sinc(x: tf.Tensor) -> tf.Tensor:
        size_seed, cutoff_seed = split_seed(sinc_seed, 2)
        choices = tf.constant(list(size_choices), tf.int32)
        kernel_size = tf.gather(choices, tf.random.stateless_uniform([], size_seed, 0, len(size_choices), tf.int32))
        cutoff = uniform(cutoff_seed, math.pi / 3.0, math.pi)
        return filter2d(x, sinc_kernel(max(size_choices), kernel_size, cutoff))

    def resize_and_sinc(x: tf.Tensor) -> tf.Tensor:
        x = random_resize(x, tf.constant([low_size, low_size]), final_resize_seed, modes)
        return with_probability(float(config.final_sinc_prob), sinc_prob_seed, sinc, x)

    def compress(x: tf.Tensor) -> tf.Tensor:
        return with_probability(float(config.jpeg_prob2), jpeg_prob_seed, final_jpeg, x)

    before_final = out
    out = either(
        float(config.final_sinc_first_prob),
        order_seed,
        lambda: compress(resize_and_sinc(before_final)),
        lambda: resize_and_sinc(compress(before_final)),
    )
    out = tf.clip_by_value(out, 0.0, 1.0)
    if config.quantize:
        out = tf.round(out * 255.0) / 255.0
    return tf.ensure_shape(out, [low_size, low_size, 3])
