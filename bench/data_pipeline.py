"""Can the data loader feed the model? Images/s of the image pipeline per DataLoader worker and in total, next to
the model's own images/s at the same batch, for the ResNet-50 v1 and v2 recipes.

    python bench/data_pipeline.py                  # CPU (~6 min on 2 cores)
    python bench/data_pipeline.py --quick          # smoke run (~1.5 min)
    python bench/data_pipeline.py --device cuda    # GPU: the model in bf16 + channels_last at the preset's batch
    python bench/data_pipeline.py --data /data/imagenet   # your own ImageFolder instead of generated JPEGs

Pipeline: JPEG files decoded by PIL, the recipe's per-sample transforms (configs/image/resnet50_v1.yaml: random
resized crop 224 + flip; resnet50_v2.yaml: crop 176 + flip + TrivialAugmentWide + random erasing), collation,
and for v2 MixUp/CutMix per batch: exactly train.py's training loader (dtrain.data.make_loaders) in a fresh
process with W worker processes, one pass over the images timed whole after a first pass (worker start-up,
page cache). Model: train.py with the same preset on synthetic images of the training crop size (no loading
work), its steady-state samples/s. Every measurement is a fresh process; the cases alternate over repetitions
and the table gives medians (min-max). Generated images are 500x375 JPEGs (quality 90, about ImageNet's mean
size).
Writes bench/results/<date>-data_pipeline-<device>.json (+ .md).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

from common import (DEFAULT_RESULTS, ROOT, TRAIN, child_env, drop_checkpoints, fmt_summary, interleaved,
                    machine_info, print_table, python_cmd, read_records, run_job, steady_rate, summary, write_json)

PRESETS = {"v1": ROOT / "configs/image/resnet50_v1.yaml", "v2": ROOT / "configs/image/resnet50_v2.yaml"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few images and steps, one repetition: checks that it runs")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--recipes", default="v1,v2", help="comma-separated: v1, v2")
    p.add_argument("--workers", default="", help="comma-separated worker counts (default: 1 and every usable core)")
    p.add_argument("--batch", type=int, default=0, help="batch per process (default: CPU 16, GPU the preset's)")
    p.add_argument("--images", type=int, default=0, help="generated JPEGs (default 512; --quick 96)")
    p.add_argument("--data", type=Path, default=None, help="an ImageFolder root (train/<class>/*) to read instead")
    p.add_argument("--reps", type=int, default=0, help="repetitions (default 3; --quick 1)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--child-loader", nargs=3, metavar=("PRESET", "ROOT", "WORKERS"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def usable_cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------
# Images


def write_jpegs(root: Path, count: int, classes: int = 10) -> Path:
    """ImageFolder of 500x375 JPEGs with smooth random content (compresses about like photographs)."""
    import torch
    from PIL import Image

    if (root / ".done").exists() and len(list(root.glob("train/*/*.jpg"))) == count:
        return root
    gen = torch.Generator().manual_seed(0)
    for i in range(count):
        folder = root / "train" / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = torch.rand(3, 24, 32, generator=gen)
        fine = torch.nn.functional.interpolate(coarse[None], size=(375, 500), mode="bicubic", align_corners=False)[0]
        fine = (fine + 0.3 * torch.rand(3, 375, 500, generator=gen)).clamp(0, 1)
        pixels = (fine * 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    for c in range(classes):  # the loaders want a validation folder with the same classes; it is not read here
        (root / "val" / f"c{c}").mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "train" / f"c{c}" / f"{c:05d}.jpg", root / "val" / f"c{c}" / "0.jpg")
    (root / ".done").touch()
    return root


# ---------------------------------------------------------------------------------------------
# Measurements (each in a fresh process)


def child_loader(preset: str, root: str, workers: int, batch: int) -> None:
    """Two passes of train.py's training loader over the images; prints {"rate": images/s} of the second, whole
    (the first starts the persistent workers and fills the page cache)."""
    import torch

    from dtrain.config import load_config
    from dtrain.data import make_loaders
    from dtrain.dist import DistEnv
    from dtrain.workloads import image

    torch.set_num_threads(1)
    cfg = load_config(preset, [f"data.root={root}", f"batch_size={batch}", f"num_workers={workers}"])
    env = DistEnv(mode="single", device=torch.device("cpu"))
    train_set, val_set = image.image_folders(cfg.data)
    loader, sampler, _ = make_loaders(train_set, val_set, image.collate_skipping_bad, cfg, env, True,
                                      batch_transform=image.mixup_cutmix(cfg.data, len(train_set.classes)),
                                      ra_reps=cfg.data.ra_reps)
    for epoch in range(2):
        sampler.start_epoch(epoch)
        began, images = time.perf_counter(), 0
        for batch_images, _, _ in loader:
            images += batch_images.shape[0]
    print(json.dumps({"rate": images / (time.perf_counter() - began), "images": images}))


def loader_rate(args, preset: Path, root: Path, workers: int, work: Path) -> float:
    log = work / "loader.log"
    cmd = python_cmd(Path(__file__), ["--child-loader", str(preset), str(root), str(workers),
                                      f"--batch={args.batch}"])
    run_job(cmd, child_env(1), log, timeout=1800)
    return json.loads(log.read_text().strip().splitlines()[-1])["rate"]


def model_rate(args, preset: Path, work: Path) -> float:
    """train.py on synthetic images of the training crop size: the model's own steady-state images/s."""
    steps, log_every = (4, 2) if args.quick else (args.model_steps, args.log_every)
    # On GPUs the synthetic images are generated by 8 workers, so that generating them does not limit the model.
    extra = (["precision=bf16", "channels_last=true", "num_workers=8"] if args.device == "cuda"
             else [f"threads={usable_cores()}", "num_workers=0"])
    cmd = python_cmd(TRAIN, ["--config", str(preset), "data.synthetic=true",
                             f"data.synthetic_train_size={args.batch * steps}", f"data.synthetic_val_size={args.batch}",
                             f"batch_size={args.batch}", f"max_steps={steps}", f"log_every={log_every}",
                             "keep_last=0", "progress=false", "resume=", f"output_dir={work}",
                             *extra])
    run_job(cmd, child_env(usable_cores()), work / "train.log", timeout=3600)
    rate = steady_rate(read_records(work / "metrics.jsonl"), warmup_windows=1)
    drop_checkpoints(work)
    return rate


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_loader:
        preset, root, workers = args.child_loader
        child_loader(preset, root, int(workers), args.batch)
        return 0
    cores = usable_cores()
    args.batch = args.batch or (16 if args.device == "cpu" else 128)
    args.model_steps, args.log_every = (6, 2) if args.device == "cpu" else (40, 10)
    reps = args.reps or (1 if args.quick else 3)
    workers = [int(w) for w in args.workers.split(",")] if args.workers else sorted({1, cores})
    recipes = [r.strip() for r in args.recipes.split(",")]
    work = args.results / "work" / f"data_pipeline-{args.device}"
    root = args.data or write_jpegs(work / "images", args.images or (96 if args.quick else 512))
    print(f"data pipeline vs model: recipes {recipes}, batch {args.batch}, workers {workers}, {reps} repetition(s), "
          f"images from {root}", flush=True)

    cases = {}
    for recipe in recipes:
        for w in workers:
            cases[f"{recipe} loader x{w}"] = lambda d, r=recipe, w=w: loader_rate(args, PRESETS[r], root, w, d)
        cases[f"{recipe} model"] = lambda d, r=recipe: model_rate(args, PRESETS[r], d)
    results = {name: summary(values) for name, values in interleaved(cases, reps, work / "runs", "img/s").items()}

    rows = []
    for recipe in recipes:
        one = results[f"{recipe} loader x1"]["median"] if 1 in workers else None
        model = results[f"{recipe} model"]
        row = [recipe, fmt_summary(results[f"{recipe} loader x1"]) if one else "-"]
        row += [fmt_summary(results[f"{recipe} loader x{w}"]) for w in workers if w != 1]
        needed = math.ceil(model["median"] / one) if one else "-"
        rows.append(row + [fmt_summary(model), needed])
    headers = ["recipe", "loader, 1 worker (img/s)"] + [f"loader, {w} workers (img/s)" for w in workers if w != 1]
    headers += [f"model {args.device}, batch {args.batch} (img/s)", "workers to feed the model"]
    note = (f"median (min-max) of {reps}; loader: decode + the recipe's transforms + collation (+ MixUp/CutMix for "
            f"v2), one DataLoader worker process per count, {cores} usable cores; model: train.py on synthetic "
            "images of the training crop, " + ("bf16 + channels_last" if args.device == "cuda" else
                                                f"fp32, {cores} threads"))
    table = print_table("Data pipeline vs model (ResNet-50 recipes)", headers, rows, note)
    write_json(args.results, f"data_pipeline-{args.device}{'-quick' if args.quick else ''}",
               {"machine": machine_info(), "settings": {"batch": args.batch, "workers": workers, "reps": reps,
                                                        "images": str(root), "device": args.device},
                "results": results, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
