"""Can the data loader feed the model? Images/s per CPU core of each image input path, against torchvision's
reference loader measured in the same run, beside the model's own images/s, for the ResNet-50 v1/v2 recipes.

    python bench/data_pipeline.py                  # CPU (~10 min on 2 cores)
    python bench/data_pipeline.py --quick          # smoke run (~2 min)
    python bench/data_pipeline.py --device cuda    # the model in bf16 + channels_last at the preset's batch
    python bench/data_pipeline.py --root /data/imagenet   # your own ImageFolder (train/<class>/*) instead

Paths (each train.py's own training loader, dtrain.build.build_loaders + dtrain.workloads.image, with the
recipe's per-sample transforms, collation and, for v2, MixUp/CutMix per batch):
- `pil`: data.decode=pil (PIL decode and PIL transforms, as before this path existed);
- `tensor`: data.decode=tensor (torchvision.io decode, the default);
- `tensor, prepared copy`: data.decode=tensor on a copy written by `python -m dtrain.prepare_images
  --short-side S` (S = --short-side, default 192);
- `gpu, workers`: data.decode=gpu's loader work (read the bytes, draw each sample's parameters, collate);
- `gpu, device step`: the training process's part of data.decode=gpu on --device (decode, crop, flip, policy,
  normalise, erase, MixUp/CutMix) over the batches of that loader's timed pass: images per second of the GPU
  (synchronised) with --device cuda, images per CPU second at 1 thread on the CPU, and the ops it calls from
  Python per image (each a dispatch on the training thread; on a GPU most are a kernel launch). On a GPU this
  work shares the device with the model: the model's img/s with it is about 1 / (1/model + 1/device step).
REFERENCE: torchvision's reference-script style loader in the same run: torchvision.datasets.ImageFolder (PIL
decode), the same per-sample transforms.v2 (the recipe's, on PIL images), default_collate; no MixUp/CutMix
(the project's side includes them). Each measurement is a fresh process: one loader in the main process
(num_workers=0), torch at 1 thread, one pass to warm up, then one timed pass; images / CPU seconds of the
process, so each figure is images/s per core (other jobs on the machine do not count). Cases alternate over
repetitions; ratios are to the reference of the same repetition. The model: train.py with the same preset
on synthetic images of the training crop size (no loading work), steady-state images/s; workers needed =
model / per-core rate, rounded up. Generated images: 500x375 JPEGs, quality 90 (about ImageNet's mean size).
Writes bench/results/<date>-data_pipeline-<device>.json (+ .md).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import (DEFAULT_RESULTS, ROOT, TRAIN, child_env, drop_checkpoints, fmt_summary, interleaved,
                    machine_info, print_table, python_cmd, read_records, run_job, steady_rate, summary, write_json)

PRESETS = {"v1": ROOT / "configs/image/resnet50_v1.yaml", "v2": ROOT / "configs/image/resnet50_v2.yaml"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few images, one repetition: checks that it runs")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model's img/s is measured")
    p.add_argument("--recipes", default="v2", help="comma-separated: v1, v2")
    p.add_argument("--batch", type=int, default=0, help="batch per process (default: CPU 16, GPU the preset's)")
    p.add_argument("--images", type=int, default=0, help="generated JPEGs (default 512; --quick 64)")
    p.add_argument("--root", "--data", dest="root", type=Path, default=None,
                   help="an ImageFolder root (train/<class>/*) to read instead of generated JPEGs")
    p.add_argument("--short-side", type=int, default=192, help="short side of the prepared copy")
    p.add_argument("--reps", type=int, default=0, help="repetitions (default 3; --quick 1)")
    p.add_argument("--no-model", action="store_true", help="skip the model's img/s (loader paths only)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--child-loader", nargs=4, metavar=("PRESET", "ROOT", "DECODE", "BATCH"), help=argparse.SUPPRESS)
    p.add_argument("--child-device", default="cpu", help=argparse.SUPPRESS)
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


def child_loader(preset: str, root: str, decode: str, batch: int, device: str) -> None:
    """Two passes of a training loader in this process; prints {"rate": images per CPU second} of the second
    (and for data.decode=gpu "device_rate", the device step's images/s over that pass's batches)."""
    import torch

    torch.set_num_threads(1)
    loader, start_epoch = reference_loader(preset, root, batch) if decode == "reference" else \
        project_loader(preset, root, decode, batch)
    for epoch in range(2):
        start_epoch(epoch)
        began, images, batches = time.process_time(), 0, []
        for batch_images, *rest in loader:
            images += len(batch_images)
            if decode == "gpu":
                batches.append((batch_images, *rest))
    result = {"rate": images / (time.process_time() - began), "images": images}
    if decode == "gpu":
        result["device_rate"], result["device_ops"] = device_step_rate(preset, root, batches, torch.device(device))
    print(json.dumps(result))


def device_step_rate(preset: str, root: str, batches: list, device) -> tuple[float, float]:
    """Images/s of data.decode=gpu's training-process step (image.device_images, as train_loss runs it): GPU
    seconds, synchronised, on CUDA; CPU seconds of this process on the CPU. The first batch warms up. Also the
    step's ops called from Python per image (torch.profiler, a second pass over the same batches): on a GPU each is a dispatch on the
    training process's thread, most of them a kernel launch, so they say what the step costs the host."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dtrain.config import load_config
    from dtrain.dist import DistEnv
    from dtrain.workloads import image

    cfg = load_config(preset, [f"data.root={root}", "data.decode=gpu"])
    step = image.device_images(cfg.data, DistEnv(mode="single", device=device), num_classes=1000)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    images = 0
    for k, (encoded, targets, bad) in enumerate(batches):
        if k == 1:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            began, images = clock(), 0
        out, _, _ = step(encoded, targets.to(device), bad)
        images += out.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rate = images / (clock() - began)
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # a pass of its own: the profiler costs time
        images = sum(step(encoded, targets.to(device), bad)[0].shape[0] for encoded, targets, bad in batches[1:])
    top_level = sum(1 for event in prof.events() if event.cpu_parent is None)
    return rate, top_level / images


def project_loader(preset: str, root: str, decode: str, batch: int):
    """train.py's training loader: the image workload's task (dataset, collation, MixUp/CutMix, repeated
    augmentation) and dtrain.build.build_loaders, as a run builds them."""
    import torch

    from dtrain.build import build_loaders
    from dtrain.config import load_config
    from dtrain.dist import DistEnv
    from dtrain.workloads import build_task

    cfg = load_config(preset, [f"data.root={root}", f"batch_size={batch}", "num_workers=0", f"data.decode={decode}"])
    env = DistEnv(mode="single", device=torch.device("cpu"))
    loader, sampler, _ = build_loaders(cfg, env, build_task(cfg, env))
    return loader, sampler.start_epoch


def reference_loader(preset: str, root: str, batch: int):
    """torchvision's reference script's loader: ImageFolder (PIL), the recipe's per-sample transforms.v2 on PIL
    images (the same objects train.py builds with data.decode=pil), default_collate, a shuffling sampler."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from dtrain.config import load_config
    from dtrain.workloads import image

    cfg = load_config(preset, [f"data.root={root}", "data.decode=pil"])
    dataset = ImageFolder(f"{root}/train", transform=image.train_transform(cfg.data))
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=0,
                        generator=torch.Generator().manual_seed(0))
    return loader, lambda epoch: None


def loader_rates(args, preset: Path, root: Path, decode: str, work: Path) -> dict[str, float]:
    log = work / "loader.log"
    cmd = python_cmd(Path(__file__), ["--child-loader", str(preset), str(root), decode, str(args.batch),
                                      "--child-device", args.device])
    run_job(cmd, child_env(1), log, timeout=1800)
    return json.loads(log.read_text().strip().splitlines()[-1])


def loader_rate(args, preset: Path, root: Path, decode: str, work: Path) -> float:
    return loader_rates(args, preset, root, decode, work)["rate"]


def prepared_copy(root: Path, short_side: int, work: Path) -> Path:
    """The train/ folder of `root` written by dtrain.prepare_images (kept between runs; reruns skip what is done)."""
    copy = work / f"prepared-{short_side}"
    subprocess.run([sys.executable, "-m", "dtrain.prepare_images", str(root / "train"), str(copy / "train"),
                    "--short-side", str(short_side), "--quality", "90"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env=child_env(1))
    if not (copy / "val").exists():  # the loaders want a val/ folder with the same classes; it is not read here
        shutil.copytree(copy / "train", copy / "val")
    return copy


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
        preset, root, decode, batch = args.child_loader
        child_loader(preset, root, decode, int(batch), args.child_device)
        return 0
    args.batch = args.batch or (16 if args.device == "cpu" else 128)
    args.model_steps, args.log_every = (6, 2) if args.device == "cpu" else (40, 10)
    reps = args.reps or (1 if args.quick else 3)
    recipes = [r.strip() for r in args.recipes.split(",")]
    work = args.results / "work" / f"data_pipeline-{args.device}"
    root = args.root or write_jpegs(work / "images", args.images or (64 if args.quick else 512))
    prepared = prepared_copy(root, args.short_side, work)
    paths = {"reference (torchvision, PIL)": ("reference", root), "pil": ("pil", root), "tensor": ("tensor", root),
             f"tensor, prepared copy (short side {args.short_side})": ("tensor", prepared)}
    gpu_row, device_row = "gpu, workers (read + draw, no decode)", f"gpu, device step ({args.device})"
    print(f"image input paths vs model: recipes {recipes}, batch {args.batch}, {reps} repetition(s), images from "
          f"{root}, prepared copy {prepared}", flush=True)

    cases = {}
    for recipe in recipes:
        for name, (decode, folder) in paths.items():
            cases[f"{recipe} {name}"] = lambda d, r=recipe, dec=decode, f=folder: loader_rate(args, PRESETS[r], f,
                                                                                                dec, d)
        # data.decode=gpu: one child measures both its workers' rate and its device step's
        cases[f"{recipe} gpu"] = lambda d, r=recipe: loader_rates(args, PRESETS[r], root, "gpu", d)
        if not args.no_model:
            cases[f"{recipe} model"] = lambda d, r=recipe: model_rate(args, PRESETS[r], d)
    runs = interleaved(cases, reps, work / "runs", "img/s")
    for recipe in recipes:
        both = runs.pop(f"{recipe} gpu")
        runs[f"{recipe} {gpu_row}"] = [r["rate"] for r in both]
        runs[f"{recipe} {device_row}"] = [r["device_rate"] for r in both]
        runs[f"{recipe} {device_row} ops per image"] = [r["device_ops"] for r in both]
    paths[gpu_row] = ("gpu", root)
    results = {name: summary(values) for name, values in runs.items()}

    rows = []
    for recipe in recipes:
        reference = runs[f"{recipe} {next(iter(paths))}"]
        model = results.get(f"{recipe} model")
        for name in paths:
            rates = runs[f"{recipe} {name}"]
            ratio = summary([a / b for a, b in zip(rates, reference)])
            results[f"{recipe} {name} / reference"] = ratio
            needed = math.ceil(model["median"] / results[f"{recipe} {name}"]["median"]) if model else "-"
            rows.append([recipe, name, fmt_summary(results[f"{recipe} {name}"]), fmt_summary(ratio, 3),
                         fmt_summary(model) if model else "-", needed])
        device = results[f"{recipe} {device_row}"] = summary(runs[f"{recipe} {device_row}"])
        ops = results[f"{recipe} {device_row} ops per image"]["median"]
        rows.append([recipe, f"{device_row}, {ops:.1f} ops/image", fmt_summary(device), "-",
                     fmt_summary(model) if model else "-",
                     "-" if args.device == "cuda" else (math.ceil(model["median"] / device["median"]) if model
                                                         else "-")])
    headers = ["recipe", "input path", "img/s per core", "x reference (same rep)",
               f"model {args.device}, batch {args.batch} (img/s)", "cores (workers) to feed the model"]
    source = f"{root} (--root)" if args.root else "generated 500x375 JPEGs, quality 90"
    note = (f"median (min-max) of {reps}; images: {source}; batch {args.batch}; one loader per fresh process, "
            "num_workers=0, 1 thread, images per CPU second; project paths include collation and (v2) MixUp/CutMix, "
            "the reference (torchvision's reference-script loader) neither MixUp/CutMix; model: train.py on synthetic "
            "images of the training crop, " + ("bf16 + channels_last" if args.device == "cuda" else
                                                f"fp32, {usable_cores()} threads"))
    table = print_table("Image input paths vs model (ResNet-50 recipes)", headers, rows, note)
    write_json(args.results, f"data_pipeline-{args.device}{'-quick' if args.quick else ''}",
               {"machine": machine_info(), "settings": {"batch": args.batch, "reps": reps, "images": str(root),
                                                        "short_side": args.short_side, "device": args.device},
                "results": results, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
