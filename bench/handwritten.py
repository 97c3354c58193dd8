"""The baseline: minimal hand-written PyTorch training loops, timed the way the project's loop is timed.

    python bench/handwritten.py image --out m.jsonl --arch resnet18 --image-size 64 --batch 32 --steps 30
    python bench/handwritten.py bert --out m.jsonl --model-dir DIR --train-file t.csv --max-length 64 ...

Same model (torchvision / the same Hugging Face directory), same data (dtrain's SyntheticImages; the
same CSV tokenized the same way), same batch, DataLoader settings, optimizer implementation (fused by
default, as the project's) and thread count as the project's run it is compared with; none of the
project's extras (per-sample seeding, resumable sampler, gradient-norm check, LR schedule, logging,
checkpoints). Every `log_every` steps it writes
{"kind": "train", "step", "samples_per_sec"} to --out, like the project's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from common import process_counters


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workload", choices=["image", "bert"])
    p.add_argument("--out", required=True, help="metrics JSONL to write")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="fused optimizer step, as the project's default (optim.fused=true)")
    # image
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--channels-last", action="store_true")
    # bert
    p.add_argument("--model-dir", default="")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--train-file", default="")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--cache-dir", default=None)
    return p.parse_args(argv)


def loader_options(args) -> dict:
    return dict(num_workers=args.workers, pin_memory=args.device.startswith("cuda"),
                persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers > 0 else None)


def image_setup(args, device):
    import torchvision

    from dtrain.workloads.image import SyntheticImages  # the very dataset class the project's runs use

    model = torchvision.models.get_model(args.arch, weights=None, num_classes=args.num_classes).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay,
                                fused=args.fused or None)
    data = SyntheticImages(args.batch * args.steps, args.num_classes, args.image_size, seed=0)
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True, **loader_options(args))

    def loss_of(model, batch):
        images, labels = batch
        images = images.to(device, memory_format=memory_format, non_blocking=True)
        return F.cross_entropy(model(images), labels.to(device, non_blocking=True))

    return model, optimizer, loader, loss_of


def bert_setup(args, device):
    import datasets
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if args.random_init:
        model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(args.model_dir, num_labels=2))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=2)
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=args.fused or None)
    data = datasets.load_dataset("csv", data_files=args.train_file, split="train", cache_dir=args.cache_dir)
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length), batched=True,
                    remove_columns=["text"]).rename_column("label", "labels")
    pad = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if device.type == "cuda" else None)
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True, collate_fn=pad,
                        **loader_options(args))

    def loss_of(model, batch):
        return model(**{k: v.to(device, non_blocking=True) for k, v in batch.items()}).loss

    return model, optimizer, loader, loss_of


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model, optimizer, loader, loss_of = (image_setup if args.workload == "image" else bert_setup)(args, device)
    if args.compile:
        model = torch.compile(model)
    model.train()
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    step, window_start = 0, time.perf_counter()
    with open(args.out, "w") as out:
        while step < args.steps:
            for batch in loader:
                with autocast:
                    loss = loss_of(model, batch)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % args.log_every == 0:
                    loss_value = loss.item()  # waits for the device, as the project's logging does
                    now = time.perf_counter()
                    rate = args.log_every * args.batch / (now - window_start)
                    out.write(json.dumps({"kind": "train", "step": step, "loss": loss_value,
                                          "samples_per_sec": rate, "cpu_s": time.process_time(),
                                          **process_counters()}) + "\n")
                    out.flush()
                    window_start = time.perf_counter()
                if step == args.steps:
                    break


if __name__ == "__main__":
    main()
