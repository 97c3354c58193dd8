"""Per-rank memory of DDP against FSDP: what each rank holds of parameters, gradients and optimizer state.

    python bench/memory.py                      # bert-base-sized model, 2 CPU processes (~3 min on 2 cores)
    python bench/memory.py --nproc 4 --quick    # another world size; a smoke run
    python bench/memory.py --device cuda        # one process per GPU (peak CUDA memory too)

Each mode runs a few AdamW steps of `train.py` under torchrun on a bert-base-sized model (110M
parameters, random weights from a config, MiniLM's uncased vocabulary: nothing is downloaded). The
figures come from the run's own memory records: the bytes of each rank's own tensors (its shard
under FSDP) and the process's peak resident memory (peak CUDA memory on GPUs). Writes
bench/results/<date>-memory-<device>.json (+ .md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import (DEFAULT_RESULTS, ROOT, TRAIN, child_env, fresh_dir, machine_info, print_table, read_records,
                    run_job, torchrun_cmd, write_bert_base_dir, write_json, write_token_csv)

MODES = {  # label: train.py overrides
    "ddp": ["mode=ddp"],
    "fsdp": ["mode=fsdp"],
    "fsdp + activation checkpointing": ["mode=fsdp", "activation_checkpointing=true"],
}
HELD = ("param_mb", "grad_mb", "optim_mb")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="per process")
    p.add_argument("--quick", action="store_true", help="2 steps, sequence length 32")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    work = fresh_dir(args.results / "work" / "memory")
    seq = 32 if args.quick else args.seq
    model_dir = write_bert_base_dir(work / "bert-base")
    data = write_token_csv(work / "tokens.csv", rows=args.nproc * args.batch * 8, max_length=seq)
    common = ["workload=bert", f"model.name_or_path={model_dir}", "model.random_init=true",
              f"model.max_length={seq}", "model.export_pretrained=false", f"data.train_files={data}",
              "data.validation_fraction=0.1", f"data.cache_dir={work / 'cache'}", f"batch_size={args.batch}",
              f"max_steps={2 if args.quick else 4}", "optim.name=adamw", "num_workers=0", "log_every=1",
              "progress=false", "keep_last=0", "timeout_s=600"]
    if args.device == "cpu":
        common += ["mode=cpu", "threads=1"]
    rows, figures = [], {}
    for label, overrides in MODES.items():
        out = work / label.replace(" ", "_").replace("+", "")
        cmd = torchrun_cmd(args.nproc, TRAIN, [*common, *overrides, f"output_dir={out}"])
        print(f"=== {label}: {' '.join(overrides)}", flush=True)
        run_job(cmd, child_env(1), out.with_suffix(".log"), timeout=3600)
        memory = [r for r in read_records(out / "metrics.jsonl") if r["kind"] == "memory"][-1]
        figures[label] = {key: memory[key] for key in (*HELD, "peak_rss_mb", "peak_cuda_mb") if key in memory}
        held = [sum(memory[k][r] for k in HELD) for r in range(args.nproc)]
        peak = memory.get("peak_cuda_mb", memory["peak_rss_mb"])
        rows.append([label, *(f"{max(memory[k]):.0f}" for k in HELD), f"{max(held):.0f}", f"{max(peak):.0f}"])
    ddp_held = float(rows[0][4])
    for row in rows:
        row.append(f"{float(row[4]) / ddp_held:.2f}")
    peak_name = "peak CUDA MB" if args.device == "cuda" else "peak RSS MB"
    table = print_table(
        f"Per-rank memory, bert-base-sized (110M parameters), AdamW, {args.nproc} processes ({args.device}), "
        f"seq {seq}, batch {args.batch} per process; the largest rank",
        ["mode", "parameters MB", "gradients MB", "optimizer MB", "held MB", peak_name, "held vs DDP"], rows,
        note="(parameters, gradients and optimizer state: the bytes of the rank's own tensors, its shard under "
             "FSDP, taken at the end of the run; gradients: what a step's backward writes. Peak: the process's "
             "high-water mark, which on the CPU includes the Python runtime, torch and the data)")
    payload = {"benchmark": "memory", "device": args.device, "nproc": args.nproc, "quick": args.quick,
               "machine": machine_info(), "per_rank": figures, "table": table,
               "seconds": time.perf_counter() - began}
    write_json(args.results, f"memory-{args.device}{'-quick' if args.quick else ''}", payload)
    print(f"memory benchmark took {time.perf_counter() - began:.0f} s "
          f"(logs under {work.relative_to(ROOT) if work.is_relative_to(ROOT) else work})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
