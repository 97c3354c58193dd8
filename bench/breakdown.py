"""Where a training step's time goes, per rank: data wait, forward, backward (with DDP's all-reduce), optimizer.

    python bench/breakdown.py --out DIR [--steps 12 --warmup 3] key=value ...            # one process
    torchrun --standalone --nproc_per_node=2 bench/breakdown.py --out DIR key=value ...   # DDP

The run is built by dtrain.build (the Trainer train.py trains: strategy, optimizer, scheduler, scaler, loaders
with the workload's batch transform, repeated augmentation and length grouping) and each step is the loop's own
(dtrain.loop.micro_step per micro-batch, then take_step: clipping, the non-finite check, the scaler, the
scheduler, the EMA), with timers between the phases, so dtrain/loop.py stays free of timers. To time the phases
on a GPU, the device is synchronized after each one, which the loop never does: the phases add up to a longer
step than train.py's (the result says so in "phase_sync").
DDP overlaps the all-reduce with the backward pass: whatever part of it is not hidden shows up as a longer
backward (and a rank that waits for a slower peer waits there too).
Under DDP, steps alternate between a normal one and one with the all-reduce skipped (no_sync), so the
difference between the two is measured by the same processes in the same seconds: on a shared machine
separate runs differ by more than the all-reduce costs. After the steps, a bare all-reduce of one
gradient-sized buffer measures the communication alone.
The process's CPU time per step (all its threads) next to the step's wall time tells waiting (a core
idle while a rank waits for its peer or the network) from slower work (the same steps taking more CPU
time when processes compete for caches and memory).
Each rank writes <out>/rank-<r>.json with per-step times in milliseconds, per variant ("steps" without
DDP; "ddp" and "ddp_no_allreduce" under DDP).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from dtrain import dist
from dtrain.build import built_trainer, offline_hub
from dtrain.config import load_config
from dtrain.data import to_device
from dtrain.loop import autocast_context, micro_step, take_step

PHASES = ("data", "forward", "backward", "optimizer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=12, help="timed steps per variant (after the warm-up ones)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-ddp", action="store_true",
                   help="diagnostic: ranks train unwrapped copies in lock-step (the per-step barrier), so the "
                        "difference to DDP's steps without the all-reduce is DDP's own work")
    p.add_argument("overrides", nargs="*", help="train.py config overrides, e.g. model.arch=resnet18")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    # The run's own output goes beside the results; nothing is resumed from an earlier one.
    cfg = load_config(None, [f"output_dir={args.out / 'run'}", "resume=", "progress=false", *args.overrides])
    with offline_hub():
        env = dist.setup(cfg)
        try:
            result = measure(cfg, env, args.warmup, args.steps, args.no_ddp)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"rank-{env.rank}.json").write_text(json.dumps(result, indent=1) + "\n")
        finally:
            dist.cleanup(env)


def measure(cfg, env, warmup: int, steps: int, no_ddp: bool = False) -> dict:
    ddp = env.distributed and not no_ddp
    # The configured mode's strategy, or with --no-ddp a plain copy of the model per rank.
    with built_trainer(cfg, env, mode=None if ddp else "single") as t:
        return timed_steps(t, warmup, steps, ddp)


def timed_steps(t, warmup: int, steps: int, ddp: bool) -> dict:
    cfg, env = t.cfg, t.env
    # (name, skip the all-reduce): under DDP every other step skips it
    variants = [("ddp", False), ("ddp_no_allreduce", True)] if ddp else [("steps", False)]
    total = (warmup + steps) * len(variants)
    if total * cfg.grad_accum_steps > len(t.train_loader):
        raise SystemExit(f"the loader has {len(t.train_loader)} batches; need {total * cfg.grad_accum_steps} "
                         "(warm-up + timed steps per variant, times grad_accum_steps)")
    autocast = autocast_context(env.device, cfg.precision)
    on_gpu = env.device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)  # CPU: nothing runs ahead, nothing to wait for
    t.sampler.start_epoch(0)
    t.model.train()
    batches = iter(t.train_loader)
    times = {name: {phase: [] for phase in PHASES} for name, _ in variants}
    cpu = {name: [] for name, _ in variants}  # CPU time of the whole process (gloo's threads too) per step
    for step in range(total):
        name, skip_allreduce = variants[step % len(variants)]
        dist.barrier(env)  # every rank starts the step together: a slow peer does not leak into "data"
        t0, c0 = time.perf_counter(), time.process_time()
        micro_batches = [to_device(next(batches), env.device) for _ in range(cfg.grad_accum_steps)]
        sync()
        t1 = time.perf_counter()
        forward = backward = 0.0
        for i, batch in enumerate(micro_batches):
            marks = [time.perf_counter()]
            last = i == len(micro_batches) - 1 and not skip_allreduce
            micro_step(t, batch, last, autocast, after_forward=lambda: (sync(), marks.append(time.perf_counter())))
            sync()
            forward, backward = forward + marks[1] - marks[0], backward + time.perf_counter() - marks[1]
        t3 = time.perf_counter()
        take_step(t)
        sync()
        t4, c4 = time.perf_counter(), time.process_time()
        if step >= warmup * len(variants):
            for phase, seconds in zip(PHASES, (t1 - t0, forward, backward, t4 - t3)):
                times[name][phase].append(1000 * seconds)
            cpu[name].append(1000 * (c4 - c0))
    params = sum(p.numel() for p in t.strategy.raw_model.parameters() if p.requires_grad)
    return {
        "rank": env.rank, "world_size": env.world_size, "threads": torch.get_num_threads(), "ddp": ddp,
        "batch_size": cfg.batch_size, "grad_accum_steps": cfg.grad_accum_steps, "parameters": params,
        "allreduce_ms": bare_allreduce_ms(params, env),
        "phase_sync": ("torch.cuda.synchronize after each phase (the loop has none: its steps overlap more)"
                       if on_gpu else "none (CPU)"),
        "variants": {name: {"median_ms": {phase: statistics.median(v) for phase, v in phases.items()},
                            "median_step_ms": statistics.median(map(sum, zip(*phases.values()))),
                            "median_cpu_ms": statistics.median(cpu[name]), "steps_ms": phases, "cpu_ms": cpu[name]}
                     for name, phases in times.items()},
    }


def bare_allreduce_ms(numel: int, env, repeats: int = 5) -> float | None:
    """Median time of one all-reduce of a float32 buffer the size of all gradients (no compute around it)."""
    if not env.distributed:
        return None
    buffer = torch.zeros(numel, dtype=torch.float32, device=env.device)
    out = []
    for _ in range(repeats):
        dist.barrier(env)
        t0 = time.perf_counter()
        tdist.all_reduce(buffer)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        out.append(1000 * (time.perf_counter() - t0))
    return statistics.median(out)


if __name__ == "__main__":
    main()
