"""Which threads a training process has, and how often each wakes: the project against the HF Trainer and the
hand-written loop, MiniLM at N threads. Wakeups are the kernel's per-thread context-switch counters, so other
users' load moves them little; a background thread beside an OpenMP team shows here.

    python bench/thread_wakeups.py                # 2 threads, a few minutes (start-up of 3 processes)
    python bench/thread_wakeups.py --threads 1

Each side runs as a fresh process; once it has written its first train record (its first log_every steps
are done: set-up is over) the script reads /proc/PID/task/*/{comm,stat,status} twice, --window seconds
apart, and reports per thread: CPU seconds,
voluntary switches (the thread slept and woke) and involuntary ones (it was preempted) in the window.
Writes bench/results/<date>-thread_wakeups-cpu.json (+ .md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cases import HANDWRITTEN, HF_TRAINER, BertCase
from common import DEFAULT_RESULTS, child_env, fresh_dir, machine_info, print_table, python_cmd, start, write_json
from overhead import RUN_PROJECT


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a side's first train record")
    p.add_argument("--window", type=float, default=20.0)
    p.add_argument("--sides", default="project,handwritten,hf_trainer")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    return p.parse_args(argv)


def read_threads(pid: int) -> dict[str, dict]:
    """tid -> name, CPU seconds (utime + stime) and context switches, for every thread of pid now."""
    ticks = 100.0  # USER_HZ on Linux
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
            out[task.name] = {"name": (task / "comm").read_text().strip(),
                              "cpu_s": (int(stat[11]) + int(stat[12])) / ticks,
                              "voluntary": int(status["voluntary_ctxt_switches"]),
                              "involuntary": int(status["nonvoluntary_ctxt_switches"])}
        except (OSError, KeyError, IndexError):
            continue  # a thread that ended between listing and reading
    return out


def measure(cmd: list[str], env: dict, log: Path, records: Path, timeout: float, window: float) -> list[dict]:
    proc = start(cmd, env, log)
    try:
        began = time.time()
        while not (records.exists() and '"train"' in records.read_text()):
            if proc.poll() is not None or time.time() - began > timeout:
                raise SystemExit(f"{cmd[1]} wrote no train record (see {log})")
            time.sleep(1.0)
        first = read_threads(proc.pid)
        time.sleep(window)
        last = read_threads(proc.pid)
    finally:
        proc.kill()
        proc.wait()
        proc.log_handle.close()
    rows = []
    for tid, now in last.items():
        before = first.get(tid, {"cpu_s": 0.0, "voluntary": 0, "involuntary": 0})
        rows.append({"tid": tid, "name": now["name"], "cpu_s": now["cpu_s"] - before["cpu_s"],
                     "voluntary": now["voluntary"] - before["voluntary"],
                     "involuntary": now["involuntary"] - before["involuntary"]})
    return sorted(rows, key=lambda r: -r["cpu_s"])


def main(argv=None) -> int:
    args = parse_args(argv)
    work = fresh_dir(args.results / "work" / "thread_wakeups")
    case = BertCase(threads=args.threads, steps=400, log_every=2).with_data(work)  # outlasts the window
    records = {"project": work / "project" / "metrics.jsonl", "handwritten": work / "handwritten.jsonl",
               "hf_trainer": work / "hf.jsonl"}
    sides = {"project": python_cmd(RUN_PROJECT, case.project_args(work / "project")),
             "handwritten": python_cmd(HANDWRITTEN, case.handwritten_args(records["handwritten"])),
             "hf_trainer": python_cmd(HF_TRAINER, case.trainer_args(records["hf_trainer"]))}
    results, rows = {}, []
    for name, cmd in sides.items():
        if name not in args.sides.split(","):
            continue
        print(f"{name}: from its first train record, a {args.window:.0f} s window", flush=True)
        threads = measure(cmd, child_env(args.threads), work / f"{name}.log", records[name], args.timeout,
                          args.window)
        results[name] = threads
        for t in threads:
            rows.append([name, t["tid"], t["name"], f"{t['cpu_s']:.2f}", f"{t['voluntary'] / args.window:.1f}",
                         f"{t['involuntary'] / args.window:.1f}"])
    table = print_table(f"Threads of each training process ({case.label()}, {args.threads} thread(s); a "
                        f"{args.window:.0f} s window)", ["process", "tid", "name", "CPU s in the window",
                                                         "voluntary switches/s", "involuntary switches/s"], rows)
    write_json(args.results, "thread_wakeups-cpu", {"benchmark": "thread_wakeups", "device": "cpu",
                                                    "threads": args.threads, "window_s": args.window,
                                                    "machine": machine_info(), "results": results, "table": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
