"""Shared helpers: tiny image data on disk, and running train.py as a user would (python / torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train.py")

# A small model without BatchNorm or dropout (squeezenet1_1, dropout=0) on 32x32 images: fast on
# 2 cores, and DDP-vs-one-process parity holds exactly up to float rounding.
FAST = ["workload=image", "model.arch=squeezenet1_1", "model.dropout=0", "data.image_size=32",
        "data.val_crop_ratio=1.0", "num_workers=0", "batch_size=4", "log_every=1", "progress=false",
        "optim.lr=0.01", "optim.warmup_steps=0", "timeout_s=60"]


# What torchrun or srun set: a job that inherited them would think it was already launched.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_", "SLURM_",
                 "TORCHELASTIC")


def without_launcher_vars(environ) -> dict[str, str]:
    return {k: v for k, v in environ.items() if not k.startswith(LAUNCHER_VARS)}


def subprocess_env(**extra: str) -> dict[str, str]:
    env = without_launcher_vars(os.environ)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def run_train(args: list[str], timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in a subprocess, as in single-process debugging."""
    return run_bounded([sys.executable, TRAIN, *args], timeout, subprocess_env(**env))


def run_torchrun(args: list[str], nproc: int = 2, timeout: float = 240, script: str = TRAIN,
                 launcher_args: tuple[str, ...] = (), **env: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N train.py ARGS`: the real launcher, with a timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *launcher_args, script, *args]
    return run_bounded(cmd, timeout, subprocess_env(**env))


def run_bounded(cmd: list[str], timeout: float, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run to the end; past `timeout` kill it with every process it started, and fail showing its output."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    return finish([proc], timeout)[0]


def output_tail(label: str, stdout: str | None, stderr: str | None, lines: int = 40) -> str:
    parts = []
    for name, text in (("stdout", stdout), ("stderr", stderr)):
        tail = (text or "").splitlines()[-lines:]
        parts.append(f"--- {label} {name} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(parts)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error")]


def assert_one_clear_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, exactly one 'error...' line containing every needle, and no traceback from our code."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "dtrain/" not in proc.stderr and 'train.py", line' not in proc.stderr, proc.stderr
    return lines[0]


def write_image_folder(root: Path, counts: dict[str, dict[str, int]], size: int = 20) -> Path:
    """ImageFolder tree: counts[split][class] images, colour tied to the class so it is learnable."""
    from PIL import Image

    for split, per_class in counts.items():
        for ci, (cls, n) in enumerate(per_class.items()):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                colour = ((80 * ci + 7 * i) % 256, (40 + 60 * ci) % 256, (200 - 50 * ci + i) % 256)
                Image.new("RGB", (size, size), colour).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    """3 classes; 8 training images each; 7 validation images (odd: does not divide by 2 ranks)."""
    return write_image_folder(tmp_path_factory.mktemp("tiny_images"),
                              {"train": {"a": 8, "b": 8, "c": 8}, "val": {"a": 3, "b": 2, "c": 2}})


def read_metrics(output_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def start(cmd_args: list[str], script: str = TRAIN, nproc: int = 0,
          launcher_args: tuple[str, ...] = (), **env: str) -> subprocess.Popen:
    """Start `python SCRIPT ARGS` (nproc=0) or `torchrun ... SCRIPT ARGS` in the background."""
    launcher = [] if nproc == 0 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                                      *launcher_args]
    # A session of its own, so a test can signal the whole process group as Slurm or a terminal does.
    return subprocess.Popen([sys.executable, *launcher, script, *cmd_args], cwd=ROOT, env=subprocess_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def start_ranks(cmd_args: list[str], world_size: int = 2, script: str = TRAIN, port: int = 0,
                **env: str) -> list[subprocess.Popen]:
    """One `python train.py ARGS` per rank with the env:// variables set and no supervisor, as srun starts them.

    Each rank's own exit code is then visible; torchrun reports only the workers that had ended when
    it noticed the first failure, and kills the rest.
    """
    port = port or free_port()
    procs = []
    for rank in range(world_size):
        rank_env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                    "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, script, *cmd_args], cwd=ROOT, text=True,
                                      env=subprocess_env(**{**rank_env, **env}), start_new_session=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Wait for every process, all within one `timeout`. If one overruns, every process (and what it
    started: each runs in a session of its own) is killed and the test fails with each one's last output."""
    import time

    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        return results
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            kill_session(p)
    outputs = []
    for i, p in enumerate(procs):
        out, err = (results[i].stdout, results[i].stderr) if i < len(results) else p.communicate()
        outputs.append(output_tail(f"process {i} ({' '.join(map(str, p.args[-3:]))})", out, err))
    pytest.fail(f"timed out after {timeout:.0f} s; every process was killed\n" + "\n".join(outputs))


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything in its session (launchers' workers, DataLoader workers)."""
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait()


def wait_until(condition, proc: subprocess.Popen, timeout: float = 120, what: str = "condition"):
    """Poll `condition()` until it returns something truthy; fail (showing the process's output) if the
    process ends or time runs out."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended (code {proc.returncode}) before {what}:\n{output_tail('process', out, err)}")
        time.sleep(0.1)
    kill_session(proc)
    out, err = proc.communicate()
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; the process was killed:\n"
                f"{output_tail('process', out, err)}")


def logged_steps(output_dir: Path) -> int:
    """Number of train records in metrics.jsonl so far (0 if none yet)."""
    path = output_dir / "metrics.jsonl"
    return path.read_text().count('"kind": "train"') if path.exists() else 0


def worker_with_local_rank(launcher: subprocess.Popen, local_rank: int):
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("LOCAL_RANK") == str(local_rank):
                return child
        except psutil.Error:
            continue
    return None
