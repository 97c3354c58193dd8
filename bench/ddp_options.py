"""DDP options side by side in the same processes: which of them pay on this machine.

    python bench/ddp_options.py                      # CPU: 2 gloo processes, ResNet-18 64px, batch 32, 1 thread (~2 min)
    python bench/ddp_options.py --variant "buckets 50 MB=ddp.bucket_cap_mb=50" --rounds 40
    python bench/ddp_options.py --device cuda        # every GPU, NCCL, ResNet-50 224px bf16 + channels_last

Separate runs on a shared machine differ by more than most DDP options change. So this script wraps one
copy of the same model (same weights) per variant, in one torchrun job, and takes the steps round-robin
through the variants, the order reversed every round: every variant sees the same load. The variant
"all-reduce skipped" (the first variant's copy, no_sync around forward and backward) is the floor: the
step without communication.
A variant is a label and the project's ddp.* config keys (see `python train.py --help`).
Writes bench/results/<date>-ddp-options-<device>.json (+ .md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from cases import ImageCase  # noqa: E402
from common import (DEFAULT_RESULTS, child_env, fresh_dir, machine_info, print_table, run_job,  # noqa: E402
                    torchrun_cmd, write_json)
from scaling import gpu_count  # noqa: E402

from dtrain import dist  # noqa: E402
from dtrain.config import load_config  # noqa: E402
from dtrain.data import make_loaders, to_device  # noqa: E402
from dtrain.loop import autocast_context, seed_everything  # noqa: E402
from dtrain.optim import build_optimizer  # noqa: E402
from dtrain.strategies import build_strategy  # noqa: E402
from dtrain.workloads import build_task  # noqa: E402

SKIPPED = "all-reduce skipped"
DEFAULT_VARIANTS = [
    "defaults=",
    "buckets 100 MB=ddp.bucket_cap_mb=100",
    "buckets 5 MB=ddp.bucket_cap_mb=5",
    "static graph=ddp.static_graph=true",
    "gradients copied to buckets=ddp.gradient_as_bucket_view=false",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--nproc", type=int, default=0, help="processes (default: 2 on CPU, every GPU)")
    p.add_argument("--rounds", type=int, default=0, help="timed rounds through all variants (default 20; --quick 3)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=0, help="threads per process (default: 1 on CPU)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=KEY=VALUE[,KEY=VALUE]",
                   help="replaces the default variants (give 'defaults=' to keep the baseline)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # set when torchrun starts this script
    return p.parse_args(argv)


def variants_of(args) -> dict[str, list[str]]:
    out = {}
    for spec in args.variant or DEFAULT_VARIANTS:
        label, _, keys = spec.partition("=")
        out[label] = [k for k in keys.split(",") if k]
    return out


def case_of(args) -> ImageCase:
    if args.device == "cuda":
        cores = len(os.sched_getaffinity(0)) // max(1, torch.cuda.device_count())
        return ImageCase(arch="resnet50", image_size=224, batch=256, threads=args.threads or max(1, cores),
                         precision="bf16", channels_last=True, device="cuda", num_classes=1000)
    case = ImageCase(image_size=64, batch=32, threads=args.threads or 1)
    return ImageCase(image_size=32, batch=16, threads=case.threads) if args.quick else case


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args)
    nproc = args.nproc or (2 if args.device == "cpu" else gpu_count())
    if nproc < 2:
        raise SystemExit(f"ddp_options compares all-reduces, so it needs at least 2 processes (found {nproc} GPU(s)); "
                         "use --nproc")
    rounds = args.rounds or (3 if args.quick else 20)
    case = case_of(args)
    work = fresh_dir(args.results / "work" / "ddp-options")
    argv_out = [f"--device={args.device}", f"--rounds={rounds}", f"--warmup={args.warmup}",
                f"--threads={case.threads}", f"--worker={work}"] + ["--quick"] * args.quick
    argv_out += [f"--variant={v}" for v in args.variant]
    print(f"{case.label()}, {case.threads} thread(s) per process, {nproc} processes, {rounds} rounds through "
          f"{len(variants_of(args)) + 1} variants", flush=True)
    began = time.perf_counter()
    run_job(torchrun_cmd(nproc, Path(__file__), argv_out), child_env(case.threads), work / "log.txt", 1800)
    per_rank = [json.loads((work / f"rank-{r}.json").read_text()) for r in range(nproc)]
    table, slowest = report(case, nproc, rounds, per_rank)
    payload = {"benchmark": "ddp-options", "device": args.device, "nproc": nproc, "rounds": rounds,
               "machine": machine_info(), "settings": case.label(), "variants": variants_of(args),
               "slowest_rank_median_ms": slowest, "per_rank": per_rank, "table": table,
               "seconds": time.perf_counter() - began}
    write_json(args.results, f"ddp-options-{args.device}{'-quick' if args.quick else ''}", payload)
    return 0


def report(case: ImageCase, nproc: int, rounds: int, per_rank: list[dict]) -> tuple[str, dict[str, float]]:
    """Per variant: the slowest rank's median step (DDP steps in lock-step), and vs the defaults."""
    slowest = {name: max(statistics.median(r["steps_ms"][name]) for r in per_rank) for name in per_rank[0]["steps_ms"]}
    base = slowest.get("defaults")
    rows = [[name, " / ".join(f"{statistics.median(r['steps_ms'][name]):.0f}" for r in per_rank),
             f"{ms:.0f}", f"{base / ms:.3f}" if base else "-"] for name, ms in slowest.items()]
    table = print_table(
        f"DDP options, one job, steps round-robin through the variants ({case.label()}, {nproc} processes, "
        f"{case.threads} thread(s) each; median of {rounds} steps per variant)",
        ["variant", "median step per rank (ms)", "slowest rank (ms)", "speed vs defaults"], rows,
        note=f"({SKIPPED!r}: the first variant's copy under no_sync, so the ranks never communicate: the floor for "
             "any option that only changes how gradients are all-reduced)")
    return table, slowest


def worker(args) -> int:
    """One rank of the torchrun job: a wrapped copy of the model per variant, stepped round-robin."""
    variants = variants_of(args)
    steps = (args.warmup + args.rounds) * (len(variants) + 1)
    case = replace(case_of(args), steps=steps)
    base = case.project_args(args.worker, processes=int(os.environ["WORLD_SIZE"]))
    configs = {label: load_config(None, base + keys) for label, keys in variants.items()}
    first = next(iter(configs.values()))
    env = dist.setup(first)
    try:
        models = {}
        for label, cfg in configs.items():  # the same seed: every variant starts from the same weights
            seed_everything(cfg.seed, cfg.deterministic)
            task = build_task(cfg, env)
            strategy = build_strategy(cfg, env)  # the loop's own wrapping, with this variant's ddp.* keys
            strategy.wrap(task.model, task.units(task.model))
            models[label] = (strategy, task, build_optimizer(strategy.raw_model, cfg.optim, task.is_no_decay))
        models[SKIPPED] = next(iter(models.values()))  # the first variant's copy, its all-reduce skipped
        task = models[SKIPPED][1]
        loader, sampler, _ = make_loaders(task, first, env)
        times = round_robin(models, loader, sampler, env, args)
        args.worker.mkdir(parents=True, exist_ok=True)
        (args.worker / f"rank-{env.rank}.json").write_text(json.dumps({"rank": env.rank, "steps_ms": times}) + "\n")
    finally:
        dist.cleanup(env)
    return 0


def round_robin(models: dict, loader, sampler, env, args) -> dict[str, list[float]]:
    """Step every variant once per round, the order reversed every other round; ms per timed step."""
    sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)
    autocast = autocast_context(env.device, next(iter(models.values()))[0].cfg.precision)
    sampler.start_epoch(0)
    batches = iter(loader)
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rnd in range(args.warmup + args.rounds):
        for name in names if rnd % 2 == 0 else names[::-1]:
            strategy, task, optimizer = models[name]
            model = strategy.model
            model.train()
            batch = to_device(next(batches), env.device)  # outside the timed part: data is not the question here
            dist.barrier(env)
            sync()
            t0 = time.perf_counter()
            with strategy.no_sync(skip=name == SKIPPED):
                with autocast:
                    loss = task.train_loss(model, batch)
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=strategy.zero_grad_to_none)
            sync()
            if rnd >= args.warmup:
                times[name].append(1000 * (time.perf_counter() - t0))
    return times


if __name__ == "__main__":
    raise SystemExit(main())
