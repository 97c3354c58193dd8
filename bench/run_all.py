"""Run every benchmark (what `make bench` does) and collect their tables in one report.

    python bench/run_all.py                  # CPU: overhead, scaling, trainer (~29 min on a 2-core machine)
    python bench/run_all.py --quick          # smoke run of all three (~4 min), into bench/results/quick/
    python bench/run_all.py --device cuda    # GPU mode of all three (scaling needs 2+ GPUs)

Each script also runs on its own (see bench/README.md). The tables go to the terminal and, together,
to bench/results/<date>-report-<device>.md; every script's full figures are in its dated JSON file there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import BENCH, DEFAULT_RESULTS, ROOT, latest_result, machine_info
from scaling import gpu_count

SCRIPTS = ("overhead", "scaling", "trainer")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--only", default=",".join(SCRIPTS), help=f"comma-separated subset of {', '.join(SCRIPTS)}")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = p.parse_args(argv)
    began = time.perf_counter()
    flags = ["--quick"] * args.quick + [f"--device={args.device}", f"--results={args.results}"]
    suffix = f"{args.device}{'-quick' if args.quick else ''}"
    failed = []
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        if name == "scaling" and args.device == "cuda" and (gpus := gpu_count()) < 2:
            print(f"\n=== bench/scaling.py skipped: it compares 1 GPU with several, and {gpus} is visible", flush=True)
            continue
        print(f"\n=== bench/{name}.py {' '.join(flags)}", flush=True)
        if subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *flags], cwd=ROOT).returncode != 0:
            failed.append(name)
    minutes = (time.perf_counter() - began) / 60
    report = [f"# Benchmarks ({suffix}), {minutes:.1f} min", "", f"machine: {json.dumps(machine_info())}"]
    for name in SCRIPTS:
        path = latest_result(args.results, f"{name}-{suffix}")
        if path is not None and name not in failed:
            report += ["", f"## {name}", "```", json.loads(path.read_text())["table"].strip(), "```"]
    out = args.results / ("quick" if args.quick else "") / f"{machine_info()['date'][:10]}-report-{suffix}.md"
    out.write_text("\n".join(report) + "\n")
    print("\n" + "\n".join(report[4:]).replace("```\n", "").replace("\n```", ""))
    print(f"\nall benchmarks: {minutes:.1f} min; tables in {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
