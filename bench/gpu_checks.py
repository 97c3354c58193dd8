"""The GPU acceptance checks in runs of at most about 8 minutes on one GPU (a lent machine's 15 minutes fit them).

    python bench/gpu_checks.py                  # one GPU: the loader check + the profiles (~5-8 min)
    python bench/gpu_checks.py --only overhead  # one GPU: the bert-base overhead ratio alone (~2.5-4.5 min)
    python bench/gpu_checks.py --only loader    # one GPU: the loader check alone (~2-3 min)
    python bench/gpu_checks.py --smoke --only loader   # the same code paths on the CPU, tiny sizes (~30 s)
    python bench/gpu_checks.py --smoke --only loader,profiles,overhead   # all of it on the CPU (~2 min)

Parts (--only takes a comma-separated list; the default is loader,profiles). The overhead part runs only when
named: all three take 7-13 minutes, more than fits one 10-minute command on a lent machine with room to spare.
The times are estimates: each part is mostly train.py start-ups (20-40 s each on a GPU machine: torch, CUDA,
cuDNN's tuning of the first step, the profiler's trace), 3 for the loader, 7 for the profiles, 6 for the
overhead part; the steps themselves take seconds. Each run's wall time and each part's are in the result.
1. loader: can the ResNet-50 v2 recipe's loader keep one GPU busy with 8 workers? train.py with
   configs/image/resnet50_v2.yaml (bf16, channels_last, batch 128, num_workers=8, ra_reps 4 as in the preset,
   160 steps), three ways: data.synthetic=true (the model alone: random images of the training crop, no
   decoding), data.decode=tensor (workers decode and augment) and data.decode=gpu (workers read the bytes and
   draw the parameters; the training process decodes with nvJPEG and augments on the GPU, inside its step).
   Steady-state img/s of each (the median of the 20-step windows after the first 60 steps, min-max beside it),
   the data wait per step, and each loader path over the model alone (target >= 1.0 within the windows'
   spread: the loader keeps up). Images: bench/data_pipeline.py's generated JPEGs (500x375, quality 90, about
   ImageNet's mean size), 256 distinct files linked over and over to 20,480 training files, so that one epoch
   covers every step (decoding a file costs the same whatever its name; all of them sit in the page cache).
2. profiles: ResNet-50, batch 64, 224 px, SGD, synthetic data, one process: fp32 against bf16 (both
   channels_last), bf16 without channels_last, and under torchrun --nproc_per_node=1 DDP against FSDP (bf16
   autocast, and fsdp.param_dtype=bf16). Each run is train.py with profile.start_step / profile.steps, so the
   trace holds whole steps of the real loop. Per run: ms per step (from the trace's step marks), GPU busy ms
   per step (kernels and copies), host ops per step called from Python, and the kernels that take the most
   time. A step much longer than its GPU busy time is bound by the host (launches, syncs, Python); one whose
   kernels grow (bf16) is the device's.
3. overhead: bert-base (random init, bf16, seq 128, batch 32): bench/overhead.py --device cuda, project
   against the hand-written loop, 3 interleaved repetitions (target >= 0.97).

Writes bench/results/<date>-gpu_checks-<device>.json (+ .md; -gpu_checks-<parts>-<device> for other parts than
the default, e.g. gpu_checks-overhead-cuda) after each part, so a run cut short keeps the parts it finished; the
traces and logs stay in bench/results/work/gpu_checks/, the generated JPEGs in bench/results/work/gpu_checks-images/.
The result names the card (machine.gpu and loader.card: torch.cuda.get_device_name).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

from common import (BENCH, DEFAULT_RESULTS, ROOT, TRAIN, child_env, drop_checkpoints, fmt_summary, fresh_dir,
                    machine_info, print_table, python_cmd, read_records, run_job, steady_rate, torchrun_cmd,
                    write_json)
from data_pipeline import write_jpegs
from step_ops import count_ops

PARTS = ("loader", "profiles", "overhead")
DEFAULT_PARTS = "loader,profiles"

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


V2_PRESET = ROOT / "configs/image/resnet50_v2.yaml"


class LoaderSizes(NamedTuple):
    arch: str
    batch: int
    steps: int
    log_every: int
    warmup_windows: int
    workers: int
    distinct: int  # generated JPEGs (at least their 10 classes), linked over and over to batch x steps files
    smoke_size: int  # training crop on the CPU (0: the preset's 176 px)


# On the GPU the first 60 steps are warm-up: the loader's queue (8 workers x prefetch 4 = 32 batches) fills while
# cuDNN tunes the first step, and a loader at 0.4 of the model's rate (data.decode=tensor's expected share) drains
# it by 0.6 batch per step, about 55 steps; the 5 windows after it are the loader's own pace.
LOADER_SIZES = {False: LoaderSizes("resnet50", 128, 160, 20, 3, 8, 256, 0),
                True: LoaderSizes("resnet18", 8, 8, 2, 1, 2, 10, 64)}
LOADER_PATHS = [  # (name, train.py overrides); the first is the model alone, the one the others are divided by
    ("model alone (data.synthetic=true)", ["data.synthetic=true"]),
    ("data.decode=tensor (workers decode and augment)", ["data.decode=tensor"]),
    ("data.decode=gpu (nvJPEG + augment in the step)", ["data.decode=gpu"]),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (ResNet-18): checks the script runs")
    p.add_argument("--only", default=DEFAULT_PARTS, help=f"comma-separated parts of {', '.join(PARTS)} "
                   f"(default {DEFAULT_PARTS}; the overhead part runs only when named)")
    p.add_argument("--skip-overhead", action="store_true", help="drop the overhead part (the default already does)")
    p.add_argument("--skip-loader", action="store_true", help="drop the loader part")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = p.parse_args(argv)
    args.parts = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown or not args.parts:
        p.error(f"--only takes parts of {', '.join(PARTS)}; got {args.only!r}")
    skipped = {"overhead": args.skip_overhead, "loader": args.skip_loader}
    args.parts = [part for part in PARTS if part in args.parts and not skipped.get(part)]
    if not args.parts:
        p.error(f"nothing left to run: --only {args.only} less the skipped parts")
    return args


# ---------------------------------------------------------------------------------------------
# 1. Can the v2 recipe's loader feed the GPU?


def linked_jpegs(images: Path, distinct: int, count: int) -> Path:
    """An ImageFolder with `count` training files: `distinct` JPEGs from bench/data_pipeline.py (500x375, quality
    90), each linked count / distinct times under its own class, and their validation folder. Generating is the
    slow part (tens of ms per image), linking is not; kept between runs."""
    source = write_jpegs(images / f"distinct-{distinct}", distinct)
    root = images / f"linked-{distinct}-{count}"
    if (root / ".done").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    files = sorted((source / "train").glob("*/*.jpg"))
    for i in range(count):
        original = files[i % len(files)]
        link = root / "train" / original.parent.name / f"{i:06d}.jpg"
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(original, link)
        except OSError:  # a file system without hard links
            shutil.copyfile(original, link)
    shutil.copytree(source / "val", root / "val")
    (root / ".done").touch()
    return root


def loader_args(overrides: list[str], root: Path, sizes: LoaderSizes, out: Path) -> list[str]:
    """train.py's arguments: the v2 preset as a user runs it on one GPU, sized for a short timed run."""
    if "data.synthetic=true" in overrides:  # random images of the training crop; the folder's 10 classes
        data = [f"data.synthetic_train_size={sizes.batch * sizes.steps}", f"data.synthetic_val_size={sizes.batch}",
                "data.num_classes=10"]
    else:
        data = [f"data.root={root}"]
    crop = ([f"data.train_crop_size={sizes.smoke_size}", f"data.image_size={sizes.smoke_size}",
             f"data.val_resize_size={sizes.smoke_size}"] if sizes.smoke_size else [])
    return ["--config", str(V2_PRESET), f"model.arch={sizes.arch}", f"batch_size={sizes.batch}",
            f"max_steps={sizes.steps}", f"log_every={sizes.log_every}", f"num_workers={sizes.workers}",
            "precision=bf16", "channels_last=true", "keep_last=0", "progress=false", "resume=",
            f"output_dir={out}", *crop, *data, *overrides]


def loader_run(name: str, overrides: list[str], root: Path, sizes: LoaderSizes, out: Path, smoke: bool) -> dict:
    env = child_env(1 if smoke else 8, **({} if smoke else {"CUDA_VISIBLE_DEVICES": "0"}))
    wall = run_job(python_cmd(TRAIN, loader_args(overrides, root, sizes, out)), env, out / "log.txt", timeout=600)
    records = read_records(out / "metrics.jsonl")
    rate = steady_rate(records, sizes.warmup_windows)  # the median window; raises if the run logged too few
    steady = [r for r in records if r.get("kind") == "train"][sizes.warmup_windows:]
    windows = [r["samples_per_sec"] for r in steady]
    drop_checkpoints(out)
    return {"path": name, "overrides": overrides, "wall_s": wall,
            "rate": {"median": rate, "min": min(windows), "max": max(windows), "n": len(windows), "values": windows},
            "data_ms_per_step": statistics.median(r["data_ms"][0] for r in steady),
            "step_ms": statistics.median(r["step_ms"][0] for r in steady)}


def loader_part(args, work: Path, log) -> tuple[dict, str]:
    import torch

    sizes = LOADER_SIZES[args.smoke]
    root = linked_jpegs(args.results / "work" / "gpu_checks-images", sizes.distinct, sizes.batch * sizes.steps)
    log(f"loader: images ready in {root}")
    runs = []
    for i, (name, overrides) in enumerate(LOADER_PATHS):
        log(f"loader: {name}")
        runs.append(loader_run(name, overrides, root, sizes, work / f"loader{i}", args.smoke))
    model = runs[0]["rate"]
    for r in runs:
        r["x_model"] = {key: r["rate"][key] / model["median"] for key in ("median", "min", "max")}
    card = torch.cuda.get_device_name(0) if not args.smoke else "CPU (smoke)"
    what = (f"CPU smoke: {sizes.arch}, crop {sizes.smoke_size} px, batch {sizes.batch}, {sizes.workers} workers"
            if args.smoke else f"{card}, ResNet-50 v2 recipe, bf16 + channels_last, batch {sizes.batch}, "
                               f"{sizes.workers} workers")
    table = print_table(
        f"Can the loader feed the model? ({what}; steps {sizes.warmup_windows * sizes.log_every + 1}-{sizes.steps} "
        f"of train.py)",
        ["input", "img/s (min-max of windows)", "data wait ms/step", "step ms", "x model alone (target >= 1.0)"],
        [[r["path"], fmt_summary(r["rate"]), f"{r['data_ms_per_step']:.1f}", f"{r['step_ms']:.1f}",
          f"{r['x_model']['median']:.3f} ({r['x_model']['min']:.3f}-{r['x_model']['max']:.3f})"] for r in runs],
        note=f"(img/s: median of the {sizes.log_every}-step windows after {sizes.warmup_windows} warm-up windows; "
             f"images: {sizes.distinct} generated 500x375 JPEGs, quality 90, linked to {sizes.batch * sizes.steps} "
             f"files; ra_reps and the rest of the recipe as in the preset; x model alone: each window over the model's median)")
    return {"card": card, "sizes": sizes._asdict(), "images": str(root), "runs": runs}, table


# ---------------------------------------------------------------------------------------------
# 2. Where a step's time goes


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


# ---------------------------------------------------------------------------------------------
# 3. The loop's overhead against a hand-written one


def overhead_ratio(args, work: Path) -> dict | None:
    mode = ["--quick", "--threads", "1"] if args.smoke else ["--device", "cuda"]  # GPU: all cores per process
    cmd = [sys.executable, str(BENCH / "overhead.py"), "--workloads", "bert", "--reps", "1" if args.smoke else "3",
           f"--results={work / 'overhead-results'}", *mode]
    run_job(cmd, child_env(1), work / "overhead.log", timeout=900)
    found = sorted((work / "overhead-results").rglob("*overhead-*.json"))
    return json.loads(found[-1].read_text())["results"][0] if found else None


def profiles_part(args, work: Path, log) -> tuple[list[dict], str]:
    rows = []
    for i, (name, nproc, overrides) in enumerate(VARIANTS):
        log(f"profiles: {name}")
        rows.append(run_variant(name, nproc, overrides, work / f"v{i}", args.smoke))
    table = print_table(
        f"One step, profiled ({SMOKE_LABEL if args.smoke else 'ResNet-50 224px, batch 64, SGD'};"
        f" steps {PROFILE[0]}-{sum(PROFILE) - 1} of train.py, torch.profiler)",
        ["run", "ms/step", "GPU busy ms/step", "host ops/step (top-level)", "top kernels (ms/step)"],
        [[r["variant"], f"{r['ms_per_step']:.1f}", f"{r['gpu_busy_ms_per_step']:.1f}", f"{r['top_level']:.0f}",
          "; ".join(f"{k} {v:g}" for k, v in list(r["top_kernels"].items())[:3])] for r in rows],
        note="(GPU busy well below the step: the host is the bound; the traces are in "
             f"{work.relative_to(args.results.parent) if work.is_relative_to(args.results.parent) else work})")
    return rows, table


def overhead_part(args, work: Path, log) -> tuple[dict | None, str]:
    log("overhead: bert-base, project against the hand-written loop")
    bert = overhead_ratio(args, work)
    if bert is None:
        return None, "\nbert-base overhead: no result file from bench/overhead.py\n"
    return bert, (f"\nbert-base overhead: project / hand-written {bert['rate']['ratio_of_medians']:.3f} "
                  f"(per repetition {bert['rate']['paired_ratio']['median']:.3f}), settings {bert['settings']}\n")


def result_name(parts: list[str], device: str, smoke: bool) -> str:
    """gpu_checks-cuda for the default parts; other parts in the name, so that --only overhead after a default
    run on the same day does not overwrite its file."""
    named = "" if parts == DEFAULT_PARTS.split(",") else "-" + "-".join(parts)
    return f"gpu_checks{named}-{device}{'-quick' if smoke else ''}"


RUNS = {"loader": loader_part, "profiles": profiles_part, "overhead": overhead_part}
PAYLOAD_KEYS = {"loader": "loader", "profiles": "profiles", "overhead": "bert_overhead"}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU here; bench/gpu_checks.py --smoke runs the same code paths on the CPU",
              file=sys.stderr)
        return 2
    work = fresh_dir(args.results / "work" / "gpu_checks")
    began = time.perf_counter()
    device = "cpu" if args.smoke else "cuda"
    payload = {"benchmark": "gpu_checks", "device": device, "smoke": args.smoke, "parts": args.parts,
               "machine": machine_info(), "seconds_by_part": {}, "table": ""}

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - began:4.0f} s] {line}", flush=True)

    for part in args.parts:  # the result file is rewritten after each part: a run cut short keeps what it finished
        part_began = time.perf_counter()
        payload[PAYLOAD_KEYS[part]], table = RUNS[part](args, work, log)
        payload["seconds_by_part"][part] = round(time.perf_counter() - part_began, 1)
        payload["table"] += table + "\n"
        payload["seconds"] = time.perf_counter() - began
        write_json(args.results, result_name(args.parts, device, args.smoke), payload)
    print(payload["table"], flush=True)
    print(f"gpu checks took {time.perf_counter() - began:.0f} s ({payload['seconds_by_part']})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
