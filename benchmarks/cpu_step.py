"""CPU speed of the teacher train step: JAX conv impls side by side, and diffusers/PyTorch for scale.

For every (model, image size, batch) config and every conv impl this measures, on the CPU cores
this process may run on:

* the whole train step (``codi_jax.objectives.teacher.train_step``: v-prediction MSE, AdamW with clipping,
  EMA, non-finite check; jitted with the state donated, as ``train_loop`` does), its compile time
  (reported apart, never inside the step time) and images/s;
* the split: a jitted forward (``model.apply``) and a jitted ``value_and_grad`` of the loss;
  backward = value_and_grad - forward;
* the same-shaped diffusers ``UNet2DModel`` forward + backward + AdamW (+ clipping and EMA) step
  in PyTorch with as many threads as JAX has cores, and the JAX / PyTorch step-time ratio.

Times are the median over ``--steps`` timed calls after ``--warmup`` untimed ones; ``cpu`` is
the process CPU time per step (wall >> cpu means another process took the cores).

  taskset -c 0 python benchmarks/cpu_step.py                       # default set (< 10 min)
  taskset -c 0 python benchmarks/cpu_step.py --models 1.6M,6.5M --image-sizes 16,32 \\
      --batch-sizes 16,32,64                                        # the full grid
  taskset -c 0 python benchmarks/cpu_step.py --xla-flags=--xla_cpu_use_xnnpack=true

torch and diffusers are optional (test-only); without them the PyTorch rows print as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import statistics
import sys
import time

from bench_host import cpu_model, usable_cores

MODELS = {"1.6M": (32, 64, 64), "6.5M": (64, 128, 128)}
ATTENTION_LEVELS = (False, False, True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="1.6M", help=f"comma list of {sorted(MODELS)} or channel triples a-b-c")
    p.add_argument("--image-sizes", default="16,32")
    p.add_argument("--batch-sizes", default="32")
    p.add_argument(
        "--impls",
        default="xla,im2col,auto",
        help="comma list: xla (XLA convs + flax GroupNorm: the plain Flax UNet), im2col (custom-VJP "
        "conv + flax GroupNorm), auto (what the UNet uses on this backend: on CPU, custom-VJP "
        "conv + the hand-written GroupNorm)",
    )
    p.add_argument("--dtype", default="float32", help="compute dtype of the JAX model (float32, bfloat16)")
    p.add_argument("--steps", type=int, default=3, help="timed calls per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
    p.add_argument("--no-split", action="store_true", help="skip the forward / value_and_grad split")
    p.add_argument("--no-torch", action="store_true", help="skip the diffusers/PyTorch rows")
    p.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before JAX is imported")
    return p.parse_args(argv)


def _channels(name: str) -> tuple[int, ...]:
    return MODELS[name] if name in MODELS else tuple(int(c) for c in name.split("-"))


def _time_calls(fn, steps: int, warmup: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``fn()`` (which must block) over ``steps`` calls."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(steps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


@contextlib.contextmanager
def _norm_for(impl: str):
    """Rows other than ``auto`` use flax's ``nn.GroupNorm`` (the code before the CPU GroupNorm)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from codi_jax.models import layers

    original = layers._group_norm
    if impl != "auto":
        layers._group_norm = lambda groups, eps, name: nn.GroupNorm(groups, epsilon=eps, dtype=jnp.float32, name=name)
    try:
        yield
    finally:
        layers._group_norm = original


def bench_jax(channels, image_size, batch, impl, dtype, args) -> dict:
    with _norm_for(impl):
        return _bench_jax(channels, image_size, batch, impl, dtype, args)


def _bench_jax(channels, image_size, batch, impl, dtype, args) -> dict:
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from codi_jax import diffusion
    from codi_jax.models.unet import UNet
    from codi_jax.objectives import teacher
    from codi_jax.training.train_state import create_train_state, make_optimizer

    model = UNet(block_out_channels=channels, attention_levels=ATTENTION_LEVELS, dtype=jnp.dtype(dtype), conv_impl=impl)
    schedule = diffusion.Schedule("cosine")
    optimizer = make_optimizer(
        ml_collections.ConfigDict(
            dict(learning_rate=3e-4, warmup_steps=200, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0)
        )
    )
    x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (batch, image_size, image_size, 3)), jnp.float32)
    t = jnp.full((batch,), 0.5, jnp.float32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x, t)["params"]
    n_params = sum(p.size for p in jax.tree.leaves(params))
    rng = jax.random.PRNGKey(1)
    out = {"params": n_params}

    def compiled(fn, *fn_args, **jit_kw):
        t0 = time.perf_counter()
        exe = jax.jit(fn, **jit_kw).lower(*fn_args).compile()
        return exe, time.perf_counter() - t0

    step_fn = functools.partial(
        teacher.train_step, model=model, schedule=schedule, optimizer=optimizer, ema_decay=0.999, parametrization="v"
    )
    state = create_train_state(params, optimizer, jax.random.PRNGKey(2))
    step_exe, out["compile_s"] = compiled(step_fn, state, {"image": x}, rng, donate_argnums=(0,))
    holder = [state]

    def run_step():
        holder[0], metrics = step_exe(holder[0], {"image": x}, rng)
        jax.block_until_ready(metrics["loss"])

    out["step_s"], out["step_cpu_s"] = _time_calls(run_step, args.steps, args.warmup)
    if not args.no_split:
        params = holder[0].params
        fwd_exe, _ = compiled(lambda p, z, tt: model.apply({"params": p}, z, tt, train=True), params, x, t * 1000)
        vg_exe, _ = compiled(
            lambda p, xx, r: jax.value_and_grad(teacher.diffusion_loss)(p, model, schedule, xx, r), params, x, rng
        )
        out["fwd_s"], _ = _time_calls(
            lambda: jax.block_until_ready(fwd_exe(params, x, t * 1000)), args.steps, args.warmup
        )
        out["vg_s"], _ = _time_calls(lambda: jax.block_until_ready(vg_exe(params, x, rng)), args.steps, args.warmup)
    return out


def bench_torch(channels, image_size, batch, threads, args) -> dict | None:
    try:
        import torch
        from diffusers import UNet2DModel
    except ImportError:
        return None
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in ATTENTION_LEVELS)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(ATTENTION_LEVELS))
    model = UNet2DModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        layers_per_block=2,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=32,
        norm_num_groups=32,
    ).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    x = torch.rand(batch, 3, image_size, image_size) * 2 - 1
    # cosine schedule with log-SNR in [-15, 15], as diffusion.Schedule("cosine")
    b = float(torch.atan(torch.exp(torch.tensor(-7.5))))
    a = float(torch.atan(torch.exp(torch.tensor(7.5)))) - b

    def loss_fn():
        tt = 1.0 - torch.rand(batch)
        eps = torch.randn_like(x)
        alpha, sigma = torch.cos(a * tt + b).view(-1, 1, 1, 1), torch.sin(a * tt + b).view(-1, 1, 1, 1)
        pred = model(alpha * x + sigma * eps, 1000.0 * tt).sample
        return torch.mean((pred - (alpha * eps - sigma * x)) ** 2)

    def step():
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - 0.999)

    def forward():
        with torch.no_grad():
            model(x, torch.full((batch,), 500.0)).sample.sum().item()

    def forward_backward():
        model.zero_grad(set_to_none=True)
        loss_fn().backward()

    out = {"params": sum(p.numel() for p in params)}
    out["step_s"], out["step_cpu_s"] = _time_calls(step, args.steps, args.warmup)
    if not args.no_split:
        out["fwd_s"], _ = _time_calls(forward, args.steps, args.warmup)
        out["vg_s"], _ = _time_calls(forward_backward, args.steps, args.warmup)
    return out


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import jax.numpy as jnp

    from codi_jax.models.conv import AUTO_IM2COL_MIN_OUTPUT, resolve_impl

    jax.config.update("jax_platforms", "cpu")
    threads = len(usable_cores())
    print(f"machine: {cpu_model()}; cores used {threads} of {os.cpu_count()}; python {platform.python_version()}")
    versions = f"jax {jax.__version__}"
    try:
        import flax

        versions += f", flax {flax.__version__}"
        import torch

        versions += f", torch {torch.__version__}"
        import diffusers

        versions += f", diffusers {diffusers.__version__}"
    except ImportError:
        pass
    print(
        f"versions: {versions}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; jax dtype {args.dtype}; "
        f"auto conv impl -> {resolve_impl('auto')} for convs with >= {AUTO_IM2COL_MIN_OUTPUT} output entries, "
        f"{resolve_impl('auto', (1,))} below"
    )
    print(
        f"median of {args.steps} timed calls after {args.warmup} warm-up; times in seconds; "
        "bwd = value_and_grad - fwd; ratio = JAX step / PyTorch step\n"
    )
    header = (
        f"{'model':>6} {'params':>8} {'img':>4} {'batch':>5} {'impl':>8} {'compile':>8} {'step':>7} "
        f"{'cpu':>7} {'img/s':>7} {'fwd':>7} {'bwd':>7} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    jnp.zeros(())  # initialise the backend before timing anything
    for name in args.models.split(","):
        channels = _channels(name)
        for image_size in (int(s) for s in args.image_sizes.split(",")):
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                torch_row = None if args.no_torch else bench_torch(channels, image_size, batch, threads, args)
                rows = []
                for impl in args.impls.split(","):
                    rows.append((impl, bench_jax(channels, image_size, batch, impl, args.dtype, args)))
                if torch_row is not None:
                    rows.append(("torch", torch_row))
                for impl, r in rows:
                    ratio = r["step_s"] / torch_row["step_s"] if torch_row and impl != "torch" else None
                    fwd, vg = r.get("fwd_s"), r.get("vg_s")
                    print(
                        f"{name:>6} {r['params'] / 1e6:>7.2f}M {image_size:>4} {batch:>5} {impl:>8} "
                        f"{_fmt(r.get('compile_s'), '.1f'):>8} {r['step_s']:>7.3f} {r['step_cpu_s']:>7.3f} "
                        f"{batch / r['step_s']:>7.1f} {_fmt(fwd):>7} {_fmt(None if vg is None else vg - fwd):>7} "
                        f"{_fmt(ratio, '.2f'):>6}",
                        flush=True,
                    )
                if torch_row is None and not args.no_torch:
                    print(
                        f"{name:>6} {'':>8} {image_size:>4} {batch:>5} {'torch':>8}  "
                        "skipped (torch/diffusers not installed)"
                    )


if __name__ == "__main__":
    main()
