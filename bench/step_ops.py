"""Host ops per training step, counted with torch.profiler: a count that load on a shared machine cannot move.

    python bench/step_ops.py                          # this checkout: ResNet-18 and MiniLM on the CPU (~2 min)
    python bench/step_ops.py --checkout /tmp/old      # the same for another checkout (its train.py and src/)
    python bench/step_ops.py --set optim.grad_clip=1  # extra train.py overrides on every run

Each workload runs train.py (a fresh process, 1 thread) with profile.start_step / profile.steps, so the
trace holds whole steps of the real loop; from the trace this counts, per step, the ops called from
Python (top-level: what the host dispatches one by one; on a GPU each is at least one launch or a
dispatcher round trip) and all ops (nested ones included), and lists the top-level ops by name.
With --norm-timing it also times the gradient norm alone in this process, torch's get_total_norm against
the project's (dtrain.optim.grad_norm_and_clip), on gradients shaped like each model's parameters: CPU
milliseconds per call, 1 thread, interleaved repetitions.
Writes bench/results/<date>-step_ops-cpu.json (+ .md).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

from cases import BertCase, ImageCase
from common import (DEFAULT_RESULTS, ROOT, child_env, fresh_dir, machine_info, print_table, run_job, write_json)

PROFILED = (4, 3)  # (first step, steps): after the first steps' allocations


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkout", type=Path, default=ROOT, help="a checkout whose train.py and src/ run")
    p.add_argument("--workloads", default="image,bert")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra train.py override")
    p.add_argument("--norm-timing", action="store_true", help="also time the gradient norm alone (this checkout)")
    p.add_argument("--label", default="", help="names this run in the result file (e.g. before / after)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    return p.parse_args(argv)


def cases(work: Path, names: list[str]) -> dict[str, object]:
    first, steps = PROFILED
    made = {}
    if "image" in names:
        made["image"] = ImageCase(image_size=32, batch=8, steps=first + steps + 1, log_every=100)
    if "bert" in names:
        made["bert"] = BertCase(max_length=32, batch=4, steps=first + steps + 1, log_every=100).with_data(work)
    return made


def profile_run(case, checkout: Path, extra: list[str], run_dir: Path) -> dict:
    first, steps = PROFILED
    args = [*case.project_args(run_dir), f"profile.start_step={first}", f"profile.steps={steps}", *extra]
    env = child_env(1, PYTHONPATH=str(checkout / "src"), KINETO_LOG_LEVEL="5")
    run_job([sys.executable, str(checkout / "train.py"), *args], env, run_dir / "log.txt", timeout=900)
    traces = sorted((run_dir / "profile").glob("*.json"))
    if not traces:
        raise SystemExit(f"no trace in {run_dir / 'profile'}: see {run_dir / 'log.txt'}")
    return count_ops(json.loads(traces[-1].read_text()), steps)


def count_ops(trace: dict, steps: int) -> dict:
    """Per step: top-level ops (not inside another op of the same thread), all ops, top-level ops by name."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    marks = [e for e in events if str(e.get("name", "")).startswith("dtrain step ")]
    ops = sorted((e for e in events if e.get("cat") == "cpu_op"), key=lambda e: (e["tid"], e["ts"], -e["dur"]))
    top, open_until = [], {}
    for e in ops:  # sorted by start: an op that starts before the enclosing one ends is nested
        if e["ts"] >= open_until.get(e["tid"], -1):
            top.append(e)
            open_until[e["tid"]] = e["ts"] + e["dur"]

    def in_steps(e):
        return any(m["ts"] <= e["ts"] <= m["ts"] + m["dur"] for m in marks)

    top = [e for e in top if in_steps(e)]
    by_name = collections.Counter(e["name"] for e in top)
    return {"steps": len(marks) or steps, "top_level": len(top) / steps,
            "all": sum(1 for e in ops if in_steps(e)) / steps,
            "by_name": {k: v / steps for k, v in by_name.most_common()}}


def norm_timing(reps: int = 7, calls: int = 50) -> dict[str, dict]:
    """CPU ms per call of torch's get_total_norm and of grad_norm_and_clip(max_norm=0), medians of
    interleaved repetitions, on random gradients shaped like ResNet-18's and MiniLM's parameters."""
    import statistics

    import torch
    import torchvision
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from common import minilm_dir
    from dtrain.optim import grad_norm_and_clip

    torch.set_num_threads(1)
    bert = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(minilm_dir(), num_labels=2))
    models = {"image": torchvision.models.resnet18(num_classes=10), "bert": bert}
    out = {}
    for name, model in models.items():
        grads = [torch.randn_like(p) for p in model.parameters()]
        sides = {"torch get_total_norm": lambda: torch.nn.utils.get_total_norm(grads),
                 "grad_norm_and_clip": lambda: grad_norm_and_clip(grads, 0.0)}
        times = {side: [] for side in sides}
        for rep in range(reps):
            for side, fn in (list(sides.items()) if rep % 2 == 0 else list(sides.items())[::-1]):
                began = time.process_time()
                for _ in range(calls):
                    fn()
                times[side].append((time.process_time() - began) / calls * 1e3)
        out[name] = {"gradients": len(grads), **{side: statistics.median(t) for side, t in times.items()},
                     "all": times}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    work = fresh_dir(args.results / "work" / "step_ops")
    began = time.perf_counter()
    results = {}
    for name, case in cases(work, names).items():
        print(f"{name}: {case.label()}, profiling steps {PROFILED[0]}-{sum(PROFILED) - 1}", flush=True)
        results[name] = {"settings": case.label(), **profile_run(case, args.checkout, args.set, work / name)}
    rows = [[name, r["settings"], f"{r['top_level']:.0f}", f"{r['all']:.0f}",
             ", ".join(f"{k} {v:g}" for k, v in list(r["by_name"].items())[:6])] for name, r in results.items()]
    table = print_table(
        f"Host ops per training step ({args.label or args.checkout}; torch.profiler, steps "
        f"{PROFILED[0]}-{sum(PROFILED) - 1}, 1 thread, CPU{', ' + ' '.join(args.set) if args.set else ''})",
        ["workload", "settings", "top-level ops", "all ops", "most frequent top-level ops"], rows,
        note="(top-level: called from Python, each a dispatcher round trip, on a GPU a launch or more; all: nested "
             "ops included)")
    timing = norm_timing() if args.norm_timing else None
    if timing:
        table += print_table("The gradient norm alone (CPU ms per call, 1 thread, median of 7 interleaved repetitions "
                             "of 50 calls)", ["workload", "gradients", "torch get_total_norm", "grad_norm_and_clip"],
                             [[name, t["gradients"], f"{t['torch get_total_norm']:.3f}",
                               f"{t['grad_norm_and_clip']:.3f}"] for name, t in timing.items()])
    payload = {"benchmark": "step_ops", "norm_timing": timing, "device": "cpu", "label": args.label, "checkout": str(args.checkout),
               "overrides": args.set, "machine": machine_info(), "results": results, "table": table,
               "seconds": time.perf_counter() - began}
    label = f"-{args.label}" if args.label else ""
    write_json(args.results, f"step_ops{label}-cpu", payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
