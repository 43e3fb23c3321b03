"""Few-step conditional sampling as library functions (the ``codi_jax.sample`` CLI wraps them).

Loading clean images or conditions from files, sampling a restored CoDi / fine-tuned model, and
writing one PNG per input plus a grid without overwriting anything.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from codi_jax import inference, sampling
from codi_jax.data import pipeline, tasks
from codi_jax.pretrained import Pretrained, load_conditional


def load_images(path: str, size: int) -> tuple[list[str], np.ndarray]:
    """``(names, images)``: every image at ``path`` (file or directory) as float32 [-1, 1], resized
    (shorter side, bicubic) and centre-cropped to ``size``."""
    if os.path.isdir(path):
        paths = pipeline.list_image_files(path)
    elif os.path.isfile(path):
        paths = [path]
    else:
        raise FileNotFoundError(f"--cond {path!r} is neither an image file nor a directory.")
    images = []
    for p in paths:
        rgb = Image.fromarray(pipeline.load_image_rgb(p))
        scale = size / min(rgb.size)
        resized = rgb.resize((max(size, round(rgb.width * scale)), max(size, round(rgb.height * scale))), Image.BICUBIC)
        left, top = (resized.width - size) // 2, (resized.height - size) // 2
        crop = np.asarray(resized.crop((left, top, left + size, top + size)), np.float32)
        images.append(crop / 127.5 - 1.0)
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return names, np.stack(images)


def conditions_from_images(task_config, images: np.ndarray) -> np.ndarray:
    """Conditions given directly as images (``--input=condition``)."""
    name, size = task_config.name, images.shape[1]
    if name == "sr":
        low = size // int(task_config.scale)
        small = jax.image.resize(jnp.asarray(images), (len(images), low, low, 3), "bicubic", antialias=True)
        return np.clip(np.asarray(jax.image.resize(small, images.shape, "bicubic")), -1.0, 1.0)
    if name in ("edge", "depth"):
        gray = images @ np.array([0.299, 0.587, 0.114], np.float32)
        return gray[..., None]
    raise ValueError(
        f"--input=condition is not supported for task {name!r} (its condition is not a single image); "
        "use --input=clean with clean images."
    )


def sample_conditional(
    pre: Pretrained,
    cond: np.ndarray,
    instruction: np.ndarray | None,
    *,
    steps: int,
    seed: int,
    stochastic: bool | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """Samples in [-1, 1] for each condition; the noise of example i depends only on (seed, i).

    ``stochastic``: re-noise between steps; None takes the run's default (CoDi: ``codi.renoise``)."""
    times = jnp.asarray(inference.sample_times(pre.config, steps))  # raises if steps > grid
    sampler = inference.make_conditional_sampler(pre.model, pre.schedule, pre.parametrization)
    rng = jax.random.PRNGKey(seed)
    shape = cond.shape[1:3] + (pre.model.backbone.out_channels,)
    out = []
    for start in range(0, len(cond), batch_size):
        stop = min(start + batch_size, len(cond))
        noise = jnp.stack([jax.random.normal(jax.random.fold_in(rng, i), shape) for i in range(start, stop)])
        renoise = inference.renoise_key(pre.config, seed, start, stochastic)
        batch_instruction = None if instruction is None else jnp.asarray(instruction[start:stop])
        out.append(
            np.asarray(sampler(pre.params, jnp.asarray(cond[start:stop]), batch_instruction, noise, times, renoise))
        )
    return np.concatenate(out)


def write_outputs(out_dir: str, names: list[str], columns: list[np.ndarray]) -> list[str]:
    """``<name>.png`` (the sample, ``columns[1]``) per input and ``grid.png`` with one row per input."""
    os.makedirs(out_dir, exist_ok=True)
    files = [f"{name}.png" for name in names] + ["grid.png"]
    if len(set(files)) != len(files):
        raise ValueError("Input file names collide after removing extensions; rename them.")
    clashes = [f for f in files if os.path.exists(os.path.join(out_dir, f))]
    if clashes:
        raise FileExistsError(
            f"{out_dir} already holds {clashes[:3]}{'...' if len(clashes) > 3 else ''}; "
            "choose another --out (nothing was overwritten)."
        )
    pixels = [sampling.to_uint8(c) for c in columns]
    paths = []
    for name, image in zip(files, pixels[1]):
        paths.append(os.path.join(out_dir, name))
        Image.fromarray(image).save(paths[-1])
    tiles = np.stack(pixels, axis=1).reshape((-1,) + pixels[0].shape[1:])
    paths.append(os.path.join(out_dir, "grid.png"))
    Image.fromarray(sampling.make_grid(tiles, columns=len(columns))).save(paths[-1])
    return paths


def run(
    workdir: str,
    cond_path: str,
    out_dir: str,
    *,
    steps: int = 4,
    input_kind: str = "clean",
    stochastic: bool | None = None,
    seed: int = 0,
    batch_size: int = 32,
    instruction: int = 0,
    step: int | None = None,
    use_ema: bool = True,
) -> list[str]:
    pre = load_conditional(workdir, step=step, use_ema=use_ema)
    size = int(pre.config.data.image_size)
    names, images = load_images(cond_path, size)
    if input_kind == "clean":
        degraded = tasks.degrade_images(pre.config.task, images, seed)
        cond, target = degraded["cond"], degraded["image"]
        instructions = degraded.get("instruction")
    else:
        cond, target = conditions_from_images(pre.config.task, images), None
        instructions = None
    if tasks.num_instructions(pre.config.task) and instructions is None:
        instructions = np.full((len(cond),), instruction, np.int32)
    samples = sample_conditional(
        pre, cond, instructions, steps=steps, seed=seed, stochastic=stochastic, batch_size=batch_size
    )
    columns = [sampling.cond_to_rgb(cond), samples] + ([target] if target is not None else [])
    return write_outputs(out_dir, names, columns)
