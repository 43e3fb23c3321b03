"""Few-step conditional sampling as library functions (the ``codi_jax.sample`` CLI wraps them).

``prepare`` checks everything about a sampling request before any weight is read or anything is
compiled (the run's saved config only, ``pretrained.read_config``): the input path and every
image in it, the output directory, the step count against the run's training grid, the task;
``run`` then restores the model, samples and writes one PNG per input plus a grid, all or
nothing (``atomic.write_files``), never overwriting anything.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from codi_jax import atomic, sharding
from codi_jax.data import image_files, task_spec
from codi_jax.frozen import batch_inputs, encoders
from codi_jax.models import networks
from codi_jax.runs.pretrained import Pretrained, load_conditional, read_config
from codi_jax.sampling import conditional, samplers
from codi_jax.sampling.options import SamplingOptions

CONDITION_TASKS = ("sr", "edge", "depth")  # tasks whose condition is one image (--input=condition)
GRID_MIN_TILE = 128  # grid tiles are enlarged (nearest neighbour) to at least this many pixels
MAX_NOTES = 5  # resize notes printed before the rest are summed up


def list_inputs(path: str, flag: str = "--images") -> list[str]:
    """The image files at ``path`` (one file, or a folder searched recursively); errors name the flag."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path}: no such file or directory.")
    try:
        return image_files.list_image_files(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{flag} {path}: the folder holds no images ({', '.join(image_files.IMAGE_EXTENSIONS)})."
        ) from None


def fit_image(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxWx3 -> float32 ``size`` x ``size`` x 3 in [-1, 1]: shorter side resized (bicubic), centre crop."""
    image = Image.fromarray(rgb)
    if image.size != (size, size):
        scale = size / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((width, height), Image.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, np.float32) / 127.5 - 1.0


def load_images(
    path: str | Sequence[str],
    size: int,
    *,
    accepted_sizes: Sequence[int] | None = None,
    strict: bool = False,
    note: Callable[[str], None] | None = print,
    flag: str = "--images",
) -> tuple[list[str], np.ndarray]:
    """``(names, images)``: every image at ``path`` (file, folder, or a list of files) as float32
    [-1, 1], resized (shorter side, bicubic) and centre-cropped to ``size``.

    Images not square at one of ``accepted_sizes`` (default: ``size``) are resized with a note
    (``note``; None: silently), or refused with ``strict``. A file that does not decode is an
    error naming it; ``flag`` names the path in errors."""
    paths = list_inputs(path, flag) if isinstance(path, str) else list(path)
    accepted = tuple(accepted_sizes or (size,))
    images, notes = [], []
    for p in paths:
        rgb = image_files.load_image_rgb(p)  # ValueError naming the file if it does not decode
        height, width = rgb.shape[:2]
        if not (height == width and height in accepted):
            wanted = " or ".join(f"{s}x{s}" for s in accepted)
            if strict:
                raise ValueError(f"{p}: {width}x{height}, the model takes {wanted} images (--strict_size).")
            notes.append(f"{os.path.basename(p)}: {width}x{height} resized to {size}x{size}")
        images.append(fit_image(rgb, size))
    if note is not None:
        for line in notes[:MAX_NOTES]:
            note(line)
        if len(notes) > MAX_NOTES:
            note(f"... and {len(notes) - MAX_NOTES} more images resized to {size}x{size}")
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return names, np.stack(images)


def check_condition_task(task_config: ml_collections.ConfigDict) -> None:
    if task_spec.text_instructions(task_config):
        return  # the source image to edit, with the instruction from --prompt
    if task_config.name not in CONDITION_TASKS:
        raise ValueError(
            f"--input=condition is not supported for task {task_config.name!r} (its condition is not a single "
            "image); use --input=clean with clean images."
        )


def conditions_from_images(task_config: ml_collections.ConfigDict, images: np.ndarray) -> np.ndarray:
    """Conditions given directly as images (``--input=condition``)."""
    check_condition_task(task_config)
    if task_spec.text_instructions(task_config):
        return images
    if task_config.name == "sr":
        size = images.shape[1]
        low = size // int(task_config.scale)
        small = jax.image.resize(jnp.asarray(images), (len(images), low, low, 3), "bicubic", antialias=True)
        return np.clip(np.asarray(jax.image.resize(small, images.shape, "bicubic")), -1.0, 1.0)
    gray = images @ np.array([0.299, 0.587, 0.114], np.float32)
    return gray[..., None]


def sample_file_names(names: Sequence[str], step_counts: Sequence[int]) -> list[list[str]]:
    """Per step count, one file per input: ``<name>.png`` for a single count, else ``<name>_<k>steps.png``."""
    if len(step_counts) == 1:
        return [[f"{name}.png" for name in names]]
    return [[f"{name}_{k}steps.png" for name in names] for k in step_counts]


def output_files(names: Sequence[str], step_counts: Sequence[int] = (1,)) -> list[str]:
    """The samples (``sample_file_names``) and ``grid.png``; names that collide are an error."""
    files = [f for per_count in sample_file_names(names, step_counts) for f in per_count] + ["grid.png"]
    if len(set(files)) != len(files):
        seen = [f for i, f in enumerate(files) if f in files[:i]]
        raise ValueError(f"input file names collide after removing extensions ({seen[:3]}); rename them.")
    return files


def check_out_dir(out_dir: str, files: Sequence[str], flag: str = "--out", overwrite: bool = False) -> None:
    """Refuses an output directory that is a file or (unless ``overwrite``) already holds one of ``files``."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{flag} {out_dir} is a file, not a directory.")
    clashes = [f for f in files if os.path.lexists(os.path.join(out_dir, f))]
    if clashes and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds {clashes[:3]}{'...' if len(clashes) > 3 else ''}; "
            f"choose another {flag} or pass --overwrite (nothing was overwritten)."
        )


def check_steps(config: ml_collections.ConfigDict, steps: int) -> None:
    """``steps`` >= 1 and, for CoDi, at most its training grid (from the saved config alone)."""
    if steps < 1:
        raise ValueError(f"--steps={steps}: must be at least 1.")
    try:
        conditional.sample_times(config, steps)
    except ValueError as error:
        raise ValueError(f"--steps={steps}: {error}") from None


@dataclasses.dataclass
class SamplePlan:
    """A checked sampling request: the run's config and step, the inputs and what will be written."""

    config: ml_collections.ConfigDict
    step: int
    names: list[str]
    files: list[str]
    cond: np.ndarray
    target: np.ndarray | None
    instructions: np.ndarray | None
    overwrite: bool = False


def read_conditional_config(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, int]:
    """The saved config of a codi / finetune run (JSON only, no weights) and its checkpoint step."""
    config, step = read_config(workdir, step, what="--run")
    if not networks.is_conditional(config):
        raise ValueError(
            f"--run {workdir} holds a {config.get('method', 'teacher')!r} run, not a conditional "
            "(codi / finetune) one; sample an unconditional teacher with python -m codi_jax.sample_teacher."
        )
    return config, step


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """What to sample: the trained ``run`` (``--run``), its checkpoint (None: the latest), the inputs
    ``images`` (a file or a folder; ``input_kind`` 'clean': degraded by the task, 'condition': the
    conditions themselves), the ``out`` folder (refused if it holds any output, unless ``overwrite``;
    ``skip_existing``: existing outputs are kept and skipped), the step counts, the edit
    ``instruction`` and ``strict_size`` (refuse, not resize, images at another size)."""

    run: str
    images: str
    out: str
    step_counts: tuple[int, ...] = (4,)
    input_kind: str = "clean"
    instruction: int = 0
    checkpoint_step: int | None = None
    strict_size: bool = False
    overwrite: bool = False
    skip_existing: bool = False


def check_request(
    request: SampleRequest, options: SamplingOptions = SamplingOptions()
) -> tuple[ml_collections.ConfigDict, int, list[str], list[str], list[str]]:
    """Every check of a sampling request that needs no pixels and no weights: ``(config, step,
    paths, names, files)``."""
    r, step_counts = request, request.step_counts
    if not step_counts or min(step_counts) < 1:
        raise ValueError(f"--steps={','.join(map(str, step_counts))}: every step count must be at least 1.")
    if r.input_kind not in ("clean", "condition"):
        raise ValueError(f"--input={r.input_kind!r}; valid: 'clean', 'condition'.")
    if r.overwrite and r.skip_existing:
        raise ValueError("--overwrite and --skip_existing contradict each other: choose one.")
    paths = list_inputs(r.images)
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    files = output_files(names, step_counts)
    check_out_dir(r.out, [] if r.skip_existing else files, overwrite=r.overwrite)
    config, step = read_conditional_config(r.run, r.checkpoint_step)
    for steps in step_counts:
        check_steps(config, steps)
    if options.lowpass_consistency:
        try:
            conditional.check_lowpass_consistency(config)
        except ValueError as error:
            raise ValueError(f"--lowpass_consistency: {error}") from None
    num_instructions = task_spec.num_instructions(config.task)
    if num_instructions and not 0 <= r.instruction < num_instructions:
        raise ValueError(
            f"--instruction={r.instruction}: the run's edit task has instructions 0..{num_instructions - 1}."
        )
    if r.input_kind == "condition":
        check_condition_task(config.task)
    elif task_spec.text_instructions(config.task):
        raise ValueError(
            "--input=clean: this run edits by free-text instructions; pass the images to edit with "
            "--input=condition and the instruction with --prompt."
        )
    check_text_request(config, options.prompt, options.guidance_scale)
    return config, step, paths, names, files


def read_conditions(
    config: ml_collections.ConfigDict,
    paths: Sequence[str],
    request: SampleRequest,
    seed: int,
    indices: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(cond, target or None, instructions or None)`` of the images ``paths``, input ``indices[i]``
    of the request (default ``0..n-1``): ``--input=clean`` degrades it with the task seed of that index;
    ``request`` gives the input kind, the edit instruction and ``strict_size``."""
    input_kind, instruction, strict_size = request.input_kind, request.instruction, request.strict_size
    task, size = config.task, int(config.data.image_size)
    accepted = (size // int(task.scale), size) if input_kind == "condition" and task.name == "sr" else (size,)
    _, images = load_images(list(paths), size, accepted_sizes=accepted, strict=strict_size)
    if input_kind == "clean":
        from codi_jax.data import tasks  # TensorFlow: the task's degradations run in tf ops

        degraded = tasks.degrade_images(task, images, seed, indices=indices)
        cond, target, instructions = degraded["cond"], degraded["image"], degraded.get("instruction")
    else:
        cond, target, instructions = conditions_from_images(task, images), None, None
    if task_spec.num_instructions(task) and instructions is None:
        instructions = np.full((len(cond),), instruction, np.int32)
    return cond, target, instructions


def prepare(request: SampleRequest, options: SamplingOptions = SamplingOptions()) -> SamplePlan:
    """Every check of a sampling request and its inputs read, before any weight is read (see the
    module docstring)."""
    config, step, paths, names, files = check_request(request, options)
    cond, target, instructions = read_conditions(config, paths, request, options.seed)
    return SamplePlan(config, step, names, files, cond, target, instructions, request.overwrite)


def check_text_request(config: ml_collections.ConfigDict, prompt: str | None, guidance_scale: float | None) -> None:
    """``--prompt`` / ``--guidance_scale`` need a text-conditioned run (checked before any weight)."""
    if batch_inputs.has_text(config):
        encoders.check_encoder_paths(config)
        return
    if prompt is not None or guidance_scale not in (None, 1.0):
        raise ValueError("--prompt / --guidance_scale need a text-conditioned run; this run's backbone has no text.")


# sample(cond, instruction, steps, indices) -> samples in [-1, 1]
ConditionalSampleFn = Callable[[np.ndarray, np.ndarray | None, int, np.ndarray | None], np.ndarray]


def conditional_sampler(pre: Pretrained, options: SamplingOptions = SamplingOptions()) -> ConditionalSampleFn:
    """``sample(cond, instruction, steps, indices=None, *, seed=None, timed=False)``: samples in
    [-1, 1] for each condition (``timed``: and the mean ms per image, the first batch run once
    untimed before); the noise of example i depends only on (seed or options.seed, i), or on
    (seed, indices[i]) where a request is sampled in pieces. The encoders are loaded and the
    programs jitted once, so calls with the same shapes compile once; each batch is split over this
    process's devices.

    ``options.renoise`` None takes the run's default (CoDi: ``codi.renoise``; DDIM only). Latent runs sample
    latents and decode them with the VAE; text runs use the config's prompt (``text.prompt``, or the
    instruction's; ``options.prompt`` replaces it) with CFG scale ``options.guidance_scale`` (None:
    the run's ``sample_guidance_scale``, default 1 = no guidance)."""
    if options.prompt is not None:
        with pre.config.unlocked():
            pre.config.text.prompt = options.prompt
    enc, frozen = batch_inputs.load(pre.config)
    latent = enc.vae is not None
    ops = conditional.lowpass_operators(pre.config) if options.lowpass_consistency else None
    sampler = conditional.make_conditional_sampler(
        pre.model, pre.schedule, pre.parametrization, options.solver, clip=not latent, lowpass_ops=ops
    )
    decode = jax.jit(functools.partial(encoders.decode_latents, enc.vae)) if latent else None
    encode_condition = batch_inputs.condition_encoder(pre.config, enc)  # the adapter's condition
    mesh = sharding.make_mesh(devices=jax.local_devices())  # each batch split over this process's devices
    params, frozen = jax.device_put((pre.params, frozen), sharding.replicated(mesh))
    renoise = options.renoise
    if renoise is None:
        renoise = options.solver == "ddim" and conditional.renoise_between_steps(pre.config)

    def sample(cond: np.ndarray, instruction: np.ndarray | None, steps: int, indices=None, *, seed=None, timed=False):
        times = jnp.asarray(conditional.sample_times(pre.config, steps))  # raises if steps > grid

        def sample_batch(batch: np.ndarray, z_init: jax.Array, renoise_keys: jax.Array | None) -> np.ndarray:
            inputs = {"cond": cond[batch]}
            if instruction is not None:
                inputs["instruction"] = instruction[batch]
            inputs = jax.device_put(inputs, sharding.batch_sharding(mesh))
            text = conditional.text_inputs(batch_inputs.add_text(frozen, inputs), pre.config, options.guidance_scale)
            cond_in = encode_condition(frozen, inputs["cond"])
            x = sampler(params, cond_in, inputs.get("instruction"), z_init, times, renoise_keys, text)
            return np.clip(np.asarray(decode(frozen.vae_params, x) if latent else x), -1.0, 1.0)

        size = cond.shape[1] // networks.latent_factor(pre.config)
        shape = (size, size, pre.model.backbone.out_channels)
        seed_ = options.seed if seed is None else seed
        kwargs = dict(seed=seed_, renoise=renoise, batch_size=options.batch_size, mesh=mesh, progress=not timed)
        warm_up = sample_batch if timed else None  # the first batch once untimed: compiled before timing
        samples, ms = samplers.sample_in_batches(
            sample_batch, len(cond), shape, indices=indices, warm_up=warm_up, **kwargs
        )
        return (samples, ms) if timed else samples

    return sample


def sample_conditional(
    pre: Pretrained,
    cond: np.ndarray,
    instruction: np.ndarray | None,
    steps: int,
    options: SamplingOptions = SamplingOptions(),
) -> np.ndarray:
    """One call of ``conditional_sampler(pre, options)``: samples in [-1, 1] for each condition."""
    return conditional_sampler(pre, options)(cond, instruction, steps)


def viewable_grid(tiles: np.ndarray, columns: int, min_tile: int = GRID_MIN_TILE) -> np.ndarray:
    """``samplers.make_grid`` of uint8 NHWC ``tiles``, enlarged (nearest neighbour) by the smallest
    integer factor that shows each tile at ``min_tile`` pixels or more (32-px tiles: 4x)."""
    factor = max(1, -(-min_tile // min(tiles.shape[1:3])))
    grid = samplers.make_grid(tiles, columns=columns)
    return np.repeat(np.repeat(grid, factor, axis=0), factor, axis=1)


def write_outputs(
    out_dir: str,
    names: list[str],
    columns: list[np.ndarray],
    step_counts: Sequence[int] = (1,),
    overwrite: bool = False,
) -> list[str]:
    """The samples (``columns[1 : 1 + len(step_counts)]``, one per step count) as ``sample_file_names``
    per input and ``grid.png`` with one row per input and one column per entry of ``columns``
    (condition | samples | [target]; tiles enlarged, ``viewable_grid``), written as one
    all-or-nothing group; an existing file is replaced only with ``overwrite``."""
    files = output_files(names, step_counts)
    check_out_dir(out_dir, files, overwrite=overwrite)
    pixels = [samplers.to_uint8(c) for c in columns]
    tiles = np.stack(pixels, axis=1).reshape((-1,) + pixels[0].shape[1:])
    images = [image for samples in pixels[1 : 1 + len(step_counts)] for image in samples]
    images.append(viewable_grid(tiles, len(columns)))
    return atomic.write_files(
        {os.path.join(out_dir, name): atomic.png_bytes(image) for name, image in zip(files, images, strict=True)}
    )


def run(request: SampleRequest, options: SamplingOptions = SamplingOptions()) -> list[str]:
    """Checks the request (``prepare``), restores the run, samples at each step count and writes
    (process 0); returns the paths written (the samples, then ``grid.png``)."""
    plan = prepare(request, options)
    step_counts = request.step_counts
    pre = load_conditional(request.run, step=plan.step, use_ema=options.ema, dtype=options.model_dtype)
    sample = conditional_sampler(pre, options)
    samples = [sample(plan.cond, plan.instructions, k) for k in step_counts]
    target = [plan.target] if plan.target is not None else []
    if jax.process_index() > 0:  # every process holds every sample; one writes them
        return []
    return write_outputs(
        request.out, plan.names, [samplers.cond_to_rgb(plan.cond), *samples, *target], step_counts, plan.overwrite
    )


def missing_outputs(out_dir: str, names: Sequence[str], step_counts: Sequence[int]) -> list[list[str]]:
    """Per input, its sample files (``sample_file_names``) not yet in ``out_dir``."""
    per_count = sample_file_names(names, step_counts)
    return [[f[i] for f in per_count if not os.path.lexists(os.path.join(out_dir, f[i]))] for i in range(len(names))]


def run_resumable(
    request: SampleRequest, options: SamplingOptions = SamplingOptions(), chunk_size: int = 256
) -> list[str]:
    """Large sets (``sample --skip_existing``, e.g. FID sets): the inputs whose samples are all in
    ``request.out`` already are skipped; the others are read, sampled and written ``chunk_size`` at a
    time (each file atomically, by process 0; no grid), so memory holds one chunk and a stopped
    run resumes where it stopped. Input i is degraded and noised as a whole request would do it.
    Returns the paths written (``request.skip_existing`` is implied)."""
    request = dataclasses.replace(request, skip_existing=True)
    config, step, paths, names, _ = check_request(request, options)
    out_dir, step_counts = request.out, request.step_counts
    missing = missing_outputs(out_dir, names, step_counts)
    todo = np.array([i for i, files in enumerate(missing) if files], np.int64)
    say = print if jax.process_index() == 0 else lambda *_, **__: None  # process 0 reports
    say(f"{len(names) - len(todo)} of {len(names)} inputs already sampled in {out_dir}; sampling {len(todo)}.")
    if not len(todo):
        return []
    pre = load_conditional(request.run, step=step, use_ema=options.ema, dtype=options.model_dtype)
    sample = conditional_sampler(pre, options)
    written = []
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        cond, _, instructions = read_conditions(config, [paths[i] for i in chunk], request, options.seed, chunk)
        samples = [sample(cond, instructions, k, chunk) for k in step_counts]
        files = sample_file_names([names[i] for i in chunk], step_counts)
        todo_files = {os.path.join(out_dir, f) for i in chunk for f in missing[i]}
        images = {
            os.path.join(out_dir, name): image
            for per_count, pixels in zip(files, samples, strict=True)
            for name, image in zip(per_count, samplers.to_uint8(pixels), strict=True)
        }
        if jax.process_index() == 0:
            written += atomic.write_files({p: atomic.png_bytes(x) for p, x in images.items() if p in todo_files})
        say(f"Sampled {min(start + chunk_size, len(todo))} of {len(todo)} inputs.", flush=True)
    return written
