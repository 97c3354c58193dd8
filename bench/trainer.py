"""BERT fine-tuning throughput: the project's train.py against the Hugging Face Trainer, identical settings.

    python bench/trainer.py                  # CPU: all-MiniLM-L6-v2, seq 64, batch 16, fp32 (~6 min on 2 cores)
    python bench/trainer.py --precision bf16 # both sides under bf16 autocast
    python bench/trainer.py --quick          # smoke run
    python bench/trainer.py --device cuda    # GPU: bert-base-sized model, seq 128, batch 32, bf16

All sides get the same model directory, the same fixed-length token CSV (every example truncates to
seq), batch, AdamW hyperparameters (lr 5e-5, weight decay 0.01 off for biases and LayerNorm), linear
schedule, gradient clipping at 1.0, precision and threads. The Trainer runs twice: with the same
torch.optim.AdamW implementation the project builds (the identical-settings comparison, target
project / Trainer >= 1.0), and with its own default optimizer (fused AdamW), which is what a Trainer
user gets; the project runs twice too, the second time with optim.fused=true, so fused meets fused.
Repetitions rotate the order of the four. Writes bench/results/trainer-<device>.json.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from cases import HF_TRAINER
from common import DEFAULT_RESULTS, fmt_summary, fresh_dir, machine_info, print_table, python_cmd, write_json
from overhead import RUN_PROJECT, bert_case, compare, measure

TARGET = 1.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--reps", type=int, default=0, help="repetitions per side (default 3; --quick 1)")
    p.add_argument("--threads", type=int, default=0, help="threads per process (default: 1 on CPU, all cores on GPU)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="")
    p.add_argument("--bert-dir", default="", help="GPU mode: a local bert-base directory (default: random init)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.compile = False  # the Trainer would need its own compile settings; both run eagerly
    reps = args.reps or (1 if args.quick else 3)
    work = fresh_dir(args.results / "work" / "trainer")
    began = time.perf_counter()
    case = replace(bert_case(args), grad_clip=1.0).with_data(work)  # the Trainer's default clipping, on both sides
    print(f"bert: {case.label()}, {case.threads} thread(s), {reps} repetition(s)", flush=True)
    trainer = lambda optim: lambda run_dir: python_cmd(  # noqa: E731
        HF_TRAINER, case.trainer_args(run_dir / "metrics.jsonl") + [f"--optim={optim}"])
    sides = {"project": lambda run_dir: python_cmd(RUN_PROJECT, case.project_args(run_dir)),
             "project_fused": lambda run_dir: python_cmd(RUN_PROJECT, [*case.project_args(run_dir),
                                                                       "optim.fused=true"]),
             "hf_trainer": trainer("adamw_torch"),  # the same torch.optim.AdamW the project builds
             "hf_trainer_default": trainer("adamw_torch_fused")}  # what a Trainer user gets by default
    runs = measure(case, sides, reps, work / "runs", args.device)
    comparisons = {  # name: (project side, Trainer side, label)
        "hf_trainer": ("project", "hf_trainer", "project vs HF Trainer, same optimizer (adamw_torch)"),
        "hf_trainer_default": ("project", "hf_trainer_default",
                               "project vs HF Trainer, its default optimizer (adamw_torch_fused)"),
        "fused_both": ("project_fused", "hf_trainer_default",
                       "project optim.fused=true vs HF Trainer adamw_torch_fused (both fused)"),
    }
    results = {name: compare("bert", case, {"project": runs[ours], theirs: runs[theirs]}, baseline=theirs)
               for name, (ours, theirs, _) in comparisons.items()}
    rows = []
    for name, (_, theirs, what) in comparisons.items():
        rate, cpu = results[name]["rate"], results[name].get("cpu_rate")
        rows.append([what, f"{fmt_summary(rate['project'])} seq/s", f"{fmt_summary(rate[theirs])} seq/s",
                     f"{rate['ratio_of_medians']:.3f}", fmt_summary(rate["paired_ratio"], 3),
                     f"{cpu['ratio_of_medians']:.3f}" if cpu else "-"])
    table = print_table(
        f"BERT fine-tuning vs Hugging Face Trainer ({args.device}; {case.label()}, {case.threads} thread(s); median "
        f"(min-max) of {reps} interleaved repetition(s), steady-state sequences/s)",
        ["compared with", "project", "HF Trainer", f"project / Trainer (target >= {TARGET})", "per repetition",
         "same, per CPU-second"], rows,
        note="(same model directory, token file, batch, AdamW hyperparameters, linear schedule, clipping at 1.0, "
             "precision, threads; the project builds torch.optim.AdamW with its defaults (foreach), or fused with "
             "optim.fused=true)")
    main_result = results["hf_trainer"]
    payload = {"benchmark": "trainer", "device": args.device, "quick": args.quick, "reps": reps,
               "machine": machine_info(), "settings": case.label(), "case": case.__dict__, "runs": runs,
               "vs_same_optimizer": results["hf_trainer"], "vs_trainer_default": results["hf_trainer_default"],
               "fused_both": results["fused_both"],
               "target": TARGET, "meets_target": main_result["rate"]["ratio_of_medians"] >= TARGET,
               "table": table, "seconds": time.perf_counter() - began}
    write_json(args.results, f"trainer-{args.device}{'-quick' if args.quick else ''}", payload)
    print(f"trainer benchmark took {time.perf_counter() - began:.0f} s", flush=True)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
