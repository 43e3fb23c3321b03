"""Multi-host on one machine: two real JAX processes (CPU collectives) train a tiny CoDi run.

  two_process.py teacher   WORKDIR                     a fresh teacher checkpoint in WORKDIR/teacher
  two_process.py worker    WORKDIR PROCESS_ID PORT     one of two processes training WORKDIR/two
  two_process.py reference WORKDIR                     one process, same global batches, WORKDIR/one
  two_process.py resume    WORKDIR                     one process resumes WORKDIR/two for 2 more steps
Each mode prints one JSON line.
"""

import hashlib
import json
import os
import sys

import jax
import numpy as np

STEPS = 2


def codi_config(workdir: str):
    from codi_jax.configs.cpu import tiny_codi

    config = tiny_codi.get_config()
    config.teacher_workdir = os.path.join(workdir, "teacher")
    config.data.data_dir = os.path.join(workdir, "tfds")  # shared: process 0 prepares it
    config.num_train_steps = STEPS
    config.checkpoint_every_steps = STEPS
    config.num_sample_images = 2
    config.sample_step_counts = (1,)
    return config


def summary(state) -> dict:
    from codi_jax import sharding

    leaves = jax.tree.leaves(sharding.to_host(state.params))
    digest = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in leaves)).hexdigest()
    return {"process": jax.process_index(), "step": int(sharding.to_host(state.step)), "digest": digest}


def both_shards(config, task_config, start_step, tokenize=None):
    """What the two processes read, concatenated: the same global batches in one process."""
    from codi_jax.data import pipeline

    streams = [
        pipeline.numpy_iterator(
            pipeline.build_dataset(
                config.data,
                config.data.train_split,
                config.batch_size,
                seed=config.seed,
                train=True,
                process_index=index,
                tokenize=tokenize,
                process_count=2,
                task_config=task_config,
                start_batch=start_step,
            )
        )
        for index in range(2)
    ]
    while True:
        parts = [next(s) for s in streams]
        yield {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def main(mode: str, workdir: str, *rest: str) -> None:
    if mode == "worker":
        jax.distributed.initialize(f"localhost:{rest[1]}", num_processes=2, process_id=int(rest[0]))
    from codi_jax import sharding
    from codi_jax.configs.cpu import tiny_teacher
    from codi_jax.runs import checkpoint
    from codi_jax.training import loop, recipes

    if mode == "teacher":
        teacher = tiny_teacher.get_config()
        mesh = sharding.make_mesh(1)
        state, _ = loop.create_sharded_state(recipes.make_recipe(teacher, mesh), mesh, teacher)
        ckpt = checkpoint.Checkpointer(os.path.join(workdir, "teacher", "checkpoints"), async_save=False)
        ckpt.save(0, state, teacher, force=True)
        ckpt.close()
        print(json.dumps({"teacher": True}))
        return
    config = codi_config(workdir)
    run_dir = os.path.join(workdir, "one" if mode == "reference" else "two")
    if mode == "reference":
        loop.local_batches = both_shards
    if mode == "resume":
        config.num_train_steps = STEPS + 2
    state = loop.train_and_evaluate(config, run_dir)
    print(json.dumps(summary(state)))


if __name__ == "__main__":
    main(*sys.argv[1:])
