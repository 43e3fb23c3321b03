"""Teacher train-step time of config files side by side (UNet vs DiT teachers, VP vs flow).

For each ``--configs`` path: the backbone's parameter count, the compile time, and the median wall
and CPU time of the train step (``teacher.train_step`` bound as ``recipes.bind_train_step`` binds
it, jitted with the state donated) at the config's batch size (or ``--batch``) on a random batch,
over ``--steps`` timed steps after ``--warmup`` untimed ones. The configs are measured one after
the other in this process, so they share the host's load: run nothing heavy beside it. The load
average before and after is printed.

  python benchmarks/teacher_step.py --configs codi_jax/configs/cpu/teacher_patches32.py,\\
codi_jax/configs/cpu/dit_teacher_patches32.py [--batch=32] [--steps=10] \\
      [--set model.num_layers=6 --set model.attention_head_dim=48 ...]

``--set field=value`` (repeatable) overrides a field of every config that has it (``model.*`` of a
DiT only when the config is a DiT's: ``dit.model.x=v`` / ``unet.model.x=v`` to pick one).
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import os
import statistics
import time

from bench_host import cpu_model, usable_cores


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", required=True, help="comma list of config files")
    p.add_argument("--batch", type=int, default=0, help="batch size (0: each config's)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="[unet.|dit.]section.field=value")
    return p.parse_args(argv)


def load_config(path: str):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def apply_overrides(config, overrides: list[str]) -> None:
    kind = config.model.kind
    for item in overrides:
        key, value = item.split("=", 1)
        parts = key.split(".")
        if parts[0] in ("unet", "dit"):
            if parts[0] != kind:
                continue
            parts = parts[1:]
        section = config
        for part in parts[:-1]:
            section = section[part]
        if parts[-1] in section:
            section[parts[-1]] = ast.literal_eval(value) if value[:1].isdigit() or value[:1] in "([-" else value


def measure(config, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from codi_jax.models import networks
    from codi_jax.runs import config_resolution
    from codi_jax.training import recipes
    from codi_jax.training.train_state import create_train_state, make_optimizer

    config = config_resolution.resolve(config)
    batch = args.batch or int(config.batch_size)
    size = int(config.data.image_size)
    model, schedule = networks.build_teacher(config)
    optimizer = make_optimizer(config.optimizer, config.num_train_steps)
    params = jax.jit(functools.partial(networks.init_teacher_params, model, size))(jax.random.PRNGKey(0))
    state = create_train_state(params, optimizer, jax.random.PRNGKey(1))
    step = jax.jit(recipes.bind_train_step(config, model, schedule, optimizer), donate_argnums=0)
    images = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32))
    t0 = time.perf_counter()
    compiled = step.lower(state, {"image": images}, jax.random.PRNGKey(2)).compile()
    compile_s = time.perf_counter() - t0
    walls, cpus = [], []
    for i in range(args.warmup + args.steps):
        w0, c0 = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, {"image": images}, jax.random.PRNGKey(3 + i))
        jax.block_until_ready(metrics["loss"])
        if i >= args.warmup:
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
    return dict(
        kind=config.model.kind,
        schedule=config.schedule.kind,
        params=sum(x.size for x in jax.tree.leaves(params)),
        batch=batch,
        compile_s=compile_s,
        wall_s=statistics.median(walls),
        cpu_s=statistics.median(cpus),
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f"host: {cpu_model()}, {len(usable_cores())} usable cores, load average {os.getloadavg()}")
    for path in args.configs.split(","):
        config = load_config(path)
        apply_overrides(config, args.set)
        r = measure(config, args)
        print(
            f"{os.path.basename(path)}: {r['kind']} / {r['schedule']}, {r['params'] / 1e6:.2f}M params, batch "
            f"{r['batch']}: compile {r['compile_s']:.1f} s, step {r['wall_s'] * 1000:.0f} ms wall "
            f"({r['cpu_s'] * 1000:.0f} ms cpu)",
            flush=True,
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
