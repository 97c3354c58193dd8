"""Weak scaling, per-rank step-time breakdown, and memory per process across epochs.

    python bench/scaling.py                  # CPU: ResNet-18, 1 vs 2 processes (gloo), 1 thread each (~8 min on 2 cores)
    python bench/scaling.py --quick          # smoke run
    python bench/scaling.py --set ddp.static_graph=true --set ddp.bucket_cap_mb=50   # try DDP options
    python bench/scaling.py --device cuda    # GPU: ResNet-50 AMP + channels_last, 1 vs all GPUs (NCCL)

Three kinds of run, repeated and interleaved, all with the same per-process batch and threads:
  1 process                 python train.py ...
  N processes, DDP          torchrun --standalone --nproc_per_node=N train.py ...
  N independent processes   N separate `python train.py` jobs at the same time, no communication
Weak-scaling efficiency = throughput(N, DDP) / (N x throughput(1)). The independent jobs show what the
machine itself allows N processes (shared cores, memory bandwidth, other users' load): if they cannot
each keep the single-process speed, that bound, not DDP, caps the efficiency.
bench/core_probe.py measures the same bound without any model (1-thread matmul and memory copy, alone and
N at once). bench/breakdown.py then times each phase of a step on every rank five ways (1 process; N
independent; N in lock-step without DDP; DDP with the all-reduce skipped; DDP: the last two alternate
step by step within one run), so each loss of efficiency has a name. The loop's per-epoch memory records (peak RSS per rank; peak CUDA memory on
GPUs) show 1 vs N processes and any growth after the first epoch (target < 3%).
Writes bench/results/<date>-scaling-<device>.json (+ .md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

from cases import ImageCase
from common import (BENCH, DEFAULT_RESULTS, TRAIN, child_env, drop_checkpoints, fmt_summary, fresh_dir, interleaved,
                    machine_info, memory_by_epoch, print_table, python_cmd, read_records, rss_growth, run_job,
                    run_together, steady_rate, summary, torchrun_cmd, write_json)

EFFICIENCY_TARGET = 0.85
GROWTH_TARGET = 0.03
BREAKDOWN = BENCH / "breakdown.py"
CORE_PROBE = BENCH / "core_probe.py"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--nproc", type=int, default=0, help="processes of the DDP run (default: 2 on CPU, all GPUs)")
    p.add_argument("--reps", type=int, default=0, help="repetitions (default 3; --quick 1)")
    p.add_argument("--breakdown-reps", type=int, default=0,
                   help="repetitions of the step breakdown (default 2, keeping make bench short; --quick 1)")
    p.add_argument("--threads", type=int, default=0, help="threads per process (default: 1 on CPU)")
    p.add_argument("--image-size", type=int, default=0)
    p.add_argument("--epochs", type=int, default=0, help="epochs per run, for the memory figures (default 4)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra train.py override for the project's runs, e.g. ddp.static_graph=true")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    return p.parse_args(argv)


def scaling_case(args, nproc: int) -> ImageCase:
    if args.device == "cuda":
        cores = len(os.sched_getaffinity(0))
        case = ImageCase(arch="resnet50", image_size=224, batch=256, steps=30, epochs=3, log_every=10,
                         warmup_windows=2, threads=args.threads or max(1, cores // nproc),
                         workers=max(1, min(8, cores // nproc - 1)), precision="bf16", channels_last=True,
                         device="cuda", num_classes=1000)
    else:
        # One thread per process, so that 2 DDP processes fit a 2-core machine: a 2-thread team on a shared CPU
        # stalls whenever another job takes one of its cores.
        case = ImageCase(image_size=64, batch=32, steps=6, epochs=4, log_every=2, warmup_windows=2,
                         threads=args.threads or 1, workers=0)
    if args.quick:
        case = replace(case, image_size=32, batch=16, steps=4, epochs=3, log_every=2, warmup_windows=1)
    return replace(case, image_size=args.image_size or case.image_size, epochs=args.epochs or case.epochs)


def gpu_env(device: str, gpus: str | None) -> dict[str, str]:
    return {"CUDA_VISIBLE_DEVICES": gpus} if device == "cuda" and gpus is not None else {}


def throughput_runs(case: ImageCase, nproc: int, reps: int, extra: list[str], work: Path, device: str) -> dict:
    """Interleaved repetitions of the three kinds of run; each returns its samples/s and memory records."""
    timeout = 1800

    def result(run_dir: Path) -> dict:
        records = read_records(run_dir / "metrics.jsonl")
        drop_checkpoints(run_dir)
        return {"rate": steady_rate(records, case.warmup_windows), "memory": memory_by_epoch(records)}

    def one(run_dir: Path) -> dict:
        run_job(python_cmd(TRAIN, case.project_args(run_dir) + extra),
                child_env(case.threads, **gpu_env(device, "0")), run_dir / "log.txt", timeout)
        return result(run_dir)

    def ddp(run_dir: Path) -> dict:
        run_job(torchrun_cmd(nproc, TRAIN, case.project_args(run_dir, processes=nproc) + extra),
                child_env(case.threads), run_dir / "log.txt", timeout)
        return result(run_dir)

    def independent(run_dir: Path) -> dict:
        jobs = [(python_cmd(TRAIN, case.project_args(run_dir / f"job{i}") + extra),
                 child_env(case.threads, **gpu_env(device, str(i))), run_dir / f"log{i}.txt") for i in range(nproc)]
        run_together(jobs, timeout)
        parts = [result(run_dir / f"job{i}") for i in range(nproc)]
        return {"rate": sum(p["rate"] for p in parts), "per_job": [p["rate"] for p in parts]}

    runs = interleaved({"one": one, "ddp": ddp, "independent": independent}, reps, work)
    return runs


BREAKDOWN_RUNS = {  # run: extra breakdown.py flags; all but "one" run N processes
    "one": [],
    "independent": [],
    "lockstep": ["--no-ddp"],
    "ddp": [],  # alternates normal steps with steps whose all-reduce is skipped
}
BREAKDOWN_ROWS = {  # row: (label, run, variant of breakdown.py's steps)
    "one": ("1 process", "one", "steps"),
    "independent": ("{n} independent processes, at once", "independent", "steps"),
    "lockstep": ("{n} processes in lock-step, no DDP", "lockstep", "steps"),
    "ddp_no_allreduce": ("DDP, {n} processes, all-reduce skipped", "ddp", "ddp_no_allreduce"),
    "ddp": ("DDP, {n} processes", "ddp", "ddp"),
}


def breakdown_runs(case: ImageCase, nproc: int, reps: int, extra: list[str], work: Path, device: str,
                   quick: bool) -> dict:
    """bench/breakdown.py four ways, repeated and interleaved; per row and rank, the median over
    repetitions of each run's median ms per phase. Each row down the list adds one thing:

    1 process -> N independent processes: sharing the machine (no communication, phases drift apart).
    -> N processes in lock-step, no DDP: every process in the same phase at the same moment (a barrier
       per step), each training its own copy.
    -> DDP with the all-reduce skipped (no_sync): DDP's own work around forward and backward.
    -> DDP: the all-reduce, as far as it is not hidden behind the backward pass.
    The last two rows come from one DDP run whose steps alternate between them, so their difference
    is not blurred by the load changing between runs.
    """
    warmup, steps = (1, 3) if quick else (3, 6)
    # Enough batches for the DDP run, which takes warm-up and timed steps for each of its two variants.
    timed = replace(case, steps=2 * (warmup + steps), epochs=1)
    raw: dict[str, list[list[dict]]] = {run: [] for run in BREAKDOWN_RUNS}
    for rep in range(reps):
        for run, flags in BREAKDOWN_RUNS.items():
            raw[run].append(breakdown_once(run, flags, timed, nproc, warmup, steps, extra,
                                           fresh_dir(work / f"{run}-{rep}"), device))
            for variant in raw[run][-1][0]["variants"]:
                steps_ms = " / ".join(f"{r['variants'][variant]['median_step_ms']:.0f}" for r in raw[run][-1])
                print(f"  rep {rep + 1}/{reps} {run} ({variant}): median step {steps_ms} ms", flush=True)
    return {row: [median_of_runs([one_variant(results[rank], variant) for results in raw[run]])
                  for rank in range(len(raw[run][0]))]
            for row, (_, run, variant) in BREAKDOWN_ROWS.items()}


def one_variant(result: dict, variant: str) -> dict:
    """One rank's figures for one variant of its steps (the bare all-reduce is per run)."""
    return {"parameters": result["parameters"], "allreduce_ms": result["allreduce_ms"], **result["variants"][variant]}


def breakdown_once(run: str, flags: list[str], timed: ImageCase, nproc: int, warmup: int, steps: int,
                   extra: list[str], run_dir: Path, device: str) -> list[dict]:
    """One breakdown.py run of one kind; the per-rank (or per-job) results."""
    processes = 1 if run in ("one", "independent") else nproc

    def args(out_dir: Path) -> list[str]:
        return [f"--out={out_dir}", f"--warmup={warmup}", f"--steps={steps}", *flags,
                *timed.project_args(out_dir, processes=processes), *extra]

    if run == "one":
        run_job(python_cmd(BREAKDOWN, args(run_dir)), child_env(timed.threads, **gpu_env(device, "0")),
                run_dir / "log.txt", 1800)
        files = [run_dir / "rank-0.json"]
    elif run == "independent":
        run_together([(python_cmd(BREAKDOWN, args(run_dir / f"job{i}")),
                       child_env(timed.threads, **gpu_env(device, str(i))), run_dir / f"log{i}.txt")
                      for i in range(nproc)], 1800)
        files = [run_dir / f"job{i}" / "rank-0.json" for i in range(nproc)]
    else:
        run_job(torchrun_cmd(nproc, BREAKDOWN, args(run_dir)), child_env(timed.threads), run_dir / "log.txt", 1800)
        files = [run_dir / f"rank-{r}.json" for r in range(nproc)]
    return [json.loads(f.read_text()) for f in files]


def median_of_runs(runs: list[dict]) -> dict:
    """One rank's breakdown over repetitions: the median of each figure (the raw runs are kept)."""
    bare = [r["allreduce_ms"] for r in runs if r["allreduce_ms"] is not None]
    return {"parameters": runs[0]["parameters"],
            "median_ms": {phase: statistics.median(r["median_ms"][phase] for r in runs)
                          for phase in runs[0]["median_ms"]},
            "median_step_ms": statistics.median(r["median_step_ms"] for r in runs),
            "median_cpu_ms": statistics.median(r["median_cpu_ms"] for r in runs),
            "allreduce_ms": statistics.median(bare) if bare else None,
            "runs": runs}


def main(argv=None) -> int:
    args = parse_args(argv)
    nproc = args.nproc or (2 if args.device == "cpu" else gpu_count())
    if nproc < 2:
        raise SystemExit(f"scaling needs at least 2 processes (found {nproc} GPU(s)); use --nproc")
    reps = args.reps or (1 if args.quick else 3)
    case = scaling_case(args, nproc)
    work = fresh_dir(args.results / "work" / "scaling")
    began = time.perf_counter()
    print(f"{case.label()}, {case.threads} thread(s) per process, {case.steps} steps x {case.epochs} epochs per "
          f"run, 1 vs {nproc} processes, {reps} repetition(s)", flush=True)
    runs = throughput_runs(case, nproc, reps, args.set, work / "runs", args.device)
    probe = core_probe(nproc, reps, work / "probe", 1.0 if args.quick else 1.5) if args.device == "cpu" else None
    print("step-time breakdown:", flush=True)
    breakdown_reps = args.breakdown_reps or (1 if args.quick else 2)
    breakdown = breakdown_runs(case, nproc, breakdown_reps, args.set, work / "breakdown", args.device, args.quick)
    tables, summaries = report(case, nproc, reps, breakdown_reps, runs, breakdown, probe, args.device)
    payload = {"benchmark": "scaling", "device": args.device, "quick": args.quick, "reps": reps, "nproc": nproc,
               "machine": machine_info(), "settings": case.label(), "case": case.__dict__, "extra_overrides": args.set,
               **summaries, "runs": runs, "breakdown": breakdown, "core_probe": probe, "table": "\n".join(tables),
               "seconds": time.perf_counter() - began}
    write_json(args.results, f"scaling-{args.device}{'-quick' if args.quick else ''}", payload)
    print(f"scaling benchmark took {time.perf_counter() - began:.0f} s", flush=True)
    return 0


def core_probe(nproc: int, reps: int, work: Path, seconds: float) -> dict:
    """1-thread matmul GFLOP/s and copy GB/s of one process alone, then of each of N processes at once."""
    def figures(log: Path) -> dict:
        return json.loads(log.read_text().strip().splitlines()[-1])

    def alone(run_dir: Path) -> dict:
        run_job(python_cmd(CORE_PROBE, [f"--seconds={seconds}"]), child_env(1), run_dir / "log.txt", 120)
        measured = figures(run_dir / "log.txt")
        return {"rate": measured["matmul_gflops"], **measured}

    def together(run_dir: Path) -> dict:
        logs = [run_dir / f"log{i}.txt" for i in range(nproc)]
        run_together([(python_cmd(CORE_PROBE, [f"--seconds={seconds}"]), child_env(1), log) for log in logs], 120)
        each = [figures(log) for log in logs]
        total = {key: sum(e[key] for e in each) for key in each[0]}
        return {"rate": total["matmul_gflops"], **total, "per_process": each}

    print("machine probe (1-thread matmul GFLOP/s, then copy GB/s; no model, no communication):", flush=True)
    return interleaved({"alone": alone, "together": together}, reps, work, unit="GFLOP/s")


def probe_ratios(probe: dict, nproc: int) -> dict[str, float]:
    return {key: statistics.median(t[key] for t in probe["together"])
            / (nproc * statistics.median(a[key] for a in probe["alone"])) for key in ("matmul_gflops", "copy_gbps")}


def probe_table(probe: dict, nproc: int) -> str:
    rows = []
    ratios = probe_ratios(probe, nproc)
    for key, what in (("matmul_gflops", "matmul 256x256, GFLOP/s"), ("copy_gbps", "copy 128 MB, GB/s")):
        alone = summary([a[key] for a in probe["alone"]])
        together = summary([t[key] for t in probe["together"]])
        rows.append([what, fmt_summary(alone), fmt_summary(together), f"{together['median'] / nproc:.1f}",
                     f"{ratios[key]:.3f}"])
    return print_table(
        "Machine check: one thread per process, no model, no communication; median (min-max)",
        ["probe", "1 process alone", f"{nproc} processes at once (total)", "per process", "vs N x alone"], rows,
        note=f"(a ratio below 1 here bounds every {nproc}-process job on this machine, DDP or not)")


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def report(case: ImageCase, nproc: int, reps: int, breakdown_reps: int, runs: dict, breakdown: dict,
           probe: dict | None, device: str) -> tuple[list, dict]:
    rates = {kind: [r["rate"] for r in runs[kind]] for kind in runs}
    one, ddp, indep = (summary(rates[k]) for k in ("one", "ddp", "independent"))
    efficiency = ddp["median"] / (nproc * one["median"])
    machine_bound = indep["median"] / (nproc * one["median"])
    paired = summary([d / (nproc * o) for d, o in zip(rates["ddp"], rates["one"])])
    step_ratios = breakdown_ratios(breakdown)
    unit = "img/s"
    tables = [print_table(
        f"Weak scaling ({device}; {case.label()}, {case.threads} thread(s) per process; median (min-max) of {reps} "
        "interleaved repetition(s))",
        ["run", "processes", "total throughput", "per process", "vs N x 1 process"],
        [["1 process", 1, f"{fmt_summary(one)} {unit}", f"{one['median']:.1f}", "1.000"],
         [f"DDP ({'gloo' if device == 'cpu' else 'nccl'})", nproc, f"{fmt_summary(ddp)} {unit}",
          f"{ddp['median'] / nproc:.1f}", f"{efficiency:.3f} = weak-scaling efficiency (target >= {EFFICIENCY_TARGET})"],
         [f"{nproc} independent jobs at once", nproc, f"{fmt_summary(indep)} {unit}", f"{indep['median'] / nproc:.1f}",
          f"{machine_bound:.3f} = what the machine allows without any communication"]],
        note=f"DDP / independent jobs = {ddp['median'] / indep['median']:.3f} (the cost of DDP itself); "
             f"efficiency per repetition: {fmt_summary(paired, 3)}\n"
             "from the step-time breakdown below, 1-process step / slowest rank's step: "
             + "; ".join(f"{BREAKDOWN_ROWS[k][0].format(n=nproc)} {v:.3f}" for k, v in step_ratios.items()))]
    if probe is not None:
        tables.append(probe_table(probe, nproc))
    tables.append(breakdown_table(breakdown, device, breakdown_reps))
    memory_rows, growth = memory_table(runs)
    tables.append(memory_rows)
    summaries = {"one": one, "ddp": ddp, "independent": indep, "weak_scaling_efficiency": efficiency,
                 "paired_efficiency": paired, "machine_bound": machine_bound,
                 "ddp_vs_independent": ddp["median"] / indep["median"], "efficiency_target": EFFICIENCY_TARGET,
                 "meets_efficiency_target": efficiency >= EFFICIENCY_TARGET, "rss_growth": growth,
                 "growth_target": GROWTH_TARGET,
                 "breakdown_step_ratios": step_ratios, "allreduce_cost": allreduce_cost(breakdown),
                 "machine_probe_ratios": probe_ratios(probe, nproc) if probe is not None else None}
    return tables, summaries


def breakdown_ratios(breakdown: dict) -> dict[str, float]:
    """Step time of 1 process over that of the slowest rank, per kind: the efficiency each kind allows."""
    one = breakdown["one"][0]["median_step_ms"]
    return {name: one / max(r["median_step_ms"] for r in ranks) for name, ranks in breakdown.items() if name != "one"}


def breakdown_table(breakdown: dict, device: str, reps: int) -> str:
    rows = []
    for name, ranks in breakdown.items():
        for i, r in enumerate(ranks):
            m = r["median_ms"]
            bare = f"{r['allreduce_ms']:.0f}" if r["allreduce_ms"] is not None else "-"
            rows.append([BREAKDOWN_ROWS[name][0].format(n=len(ranks)), i, f"{m['data']:.0f}", f"{m['forward']:.0f}",
                         f"{m['backward']:.0f}", f"{m['optimizer']:.0f}", f"{r['median_step_ms']:.0f}",
                         f"{r['median_cpu_ms']:.0f}", bare])
    params = breakdown["one"][0]["parameters"]
    return print_table(
        f"Step-time breakdown per rank ({device}; median ms per step, median of {reps} interleaved run(s) of each "
        "kind; each row adds one thing to the row above)",
        ["run", "rank / job", "data wait", "forward", "backward", "optimizer", "step", "CPU busy", "bare all-reduce"],
        rows,
        note=f"(backward includes DDP's all-reduce, which overlaps it; CPU busy: the process's CPU time per step, all "
             "its threads: step minus CPU busy is time spent waiting, CPU busy above the 1-process row is the same "
             f"work done slower or extra work; bare all-reduce: one all-reduce of all "
             f"{params / 1e6:.1f}M fp32 gradients with nothing else running. independent: the cost of sharing the "
             "machine; lock-step: of all processes being in the same phase at once; all-reduce skipped: of DDP's own "
             "work; DDP: of the all-reduce. The last two come from one DDP run whose steps alternate between them: "
             f"the all-reduce added {allreduce_cost(breakdown):.0%} to the step there.)")


def allreduce_cost(breakdown: dict) -> float:
    """Slowest rank's DDP step over its step with the all-reduce skipped, minus 1 (the same runs, alternate steps)."""
    return (max(r["median_step_ms"] for r in breakdown["ddp"])
            / max(r["median_step_ms"] for r in breakdown["ddp_no_allreduce"]) - 1)


def memory_table(runs: dict) -> tuple[str, dict]:
    """Peak RSS per rank after each epoch, from the last repetition's 1-process and DDP runs; growth (the
    worst rank's) from every repetition, since one run's high-water mark can step once and stay."""
    rows, growth, per_rep = [], {}, {}
    for kind in ("one", "ddp"):
        memory = runs[kind][-1]["memory"]
        if not memory:
            continue
        per_rep[kind] = [g for g in (rss_growth(r["memory"]) for r in runs[kind]) if g is not None]
        growth[kind] = statistics.median(per_rep[kind]) if per_rep[kind] else None
        for rank in range(len(memory[0]["peak_rss_mb"])):
            per_epoch = [m["peak_rss_mb"][rank] for m in memory]
            shown = f"{100 * (per_epoch[-1] / per_epoch[1] - 1):+.1f}%" if len(memory) >= 3 else "needs 3+ epochs"
            cuda = (" / ".join(f"{m['peak_cuda_mb'][rank]:.0f}" for m in memory)
                    if "peak_cuda_mb" in memory[0] else "-")
            rows.append(["1 process" if kind == "one" else f"DDP, {len(memory[0]['peak_rss_mb'])} processes", rank,
                         " / ".join(f"{v:.0f}" for v in per_epoch), shown, cuda])
    return print_table(f"Peak memory per process after each epoch (MB; target: growth from the end of epoch 2 to "
                       f"the end of the last < {100 * GROWTH_TARGET:.0f}%)",
                       ["run", "rank", "peak RSS by epoch", "growth epoch 2 -> last", "peak CUDA by epoch"],
                       rows,
                       note="worst rank's growth in each repetition: " + "; ".join(
                           f"{'1 process' if kind == 'one' else 'DDP'} " + " / ".join(f"{100 * g:+.1f}%" for g in gs)
                           + f" (median {100 * growth[kind]:+.1f}%)" for kind, gs in per_rep.items() if gs)), \
        {"median": growth, "per_repetition": per_rep}

if __name__ == "__main__":
    raise SystemExit(main())
