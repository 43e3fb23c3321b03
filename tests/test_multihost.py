"""Scale-out: the step on (data x fsdp) meshes of 8 simulated devices equals the replicated one
(teacher and full CoDi), and two real processes on localhost train a tiny CoDi run that equals
one process on the same global batches, then resumes on one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from codi_jax import xla_flags
from codi_jax.runs import pretrained
from tests.optional_deps import skip_if_subprocess_lacks_optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "tests", "scripts")
_TEXT = dict(capture_output=True, text=True, timeout=600)
FINETUNE = os.path.join(REPO, "checkpoints", "finetune_sr4_color")  # committed conditional run (32 px, x4 SR)


def _env(**extra: str) -> dict:
    cache = os.environ.get("CODI_TEST_XLA_CACHE") or jax.config.jax_compilation_cache_dir or ""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_COMPILATION_CACHE_DIR=cache)
    if "XLA_FLAGS" in extra:  # added to the suite's own (conftest)
        extra["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {extra['XLA_FLAGS']}".strip()
    return {**env, **extra}


def _last_json(proc: subprocess.CompletedProcess) -> dict:
    skip_if_subprocess_lacks_optional(proc.stderr)  # the training loop's clu / the pipeline's TensorFlow
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run(*args: str, env: dict | None = None, timeout: int = 900) -> dict:
    script = os.path.join(SCRIPTS, args[0])
    proc = subprocess.run(
        [sys.executable, script, *args[1:]],
        cwd=REPO,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return _last_json(proc)


def test_data_and_fsdp_meshes_equal_the_replicated_step(tmp_path) -> None:
    result = _run("sharded_equality.py", str(tmp_path), env=_env(XLA_FLAGS=xla_flags.simulated_devices(8)))
    (tmp_path / "result.json").write_text(json.dumps(result, indent=1))  # the figures, for the record
    for model in ("teacher", "codi"):
        rows, lr = result[model]["rows"], result[model]["lr"]
        assert set(rows) == {"1x1", "8x1", "2x4"}, rows
        assert rows["2x4"]["split"] > 0, rows  # fsdp did shard
        assert rows["8x1"]["split"] == 0 and rows["1x1"]["split"] == 0, rows
        # A checkpoint written from the 2x4 (data x FSDP) mesh restores bitwise on one device, and back.
        assert result[model]["topology"] == {"8->1": True, "1->8": True}, result[model]["topology"]
        for name, row in rows.items():
            # Losses: the same numbers summed in another order.
            assert row["loss_rel"] < 1e-5, (model, name, row)
            # Params: Adam divides by sqrt(v), so a float-level gradient difference on a near-zero
            # gradient can move a parameter by a fraction of the learning rate; a sharding bug
            # moves many by ~lr.
            assert row["max_param_diff"] < 0.25 * lr and row["max_ema_diff"] < 0.25 * lr, (model, name, row)


def test_evaluation_sampling_on_8_devices_equals_one_device() -> None:
    """``evaluate.sample_all`` splits each batch over 8 simulated devices (padding 6 and 5 examples
    to 8): the samples equal one device's within float rounding of the image range [-1, 1]."""
    result = _run("sharded_sampling.py", env=_env(XLA_FLAGS=xla_flags.simulated_devices(8)))
    for row in result.values():
        assert row["shape"] == [11, 16, 16, 3], row
        assert row["cond_effect"] > 0.1, row  # the examples differ: a mix-up would show
        assert row["max_diff"] < 1e-5, row


def _sample_cli(images: str, out: str, devices: int) -> np.ndarray:
    """``sample`` on the committed fine-tuned x4 SR run with ``devices`` simulated CPU devices: the
    11 samples (uint8) as one array."""
    from PIL import Image

    args = ["-m", "codi_jax.sample", f"--run={FINETUNE}", f"--images={images}", "--input=condition"]
    args += [f"--out={out}", "--steps=2", "--renoise", "--batch_size=6", "--seed=5"]
    env = _env(XLA_FLAGS=xla_flags.simulated_devices(devices))
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return np.stack([np.asarray(Image.open(os.path.join(out, f"lr_{i:02d}.png"))) for i in range(11)])


def test_sample_cli_on_8_devices_equals_one_device(tmp_path) -> None:
    """``sample`` splits each batch over every local device (6 and 5 inputs padded to 8): its PNGs
    equal one device's, up to one 8-bit level where a float lands on a rounding boundary."""
    from PIL import Image

    images = tmp_path / "lr"
    images.mkdir()
    rng = np.random.RandomState(0)
    for i in range(11):
        Image.fromarray(rng.randint(0, 256, (8, 8, 3), np.uint8)).save(images / f"lr_{i:02d}.png")
    one = _sample_cli(str(images), str(tmp_path / "one"), 1)
    eight = _sample_cli(str(images), str(tmp_path / "eight"), 8)
    diff = np.abs(one.astype(int) - eight.astype(int))
    assert one.shape == (11, 32, 32, 3) and diff.max() <= 1 and (diff == 0).mean() > 0.99, diff.max()
    assert np.abs(one[0].astype(int) - one[1].astype(int)).mean() > 5  # the inputs differ: a mix-up would show


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _on_two_processes(args: list[str]) -> list[tuple[str, str]]:
    """``python ARGS`` as two real processes (``jax.distributed`` on localhost): their (stdout, stderr)."""
    distributed = [f"--coordinator_address=localhost:{_free_port()}", "--num_processes=2"]
    workers = [
        subprocess.Popen([sys.executable, *args, *distributed, f"--process_id={i}"],
                         cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]  # fmt: skip
    outputs = [worker.communicate(timeout=900) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], [err[-3000:] for _, err in outputs]
    return outputs


def test_two_processes_sample_what_one_process_samples(tmp_path) -> None:
    """``sample --skip_existing`` on two real processes (``jax.distributed``): each samples its
    block of the 7 inputs, the blocks are gathered and process 0 alone writes; the files equal one
    process's."""
    from PIL import Image

    images = tmp_path / "lr"
    images.mkdir()
    rng = np.random.RandomState(1)
    for i in range(7):
        Image.fromarray(rng.randint(0, 256, (8, 8, 3), np.uint8)).save(images / f"lr_{i}.png")
    args = ["-m", "codi_jax.sample", f"--run={FINETUNE}", f"--images={images}", "--input=condition"]
    args += ["--steps=2", "--renoise", "--batch_size=2", "--seed=5", "--skip_existing", "--chunk_size=4"]
    one = subprocess.run([sys.executable, *args, f"--out={tmp_path / 'one'}"], cwd=REPO, env=_env(), **_TEXT)
    assert one.returncode == 0, one.stderr[-4000:]
    outputs = _on_two_processes([*args, f"--out={tmp_path / 'two'}"])
    assert "Wrote 7 samples" in outputs[0][0] and "Wrote" not in outputs[1][0]  # process 0 writes
    names = sorted(os.listdir(tmp_path / "one"))
    assert len(names) == 7 and sorted(os.listdir(tmp_path / "two")) == names
    pixels = {
        run: np.stack([np.asarray(Image.open(tmp_path / run / n)) for n in names]).astype(int) for run in ("one", "two")
    }
    diff = np.abs(pixels["one"] - pixels["two"])
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, diff.max()
    assert np.abs(pixels["one"][0] - pixels["one"][6]).mean() > 5  # the inputs differ: a mix-up would show


def test_two_processes_evaluate_what_one_process_evaluates(tmp_path) -> None:
    """``evaluate`` on two real processes: each samples its block of the held-out images, both score
    the gathered samples, process 0 alone writes; the table equals one process's."""
    from PIL import Image

    images = tmp_path / "photos"
    images.mkdir()
    rng = np.random.RandomState(2)
    for i in range(5):
        Image.fromarray(rng.randint(0, 256, (32, 32, 3), np.uint8)).save(images / f"im{i}.png")
    args = ["-m", "codi_jax.evaluate", f"--run=ft={FINETUNE}:2", f"--images={images}", "--batch_size=2"]
    one = subprocess.run([sys.executable, *args, f"--out={tmp_path / 'one'}"], cwd=REPO, env=_env(), **_TEXT)
    skip_if_subprocess_lacks_optional(one.stderr)  # the held-out degradation runs in TensorFlow
    assert one.returncode == 0, one.stderr[-4000:]
    outputs = _on_two_processes([*args, f"--out={tmp_path / 'two'}"])
    assert "| ft" in outputs[0][0] and "| ft" not in outputs[1][0]  # process 0 prints and writes
    rows = {}
    for run in ("one", "two"):
        with open(tmp_path / run / "results.json") as f:
            rows[run] = json.load(f)["rows"]
    assert len(rows["one"]) == len(rows["two"]) == 2  # the run and bicubic
    for a, b in zip(rows["one"], rows["two"], strict=True):
        assert a["method"] == b["method"] and a["steps"] == b["steps"]
        for x, y in ((a["psnr"], b["psnr"]), (a["ssim"], b["ssim"]), (a["extra"]["lpips"], b["extra"]["lpips"])):
            assert abs(x - y) <= 1e-3 * max(1.0, abs(x)), (a, b)


def test_two_processes_equal_one_on_the_same_global_batches(tmp_path) -> None:
    workdir = str(tmp_path)
    _run("two_process.py", "teacher", workdir)
    port = str(_free_port())
    script = os.path.join(SCRIPTS, "two_process.py")
    workers = [
        subprocess.Popen(
            [sys.executable, script, "worker", workdir, str(i), port],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=900)
        results.append(_last_json(subprocess.CompletedProcess(worker.args, worker.returncode, out, err)))
    assert [r["process"] for r in results] == [0, 1] and {r["step"] for r in results} == {2}
    assert results[0]["digest"] == results[1]["digest"], results  # both processes hold the same state
    assert os.listdir(os.path.join(workdir, "two", "samples")) == ["step_0000002.png"]

    one = _run("two_process.py", "reference", workdir)
    assert one["step"] == 2
    two_params = pretrained.load_conditional(os.path.join(workdir, "two"), use_ema=False).params
    one_params = pretrained.load_conditional(os.path.join(workdir, "one"), use_ema=False).params
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(two_params), jax.tree.leaves(one_params))]
    assert max(diffs) < 0.25 * 1e-3, max(diffs)  # lr 1e-3 (tiny_codi)

    resumed = _run("two_process.py", "resume", workdir)  # the 2-process checkpoint, on 1 process
    assert resumed["step"] == 4
