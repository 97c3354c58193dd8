"""`make demo` on any machine: torchrun with as many processes as this machine has devices for.

    python -m dtrain.launch_plan [--nproc N] [--most M] train.py --config configs/...yaml [key=value ...]

prints one line saying what it chose and why, then replaces itself with
`python -m torch.distributed.run --standalone --nproc_per_node=N train.py ...`:

- GPUs visible: one process per GPU (NCCL), at most `--most` of them;
- no GPU: `--most` processes on the CPU (Gloo), fewer on a machine with fewer cores.

A fixed count per machine fails on another: 2 processes on a one-GPU workstation leave rank 1 without a
GPU. `--nproc N` (the Makefile's NPROC=N) overrides the choice; on GPUs it must not exceed their count.
`--gpus`/`--cpus` replace what this machine reports, to see the plan for another machine (with
`--dry-run`, which prints the command instead of running it).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass

from dtrain.errors import ConfigError
from dtrain.processes import torchrun_cmd


@dataclass(frozen=True)
class Plan:
    nproc: int
    device: str  # "cuda" or "cpu"
    why: str  # the one line printed before the launch


def choose(gpus: int, cpus: int, requested: int = 0, most: int = 2) -> Plan:
    """The process count and device for this machine. requested > 0 is the user's NPROC=, taken as it is
    unless it asks for more processes than there are GPUs (rank N would find no GPU and stop)."""
    if gpus > 0:
        if requested > gpus:
            raise ConfigError(f"NPROC={requested} but {count(gpus, 'GPU')} visible: use NPROC={gpus} or fewer "
                              "(one process per GPU), or hide the GPUs (CUDA_VISIBLE_DEVICES=) for CPU processes")
        n = requested or min(gpus, most)
        note = "NPROC=N chose it" if requested else (
            f"one per GPU, up to {most}; NPROC=N to change" if gpus > most else
            "one per GPU; NPROC=N to change")
        return Plan(n, "cuda", f"launch: {count(gpus, 'GPU')} visible -> {count(n, 'DDP process')} on the GPUs, "
                               f"NCCL ({note})")
    n = requested or max(1, min(most, cpus))
    note = "NPROC=N chose it" if requested else f"{most} unless fewer cores; NPROC=N to change"
    return Plan(n, "cpu", f"launch: no GPU, {count(cpus, 'CPU core')} -> {count(n, 'DDP process')} on the CPU, "
                          f"Gloo ({note})")


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 'es' if noun.endswith('s') else 's'}"


def visible_gpus() -> int:
    import torch  # imported here: choose() and --help need no torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dtrain.launch_plan", description=__doc__.splitlines()[0])
    p.add_argument("--nproc", default="", help="processes to start (empty or 0: choose from the machine)")
    p.add_argument("--most", type=int, default=2, help="at most this many processes when choosing (default 2)")
    p.add_argument("--gpus", type=int, default=None, help="plan for this many GPUs instead of the visible ones")
    p.add_argument("--cpus", type=int, default=None, help="plan for this many CPU cores instead of the usable ones")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.add_argument("script_and_args", nargs=argparse.REMAINDER, help="train.py and its arguments")
    args = p.parse_args(argv)
    try:
        requested = int(args.nproc or 0)
        if requested < 0 or not args.script_and_args:
            raise ValueError
    except ValueError:
        print(f"error: NPROC must be a whole number >= 1 (or empty to choose) and a script must follow; got "
              f"NPROC={args.nproc!r} and {' '.join(args.script_and_args) or 'no script'}", file=sys.stderr)
        return ConfigError.exit_code
    gpus = visible_gpus() if args.gpus is None else args.gpus
    cpus = usable_cpus() if args.cpus is None else args.cpus
    try:
        plan = choose(gpus, cpus, requested, args.most)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    command = torchrun_cmd(plan.nproc, args.script_and_args[0], args.script_and_args[1:])
    print(plan.why, flush=True)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    os.execv(sys.executable, command)  # torchrun gets the terminal's signals itself; its exit code is make's


if __name__ == "__main__":
    raise SystemExit(main())
