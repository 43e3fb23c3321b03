"""How good one prediction of a conditional run is at each noise level.

For each time ``t`` the held-out patches are noised with the run's own path (``z_t = alpha_t x +
sigma_t eps``; flow: ``(1 - t) x + t eps``) and the run predicts ``x_hat`` once. The table gives its
PSNR, SWD and LPIPS against the clean patches, beside those of ``z_t`` itself. A few-step sample
ends with the prediction at its last grid time (CoDi, 4 steps on N = 50: t = 0.22), so a run that
is worse here than the non-distilled model at low ``t`` cannot beat that model's few-step samples
(``docs/flow_matching.md``, "The student near the data"):

  python experiments/per_time_quality.py --run=CoDi=DIR/codi --run=baseline=DIR/finetune
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from codi_jax import diffusion  # noqa: E402
from codi_jax.evaluation import held_out, scoring  # noqa: E402
from codi_jax.frozen import encoders  # noqa: E402
from codi_jax.metrics import lpips  # noqa: E402
from codi_jax.runs.pretrained import Pretrained, load_conditional  # noqa: E402
from codi_jax.sampling import few_step  # noqa: E402

TIMES = (1.0, 0.75, 0.5, 0.25, 0.125, 0.05)


def predictions(pre: Pretrained, x: np.ndarray, cond: np.ndarray, t: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(z_t, x_hat)`` at time ``t`` for clean ``x`` (noise from ``seed``), ``x_hat`` clipped."""
    times = jnp.full((len(x),), t, jnp.float32)
    alpha, sigma = pre.schedule.alpha_sigma(times)
    z = diffusion.q_sample(jnp.asarray(x), jax.random.normal(jax.random.PRNGKey(seed), x.shape), alpha, sigma)
    out = pre.model.apply(pre.params, z, pre.schedule.model_time(times), jnp.asarray(cond), None)
    parametrization = diffusion.resolve_parametrization(pre.schedule, pre.parametrization)
    x_hat, _ = diffusion.x_eps_from_prediction(z, out, alpha, sigma, parametrization)
    return np.asarray(z), np.clip(np.asarray(x_hat), -1.0, 1.0)


def rows(name: str, workdir: str, num_eval: int, times: list[float], seed: int) -> list[str]:
    """Markdown rows ``name | step | t | PSNR | SWD | LPIPS | PSNR of z_t`` for one run."""
    pre = load_conditional(workdir)
    examples = held_out.held_out_examples(pre.config, num_eval)
    x, cond = examples["image"], examples["cond"]
    variables = lpips.load_packaged_lpips()
    out = []
    for t in times:
        z, x_hat = predictions(pre, x, cond, t, seed)
        distance = float(jnp.mean(lpips.lpips_distance(variables, jnp.asarray(x_hat), jnp.asarray(x))))
        psnr, noisy = scoring.psnr(x_hat, x).mean(), scoring.psnr(z, x).mean()
        swd = scoring.swd(x_hat, x)
        out.append(f"| {name} | {pre.step} | {t:g} | {psnr:.2f} | {swd:.1f} | {distance:.4f} | {noisy:.2f} |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", required=True, help="NAME=WORKDIR of a codi / finetune run.")
    parser.add_argument("--num_eval", type=int, default=64, help="Held-out patches (the eval split's first).")
    parser.add_argument("--times", default=",".join(map(str, TIMES)), help="Comma-separated times in (0, 1].")
    parser.add_argument("--seed", type=int, default=1, help="Seed of the noise.")
    args = parser.parse_args(argv)
    runs = [spec.split("=", 1) for spec in args.run]
    times = [float(t) for t in args.times.split(",")]
    if any(len(spec) != 2 or not os.path.isdir(spec[1]) for spec in runs):
        print(f"error: --run takes NAME=WORKDIR of an existing folder; got {args.run}.", file=sys.stderr)
        return 2
    if not all(0.0 < t <= 1.0 for t in times):
        print(f"error: --times={args.times}: every time must be in (0, 1].", file=sys.stderr)
        return 2
    if args.num_eval < 1:
        print(f"error: --num_eval={args.num_eval}: must be at least 1.", file=sys.stderr)
        return 2
    for name, workdir in runs:  # the saved configs only (JSON), before any weight is read
        try:
            config, _ = few_step.read_conditional_config(workdir)
        except (FileNotFoundError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        if encoders.is_latent(config) or encoders.has_text(config):
            print(f"error: --run {name}: a pixel-space run without text is needed; {workdir} is not.", file=sys.stderr)
            return 2
    print("| run | step | t | PSNR (dB) | SWD x1e3 | LPIPS | PSNR of z_t |\n|---|---|---|---|---|---|---|")
    for name, workdir in runs:
        print("\n".join(rows(name, workdir, args.num_eval, times, args.seed)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
