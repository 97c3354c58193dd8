"""The project's train.py against pytorch/examples' imagenet/main.py: same model, data, batch, SGD settings, threads.

    python bench/examples_imagenet.py --examples-main /tmp/examples/imagenet/main.py     # ~3.5 min on 2 cores
    python bench/examples_imagenet.py --examples-main PATH --variant "unfused:optim.fused=false"

pytorch/examples is not part of this repository: fetch it yourself and pass the path of its imagenet/main.py.
It runs unchanged through bench/run_examples_imagenet.py (ResNet-18 by default, `--dummy` data replaced by
dtrain's SyntheticImages at --image-size, `-j 0` as the project's run, on the CPU), beside train.py with the same
settings: 1000 classes, batch 32, SGD with lr 0.1, momentum 0.9, weight decay 1e-4, fp32, the same thread count,
no DataLoader workers. What differs is each side's own loop: the peer's optimizer step is torch's default (on the
CPU a loop over the parameters) where the project's is fused (optim.fused=true, its default; `--variant` adds
project sides with other overrides); the project's learning rate follows its schedule (the peer's StepLR keeps
0.1 in these steps); the project computes the gradient norm (its non-finite check) and the peer top-1/top-5
accuracy and the loss's value every step.

Repetitions are interleaved; reports steady-state img/s of each side, project / peer per repetition and per
CPU-second, and the processes' threads and context switches per step. Writes
bench/results/<date>-examples_imagenet[-LABEL]-cpu.json (+ .md).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

from cases import ImageCase
import overhead
from common import (BENCH, DEFAULT_RESULTS, fmt_summary, fresh_dir, machine_info, print_table, python_cmd, summary,
                    write_json)
from overhead import RUN_PROJECT

RUN_PEER = BENCH / "run_examples_imagenet.py"
PEER = "examples"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples-main", type=Path, required=True,
                   help="path to pytorch/examples' imagenet/main.py (not shipped here)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per side")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per run")
    p.add_argument("--log-every", type=int, default=3)
    p.add_argument("--warmup-windows", type=int, default=2)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--variant", action="append", default=[],
                   help="another project side, 'label:key=value key=value' (train.py overrides)")
    p.add_argument("--label", default="", help="names the result file <date>-examples_imagenet-LABEL-cpu (a second run "
                                               "of the day beside the first)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    return p.parse_args(argv)


def image_case(args) -> ImageCase:
    return replace(ImageCase(), arch=args.arch, image_size=args.image_size, batch=args.batch, steps=args.steps,
                   log_every=args.log_every, warmup_windows=args.warmup_windows, threads=args.threads,
                   num_classes=1000)


def peer_args(args, case: ImageCase, metrics: Path) -> list[str]:
    return [f"--main={args.examples_main}", f"--out={metrics}", f"--image-size={case.image_size}",
            f"--steps={case.steps}", f"--log-every={case.log_every}", f"--batch={case.batch}", "--",
            "--dummy", "-a", case.arch, "-b", str(case.batch), "-j", str(case.workers), "--no-accel",
            "--lr", "0.1", "--momentum", "0.9", "--wd", "1e-4"]


def parse_variant(text: str) -> tuple[str, list[str]]:
    label, _, overrides = text.partition(":")
    if not label or not overrides:
        raise SystemExit(f"--variant wants 'label:key=value ...', got {text!r}")
    return f"project-{label}", overrides.split()


def sides(args, case: ImageCase) -> dict:
    """Name -> command for a run directory: the project, its variants, the peer."""
    out = {"project": lambda run_dir: python_cmd(RUN_PROJECT, case.project_args(run_dir))}
    for text in args.variant:
        name, overrides = parse_variant(text)
        out[name] = lambda run_dir, extra=overrides: python_cmd(RUN_PROJECT, case.project_args(run_dir) + extra)
    out[PEER] = lambda run_dir: python_cmd(RUN_PEER, peer_args(args, case, run_dir / "metrics.jsonl"))
    return out


def measure(case: ImageCase, commands: dict, reps: int, work: Path) -> dict[str, list[dict]]:
    """overhead.py's interleaved runs, with the peer's longer runs allowed 30 minutes each."""
    return overhead.measure(case, commands, reps, work, "cpu", timeout=1800, unit="img/s")


def ratios(runs: dict[str, list[dict]], side: str, metric: str) -> dict | None:
    mine, peer = [r[metric] for r in runs[side]], [r[metric] for r in runs[PEER]]
    if None in mine or None in peer:
        return None
    return {"ratio_of_medians": statistics.median(mine) / statistics.median(peer),
            "paired": summary([a / b for a, b in zip(mine, peer)])}


def counters_cell(runs: list[dict]) -> str:
    counts = [r["process"] for r in runs if r.get("process")]
    if not counts:
        return "-"
    med = {k: statistics.median(c[k] for c in counts) for k in counts[0]}
    return f"{med['os_threads']:.0f}, {med['voluntary_per_step']:.1f}/{med['involuntary_per_step']:.1f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.examples_main.is_file():
        raise SystemExit(f"--examples-main: no file {args.examples_main}")
    case = image_case(args)
    work = fresh_dir(args.results / "work" / "examples_imagenet")
    began = time.perf_counter()
    print(f"{case.label()}, 1000 classes, {case.threads} thread(s), {args.reps} repetition(s), against "
          f"{args.examples_main}", flush=True)
    runs = measure(case, sides(args, case), args.reps, work)
    rows, results = [], {}
    for side in [s for s in runs if s != PEER]:
        rate, cpu = ratios(runs, side, "rate"), ratios(runs, side, "cpu_rate")
        results[side] = {"rate": rate, "cpu_rate": cpu}
        rows.append([side, f"{fmt_summary(summary(r['rate'] for r in runs[side]))} img/s",
                     f"{fmt_summary(summary(r['rate'] for r in runs[PEER]))} img/s",
                     f"{rate['ratio_of_medians']:.3f}", fmt_summary(rate["paired"], 3),
                     fmt_summary(cpu["paired"], 3) if cpu else "-",
                     f"{counters_cell(runs[side])}; {counters_cell(runs[PEER])}"])
    table = print_table(
        f"train.py against pytorch/examples' imagenet/main.py ({case.label()}, 1000 classes, {case.threads} "
        f"thread(s); median (min-max) of {args.reps} interleaved repetitions, steady-state img/s)",
        ["side", "img/s", "examples img/s", "side / examples", "per repetition", "per CPU-second, per repetition",
         "OS threads, switches/step (side; examples)"], rows,
        note="(side / examples: ratio of the medians; per repetition: median (min-max) of the paired ratios; "
             "per CPU-second: the same for samples per CPU-second of each process; switches: voluntary/"
             "involuntary context switches of the whole process per step)")
    payload = {"benchmark": "examples_imagenet", "device": "cpu", "reps": args.reps, "case": case.__dict__,
               "examples_main": str(args.examples_main), "variants": args.variant, "machine": machine_info(),
               "runs": runs, "results": results, "table": table, "seconds": time.perf_counter() - began}
    write_json(args.results, f"examples_imagenet{'-' + args.label if args.label else ''}-cpu", payload)
    print(f"examples_imagenet benchmark took {time.perf_counter() - began:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
