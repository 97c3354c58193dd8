"""The GPU step's open questions in one run of about 8 minutes on one GPU (a lent machine's 15 minutes fit a rerun).

    python bench/gpu_checks.py            # one GPU: profiles + the bert-base overhead ratio (~8 min)
    python bench/gpu_checks.py --smoke    # the same code paths on the CPU with tiny sizes (~3 min), no GPU needed
    python bench/gpu_checks.py --skip-overhead   # the profiles only (~4 min)

1. ResNet-50, batch 64, 224 px, SGD, synthetic data, one process: fp32 against bf16 (both channels_last),
   bf16 without channels_last, and under torchrun --nproc_per_node=1 DDP against FSDP (bf16 autocast, and
   fsdp.param_dtype=bf16). Each run is train.py with profile.start_step / profile.steps, so the trace holds
   whole steps of the real loop. Per run: ms per step (from the trace's step marks), GPU busy ms per step
   (kernels and copies), host ops per step called from Python, and the kernels that take the most time.
   A step much longer than its GPU busy time is bound by the host (launches, syncs, Python); one whose
   kernels grow (bf16) is the device's.
2. bert-base (random init, bf16, seq 128, batch 32): bench/overhead.py --device cuda, project against the
   hand-written loop, 3 interleaved repetitions (target >= 0.97).

Writes bench/results/<date>-gpu_checks-<device>.json (+ .md); the traces stay in bench/results/work/gpu_checks/.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

from common import (BENCH, DEFAULT_RESULTS, TRAIN, child_env, fresh_dir, machine_info, print_table, python_cmd, run_job,
                    torchrun_cmd, write_json)
from step_ops import count_ops

SMOKE_LABEL = "CPU smoke: resnet18 32px batch 8, channels_last not applied"
PROFILE = (11, 5)  # steps 11-15: after cuDNN's algorithm search and the allocator's warm-up
VARIANTS = [  # (name, launcher processes (0: python train.py), overrides)
    ("fp32, channels_last", 0, ["precision=fp32", "channels_last=true"]),
    ("bf16, channels_last", 0, ["precision=bf16", "channels_last=true"]),
    ("bf16, contiguous", 0, ["precision=bf16", "channels_last=false"]),
    ("bf16, channels_last, deterministic (no cuDNN autotuning)", 0,
     ["precision=bf16", "channels_last=true", "deterministic=true"]),
    ("DDP 1 rank, bf16, channels_last", 1, ["mode=ddp", "precision=bf16", "channels_last=true"]),
    ("FSDP 1 rank, bf16 autocast, channels_last", 1, ["mode=fsdp", "precision=bf16", "channels_last=true"]),
    ("FSDP 1 rank, param_dtype=bf16, channels_last", 1,
     ["mode=fsdp", "fsdp.param_dtype=bf16", "channels_last=true"]),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, ResNet-18 at 32 px, batch 8: checks the script runs")
    p.add_argument("--skip-overhead", action="store_true", help="only the ResNet-50 profiles")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    return p.parse_args(argv)


def image_args(out: Path, smoke: bool) -> list[str]:
    first, steps = PROFILE
    arch, size, batch = ("resnet18", 32, 8) if smoke else ("resnet50", 224, 64)
    return ["workload=image", f"model.arch={arch}", "data.synthetic=true", f"data.image_size={size}",
            "data.num_classes=1000" if not smoke else "data.num_classes=10",
            f"data.synthetic_train_size={batch * (first + steps + 2)}", f"data.synthetic_val_size={batch}",
            f"batch_size={batch}", "epochs=1", "log_every=5", "num_workers=0", "optim.name=sgd", "optim.lr=0.1",
            "optim.warmup_steps=0", "keep_last=0", "progress=false", f"output_dir={out}",
            f"profile.start_step={first}", f"profile.steps={steps}"] + (["mode=cpu"] if smoke else [])


def run_variant(name: str, nproc: int, overrides: list[str], out: Path, smoke: bool) -> dict:
    args = image_args(out, smoke)
    if smoke:  # the CPU: no channels_last / bf16 question to answer, only the code path to exercise
        overrides = [o for o in overrides if not o.startswith("channels_last")]
        args = [a for a in args if a != "mode=cpu"] if nproc else args
    args += overrides
    cmd = torchrun_cmd(nproc, TRAIN, args) if nproc else python_cmd(TRAIN, args)
    env = child_env(1 if smoke else 8, **({} if smoke else {"CUDA_VISIBLE_DEVICES": "0"}), KINETO_LOG_LEVEL="5")
    wall = run_job(cmd, env, out / "log.txt", timeout=600)
    traces = sorted((out / "profile").glob("*.json"))
    if not traces:
        raise SystemExit(f"{name}: no trace in {out / 'profile'} (see {out / 'log.txt'})")
    trace = json.loads(traces[-1].read_text())
    return {"variant": name, "overrides": overrides, "wall_s": wall, **step_times(trace),
            **{k: v for k, v in count_ops(trace, PROFILE[1]).items() if k != "by_name"},
            "top_host_ops": dict(list(count_ops(trace, PROFILE[1])["by_name"].items())[:12]),
            "top_kernels": top_kernels(trace)}


def step_times(trace: dict) -> dict:
    """ms per step from the loop's own 'dtrain step N' marks; GPU busy ms per step (kernels + copies, overlaps
    counted once)."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    marks = sorted((e for e in events if str(e.get("name", "")).startswith("dtrain step ")), key=lambda e: e["ts"])
    steps = max(1, len(marks))
    step_ms = (marks[-1]["ts"] + marks[-1]["dur"] - marks[0]["ts"]) / 1e3 / steps if marks else 0.0
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in ("kernel", "gpu_memcpy",
                                                                                        "gpu_memset"))
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return {"ms_per_step": step_ms, "gpu_busy_ms_per_step": busy / 1e3 / steps}


def top_kernels(trace: dict, count: int = 10) -> dict[str, float]:
    """The kernels (and copies) with the most time, ms per step, names cut to 80 characters."""
    steps = PROFILE[1]
    totals = collections.Counter()
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            totals[str(e["name"])[:80]] += e["dur"] / 1e3 / steps
    return {k: round(v, 3) for k, v in totals.most_common(count)}


def overhead_ratio(args, work: Path) -> dict | None:
    if args.skip_overhead:
        return None
    mode = ["--quick", "--threads", "1"] if args.smoke else ["--device", "cuda"]  # GPU: all cores per process
    cmd = [sys.executable, str(BENCH / "overhead.py"), "--workloads", "bert", "--reps", "1" if args.smoke else "3",
           f"--results={work / 'overhead-results'}", *mode]
    run_job(cmd, child_env(1), work / "overhead.log", timeout=900)
    found = sorted((work / "overhead-results").rglob("*overhead-*.json"))
    return json.loads(found[-1].read_text())["results"][0] if found else None


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU here; bench/gpu_checks.py --smoke runs the same code paths on the CPU",
              file=sys.stderr)
        return 2
    work = fresh_dir(args.results / "work" / "gpu_checks")
    began = time.perf_counter()
    rows = []
    for i, (name, nproc, overrides) in enumerate(VARIANTS):
        print(f"[{time.perf_counter() - began:4.0f} s] {name}", flush=True)
        rows.append(run_variant(name, nproc, overrides, work / f"v{i}", args.smoke))
    table = print_table(
        f"One step, profiled ({SMOKE_LABEL if args.smoke else 'ResNet-50 224px, batch 64, SGD'};"
        f" steps {PROFILE[0]}-{sum(PROFILE) - 1} of train.py, torch.profiler)",
        ["run", "ms/step", "GPU busy ms/step", "host ops/step (top-level)", "top kernels (ms/step)"],
        [[r["variant"], f"{r['ms_per_step']:.1f}", f"{r['gpu_busy_ms_per_step']:.1f}", f"{r['top_level']:.0f}",
          "; ".join(f"{k} {v:g}" for k, v in list(r["top_kernels"].items())[:3])] for r in rows],
        note="(GPU busy well below the step: the host is the bound; the traces are in "
             f"{work.relative_to(args.results.parent) if work.is_relative_to(args.results.parent) else work})")
    bert = overhead_ratio(args, work)
    if bert is not None:
        table += (f"\nbert-base overhead: project / hand-written {bert['rate']['ratio_of_medians']:.3f} "
                  f"(per repetition {bert['rate']['paired_ratio']['median']:.3f}), settings {bert['settings']}\n")
    print(table, flush=True)
    device = "cpu" if args.smoke else "cuda"
    payload = {"benchmark": "gpu_checks", "device": device, "smoke": args.smoke, "machine": machine_info(),
               "profiles": rows, "bert_overhead": bert, "table": table, "seconds": time.perf_counter() - began}
    write_json(args.results, f"gpu_checks-{device}{'-quick' if args.smoke else ''}", payload)
    print(f"gpu checks took {time.perf_counter() - began:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
