"""How long a checkpoint save blocks the training loop: synchronous against background (async_save=true).

    python bench/checkpoint_blocking.py                 # bert-base-sized model + AdamW state, CPU, 3 repetitions
    python bench/checkpoint_blocking.py --device cuda   # the model on the GPU: pinned host buffers
    python bench/checkpoint_blocking.py --quick         # a smoke run: a 2-layer model, 1 repetition

The state is a bert-base-sized BertForSequenceClassification (110M parameters, random weights from a
config: nothing is downloaded) and its AdamW state after one step, as the loop saves it. Synchronous:
dtrain.checkpoint.save_checkpoint (write, fsync, rename, link, prune), all of it on the loop's time.
Background: what the loop does with async_save=true (dtrain.checkpointer.OneFile.write): the copy
into host buffers kept between saves, then the same save_checkpoint in a thread; blocked is the time
until the loop may continue, and the write's own duration is reported beside it. The first background
save also allocates the host buffers and is reported apart. Repetitions alternate sync and background,
so load on the machine hits both. Writes bench/results/<date>-checkpoint_blocking-<device>.json (+ .md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import DEFAULT_RESULTS, ROOT, fresh_dir, machine_info, print_table, write_bert_base_dir, write_json

sys.path.insert(0, str(ROOT / "src"))
from dtrain import checkpoint as ckpt  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2 layers, 1 repetition")
    p.add_argument("--dir", type=Path, default=None, help="where the checkpoints go (default: a temporary folder "
                                                          "on the results folder's file system)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    return p.parse_args(argv)


def build_state(work: Path, device: str, quick: bool) -> tuple[dict, int]:
    """The model and AdamW state after one step, as the loop hands them to a save."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    config = BertConfig.from_pretrained(write_bert_base_dir(work / "bert-base"), num_labels=2)
    if quick:
        config.num_hidden_layers = 2
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, config.vocab_size, (2, 16), device=device)
    model(input_ids=ids, labels=torch.zeros(2, dtype=torch.long, device=device)).loss.backward()
    optimizer.step()
    params = sum(p.numel() for p in model.parameters())
    payload = {"format_version": ckpt.FORMAT_VERSION, "identity": {}, "scheduler": {}, "scaler": {},
               "state": ckpt.TrainState().state_dict(), "config": {},
               "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    return payload, params


def save_sync(payload: dict, folder: Path, step: int) -> dict[str, float]:
    start = time.perf_counter()
    ckpt.save_checkpoint(payload, folder, step, keep_last=1, is_best=False)
    blocked = time.perf_counter() - start
    return {"blocked_ms": blocked * 1e3, "write_ms": blocked * 1e3}


def save_background(payload: dict, folder: Path, step: int, host: ckpt.HostCopy,
                    write: ckpt.BackgroundWrite) -> dict[str, float]:
    start = time.perf_counter()
    copied = host.take(payload)  # what OneFile.write does in the background
    write.start(lambda: ckpt.save_checkpoint(copied, folder, step, keep_last=1, is_best=False))
    blocked = time.perf_counter() - start
    failure = write.wait()
    if failure is not None:
        raise SystemExit(f"error: {failure}")
    return {"blocked_ms": blocked * 1e3, "write_ms": (time.perf_counter() - start) * 1e3}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no GPU here")
    began = time.perf_counter()
    reps = 1 if args.quick else args.reps
    work = fresh_dir(args.results / "work" / "checkpoint_blocking")
    payload, params = build_state(work, args.device, args.quick)
    host, write = ckpt.HostCopy(), ckpt.BackgroundWrite()
    runs: dict[str, list[dict[str, float]]] = {"sync": [], "background": []}
    with tempfile.TemporaryDirectory(dir=args.dir or work) as tmp:
        folder = Path(tmp) / "checkpoints"
        first = save_background(payload, folder, 0, host, write)  # allocates the host buffers
        size_mb = (folder / "last.pt").stat().st_size / 2**20
        step = 0
        for rep in range(reps):
            order = ("sync", "background") if rep % 2 == 0 else ("background", "sync")
            for case in order:
                step += 1
                figures = save_sync(payload, folder, step) if case == "sync" else \
                    save_background(payload, folder, step, host, write)
                runs[case].append(figures)
                print(f"rep {rep + 1} {case}: blocked {figures['blocked_ms']:.0f} ms, written in "
                      f"{figures['write_ms']:.0f} ms", flush=True)

    def cell(case: str, key: str) -> str:
        values = [r[key] for r in runs[case]]
        return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"

    sync_blocked = statistics.median(r["blocked_ms"] for r in runs["sync"])
    bg_blocked = statistics.median(r["blocked_ms"] for r in runs["background"])
    rows = [["synchronous", cell("sync", "blocked_ms"), cell("sync", "write_ms")],
            ["background (async_save=true)", cell("background", "blocked_ms"), cell("background", "write_ms")],
            ["background, first save (allocates the host buffers)", f"{first['blocked_ms']:.0f}",
             f"{first['write_ms']:.0f}"]]
    name = f"checkpoint_blocking-{args.device}" + ("-quick" if args.quick else "")
    table = print_table(
        f"Milliseconds a save blocks the training loop, {'bert-base-sized' if not args.quick else '2-layer BERT'} "
        f"({params / 1e6:.0f}M parameters) + AdamW state, {size_mb:.0f} MB file, device {args.device}; "
        f"median (min-max) of {reps} alternating repetitions",
        ["save", "blocked ms", "until on disk ms"], rows,
        note=f"(blocked: until the loop may take its next step; until on disk: write, fsync, rename and link done. "
             f"Background blocks {sync_blocked / bg_blocked:.1f}x less)")
    write_json(args.results, name, {"benchmark": "checkpoint_blocking", "device": args.device, "quick": args.quick,
                                    "parameters": params, "file_mb": size_mb, "machine": machine_info(),
                                    "runs": runs, "first_background": first, "table": table,
                                    "seconds": time.perf_counter() - began})
    return 0


if __name__ == "__main__":
    sys.exit(main())
