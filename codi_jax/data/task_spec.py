"""The ``task`` section of a config: its fields, their defaults, validation, and what they imply
for the networks (condition channels, instruction vocabulary).

Why a module of its own: models, adapters, converters, samplers and config checks need these
facts, and none of them may import TensorFlow. The tasks themselves (``tasks.apply_task``, the
Real-ESRGAN chain in ``degradations``, procedural scenes in ``procedural``) are tf.data code
and import this module, never the other way round.

Sub-sections: ``task.realesrgan`` (``default_realesrgan_config``, Real-ESRGAN's second-order
degradation, see ``degradations``) and ``task.procedural`` (``default_procedural_config``,
procedural depth scenes, see ``procedural``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import ml_collections

TASKS = ("none", "sr", "inpaint", "edge", "depth", "edit")
SR_DEGRADATIONS = ("bicubic", "realesrgan")
SR_DOWNSAMPLES = ("bicubic", "area")
MASK_KINDS = ("freeform", "box", "mixed")
EDGE_METHODS = ("canny", "sobel")
DEPTH_SOURCES = ("feature", "procedural")
EDIT_INSTRUCTIONS = ("ids", "text")
# The edit table; an instruction id indexes it.
EDIT_NAMES = (
    "flip_horizontal",
    "grayscale",
    "invert",
    "rotate_90",  # counter-clockwise
    "warm_tint",
    "cool_tint",
    "brighten",
    "darken",
    "blur",
    "posterize",
)

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")
# Probabilities of (up, down, keep) in the random resize.
RESIZE_DIRECTIONS = ("up", "down", "keep")


def default_realesrgan_config() -> ml_collections.ConfigDict:
    """The `task.realesrgan` fields: Real-ESRGAN's defaults (x4plus) plus per-stage switches."""
    config = ml_collections.ConfigDict()
    # Kernels: odd sizes drawn uniformly from kernel_size_range (Real-ESRGAN: 7..21), capped at
    # max_kernel_size_fraction of the HR side (rounded down to odd, at least 3).
    config.kernel_size_range = (7, 21)
    config.max_kernel_size_fraction = 0.75
    config.resize_modes = RESIZE_MODES  # interpolations drawn uniformly at every resize
    # ---- first degradation
    config.blur_prob = 1.0  # not in Real-ESRGAN (always blurs)
    config.kernel_prob = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # probabilities of KERNEL_TYPES
    config.sinc_prob = 0.1  # sinc (ringing) kernel instead of the above
    config.blur_sigma = (0.2, 3.0)  # Gaussian sigma range (HR pixels), both axes
    config.betag_range = (0.5, 4.0)  # shape of generalized Gaussian kernels
    config.betap_range = (1.0, 2.0)  # shape of plateau kernels
    config.resize_prob = (0.2, 0.7, 0.1)  # up, down, keep
    config.resize_range = (0.15, 1.5)  # scale factor range (down: [lo, 1], up: [1, hi])
    config.noise_prob = 1.0  # not in Real-ESRGAN (always adds noise)
    config.gaussian_noise_prob = 0.5  # Gaussian, else Poisson
    config.noise_range = (1.0, 30.0)  # Gaussian sigma in 8-bit levels
    config.poisson_scale_range = (0.05, 3.0)
    config.gray_noise_prob = 0.4  # same noise in all channels
    config.jpeg_prob = 1.0  # not in Real-ESRGAN (always compresses)
    config.jpeg_range = (30, 95)  # JPEG quality range (inclusive)
    # ---- second degradation
    config.second_blur_prob = 0.8
    config.kernel_prob2 = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    config.sinc_prob2 = 0.1
    config.blur_sigma2 = (0.2, 1.5)
    config.betag_range2 = (0.5, 4.0)
    config.betap_range2 = (1.0, 2.0)
    config.resize_prob2 = (0.3, 0.4, 0.3)
    config.resize_range2 = (0.3, 1.2)  # relative to the LR size
    config.noise_prob2 = 1.0
    config.gaussian_noise_prob2 = 0.5
    config.noise_range2 = (1.0, 25.0)
    config.poisson_scale_range2 = (0.05, 2.5)
    config.gray_noise_prob2 = 0.4
    config.jpeg_prob2 = 1.0  # the final JPEG
    config.jpeg_range2 = (30, 95)
    # ---- final
    config.final_sinc_prob = 0.8  # sinc filter after the final resize (else none)
    config.final_sinc_first_prob = 0.5  # [resize + sinc] before the final JPEG (else after)
    config.quantize = True  # round the LR image to 8-bit levels, as Real-ESRGAN does
    return config


# --------------------------------------------------------------------------- task.realesrgan checks


def _require(ok: bool, field: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r}: expected {expected}")


def _check_probability(config: ml_collections.ConfigDict, prefix: str, name: str) -> None:
    value = config[name]
    _require(isinstance(value, int | float) and 0.0 <= value <= 1.0, prefix + name, value, "a probability in [0, 1]")


def _check_range(config: ml_collections.ConfigDict, prefix: str, name: str, *, low: float) -> None:
    value = config[name]
    ok = isinstance(value, Sequence) and len(value) == 2 and low <= value[0] <= value[1]
    _require(ok, prefix + name, value, f"(lo, hi) with {low} <= lo <= hi")


def _check_distribution(config: ml_collections.ConfigDict, prefix: str, name: str, names: Sequence[str]) -> None:
    value = config[name]
    ok = (
        isinstance(value, Sequence)
        and len(value) == len(names)
        and all(isinstance(p, int | float) and p >= 0 for p in value)
        and sum(value) > 0
    )
    _require(ok, prefix + name, value, f"{len(names)} non-negative weights with a positive sum for {tuple(names)}")


def check_realesrgan_config(config: ml_collections.ConfigDict, prefix: str = "task.realesrgan.") -> None:
    """Raises ValueError naming the first bad field."""
    for name in (
        "blur_prob",
        "sinc_prob",
        "noise_prob",
        "gaussian_noise_prob",
        "gray_noise_prob",
        "jpeg_prob",
        "second_blur_prob",
        "sinc_prob2",
        "noise_prob2",
        "gaussian_noise_prob2",
        "gray_noise_prob2",
        "jpeg_prob2",
        "final_sinc_prob",
        "final_sinc_first_prob",
    ):
        _check_probability(config, prefix, name)
    for name in ("kernel_prob", "kernel_prob2"):
        _check_distribution(config, prefix, name, KERNEL_TYPES)
    for name in ("resize_prob", "resize_prob2"):
        _check_distribution(config, prefix, name, RESIZE_DIRECTIONS)
    for name in ("blur_sigma", "blur_sigma2", "resize_range", "resize_range2", "poisson_scale_range"):
        _check_range(config, prefix, name, low=1e-6)
    _check_range(config, prefix, "poisson_scale_range2", low=0.0)
    for name in ("betag_range", "betag_range2", "betap_range", "betap_range2"):
        _check_range(config, prefix, name, low=1e-3)
    for name in ("noise_range", "noise_range2"):
        _check_range(config, prefix, name, low=0.0)
    for name in ("jpeg_range", "jpeg_range2"):
        value = config[name]
        _check_range(config, prefix, name, low=1)
        _require(value[1] <= 100 and all(float(q).is_integer() for q in value), prefix + name, value, "integers <= 100")
    sizes = config.kernel_size_range
    _check_range(config, prefix, "kernel_size_range", low=1)
    _require(all(int(s) % 2 == 1 for s in sizes), prefix + "kernel_size_range", sizes, "odd sizes")
    fraction = config.max_kernel_size_fraction
    _require(0.0 < fraction, prefix + "max_kernel_size_fraction", fraction, "a positive fraction of the image side")
    modes = tuple(config.resize_modes)
    ok = bool(modes) and all(mode in RESIZE_MODES for mode in modes)
    _require(ok, prefix + "resize_modes", config.resize_modes, f"a non-empty subset of {RESIZE_MODES}")


def default_procedural_config() -> ml_collections.ConfigDict:
    """The `task.procedural` fields."""
    config = ml_collections.ConfigDict()
    config.max_objects = 4  # objects in front of the background: 1..max_objects, uniform
    config.sphere_prob = 0.5  # each object is a sphere with this probability, else a box
    config.depth_range = (1.0, 4.0)  # (near, far): objects' centres in the nearer 70%, background beyond
    config.size_range = (0.15, 0.5)  # sphere radius / box half-side, in units of the image half-width
    config.max_tilt = 0.5  # |dz/du|, |dz/dv| of boxes and (x 0.3) of the background plane
    config.ambient = 0.35  # shading: ambient + (1 - ambient) * max(0, n . light)
    return config


def check_procedural_config(config: ml_collections.ConfigDict, prefix: str = "task.procedural.") -> None:
    """Raises ValueError naming the first bad field."""

    def require(ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise ValueError(f"{prefix}{name}={config[name]!r}: expected {expected}")

    require(isinstance(config.max_objects, int) and config.max_objects >= 1, "max_objects", "an int >= 1")
    require(0.0 <= config.sphere_prob <= 1.0, "sphere_prob", "a probability in [0, 1]")
    near, far = config.depth_range
    require(0.0 < near < far, "depth_range", "(near, far) with 0 < near < far")
    low, high = config.size_range
    require(0.0 < low <= high, "size_range", "(lo, hi) with 0 < lo <= hi")
    require(config.max_tilt >= 0.0, "max_tilt", "a non-negative slope")
    require(0.0 <= config.ambient <= 1.0, "ambient", "a fraction in [0, 1]")


def default_task_config() -> ml_collections.ConfigDict:
    """The `config.task` fields and their defaults (only those of `name`'s task are used)."""
    config = ml_collections.ConfigDict()
    config.name = "none"  # one of TASKS
    # ---- sr
    config.scale = 4  # downscale factor; must divide the image size
    config.degradation = "bicubic"  # 'bicubic' | 'realesrgan'
    config.downsample = "bicubic"  # filter of the 'bicubic' degradation: 'bicubic' (anti-aliased) | 'area'
    config.realesrgan = default_realesrgan_config()  # degradation='realesrgan' only
    # ---- inpaint
    config.mask_kind = "mixed"  # 'freeform' (brush strokes) | 'box' | 'mixed'
    config.mask_area_range = (0.1, 0.5)  # target hole area fraction, drawn uniformly per example
    config.mask_box_prob = 0.5  # mask_kind='mixed': probability of a box mask (else strokes)
    config.stroke_max_count = 8  # candidate strokes; added one by one until the target area
    config.stroke_max_segments = 6  # segments per stroke: 1..this, uniform
    config.stroke_length_range = (0.1, 0.4)  # segment length, fraction of the image side
    config.stroke_width_range = (0.05, 0.15)  # brush width, fraction of the side (at least 1 px)
    config.box_max_count = 4  # candidate boxes; added one by one until the target area
    config.box_size_range = (0.15, 0.6)  # box side, fraction of the image side
    # ---- edge
    config.edge_method = "canny"  # 'canny' | 'sobel' (magnitude >= edge_high_threshold, no thinning)
    config.edge_sigma = 1.0  # Gaussian smoothing before the gradient (pixels; 0 = none)
    # Thresholds on the gradient magnitude of the [0, 1] gray image (Sobel / 8: a unit step gives 0.5
    # unsmoothed); 0.05 / 0.1 are about ControlNet's Canny 100 / 200 on 8-bit images.
    config.edge_low_threshold = 0.05
    config.edge_high_threshold = 0.1
    # ---- depth
    config.depth_source = "feature"  # 'feature' (the example's `depth`) | 'procedural'
    config.depth_is_disparity = True  # the feature grows towards the camera (skimage_patches); False: metric
    config.filter_missing_depth = True  # drop examples whose `has_depth` is False
    config.procedural = default_procedural_config()  # depth_source='procedural' only
    # ---- edit
    config.num_instructions = len(EDIT_NAMES)  # the first this many of EDIT_NAMES are used
    # 'ids': this codebase's synthetic edits (EDIT_NAMES, an instruction id per example); 'text':
    # the data's own pairs and free-text instructions (source='edit_triples', InstructPix2Pix)
    config.instructions = "ids"
    return config


# --------------------------------------------------------------------------- task checks


def _fail(field: str, value: Any, expected: str) -> NoReturn:
    raise ValueError(f"task.{field}={value!r}: expected {expected}")


def _check_choice(config: ml_collections.ConfigDict, field: str, choices: Sequence[str]) -> None:
    if config[field] not in choices:
        _fail(field, config[field], f"one of {tuple(choices)}")


def _check_fraction_range(config: ml_collections.ConfigDict, field: str, *, upper: float = 1.0) -> None:
    value = config[field]
    ok = isinstance(value, Sequence) and len(value) == 2 and 0.0 < value[0] <= value[1] <= upper
    if not ok:
        _fail(field, value, f"(lo, hi) with 0 < lo <= hi <= {upper}")


def _check_count(config: ml_collections.ConfigDict, field: str) -> None:
    value = config[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(field, value, "an integer >= 1")


def check_task_config(task_config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field when `task_config` is invalid for its task."""
    name = task_config.get("name")
    if name not in TASKS:
        raise ValueError(f"task.name={name!r}: unknown task; valid names: {TASKS}")
    if name == "sr":
        scale = task_config.scale
        if not isinstance(scale, int) or isinstance(scale, bool) or scale < 2:
            _fail("scale", scale, "an integer >= 2 (e.g. 2 or 4)")
        _check_choice(task_config, "degradation", SR_DEGRADATIONS)
        _check_choice(task_config, "downsample", SR_DOWNSAMPLES)
        if task_config.degradation == "realesrgan":
            check_realesrgan_config(task_config.realesrgan)
    elif name == "inpaint":
        _check_choice(task_config, "mask_kind", MASK_KINDS)
        _check_fraction_range(task_config, "mask_area_range")
        if not 0.0 <= task_config.mask_box_prob <= 1.0:
            _fail("mask_box_prob", task_config.mask_box_prob, "a probability in [0, 1]")
        for field in ("stroke_max_count", "stroke_max_segments", "box_max_count"):
            _check_count(task_config, field)
        _check_fraction_range(task_config, "stroke_length_range", upper=2.0)
        _check_fraction_range(task_config, "stroke_width_range")
        _check_fraction_range(task_config, "box_size_range")
    elif name == "edge":
        _check_choice(task_config, "edge_method", EDGE_METHODS)
        if task_config.edge_sigma < 0:
            _fail("edge_sigma", task_config.edge_sigma, "a non-negative sigma in pixels")
        low, high = task_config.edge_low_threshold, task_config.edge_high_threshold
        if not 0.0 <= low <= high:
            _fail("edge_low_threshold", low, f"0 <= edge_low_threshold <= edge_high_threshold ({high})")
    elif name == "depth":
        _check_choice(task_config, "depth_source", DEPTH_SOURCES)
        if task_config.depth_source == "procedural":
            check_procedural_config(task_config.procedural)
    elif name == "edit":
        if "instructions" in task_config:  # configs saved before the field existed: 'ids'
            _check_choice(task_config, "instructions", EDIT_INSTRUCTIONS)
        count = task_config.num_instructions
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= len(EDIT_NAMES):
            _fail("num_instructions", count, f"an integer in [1, {len(EDIT_NAMES)}] (the edits: {EDIT_NAMES})")


def cond_channels(task_config: ml_collections.ConfigDict) -> int:
    """Channels of `cond` (0 for the unconditional task)."""
    check_task_config(task_config)
    return {"none": 0, "sr": 3, "inpaint": 4, "edge": 1, "depth": 1, "edit": 3}[task_config.name]


def num_instructions(task_config: ml_collections.ConfigDict) -> int:
    """Size of the instruction vocabulary (0 for tasks without instructions)."""
    check_task_config(task_config)
    return int(task_config.num_instructions) if task_config.name == "edit" and not text_instructions(task_config) else 0


def text_instructions(task_config: ml_collections.ConfigDict) -> bool:
    """True for the edit task on the data's own (source, edited, instruction) triples."""
    return task_config.name == "edit" and task_config.instructions == "text"


def instruction_names(task_config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Names of the instruction ids in use (empty for tasks without instructions)."""
    return EDIT_NAMES[: num_instructions(task_config)]


def needs_depth_feature(task_config: ml_collections.ConfigDict) -> bool:
    """True when the task reads the examples' `depth` feature."""
    check_task_config(task_config)
    return task_config.name == "depth" and task_config.depth_source == "feature"
