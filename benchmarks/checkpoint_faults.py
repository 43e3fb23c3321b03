"""The operator's fault table: each checkpoint / config / signal fault of issue 26 run through the
real ``python -m codi_jax.train`` CLI on the tiny teacher, with its exit code, seconds and the
first console line that says what happened (``error:`` / ``E...`` / the fallback warning).

  python benchmarks/checkpoint_faults.py [--root /tmp/faults]

Prints a Markdown table (about 5 minutes on 2 CPU cores). Cases that need a fault the kernel
must produce use ``tests/scripts/file_size_limit.py`` (writes past a size fail with EFBIG).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "codi_jax", "configs", "cpu", "tiny_teacher.py")


def _train(workdir: str, data_dir: str, *overrides: str, prefix: tuple[str, ...] = ()) -> list[str]:
    base = ["-m", "codi_jax.train", f"--config={CONFIG}", f"--workdir={workdir}", "--compilation_cache="]
    fields = [f"--config.data.data_dir={data_dir}", "--config.sample_every_steps=1000", *overrides]
    return [sys.executable, *prefix, *base, *fields]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=REPO)


def _run(args: list[str], *, signal_after: str | None = None, signum: int = signal.SIGTERM) -> tuple[int, float, str]:
    start = time.time()
    proc = subprocess.Popen(args, env=_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if signal_after and signal_after in line:
            proc.send_signal(signum)
            signal_after = None
    proc.wait()
    return proc.returncode, time.time() - start, _telling_line(lines)


def _telling_line(lines: list[str]) -> str:
    for marker in ("error:", "] CheckpointWriteFailed", "] Preempted", "does not restore", "Traceback"):
        for line in lines:
            if marker in line:
                return line.strip()[:220]
    return (lines[-1].strip() if lines else "")[:220]


def _damage(step_dir: str) -> None:
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _flip(step_dir: str) -> None:
    files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True) if "/d/" in p]
    path = max(files, key=os.path.getsize)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


def _fresh(root: str, name: str, data_dir: str, steps: int = 6) -> str:
    """A workdir trained for ``steps`` (checkpoints every 3), copied from a cached one."""
    cached = os.path.join(root, f"trained-{steps}")
    if not os.path.isdir(cached):
        subprocess.run(
            _train(cached, data_dir, f"--config.num_train_steps={steps}"), env=_env(), check=True, capture_output=True
        )
    workdir = os.path.join(root, name)
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.copytree(cached, workdir, ignore=shutil.ignore_patterns("run.lock"))
    return workdir


def cases(root: str, data_dir: str) -> list[tuple[str, list[str], dict, callable]]:
    """(name, command, _run options, preparation) per case."""
    steps7 = "--config.num_train_steps=7"
    return [
        (
            "resume with another model (layers_per_block 1 -> 2)",
            lambda w: _train(w, data_dir, steps7, "--config.model.layers_per_block=2"),
            {},
            None,
        ),
        (
            "resume with another batch_size (8 -> 4)",
            lambda w: _train(w, data_dir, steps7, "--config.batch_size=4"),
            {},
            None,
        ),
        (
            "... the same, allowed: allow_resume_changes=batch_size",
            lambda w: _train(w, data_dir, steps7, "--config.batch_size=4", "--config.allow_resume_changes=batch_size"),
            {},
            None,
        ),
        (
            "one flipped byte in the latest checkpoint's data",
            lambda w: _train(w, data_dir, steps7),
            {},
            lambda w: _flip(f"{w}/checkpoints/6"),
        ),
        (
            "both checkpoints damaged",
            lambda w: _train(w, data_dir, steps7),
            {},
            lambda w: [_damage(f"{w}/checkpoints/{s}") for s in (3, 6)],
        ),
        (
            "latest damaged, corrupt-step-6 already taken",
            lambda w: _train(w, data_dir, steps7),
            {},
            lambda w: (_damage(f"{w}/checkpoints/6"), os.makedirs(f"{w}/checkpoints/corrupt-step-6")),
        ),
        ("keep_checkpoints=0", lambda w: _train(w, data_dir, "--config.keep_checkpoints=0"), {}, None),
        ("optimizer.b2=1.0", lambda w: _train(w, data_dir, "--config.optimizer.b2=1.0"), {}, None),
        ("num_train_steps=-5", lambda w: _train(w, data_dir, "--config.num_train_steps=-5"), {}, None),
        ("log_every_steps=0", lambda w: _train(w, data_dir, "--config.log_every_steps=0"), {}, None),
        (
            "nonfinite.max_param_norm_ratio=0",
            lambda w: _train(w, data_dir, "--config.nonfinite.max_param_norm_ratio=0"),
            {},
            None,
        ),
        (
            "--config.optimizer.lr=1e-4 (no such field)",
            lambda w: _train(w, data_dir, "--config.optimizer.lr=1e-4"),
            {},
            None,
        ),
        (
            "--workdir names a file",
            lambda w: _train(os.path.join(root, "a_file"), data_dir),
            {},
            lambda w: open(os.path.join(root, "a_file"), "w").close(),
        ),
        (
            "files capped at 200 kB (EFBIG: a full disk's stand-in)",
            lambda w: _train(
                w,
                data_dir,
                "--config.num_train_steps=1000",
                "--config.checkpoint_every_steps=1",
                prefix=(os.path.join(REPO, "tests", "scripts", "file_size_limit.py"), "200000"),
            ),
            {},
            "fresh",
        ),
        (
            "SIGINT during start-up (after the config checks)",
            lambda w: _train(w, data_dir),
            {"signal_after": "XLA compilation cache", "signum": signal.SIGINT},
            "fresh",
        ),
        (
            "SIGTERM during start-up (after the config checks)",
            lambda w: _train(w, data_dir),
            {"signal_after": "XLA compilation cache"},
            "fresh",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/codi_checkpoint_faults")
    args = parser.parse_args()
    os.makedirs(args.root, exist_ok=True)
    data_dir = os.path.join(args.root, "tfds")
    print("| case | exit | s | first telling line |\n|---|---|---|---|")
    for i, (name, command, options, prepare) in enumerate(cases(args.root, data_dir)):
        if prepare == "fresh":
            workdir = os.path.join(args.root, f"case{i}")
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            workdir = _fresh(args.root, f"case{i}", data_dir)
            if prepare:
                prepare(workdir)
        code, seconds, line = _run(command(workdir), **options)
        print(f"| {name} | {code} | {seconds:.0f} | `{line}` |", flush=True)
    concurrent(args.root, data_dir)


def concurrent(root: str, data_dir: str) -> None:
    """A second run on the workdir of a running one."""
    workdir = os.path.join(root, "concurrent")
    shutil.rmtree(workdir, ignore_errors=True)
    first = subprocess.Popen(
        _train(workdir, data_dir, "--config.num_train_steps=100000", "--config.log_every_steps=1"),
        env=_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in first.stderr:
        if "step 2/100000" in line:
            break
    code, seconds, line = _run(_train(workdir, data_dir))
    print(f"| a second run on a running run's workdir | {code} | {seconds:.0f} | `{line}` |")
    first.send_signal(signal.SIGTERM)
    first.communicate()
    print(f"| ... the first, then SIGTERM | {first.returncode} | | (preempted, checkpoint written) |")


if __name__ == "__main__":
    main()
