"""The GPU check: SD-1.5-shaped CoDi training and sampling (and SDXL / SD3 train steps) on one accelerator,
one table and one JSON.

Measured with random weights (no download) and synthetic inputs of the real shapes (64x64x4
latents, a random 77x768 array in place of CLIP's text context, 512x512x3 conditions), bf16
networks, one device (spec: /work/shared/GPU.md):

  train    PE-CoDi and full CoDi train steps (``sd15_sr4``: UNet + ControlNet, the step bound as a
           run binds it, state donated, compiled ahead of time) for ``model.attention_impl`` in
           {cudnn, dot_product} x ``model.remat_policy`` in {full, dots_saveable}, at the largest
           batch that fits: a probe compile (``--probe_batch``) gives the AOT memory
           (``Compiled.memory_analysis()``), its temporaries extrapolated linearly give the largest
           batch under 92% of ``memory_stats()['bytes_limit']``, compiled and kept if its AOT total
           fits (an out-of-memory first step falls back to the probe). Step time: median of
           ``--steps`` device-synchronised steps after ``--warmup``; images/s; model TFLOP/s (XLA's
           cost analysis of the step lowered without remat, dot_product attention: what the model
           needs) and MFU against ``--peak_tflops``; AOT GiB against the measured
           ``peak_bytes_in_use`` (n/a on CPU); compile seconds apart.
  sample   the PE-CoDi student at 512 px with the VAE decode: 1 and 4 steps (CoDi's grid and
           re-noising), batch 1 latency and batch 16 throughput; the 50-step DDIM teacher sampler
           (the same conditional network, classifier-free guidance at ``--teacher_guidance``,
           default sd15_edit's ``sample_guidance_scale``: two network calls per step) for the ratio.
  vae      the VAE encoder per image (512x512 -> 64x64x4, float32 as the run loads it).
  sdxl     last, in its own group: the PE-CoDi train step of an SDXL-base-shaped UNet + ControlNet
           (``sdxl_sr4``: 1024 px, 128x128 latents, the text_time context dict of the real shapes:
           tokens 77x2048, text_embeds 1280, 6 time ids) at ``--sdxl_batch`` (no batch search: one
           compile), ``--sdxl_attention_impl``, remat full; the dry run builds it at tiny shapes.
  sd3      after it, in its own group: the PE-CoDi train step of an SD3-medium-shaped transformer (2.03 B
           parameters, frozen) + its ControlNet (``DiTControlNet``: 12 of the 24 blocks) (``sd3_sr4``: 1024
           px, 128x128x16 latents on the flow schedule, the condition as 128x128x16 VAE latents, the
           context dict of the real shapes: 333x4096 tokens, 77 CLIP + 256 T5, pooled 2048) at
           ``--sd3_batch`` (one compile), ``--sd3_attention_impl``, remat full; the dry run builds it at
           tiny shapes.

Every case group runs in its own process (a crash or out-of-memory error is recorded and the
next one runs; the device's peak memory is the case's own); groups that would start after
``--budget_s`` are recorded as skipped, and a running group is stopped at the budget. Progress
lines are printed as cases finish (a group running longer than ``--group_budget_s`` is stopped too,
so one slow compile cannot take the whole budget), the table last; every number goes to ``OUT/gpu.json``
(rewritten atomically after each group). Exit status 0 whatever failed.

  python benchmarks/gpu_check.py --dry_run            # tiny shapes on the CPU, about a minute
  PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out=$OUT   # the GPU machine (~8 min)

The GPU machine's image lacks ml-collections: ``bash benchmarks/gpu_run.sh prepare`` downloads its
wheel here and ``bash benchmarks/gpu_run.sh run`` installs it there and runs the check.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

TRAIN_CASES = [  # (method, attention_impl, remat_policy), in the order they run (the budget may cut the tail)
    ("pe", "cudnn", "full"),
    ("full", "cudnn", "full"),
    ("pe", "dot_product", "full"),
    ("pe", "cudnn", "dots_saveable"),
    ("full", "dot_product", "full"),
    ("full", "cudnn", "dots_saveable"),
    ("pe", "dot_product", "dots_saveable"),
    ("full", "dot_product", "dots_saveable"),
]
LARGE_MODELS = ("sdxl", "sd3")  # their train cases run last, one group each, at one fixed batch
COLUMNS = ("case", "batch", "step ms", "sample ms", "ms/img", "images/s", "TFLOP/s", "MFU", "AOT GiB", "peak GiB")
COLUMNS += ("compile s", "status")
NOTES = [
    "random weights; synthetic inputs of the real shapes",
    "text context: a random (77, 768) array in place of CLIP's output (CLIP is not run)",
    "SDXL: a random {tokens (77, 2048), text_embeds (1280,), time_ids (6,)} context (no text encoder run)",
    "SD3: a random {encoder_hidden_states (333, 4096), pooled_projections (2048,)} context (no text encoder run)"
    " and a random (128, 128, 16) latent condition (no VAE run)",
    "model TFLOP/s: XLA cost analysis of the step lowered without remat (dot_product attention)",
    "peak GiB: memory_stats()['peak_bytes_in_use'] of the case's own process (n/a on CPU)",
    "compile s: lowering + XLA compile of the timed program(s) (train: of the chosen batch; every try in batch_search)",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry_run", action="store_true", help="tiny shapes (CPU): the same code paths, in about a minute")
    p.add_argument("--out", default="gpu_check_out", help="folder for gpu.json")
    p.add_argument("--budget_s", type=float, default=480.0, help="cases that would start after this are skipped")
    p.add_argument(
        "--group_budget_s", type=float, default=210.0, help="a case group still running after this is stopped"
    )
    p.add_argument("--peak_tflops", type=float, default=989.0, help="the device's dense bf16 peak (H200: 989)")
    p.add_argument("--steps", type=int, default=5, help="timed train steps (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed train steps after compiling")
    p.add_argument("--probe_batch", type=int, default=None, help="batch of the probe compile (default 8; dry run 2)")
    p.add_argument("--batch", type=int, default=None, help="fixed train batch (no search)")
    p.add_argument("--sample_batch", type=int, default=None, help="throughput batch (default 16; dry run 2)")
    p.add_argument("--sample_repeats", type=int, default=3, help="timed sampling / encoding calls (median)")
    p.add_argument("--sample_attention_impl", default="dot_product", help="attention of the sampling cases")
    p.add_argument("--compile_threads", type=int, default=4, help="sampling programs compiled at once")
    p.add_argument("--no_sampling", action="store_true", help="train cases only")
    p.add_argument("--teacher_steps", type=int, default=50)
    p.add_argument("--teacher_guidance", type=float, default=None, help="default: sd15_edit.sample_guidance_scale")
    p.add_argument("--methods", default=None, help="train cases: CoDi methods (default pe,full; dry run: pe)")
    p.add_argument("--attention_impls", default="cudnn,dot_product", help="train cases: model.attention_impl values")
    p.add_argument("--remat_policies", default=None, help="train cases (default full,dots_saveable; dry run: full)")
    p.add_argument("--sdxl_batch", type=int, default=None, help="SDXL train case batch (default 4; dry run 2; 0: none)")
    p.add_argument("--sdxl_attention_impl", default="dot_product", help="attention of the SDXL train case")
    p.add_argument("--sd3_batch", type=int, default=None, help="SD3 train case batch (default 4; dry run 2; 0: none)")
    p.add_argument("--sd3_attention_impl", default="dot_product", help="attention of the SD3 train case")
    p.add_argument("--group", default=None, help=argparse.SUPPRESS)  # internal: a child process's cases (JSON)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)  # internal: where a child writes its rows
    args = p.parse_args(argv)
    args.probe_batch = args.probe_batch or (2 if args.dry_run else 8)
    args.sample_batch = args.sample_batch or (1 if args.dry_run else 16)
    args.methods = args.methods or ("pe" if args.dry_run else "pe,full")
    args.remat_policies = args.remat_policies or ("full" if args.dry_run else "full,dots_saveable")
    args.sdxl_batch = (2 if args.dry_run else 4) if args.sdxl_batch is None else args.sdxl_batch
    args.sd3_batch = (2 if args.dry_run else 4) if args.sd3_batch is None else args.sd3_batch
    return args


def flops_key(case: dict[str, Any], batch: int) -> str:
    """The key of a train case's model FLOPs (the same for every attention / remat choice)."""
    return f"{case.get('model', 'sd15')} {case['method']}@{batch}"


def large_case(args: argparse.Namespace, model: str) -> list[dict[str, Any]]:
    """The PE-CoDi train case of a ``LARGE_MODELS`` model at its ``--<model>_batch`` (none with 0) and
    ``--<model>_attention_impl``, remat full."""
    impl, batch = getattr(args, f"{model}_attention_impl"), getattr(args, f"{model}_batch")
    if batch <= 0:
        return []
    case = dict(kind="train", model=model, method="pe", attention_impl=impl, remat_policy="full", fixed_batch=batch)
    return [dict(case, case=f"train {model} pe {impl} remat=full b{batch}")]


def case_groups(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The case groups in running order: the first train case, the sampling group, the other train
    cases, the SDXL then the SD3 train case (last: the SD-1.5 cases never wait for them)."""
    chosen = [set(text.split(",")) - {""} for text in (args.methods, args.attention_impls, args.remat_policies)]
    train = [
        dict(kind="train", case=f"train {m} {a} remat={r}", method=m, attention_impl=a, remat_policy=r)
        for m, a, r in TRAIN_CASES
        if m in chosen[0] and a in chosen[1] and r in chosen[2]
    ]
    sampling = []
    for batch in sorted({1, args.sample_batch}):
        for steps in (1, 4):
            sampling.append(dict(kind="codi", case=f"sample codi {steps}-step b{batch}", steps=steps, batch=batch))
        steps = args.teacher_steps
        sampling.append(dict(kind="teacher", case=f"sample teacher {steps}-step b{batch}", steps=steps, batch=batch))
    sampling.append(dict(kind="vae_encode", case=f"vae encode b{args.sample_batch}", batch=args.sample_batch))
    groups = [dict(kind="train", cases=[case]) for case in train]
    sampling_group = [] if args.no_sampling else [dict(kind="sampling", cases=sampling)]
    large = [dict(kind="train", cases=[case]) for model in LARGE_MODELS for case in large_case(args, model)]
    return groups[:1] + sampling_group + groups[1:] + large


def child_env(dry_run: bool) -> dict[str, str]:
    """The children's environment: XLA may use 90% of the accelerator's memory (default 75%); the dry
    run compiles without LLVM optimisation (its CPU timings mean nothing; compiling is its cost)."""
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")
    if dry_run and "xla_backend_optimization_level" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    return env


def read_rows(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_group(group: dict[str, Any], args: argparse.Namespace, argv: list[str], timeout: float) -> list[dict]:
    """One group in a child process (``--group``); cases it gave no row get its failure."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "rows.jsonl")
        command = [
            sys.executable,
            os.path.abspath(__file__),
            *argv,
            f"--group={json.dumps(group)}",
            f"--result={result}",
        ]
        start, failure = time.perf_counter(), None
        try:
            proc = subprocess.run(
                command, stderr=subprocess.PIPE, text=True, timeout=timeout, env=child_env(args.dry_run)
            )
            if proc.returncode:
                failure = f"process exited {proc.returncode}: {proc.stderr.strip()[-1500:]}"
        except subprocess.TimeoutExpired:
            failure = f"stopped after {timeout:.0f} s (the time budget left, or --group_budget_s)"
        rows = read_rows(result)
    done = {row["case"] for row in rows}
    for case in group["cases"]:
        if case["case"] not in done:
            rows.append(dict(case, status="error", error=failure or "no result written"))
            print(f"[gpu_check] {case['case']}: error: {rows[-1]['error'][:300]}", flush=True)
    for row in rows:
        row["group_s"] = time.perf_counter() - start
    return rows


def collect(args: argparse.Namespace, argv: list[str]) -> tuple[list[dict[str, Any]], float]:
    """Every group in turn within the budget; ``gpu.json`` rewritten after each."""
    start, rows, flops = time.perf_counter(), [], {}
    for group in case_groups(args):
        left = args.budget_s - (time.perf_counter() - start)
        if left < 5:
            for case in group["cases"]:
                rows.append(dict(case, status="skipped", error=f"time budget ({args.budget_s:.0f} s) spent"))
                print(f"[gpu_check] {case['case']}: skipped (budget)", flush=True)
            continue
        rows += run_group(dict(group, known_flops=flops), args, argv, min(left, args.group_budget_s))
        ok = [row for row in rows if row["kind"] == "train" and row["status"] == "ok"]
        flops.update({flops_key(row, row["batch"]): row["model_flops_per_step"] for row in ok})
        write_json(args, rows, time.perf_counter() - start)
    return rows, time.perf_counter() - start


def add_ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Teacher / CoDi sampling time at each batch and CoDi step count."""
    ok = {row["case"]: row for row in rows if row.get("status") == "ok" and row.get("sample_ms")}
    ratios = {}
    for teacher in [row for row in ok.values() if row["kind"] == "teacher"]:
        for codi in [row for row in ok.values() if row["kind"] == "codi" and row["batch"] == teacher["batch"]]:
            ratios[f"{teacher['case']} / {codi['case']}"] = teacher["sample_ms"] / codi["sample_ms"]
    return ratios


def device_fields(rows: list[dict[str, Any]]) -> dict[str, Any]:
    for row in rows:
        if row.get("device_kind"):
            return {key: row[key] for key in ("device_kind", "platform", "jax_version", "device_count")}
    return dict(device_kind=None, platform=None, jax_version=None, device_count=None)


def write_json(args: argparse.Namespace, rows: list[dict[str, Any]], elapsed: float) -> str:
    """``OUT/gpu.json`` (a temporary file, then ``os.replace``)."""
    os.makedirs(args.out, exist_ok=True)
    record = dict(
        command=" ".join(["python", *sys.argv]),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **device_fields(rows),
        python=platform.python_version(),
        host=platform.node(),
        dry_run=args.dry_run,
        settings={k: v for k, v in vars(args).items() if k not in ("group", "result")},
        elapsed_s=elapsed,
        notes=NOTES,
        ratios=add_ratios(rows),
        tensorflow_imported=any(row.get("tensorflow_imported") for row in rows),
        rows=rows,
    )
    path = os.path.join(args.out, "gpu.json")
    fd, tmp = tempfile.mkstemp(prefix=".gpu.json.", dir=args.out)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1, allow_nan=True)
    os.replace(tmp, path)
    return path


def _number(value: Any, digits: int = 1, scale: float = 1.0) -> str:
    """``value * scale`` with ``digits`` decimals (small values: 2 significant digits); n/a for None / NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    shown = f"{value * scale:.{digits}f}"
    return f"{value * scale:.2g}" if value and float(shown) == 0 else shown


def table_line(row: dict[str, Any]) -> list[str]:
    status = row["status"] if row["status"] == "ok" else f"{row['status']}: {row.get('error', '')}"
    status = status.replace("\n", " ").replace("|", "/")
    return [
        row["case"],
        str(row.get("batch", "")),
        _number(row.get("step_ms")),
        _number(row.get("sample_ms")),
        _number(row.get("ms_per_image"), 2),
        _number(row.get("images_per_s"), 2),
        _number(row.get("tflops")),
        _number(row.get("mfu"), 1, 100.0) + ("%" if row.get("mfu") is not None else ""),
        _number(row.get("aot_gib"), 3),
        _number(row.get("peak_gib"), 3),
        _number(row.get("compile_s")),
        status[:90],
    ]


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table (n/a: not measured for that row / not reported by the backend)."""
    lines = [f"| {' | '.join(COLUMNS)} |", f"|{'|'.join('---' for _ in COLUMNS)}|"]
    return "\n".join(lines + [f"| {' | '.join(table_line(row))} |" for row in rows])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.group is not None:
        from gpu_cases import run_child  # the child: imports JAX and the models

        run_child(json.loads(args.group), args)
        return
    what = "dry run (tiny shapes)" if args.dry_run else "SD-1.5 / SDXL / SD3 shapes"
    print(f"[gpu_check] {what}; budget {args.budget_s:.0f} s")
    rows, elapsed = collect(args, [a for a in argv if not a.startswith(("--group", "--result"))])
    path = write_json(args, rows, elapsed)
    ratios = add_ratios(rows)
    for name, ratio in ratios.items():
        print(f"[gpu_check] sampling time {name}: x{ratio:.1f}")
    device = device_fields(rows)
    print(f"[gpu_check] {elapsed:.0f} s; wrote {path}; device {device['device_kind']} ({device['platform']}), "
          f"jax {device['jax_version']}; MFU against {args.peak_tflops:g} TFLOP/s")  # fmt: skip
    print(table(rows), flush=True)


if __name__ == "__main__":
    main()
