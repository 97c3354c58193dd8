"""What a user watches: rank-0 progress, metrics.jsonl, experiment trackers (TensorBoard, ...), per-process peak
memory."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from dtrain.dist import DistEnv
from dtrain.errors import StopTraining
from dtrain.trackers import Trackers


class MemoryTracker:
    """Peak resident memory of this process (sampled with psutil) and peak CUDA memory."""

    def __init__(self, device: torch.device):
        self.device = device
        self.process = psutil.Process()
        self.peak_rss = 0

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)

    def report(self) -> dict[str, float]:
        self.sample()
        out = {"peak_rss_mb": self.peak_rss / 2**20}
        if self.device.type == "cuda":
            out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out


class RunLogger:
    """Rank 0 writes metrics.jsonl, hands each record to the trackers (dtrain.trackers) and prints; other
    ranks only track their memory."""

    def __init__(self, output_dir: str, env: DistEnv, progress: bool, trackers: Trackers | None = None):
        self.env = env
        self.memory = MemoryTracker(env.device)
        self.bar = None
        self.use_bar = progress and sys.stderr.isatty()
        self.jsonl = None
        self.trackers = trackers if env.is_main else None
        self.output_dir = Path(output_dir)
        if env.is_main:
            self.jsonl = open(Path(output_dir) / "metrics.jsonl", "a", buffering=1)

    def start_epoch(self, epoch: int, total_steps: int, done_steps: int) -> None:
        if self.env.is_main and self.use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=done_steps, desc=f"epoch {epoch}", dynamic_ncols=True)

    def step_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def record(self, record: dict[str, Any], step: int) -> None:
        """One metrics.jsonl line, the same record to each tracker (queued), a console line (rank 0)."""
        self.memory.sample()
        if not self.env.is_main:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.record(record, step)
        table = _per_class_lines(record["per_class"]) if "per_class" in record else []
        self.print("\n".join([_format(record), *table]))  # one eval text: above the progress bar, whole

    def confusion(self, kind: str, step: int, classes: list[str], matrix: list[list[int]]) -> None:
        """Rank 0: one evaluation's confusion matrix (rows: true class, columns: predicted class) to
        <output_dir>/confusion/step_N.json (step_N_ema.json for the EMA), and to the trackers (TensorBoard: an
        image whose rows are normalised, row i: where class i's samples went; the diagonal is each class's recall)."""
        if not self.env.is_main:
            return
        folder = self.output_dir / "confusion"
        folder.mkdir(exist_ok=True)
        suffix = kind.removeprefix("eval")
        path = folder / f"step_{step:08d}{suffix}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"step": step, "kind": kind, "rows": "true class", "columns": "predicted class",
                                   "classes": classes, "matrix": matrix}) + "\n")
        tmp.replace(path)
        if self.trackers is not None:
            self.trackers.confusion(kind, step, classes, matrix, path)

    def outputs(self, tags: dict[str, str]) -> None:
        """Rank 0: what the run has written (checkpoints, an exported model), as tracker tags."""
        if self.trackers is not None:
            self.trackers.outputs(tags)

    def print(self, line: str) -> None:
        if not self.env.is_main:
            return
        if self.bar is not None and not line.startswith("eval"):
            self.bar.set_postfix_str(line.split(" ", 3)[-1], refresh=True)
        elif self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        """Called in a `finally`: the exception on its way out, if any, says how the trackers' run ended."""
        self.end_epoch()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.trackers is not None:
            error = sys.exc_info()[0]
            self.trackers.close("FINISHED" if error is None else "KILLED" if error is StopTraining else "FAILED")


def _format(record: dict[str, Any]) -> str:
    parts = [record["kind"]]
    for key, value in record.items():
        if key == "kind" or isinstance(value, dict):
            continue
        if isinstance(value, list) and len(value) <= 4:  # one value per rank
            parts.append(f"{key} {'/'.join(f'{v:g}' for v in value)}")
            continue
        if isinstance(value, list):  # many ranks: the range
            parts.append(f"{key} {min(value):g}..{max(value):g}")
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " ".join(parts)


def _per_class_lines(per_class: dict[str, list], most: int = 20) -> list[str]:
    """A small table of each class's precision, recall, F1 and support (up to `most` classes; more
    would flood the console: they are in metrics.jsonl and confusion/)."""
    count = len(per_class["support"])
    if count > most:
        return [f"  per-class precision/recall/F1 of {count} classes: metrics.jsonl and confusion/"]
    lines = [f"  {'class':>5} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    for c, (p, r, f, n) in enumerate(zip(per_class["precision"], per_class["recall"], per_class["f1"],
                                         per_class["support"])):
        lines.append(f"  {c:>5} {p:>9.4f} {r:>7.4f} {f:>7.4f} {n:>8}")
    return lines


class Throughput:
    """Global samples per second between two log points."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.samples = 0

    def rate(self) -> float:
        return self.samples / max(time.perf_counter() - self.start, 1e-9)
