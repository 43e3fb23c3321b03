"""Run in a subprocess with 8 simulated CPU devices: the teacher and CoDi train steps on a
replicated 1-device mesh and on (data x fsdp) = 8x1 and 2x4 meshes; prints one JSON line.

Usage: python tests/scripts/sharded_equality.py WORKDIR
"""

import json
import os
import sys

import jax
import ml_collections
import numpy as np

from codi_jax import sharding
from codi_jax.configs.cpu import tiny_codi, tiny_teacher
from codi_jax.runs import checkpoint, config_resolution
from codi_jax.training import loop, recipes

# (devices, fsdp): replicated, pure data parallel, and data x fsdp (pure FSDP, 1x8, adds little
# beyond 2x4 and cost the suite ~50 s of 8-device compiles).
MESHES = ((1, 1), (8, 1), (8, 4))


def batch_for(config, mesh, conditional: bool) -> dict:
    rng = np.random.RandomState(0)
    size = config.data.image_size
    batch = {"image": rng.uniform(-1, 1, (8, size, size, 3)).astype(np.float32)}
    if conditional:
        batch["cond"] = rng.uniform(-1, 1, (8, size, size, 3)).astype(np.float32)
    return jax.device_put(batch, sharding.batch_sharding(mesh))


def run(config, conditional: bool, workdir: str) -> dict:
    out, kept = {}, {}
    for devices, fsdp in MESHES:
        config.num_devices, config.sharding.fsdp, config.sharding.min_size = devices, fsdp, 64
        mesh = sharding.mesh_from_config(config)
        recipe = recipes.make_recipe(config, mesh)
        state, shardings = loop.create_sharded_state(recipe, mesh, config)
        split = [s for s in jax.tree.leaves(shardings) if any(a is not None for a in s.spec)]
        repl = sharding.replicated(mesh)
        step = jax.jit(
            recipe.train_step,
            in_shardings=(shardings, sharding.batch_sharding(mesh), repl),
            out_shardings=(shardings, repl),
        )
        batch = batch_for(config, mesh, conditional)
        losses = []
        for i in range(2):
            state, metrics = step(state, batch, jax.random.PRNGKey(i))
            losses.append(float(sharding.to_host(metrics["loss"])))
        name = f"{devices // fsdp}x{fsdp}"
        out[name] = (losses, sharding.to_host(state.params), sharding.to_host(state.ema_params), len(split))
        kept[name] = (state, shardings)
    out["topology"] = {
        "8->1": round_trip(kept["2x4"], kept["1x1"], workdir),
        "1->8": round_trip(kept["1x1"], kept["2x4"], workdir),
    }
    return out


def round_trip(source, target, workdir: str) -> bool:
    """A checkpoint written from ``source``'s mesh restores bitwise into ``target``'s shardings."""
    state, _ = source
    root = os.path.join(workdir, "round_trip")
    directory = os.path.join(root, str(len(os.listdir(root)) if os.path.isdir(root) else 0))
    ckpt = checkpoint.Checkpointer(directory, async_save=False)
    ckpt.save(1, state, ml_collections.ConfigDict(), force=True)
    restored = ckpt.restore(checkpoint.abstract_like(target[0], target[1]))
    ckpt.close()
    placed = all(a.sharding == b for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(target[1])))
    pairs = zip(jax.tree.leaves(sharding.to_host(restored)), jax.tree.leaves(sharding.to_host(state)))
    return bool(placed and all(np.array_equal(a, b) for a, b in pairs))


def compare(out: dict, lr: float) -> dict:
    ref_losses, ref_params, ref_ema, _ = out["1x1"]
    rows = {}
    for name, (losses, params, ema, num_split) in ((k, v) for k, v in out.items() if k != "topology"):
        diffs = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params))]
        ema_diffs = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(ref_ema))]
        loss_rel = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(losses, ref_losses))
        rows[name] = dict(max_param_diff=max(diffs), max_ema_diff=max(ema_diffs), loss_rel=loss_rel, split=num_split)
    moved = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(ref_params))
    return dict(rows=rows, lr=lr, param_scale=moved, topology=out["topology"])


def main(workdir: str) -> None:
    assert len(jax.devices()) == 8, jax.devices()
    teacher = tiny_teacher.get_config()
    teacher.data.data_dir = os.path.join(workdir, "tfds")
    # Smaller than tiny_teacher (XLA:CPU compiles 8-device programs slowly); attention kept.
    teacher.model.update(block_out_channels=(8, 16), attention_head_dim=8, norm_num_groups=4)
    result = {"teacher": compare(run(teacher, False, workdir), teacher.optimizer.learning_rate)}
    # A teacher checkpoint (fresh weights; equality does not need a trained one) for CoDi.
    mesh = sharding.make_mesh(1)
    state, _ = loop.create_sharded_state(recipes.make_recipe(teacher, mesh), mesh, teacher)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "teacher", "checkpoints"), async_save=False)
    ckpt.save(0, state, teacher, force=True)
    ckpt.close()
    codi = tiny_codi.get_config()
    codi.teacher_workdir = os.path.join(workdir, "teacher")
    codi.data.data_dir = teacher.data.data_dir
    codi.adapter.train_backbone = True  # full CoDi: the backbone, its EMA and moments are sharded too
    codi = config_resolution.resolve(codi)
    result["codi"] = compare(run(codi, True, workdir), codi.optimizer.learning_rate)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
