"""What the tests share: running train.py as users do, reading what a run leaves, and what the markers check.

- Launching, every way a user does: `run_train` (python train.py), `run_torchrun` (torchrun --standalone),
  `run_ranks` (one process per rank with RANK/WORLD_SIZE/MASTER_* set and no supervisor, as srun starts
  them), or any command (`run_bounded`). `nproc=N` runs are plain `run_train`/`start` runs with the word
  `nproc=N` among the arguments. `start`, `start_ranks` and `start_command` start in the background;
  `finish` and `wait_until` wait for them.
- Bounded time: every process started here runs in a session of its own. `finish`, `wait_until` and the
  `run_*` helpers wait within a deadline; on a timeout (or, for `wait_until`, a process that ended too
  early) they kill every process of each session and fail the test with each process's last output lines.
- Environments (dtrain.processes, which bench/ uses too): `without_launcher_vars` is the one scrub of what
  torchrun, srun/sbatch and the launch/ scripts read as "already launched" (RANK, WORLD_SIZE, MASTER_*,
  TORCHELASTIC_*, SLURM_*, NPROC, ...);
  `subprocess_env` adds unbuffered output and one thread per process.
- A run's outputs: `read_metrics`, `records`, `losses`, `logged_steps`; `read_checkpoint`, `weights`,
  `max_difference`, `assert_same_run`. Error output: `error_lines`, `assert_one_clear_error`.
- Data: `write_image_folder` on disk; `Numbers` and `env_of` for samplers in process.
- Markers (registered in pyproject.toml): `unmet_need` says why this machine lacks what a needs_* marker
  asks for; conftest.py's hook skips the test then, or fails it for root and Slurm under
  DTRAIN_REQUIRE_CLUSTER=1.

conftest.py holds the fixtures and hooks; the test files, the support modules (bert_helpers.py,
cluster_netns.py, cluster_slurm.py) and the wrapper scripts (patched_train.py, threads_after_main.py)
import from here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from dtrain.processes import (LAUNCHER_VARS, free_port, python_cmd, scrubbed_environ, torchrun_cmd,  # noqa: F401
                              without_launcher_vars)

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train.py")
TESTS = Path(__file__).resolve().parent
# Wrapper scripts that run train.py with something instrumented or recorded (see each file's docstring).
PATCHED_TRAIN = str(TESTS / "patched_train.py")
THREADS_AFTER_MAIN = str(TESTS / "threads_after_main.py")
ENV_DUMP = str(TESTS / "env_dump.py")
MNIST_DEMO_CONFIG = "configs/image/mnist_demo.yaml"

# A small model without BatchNorm or dropout (squeezenet1_1, dropout=0) on 32x32 images: fast on
# 2 cores, and DDP-vs-one-process parity holds exactly up to float rounding.
FAST = ["workload=image", "model.arch=squeezenet1_1", "model.dropout=0", "data.image_size=32",
        "data.val_crop_ratio=1.0", "num_workers=0", "batch_size=4", "log_every=1", "progress=false",
        "optim.lr=0.01", "optim.warmup_steps=0", "timeout_s=60"]
# squeezenet (no BatchNorm, dropout 0) on synthetic images: exact up to float summation order.
# 9 validation images in batches of 2 over 2 ranks: 3 batches on rank 0, 2 on rank 1 (one padding batch).
SYNTH = [*FAST, "data.synthetic=true", "data.synthetic_train_size=96", "data.synthetic_val_size=9",
         "eval_batch_size=2", "optim.weight_decay=0", "data.num_classes=4"]


# ---------------------------------------------------------------------------------------------
# Environments

def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a process a test starts: this one's, scrubbed, unbuffered, one thread; then `extra`."""
    return scrubbed_environ(OMP_NUM_THREADS="1", **extra)


# ---------------------------------------------------------------------------------------------
# Starting processes

def start_command(cmd: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT,
                  merge_output: bool = False) -> subprocess.Popen:
    """`cmd` in the background, in a session of its own (so a test can signal or kill all it started, as
    Slurm or a terminal does), output piped (stderr into stdout with `merge_output`); env: subprocess_env()."""
    return subprocess.Popen(cmd, cwd=cwd, env=subprocess_env() if env is None else env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
                            start_new_session=True)


def train_command(args: list[str], script: str = TRAIN, nproc: int = 0,
                  launcher_args: tuple[str, ...] = ()) -> list[str]:
    """`python SCRIPT ARGS` (nproc=0) or `python -m torch.distributed.run --standalone --nproc_per_node=N
    LAUNCHER_ARGS SCRIPT ARGS` (torchrun)."""
    return python_cmd(script, args) if nproc == 0 else torchrun_cmd(nproc, script, args, launcher_args)


def start(args: list[str], script: str = TRAIN, nproc: int = 0, launcher_args: tuple[str, ...] = (),
          **env: str) -> subprocess.Popen:
    """Start `python SCRIPT ARGS` (nproc=0) or `torchrun ... SCRIPT ARGS` in the background."""
    return start_command(train_command(args, script, nproc, launcher_args), subprocess_env(**env))


def start_ranks(args: list[str], world_size: int = 2, script: str = TRAIN, port: int = 0,
                **env: str) -> list[subprocess.Popen]:
    """One `python SCRIPT ARGS` per rank with the env:// variables set and no supervisor, as srun starts them.

    Each rank's own exit code is then visible; torchrun reports only the workers that had ended when
    it noticed the first failure, and kills the rest. `env` comes last (a test may set RANK itself).
    """
    port = port or free_port()
    procs = []
    for rank in range(world_size):
        rank_env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                    "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(start_command(train_command(args, script), subprocess_env(**{**rank_env, **env})))
    return procs


# ---------------------------------------------------------------------------------------------
# Waiting within bounded time

def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the process, everything in its session, and every descendant that left it: torchrun
    starts each worker in a session of its own, so killing torchrun's session alone leaves the
    workers running (a worker blocked on purpose lived on for the rest of the suite)."""
    if proc.poll() is None:
        try:
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        for child in descendants:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait()


def output_tail(label: str, stdout: str | None, stderr: str | None, lines: int = 40) -> str:
    parts = []
    for name, text in (("stdout", stdout), ("stderr", stderr)):
        tail = (text or "").splitlines()[-lines:]
        parts.append(f"--- {label} {name} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(parts)


def _fail_killing(message: str, procs: list[subprocess.Popen],
                  outputs: list[tuple[str | None, str | None]] = ()) -> None:
    """Kill every process's session, then fail the test with `message` and each process's last output lines
    (`outputs[i]` for those already read to the end; not piped: no lines)."""
    for p in procs:
        kill_session(p)
    tails = []
    for i, p in enumerate(procs):
        out, err = outputs[i] if i < len(outputs) else p.communicate()
        if p.stdout is not None or p.stderr is not None:
            tails.append(output_tail(f"process {i} ({' '.join(map(str, p.args[-3:]))})", out, err))
    pytest.fail("\n".join([message, *tails]))


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Wait for every process, all within one `timeout`. If one overruns, every process (and what it
    started: each runs in a session of its own) is killed and the test fails with each one's last output."""
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
    _fail_killing(f"timed out after {timeout:.0f} s; every process was killed", procs,
                  [(r.stdout, r.stderr) for r in results])


def wait_until(condition, *procs: subprocess.Popen, timeout: float = 120, what: str = "condition",
               report=None):
    """Poll `condition()` until it returns something truthy, and return that. If one of `procs` ends first,
    or time runs out, kill them all and fail showing each one's output (and `report()`, if given)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        for i, p in enumerate(procs):
            if p.poll() is not None:
                _fail_killing(f"process {i} ended (code {p.returncode}) before {what}"
                              + (f"\n{report()}" if report else ""), list(procs))
        time.sleep(0.1)
    _fail_killing(f"timed out after {timeout:.0f} s waiting for {what}"
                  + ("; every process was killed" if procs else "") + (f"\n{report()}" if report else ""),
                  list(procs))


def worker_with_local_rank(launcher: subprocess.Popen, local_rank: int):
    """The launcher's worker process (psutil) with this LOCAL_RANK, or None."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("LOCAL_RANK") == str(local_rank):
                return child
        except psutil.Error:
            continue
    return None


def run_elastic_killing_worker_1(args: list[str], out: Path, after_steps: int = 7,
                                 timeout: float = 240) -> subprocess.CompletedProcess:
    """torchrun with 2 workers and --max-restarts=1; SIGKILL of local rank 1 once `after_steps` steps are
    logged, then the restarted job runs to its end."""
    launcher = start([*args, f"output_dir={out}"], nproc=2, launcher_args=("--max-restarts=1",))
    wait_until(lambda: logged_steps(out) >= after_steps, launcher, what=f"step {after_steps}")
    wait_until(lambda: worker_with_local_rank(launcher, 1), launcher, what="worker 1").kill()
    return finish([launcher], timeout=timeout)[0]


# ---------------------------------------------------------------------------------------------
# Running to the end

def run_bounded(cmd: list[str], timeout: float, env: dict[str, str] | None = None, cwd: Path = ROOT,
                merge_output: bool = False) -> subprocess.CompletedProcess:
    """Run to the end; past `timeout` kill it with every process it started, and fail showing its output."""
    return finish([start_command(cmd, env, cwd, merge_output)], timeout)[0]


def run_train(args: list[str], timeout: float = 180, script: str = TRAIN, **env: str) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in a subprocess, as in single-process debugging (or nproc=N among ARGS)."""
    return run_bounded(train_command(args, script), timeout, subprocess_env(**env))


def run_torchrun(args: list[str], nproc: int = 2, timeout: float = 240, script: str = TRAIN,
                 launcher_args: tuple[str, ...] = (), **env: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N train.py ARGS`: the real launcher, with a timeout."""
    return run_bounded(train_command(args, script, nproc, launcher_args), timeout, subprocess_env(**env))


def run_ranks(args: list[str], world_size: int = 2, timeout: float = 120, script: str = TRAIN, port: int = 0,
              **env: str) -> list[subprocess.CompletedProcess]:
    """`start_ranks` to the end: every rank has to finish by itself within `timeout` (torchrun would kill
    the others when one fails, which would hide a rank left waiting at a barrier)."""
    return finish(start_ranks(args, world_size, script, port, **env), timeout)


def load_train(argv: list[str], run_name: str = "train") -> dict:
    """For wrapper scripts that patch something first: train.py run in this process with `argv` as its
    arguments. run_name="__main__" runs it as `python train.py` does; "train" only defines main() & co."""
    import runpy

    sys.argv = [TRAIN, *argv]
    return runpy.run_path(TRAIN, run_name=run_name)


# ---------------------------------------------------------------------------------------------
# Error output

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


# ---------------------------------------------------------------------------------------------
# What a run leaves: metrics.jsonl and checkpoints

def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def records(output_dir: Path, kind: str) -> list[dict]:
    """The metrics.jsonl records of one kind ("train", "eval", "eval_ema", "memory", ...)."""
    return [r for r in read_metrics(output_dir) if r["kind"] == kind]


def losses(output_dir: Path) -> dict[int, float]:
    """Training loss per step; a step logged twice (re-run after a crash) keeps its last value."""
    return {r["step"]: r["loss"] for r in records(output_dir, "train")}


def logged_steps(output_dir: Path) -> int:
    """Number of train records in metrics.jsonl so far (0 if none yet)."""
    path = output_dir / "metrics.jsonl"
    return path.read_text().count('"kind": "train"') if path.exists() else 0


def read_checkpoint(output_dir: Path) -> dict:
    """The run's newest checkpoint as one dict: checkpoints/last.pt, or the sharded checkpoints/last
    consolidated first (into OUTPUT_DIR/consolidated.pt)."""
    from dtrain.checkpoint import consolidate

    last = output_dir / "checkpoints" / "last"
    if last.exists():
        return torch.load(consolidate(last, output_dir / "consolidated.pt"), map_location="cpu", weights_only=True)
    return torch.load(output_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    """The model of the run's newest checkpoint, whichever kind."""
    return read_checkpoint(output_dir)["model"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference of any entry of two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def initial_weights(num_classes: int = 10) -> dict[str, torch.Tensor]:
    """FAST's model before any step: the loop seeds with cfg.seed (0) right before building it."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.get_model("squeezenet1_1", weights=None, num_classes=num_classes,
                                        dropout=0.0).state_dict()


def assert_same_run(a: Path, b: Path) -> None:
    """Two runs logged the same losses and ended with the same weights, bit for bit."""
    assert losses(a) == losses(b)  # bit-for-bit: floats compared exactly
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------------------------------------
# Data

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


class Numbers(torch.utils.data.Dataset):
    """0, 1, ..., n-1: a dataset whose samples are their own indices."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def env_of(rank: int, world_size: int):
    """The DistEnv of `rank` in a CPU job of `world_size` processes (no process group: for samplers)."""
    from dtrain.dist import DistEnv

    return DistEnv(mode="ddp" if world_size > 1 else "single", device=torch.device("cpu"), rank=rank,
                   world_size=world_size)


# ---------------------------------------------------------------------------------------------
# What the needs_* markers ask of the machine

# Namespace hosts (cluster_netns.py) are made with these; real mounts need mount(8) too.
NETNS_TOOLS = ("ip", "nsenter", "unshare", "mount")
SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "srun", "sinfo")
# A missing need of these fails its tests instead of skipping them under DTRAIN_REQUIRE_CLUSTER=1 (.ci/run).
CLUSTER_NEEDS = ("needs_root", "needs_slurm")


def _cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _missing_programs(names) -> list[str]:
    return [n for n in names if shutil.which(n) is None and not Path("/usr/sbin", n).exists()]


def unmet_need(marker: pytest.Mark) -> str | None:
    """Why this machine lacks what a needs_* (or cpu_only) marker asks for; None if it has it, or for
    any other marker."""
    if marker.name == "needs_cuda":
        return None if _cuda_devices() >= 1 else "needs a CUDA GPU"
    if marker.name == "needs_2_gpus":
        return None if _cuda_devices() >= 2 else "needs 2 CUDA GPUs"
    if marker.name == "cpu_only":
        return "checks what happens without a GPU" if _cuda_devices() else None
    if marker.name == "needs_root":  # needs_root(*programs): root, and these programs installed
        if os.geteuid() != 0:
            return "needs root (network namespaces, bridges, mounts)"
        missing = _missing_programs(marker.args)
        return f"needs {', '.join(missing)} (apt-get install iproute2 util-linux mount)" if missing else None
    if marker.name == "needs_slurm":  # a throwaway cluster: daemons as root, nodes on namespace hosts
        if os.geteuid() != 0:
            return "Slurm tests need root (they start munged, slurmctld and slurmd on network-namespace hosts)"
        missing = _missing_programs(NETNS_TOOLS)
        if missing:
            return f"Slurm tests need {', '.join(missing)} (apt-get install iproute2 util-linux mount)"
        missing = _missing_programs(SLURM_PROGRAMS)
        if missing:
            return f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
    return None
