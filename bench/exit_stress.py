"""Run a short 2-rank job many times and count the runs that did not exit cleanly.

    python bench/exit_stress.py --runs 100                 # 100 runs under torchrun, then 100 as plain processes
    python bench/exit_stress.py --runs 20 --launcher ranks # only plain processes (as srun starts them)
    python bench/exit_stress.py --runs 20 --case stop      # a stop signal mid-run: every rank must exit 3

A finished job must end with every rank's exit code 0 (3 after an agreed stop) on every launcher.
A rank that dies at exit (SIGABRT, a segfault) turns a good run into a failed one for torchrun,
Slurm and any pipeline that reads exit codes, so this counts such runs and prints why each failed:
the exit code or signal and the last line the rank printed. It is a tool, not a test: the rate it
finds depends on the machine's load (run it beside a CPU-heavy job to make races more likely).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, TRAIN, child_env, free_port, torchrun_cmd

# A few DDP steps of a small model on synthetic images, with an evaluation and a checkpoint: every
# collective the loop uses runs at least once, and the job takes seconds.
JOB = ["workload=image", "data.synthetic=true", "data.synthetic_train_size=64", "data.synthetic_val_size=16",
       "data.image_size=32", "data.val_crop_ratio=1.0", "data.num_classes=4", "model.arch=squeezenet1_1",
       "num_workers=0", "batch_size=4", "progress=false", "threads=1", "epochs=1", "log_every=2",
       "timeout_s=60"]
def describe(code: int | None) -> str:
    if code is None:
        return "hung (killed at the time limit)"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:160] if lines else "(no output)"


def job_args(out: Path, case: str) -> list[str]:
    # stop: enough steps that the signal arrives mid-run
    steps = ["max_steps=40", "data.synthetic_train_size=400"] if case == "stop" else ["max_steps=6"]
    return [*JOB, *steps, f"output_dir={out}"]


def wait_for_training(out: Path, procs: list[subprocess.Popen], timeout: float) -> None:
    """Until the first train record appears (the ranks are past set-up), or a process ended."""
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline and not any(p.poll() is not None for p in procs):
        if metrics.exists() and '"kind": "train"' in metrics.read_text():
            return
        time.sleep(0.1)


def collect(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int | None, str]]:
    """(exit code or None if it hung, its output) per process; all are killed at the time limit."""
    deadline = time.monotonic() + timeout
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            results.append((p.returncode, out))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
            results.append((None, out))
    return results


def run_torchrun(out: Path, case: str, timeout: float) -> tuple[bool, str]:
    cmd = torchrun_cmd(2, TRAIN, job_args(out, case))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    if case == "stop":
        wait_for_training(out, [proc], timeout)
        proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
    [(code, text)] = collect([proc], timeout)
    aborted = "terminate called" in text  # what a worker that aborts at exit prints
    if case == "finish" and code == 0 and not aborted:
        return True, ""
    # A signalled torchrun exits 1 with a SignalException traceback and no summary of its workers'
    # exit codes: the workers' own "stopped at step" line tells a clean stop.
    if case == "stop" and code == 1 and "stopped at step" in text and not aborted:
        return True, ""
    worker_codes = sorted(set(re.findall(r"exitcode\s*:\s*(-?\d+)", text)))  # torchrun's failure summary
    detail = f"; worker exit codes {', '.join(describe(int(c)) for c in worker_codes)}" if worker_codes else ""
    return False, f"torchrun {describe(code)}{detail}: {last_line(text)}"


def run_ranks(out: Path, case: str, timeout: float) -> tuple[bool, str]:
    port = free_port()
    procs = []
    for rank in range(2):
        env = child_env(1, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(TRAIN), *job_args(out, case)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    if case == "stop":
        wait_for_training(out, procs, timeout)
        procs[1].send_signal(signal.SIGTERM)  # one rank only: the other must learn of it and stop too
    expected = 3 if case == "stop" else 0
    failures = [f"rank {rank} {describe(code)}: {last_line(text)}"
                for rank, (code, text) in enumerate(collect(procs, timeout)) if code != expected]
    return not failures, "; ".join(failures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="runs per launcher")
    parser.add_argument("--launcher", choices=["torchrun", "ranks", "both"], default="both")
    parser.add_argument("--case", choices=["finish", "stop"], default="finish",
                        help="finish: the job runs to its end (exit 0); stop: SIGTERM mid-run (exit 3)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds one run may take")
    parser.add_argument("--load", type=int, default=0,
                        help="busy processes to run beside the jobs: a loaded machine deschedules threads at "
                             "unlucky moments, which makes exit races more likely")
    args = parser.parse_args(argv)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    try:
        return stress(args)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def stress(args: argparse.Namespace) -> int:
    launchers = {"torchrun": run_torchrun, "ranks": run_ranks}
    chosen = list(launchers) if args.launcher == "both" else [args.launcher]
    bad_total = 0
    with tempfile.TemporaryDirectory(prefix="dtrain-exit-stress-") as work:
        for name in chosen:
            reasons: collections.Counter[str] = collections.Counter()
            began = time.monotonic()
            for i in range(args.runs):
                ok, why = launchers[name](Path(work) / f"{name}-{i}", args.case, args.timeout)
                if not ok:
                    reasons[why] += 1
                    print(f"{name} run {i + 1}: {why}", flush=True)
            bad = sum(reasons.values())
            bad_total += bad
            print(f"{name}: {bad} of {args.runs} runs ({args.case}, {args.load} busy processes beside) exited "
                  f"abnormally ({time.monotonic() - began:.0f} s)", flush=True)
            for why, count in reasons.most_common():
                print(f"  {count} x {why}")
    return 1 if bad_total else 0


if __name__ == "__main__":
    sys.exit(main())
