"""Where a training step's time goes, per rank: data wait, forward, backward (with DDP's all-reduce), optimizer.

    python bench/breakdown.py --out DIR [--steps 12 --warmup 3] key=value ...            # one process
    torchrun --standalone --nproc_per_node=2 bench/breakdown.py --out DIR key=value ...   # DDP

An instrumented copy of the shared loop's step, built from the project's own pieces (config, dist.setup,
the workload's Task, make_loaders, the mode's strategy, build_optimizer, the loop's autocast), so dtrain/loop.py
stays free of timers. DDP overlaps the all-reduce with the backward pass: whatever part of it is not
hidden shows up as a longer backward (and a rank that waits for a slower peer waits there too).
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
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

from dtrain import dist  # noqa: E402
from dtrain.config import load_config  # noqa: E402
from dtrain.data import make_loaders, to_device  # noqa: E402
from dtrain.loop import autocast_context, seed_everything  # noqa: E402
from dtrain.optim import build_optimizer  # noqa: E402
from dtrain.strategies import SingleDevice, build_strategy  # noqa: E402
from dtrain.workloads import build_task  # noqa: E402

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
    cfg = load_config(None, args.overrides)
    env = dist.setup(cfg)
    try:
        result = measure(cfg, env, args.warmup, args.steps, args.no_ddp)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"rank-{env.rank}.json").write_text(json.dumps(result, indent=1) + "\n")
    finally:
        dist.cleanup(env)


def measure(cfg, env, warmup: int, steps: int, no_ddp: bool = False) -> dict:
    seed_everything(cfg.seed, cfg.deterministic)
    task = build_task(cfg, env)
    ddp = env.distributed and not no_ddp
    # The loop's own set-up: the mode's strategy wraps the model (a plain copy per rank with --no-ddp).
    strategy = build_strategy(cfg, env) if ddp else SingleDevice(cfg, env)
    model = strategy.wrap(task.model, task.units(task.model))
    raw_model = strategy.raw_model
    optimizer = build_optimizer(raw_model, cfg.optim, task.is_no_decay)
    train_loader, sampler, _ = make_loaders(task, cfg, env)
    # (name, skip the all-reduce): under DDP every other step skips it
    variants = [("ddp", False), ("ddp_no_allreduce", True)] if ddp else [("steps", False)]
    total = (warmup + steps) * len(variants)
    if total > len(train_loader):
        raise SystemExit(f"the loader has {len(train_loader)} batches; need {total} (warm-up + timed steps per variant)")
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.precision == "fp16")
    autocast = autocast_context(env.device, cfg.precision)
    sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)
    sampler.start_epoch(0)
    model.train()
    batches = iter(train_loader)
    times = {name: {phase: [] for phase in PHASES} for name, _ in variants}
    cpu = {name: [] for name, _ in variants}  # CPU time of the whole process (gloo's threads too) per step
    for step in range(total):
        name, skip_allreduce = variants[step % len(variants)]
        dist.barrier(env)  # every rank starts the step together: a slow peer does not leak into "data"
        t0, c0 = time.perf_counter(), time.process_time()
        batch = to_device(next(batches), env.device)
        sync()
        t1 = time.perf_counter()
        # no_sync has to cover the forward pass too: DDP's forward prepares the backward all-reduce.
        with strategy.no_sync(skip=skip_allreduce):
            with autocast:
                loss = task.train_loss(model, batch)
            sync()
            t2 = time.perf_counter()
            scaler.scale(loss).backward()
            sync()
        t3 = time.perf_counter()
        scaler.unscale_(optimizer)
        bool(torch.isfinite(strategy.clip_grad_norm(cfg.optim.grad_clip)))  # the loop's finiteness check
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=strategy.zero_grad_to_none)  # as the loop does
        sync()
        t4, c4 = time.perf_counter(), time.process_time()
        if step >= warmup * len(variants):
            for phase, (a, b) in zip(PHASES, ((t0, t1), (t1, t2), (t2, t3), (t3, t4))):
                times[name][phase].append(1000 * (b - a))
            cpu[name].append(1000 * (c4 - c0))
    params = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    return {
        "rank": env.rank, "world_size": env.world_size, "threads": torch.get_num_threads(), "ddp": ddp,
        "batch_size": cfg.batch_size, "parameters": params, "allreduce_ms": bare_allreduce_ms(params, env),
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
