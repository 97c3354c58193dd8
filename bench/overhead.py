"""Loop overhead: the project's train.py against a minimal hand-written PyTorch loop, same everything else.

    python bench/overhead.py                 # CPU: ResNet-18 synthetic + all-MiniLM-L6-v2, 1 thread and all cores (~11 min)
                                             # (a row each: twice the time of --threads 1, ~5.5 min on 2 cores)
    python bench/overhead.py --threads 1     # one thread per process only (~5.5 min on 2 cores)
    python bench/overhead.py --quick         # smoke run (~1.5 min)
    python bench/overhead.py --device cuda   # GPU: ResNet-50 AMP + channels_last, bert-base bf16

Each repetition runs both sides as fresh processes, alternating which goes first; the throughput of
one run is its steady-state samples/s (warm-up windows dropped). The table gives the median over
repetitions with the range, and the ratio project / hand-written (target >= 0.97).
Writes bench/results/<date>-overhead-<device>.json (+ .md).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from cases import HANDWRITTEN, BertCase, ImageCase
from common import (BENCH, DEFAULT_RESULTS, PUBLISHED, child_env, drop_checkpoints, fmt_summary, fresh_dir,
                    interleaved, machine_info, print_table, python_cmd, read_records, run_job, steady_counters,
                    steady_cpu_rate, steady_rate, summary, write_json)

TARGET = 0.97
RUN_PROJECT = BENCH / "run_project.py"  # train.py, plus CPU seconds in each metrics record


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny settings, one repetition: checks that it runs")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--workloads", default="image,bert", help="comma-separated: image, bert")
    p.add_argument("--reps", type=int, default=0, help="repetitions per side (default 3; --quick 1)")
    p.add_argument("--threads", default="",
                   help="comma-separated threads per process, a number or 'all' (the usable cores); each is a row. "
                        "Default: '1,all' on CPU (1: other users' jobs share the cores; all: a team of threads "
                        "shows what competes with it in the process), 'all' on GPU machines")
    p.add_argument("--image-size", type=int, default=0, help="image workload: image size (default 64 on CPU)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="",
                   help="override the mode's precision (CPU fp32, GPU bf16)")
    p.add_argument("--compile", action="store_true", help="torch.compile on both sides")
    p.add_argument("--bert-dir", default="", help="GPU mode: a local bert-base directory (default: random init)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    return p.parse_args(argv)


def usable_cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def thread_counts(args) -> list[int]:
    words = [w.strip() for w in (args.threads or ("all" if args.device == "cuda" else "1,all")).split(",") if w.strip()]
    counts = [usable_cores() if w == "all" else int(w) for w in words]
    return list(dict.fromkeys(counts))  # '1,all' on a one-core machine: one row


def image_case(args, threads: int) -> ImageCase:
    if args.device == "cuda":  # the published comparison: ResNet-50, AMP, channels_last, 224 px
        case = ImageCase(arch="resnet50", image_size=224, batch=256, steps=120, log_every=20, warmup_windows=2,
                         threads=threads, workers=min(8, threads), precision=args.precision or "bf16",
                         channels_last=True, device="cuda", num_classes=1000)
    else:
        case = ImageCase(threads=threads, precision=args.precision or "fp32")
    if args.image_size:
        case = replace(case, image_size=args.image_size)
    if args.quick:
        case = replace(case, image_size=min(case.image_size, 32), steps=6, log_every=2, warmup_windows=1,
                       batch=min(case.batch, 16))
    return replace(case, compile=args.compile)


def bert_case(args, threads: int) -> BertCase:
    if args.device == "cuda":
        case = BertCase(model_dir=args.bert_dir, random_init=not args.bert_dir, max_length=128, batch=32, steps=120,
                        log_every=20, warmup_windows=2, threads=threads, workers=2,
                        precision=args.precision or "bf16", device="cuda")
    else:
        case = BertCase(threads=threads, precision=args.precision or "fp32")
    if args.quick:
        case = replace(case, max_length=min(case.max_length, 32), batch=min(case.batch, 8), steps=4, log_every=2,
                       warmup_windows=1)
    return replace(case, compile=args.compile)


def measure(case, sides: dict, reps: int, work: Path, device: str, timeout: float = 0,
            unit: str = "samples/s") -> dict[str, list[dict]]:
    """Interleaved runs of each side (name -> command for a run directory); wall-clock and CPU-time samples/s.
    timeout: seconds per run (0: 1800 on GPUs, 900 on the CPU)."""
    env = child_env(case.threads, **({"CUDA_VISIBLE_DEVICES": "0"} if device == "cuda" else {}))
    timeout = timeout or (1800 if device == "cuda" else 900)

    def run(command_for) -> callable:
        def one(run_dir: Path) -> dict:
            run_job(command_for(run_dir), env, run_dir / "log.txt", timeout)
            drop_checkpoints(run_dir)
            records = read_records(run_dir / "metrics.jsonl")
            return {"rate": steady_rate(records, case.warmup_windows),
                    "cpu_rate": steady_cpu_rate(records, case.warmup_windows, case.log_every * case.batch),
                    "process": steady_counters(records, case.warmup_windows)}
        return one

    return interleaved({name: run(command_for) for name, command_for in sides.items()}, reps, work, unit)


def project_vs_handwritten(case) -> dict:
    return {"project": lambda run_dir: python_cmd(RUN_PROJECT, case.project_args(run_dir)),
            "handwritten": lambda run_dir: python_cmd(HANDWRITTEN, case.handwritten_args(run_dir / "metrics.jsonl"))}


def compare(name: str, case, runs: dict[str, list[dict]], baseline: str = "handwritten") -> dict:
    out = {"workload": name, "settings": case.label(), "case": case.__dict__, "runs": runs, "target": TARGET}
    for metric in ("rate", "cpu_rate"):
        project = [r[metric] for r in runs["project"]]
        base = [r[metric] for r in runs[baseline]]
        if None in project or None in base:
            continue
        p, b = summary(project), summary(base)
        out[metric] = {"project": p, baseline: b, "ratio_of_medians": p["median"] / b["median"],
                       "paired_ratio": summary([x / y for x, y in zip(project, base)])}
    out["meets_target"] = out["rate"]["ratio_of_medians"] >= TARGET
    return out


def process_cell(result: dict) -> str:
    """Median OS threads and voluntary/involuntary context switches per step of each side's process."""
    import statistics

    parts = []
    for side in ("project", "handwritten"):
        counts = [run["process"] for run in result["runs"][side] if run.get("process")]
        if not counts:
            return "-"
        med = {k: statistics.median(c[k] for c in counts) for k in counts[0]}
        parts.append(f"{med['os_threads']:.0f}, {med['voluntary_per_step']:.1f}/{med['involuntary_per_step']:.1f}")
    return "; ".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    work = fresh_dir(args.results / "work" / "overhead")
    began = time.perf_counter()
    rows = []
    for name in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        for threads in thread_counts(args):
            case = image_case(args, threads) if name == "image" else bert_case(args, threads).with_data(work)
            unit = "img/s" if name == "image" else "seq/s"
            print(f"\n{name}: {case.label()}, {case.threads} thread(s), {reps} repetition(s)", flush=True)
            runs = measure(case, project_vs_handwritten(case), reps, work / f"{name}-{threads}t", args.device)
            result = compare(name, case, runs)
            result["unit"] = unit
            rows.append(result)
    table = print_table(
        f"Loop overhead ({args.device}; median (min-max) of {reps} interleaved repetition(s), steady-state samples/s)",
        ["workload", "settings", "threads", "project", "hand-written", "project / hand-written",
         "per repetition", "same, per CPU-second", "OS threads, switches/step (project; hand-written)"],
        [[r["workload"], r["settings"], r["case"]["threads"], f"{fmt_summary(r['rate']['project'])} {r['unit']}",
          f"{fmt_summary(r['rate']['handwritten'])} {r['unit']}",
          f"{r['rate']['ratio_of_medians']:.3f} (target >= {TARGET})", fmt_summary(r["rate"]["paired_ratio"], 3),
          f"{r['cpu_rate']['ratio_of_medians']:.3f}" if "cpu_rate" in r else "-", process_cell(r)] for r in rows],
        note="(project / hand-written: ratio of the medians; per repetition: median (min-max) of the paired ratios; "
             "per CPU-second: the same ratio for samples per CPU-second of each process, which other users' load "
             "hardly moves; switches: voluntary/involuntary context switches of the whole process per step)")
    if args.device == "cuda":
        table += "\n" + published_table(rows)
    payload = {"benchmark": "overhead", "device": args.device, "quick": args.quick, "reps": reps,
               "machine": machine_info(), "results": rows, "table": table,
               "seconds": time.perf_counter() - began}
    write_json(args.results, f"overhead-{args.device}{'-quick' if args.quick else ''}", payload)
    print(f"overhead benchmark took {time.perf_counter() - began:.0f} s", flush=True)
    return 0


def published_table(rows: list[dict]) -> str:
    """GPU mode: the project's per-GPU throughput next to NVIDIA's and timm's published figures (PUBLISHED)."""
    lines = []
    for r in rows:
        keys = ["resnet50", "resnet50_tf32", "resnet50_3090"] if r["workload"] == "image" else ["bert_large_squad"]
        for key in keys:
            what, figure, unit = PUBLISHED[key]
            lines.append([r["settings"], f"{r['rate']['project']['median']:.0f} {unit}", what, f"{figure:g} {unit}"])
    note = ("(A BERT-large sequence of 384 tokens costs roughly 10 times a bert-base sequence of 128 tokens: "
            "compare orders of magnitude only.)")
    return print_table("Per GPU, against published figures", ["this project", "measured", "published", "figure"],
                       lines, note=note)


if __name__ == "__main__":
    raise SystemExit(main())
