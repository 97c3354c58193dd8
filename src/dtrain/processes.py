"""Starting the project's processes from another one (the tests, the benchmarks): the environment they inherit
and the command lines that launch them. No torch import here: a parent that only starts jobs stays light."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

# Nothing is ever fetched from a model hub at run time: models and data come from local paths. dtrain.build
# sets these for a run; a parent sets them for baseline scripts that are not a dtrain run.
OFFLINE_HUB = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

# What torchrun, srun/sbatch/salloc and the launch/ scripts read (prefixes): a process that inherited them
# from its parent (itself run under torchrun or srun) would think it was already launched, or launch differently.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_", "TORCHELASTIC",
                 "SLURM_", "SBATCH_", "SRUN_", "SALLOC_",
                 "NNODES", "NPROC", "HEAD_", "RDZV_", "JOIN_TIMEOUT")


def without_launcher_vars(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` without any launcher variable."""
    return {k: v for k, v in environ.items() if not k.startswith(LAUNCHER_VARS)}


def free_port() -> int:
    """A TCP port nobody listens on now (for a rendezvous that is not torchrun's own)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def python_cmd(script: Path | str, args: Sequence[str]) -> list[str]:
    """`python SCRIPT ARGS` with this interpreter."""
    return [sys.executable, str(script), *args]


def torchrun_cmd(nproc: int, script: Path | str, args: Sequence[str], launcher_args: Sequence[str] = ()) -> list[str]:
    """`torchrun --standalone --nproc_per_node=N LAUNCHER_ARGS SCRIPT ARGS`, as this interpreter's module (the
    `torchrun` on PATH may belong to another environment)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *launcher_args, str(script), *args]


def scrubbed_environ(**extra: str) -> dict[str, str]:
    """This process's environment without launcher variables, unbuffered output; then `extra`."""
    env = without_launcher_vars(os.environ)
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env
