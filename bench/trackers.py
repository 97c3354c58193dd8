"""Step overhead of each experiment tracker: the same short run with trackers=[] and with each tracker on.

    python bench/trackers.py [--reps 3] [--steps 60] [--quick]

Every step is logged (log_every=1), the worst case: each tracker gets a record per optimizer step. The
figure is the median optimizer step time (metrics.jsonl `step_ms`, after the warm-up steps) relative to the
run without trackers, over interleaved repetitions (cases rotate so load from other jobs hits all alike).
MLflow logs to a real `mlflow server` (SQLite backend) this script starts on 127.0.0.1; W&B runs offline.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DEFAULT_RESULTS, TRAIN, child_env, free_port, interleaved, machine_info, print_table,  # noqa: E402
                    python_cmd, read_records, run_job, summary, write_json)

MODEL = ["workload=image", "model.arch=resnet18", "data.synthetic=true", "data.image_size=64", "data.num_classes=10",
         "data.synthetic_val_size=64", "batch_size=16", "num_workers=0", "threads=1", "log_every=1",
         "progress=false", "eval_every=1000", "checkpoint_every=0", "keep_last=1"]
CASES = ("none", "tensorboard", "csv", "mlflow", "wandb")
WARMUP_STEPS = 10


def stop_server(proc: subprocess.Popen) -> None:
    """The whole session: `mlflow server` runs uvicorn and job-runner processes that outlive a killed parent."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def start_mlflow_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return proc, uri
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise SystemExit(f"mlflow server did not start: see {root / 'server.log'}")


def case(name: str, steps: int, uri: str):
    def run(work: Path) -> dict:
        trackers = "[]" if name == "none" else name
        args = [*MODEL, f"max_steps={steps}", f"data.synthetic_train_size={16 * steps}", f"trackers={trackers}",
                f"mlflow_tracking_uri={uri}", "tracker_project=bench", f"output_dir={work}"]
        run_job(python_cmd(TRAIN, args), child_env(1, WANDB_MODE="offline"), work / "log.txt", timeout=900)
        step_ms = [r["step_ms"][0] for r in read_records(work / "metrics.jsonl") if r["kind"] == "train"]
        steady = statistics.median(step_ms[WARMUP_STEPS:])
        return {"rate": steady, "step_ms": step_ms}
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--quick", action="store_true", help="1 repetition of 20 steps (smoke run)")
    args = parser.parse_args()
    reps, steps = (1, 20) if args.quick else (args.reps, args.steps)
    with tempfile.TemporaryDirectory(prefix="bench-trackers-") as tmp:
        work = Path(tmp)
        (work / "mlflow").mkdir()
        server, uri = start_mlflow_server(work / "mlflow")
        try:
            results = interleaved({name: case(name, steps, uri) for name in CASES}, reps, work / "runs",
                                  unit="ms per step")
        finally:
            stop_server(server)
    base = summary(r["rate"] for r in results["none"])
    rows, figures = [], {}
    for name in CASES:
        s = summary(r["rate"] for r in results[name])
        paired = [r["rate"] / b["rate"] for r, b in zip(results[name], results["none"])]
        figures[name] = {"step_ms": s, "ratio_of_medians": s["median"] / base["median"], "paired_ratios": paired}
        rows.append([name, f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})", f"{s['median'] / base['median']:.3f}",
                     f"{statistics.median(paired):.3f} ({min(paired):.3f}-{max(paired):.3f})"])
    table = print_table(f"Step time with each tracker on (resnet18 64px, batch 16, 1 thread, log_every=1, {steps} "
                        f"steps, first {WARMUP_STEPS} dropped; median (min-max) of {reps} interleaved repetition(s))",
                        ["trackers", "step ms", "vs none", "per repetition"], rows,
                        note="(vs none: ratio of the medians; per repetition: median (min-max) of the paired ratios)")
    name = "trackers-cpu" + ("-quick" if args.quick else "")
    write_json(DEFAULT_RESULTS, name, {"machine": machine_info(), "reps": reps, "steps": steps, "cases": figures,
                                       "table": table})


if __name__ == "__main__":
    main()
