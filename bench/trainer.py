"""BERT fine-tuning throughput: the project's train.py against the Hugging Face Trainer on the demo's real data.

    python bench/trainer.py                  # CPU: all-MiniLM-L6-v2 on Rotten Tomatoes, batch 16 (~10 min on 2 cores)
    python bench/trainer.py --quick          # smoke run
    python bench/trainer.py --device cuda    # the same on one GPU

Both sides train on the demo's training split (written once to a CSV in the order the workload's own seeded
split gives it: dtrain.workloads.bert.split_rows with the shipped config), tokenized the same way (truncation
to the config's 64 tokens, padding per batch), the config's batch 16, one process, the same thread count.
Four sides, their order rotated every repetition:

- project, shipped config: `train.py --config configs/bert/minilm_rotten_tomatoes.yaml` as it is, only
  paths, step count and logging overridden (a 64-row validation file keeps the final evaluation short);
- Trainer, its defaults: what a user writes (DataCollatorWithPadding, batch 16, the CPU); everything else
  is the Trainer's default (fused AdamW, random order, fp32);
- project and Trainer at identical settings: fused AdamW with the config's hyperparameters, warmup,
  schedule and clipping, --precision (fp32 by default), uniformly random batches without length grouping,
  and the very same sample order (the Trainer gets the project's epoch permutation, trained sequentially).

Reports steady-state sequences/s (median over windows after warm-up, then median (min-max) over
repetitions), the two ratios project / Trainer, and pad tokens per sample of each side. Writes
bench/results/<date>-trainer-<device>.json (+ .md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from cases import HF_TRAINER
from common import (DEFAULT_RESULTS, ROOT, child_env, drop_checkpoints, fmt_summary, fresh_dir, interleaved,
                    machine_info, print_table, python_cmd, read_records, run_job, steady_counters, steady_cpu_rate,
                    steady_rate, summary, write_json)
from overhead import RUN_PROJECT, usable_cores

CONFIG = ROOT / "configs" / "bert" / "minilm_rotten_tomatoes.yaml"
TARGETS = {"shipped": 1.3, "identical": 1.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--reps", type=int, default=0, help="repetitions per side (default 3; --quick 1)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per run (default 36; --quick 8)")
    p.add_argument("--threads", type=int, default=0, help="threads per process (default: 1 on CPU, all cores on GPU)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="precision of the identical-settings pair (the shipped config keeps its own)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    return p.parse_args(argv)


class Setup:
    """Data files, settings and the four sides' commands, from one description."""

    log_every, warmup_windows = 2, 3

    def __init__(self, args, work: Path):
        from dtrain.config import load_config

        self.args, self.work = args, work
        self.steps = args.steps or (8 if args.quick else 36)
        self.warmup_windows = 1 if args.quick else self.warmup_windows
        self.threads = args.threads or (usable_cores() if args.device == "cuda" else 1)
        self.config = load_config(str(CONFIG), [])  # the shipped config's batch, sequence length and seed
        self.batch, self.max_length, self.seed = (self.config.batch_size, self.config.model.max_length,
                                                  self.config.seed)
        self.model_dir, self.train_file, self.val_file, self.lengths = write_data(work / "data")

    def project(self, run_dir: Path, *extra: str) -> list[str]:
        return python_cmd(RUN_PROJECT, [
            "--config", str(CONFIG), f"model.name_or_path={self.model_dir}", f"data.train_files={self.train_file}",
            f"data.validation_files={self.val_file}", f"data.cache_dir={self.work / 'cache'}",
            f"max_steps={self.steps}", f"log_every={self.log_every}", "checkpoint_every=0", "keep_last=0",
            "resume=", "model.export_pretrained=false", "progress=false", f"output_dir={run_dir}",
            "mode=cpu" if self.args.device == "cpu" else "mode=auto", *extra])

    def trainer(self, run_dir: Path, *extra: str) -> list[str]:
        return python_cmd(HF_TRAINER, [
            f"--out={run_dir / 'metrics.jsonl'}", f"--model-dir={self.model_dir}", f"--train-file={self.train_file}",
            f"--cache-dir={self.work / 'cache'}", f"--max-length={self.max_length}", f"--batch={self.batch}",
            f"--steps={self.steps}", f"--log-every={self.log_every}", f"--threads={self.threads}",
            f"--device={self.args.device}", *extra])

    def sides(self) -> dict:
        optim = self.config.optim
        same_project = ["data.group_by_length=false", "optim.fused=true", f"precision={self.args.precision}"]
        same_trainer = ["--optim=adamw_torch_fused", f"--lr={optim.lr}", f"--weight-decay={optim.weight_decay}",
                        f"--warmup-steps={optim.warmup_steps}", f"--grad-clip={optim.grad_clip}",
                        f"--precision={self.args.precision}", f"--order={self.order_file()}"]
        return {"project_shipped": lambda d: self.project(d),
                "trainer_defaults": lambda d: self.trainer(d, "--defaults"),
                "project_identical": lambda d: self.project(d, *same_project),
                "trainer_identical": lambda d: self.trainer(d, *same_trainer)}

    def order_file(self) -> Path:
        """The project's epoch-0 sample order without length grouping (one process), for the Trainer."""
        path = self.work / "data" / "project_order.json"
        path.write_text(json.dumps(project_order(self.lengths, self.seed, grouped=False, batch=self.batch)))
        return path

    def settings(self) -> str:
        return (f"all-MiniLM-L6-v2 on the Rotten Tomatoes training split ({len(self.lengths)} rows), "
                f"seq <= {self.max_length}, batch {self.batch}, {self.steps} steps, {self.threads} thread(s)")


def write_data(target: Path) -> tuple[str, Path, Path, list[int]]:
    """The demo's data as the shipped config splits it (the workload's own seeded split): the training rows
    (label ids) and 64 validation rows. Returns the model directory, the two files and every training row's
    token count."""
    import csv

    import datasets
    from transformers import AutoTokenizer

    from dtrain.config import load_config
    from dtrain.demo_data import write_rotten_tomatoes
    from dtrain.workloads import bert

    datasets.disable_progress_bars()
    write_rotten_tomatoes(target)
    cfg = load_config(str(CONFIG), [f"data.train_files={target / 'reviews.csv'}", "data.validation_files=",
                                    f"data.cache_dir={target / 'cache'}"])
    train, val = bert.split_rows(cfg)
    names = ["rotten", "fresh"]
    files = []
    for part, name in ((train, "train.csv"), (val.select(range(64)), "val64.csv")):
        with open(target / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows([text, names.index(label)] for text, label in zip(part["text"], part["label"]))
        files.append(target / name)
    model_dir = str(target / "all-MiniLM-L6-v2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = [len(ids) for ids in tokenizer(list(train["text"]), truncation=True, max_length=cfg.model.max_length)
               ["input_ids"]]
    return model_dir, files[0], files[1], lengths


def project_order(lengths: list[int], seed: int, grouped: bool, batch: int) -> list[int]:
    """The training rows of epoch 0 in the order the project's sampler gives them (one process)."""
    import torch

    from dtrain.data import LengthGroupedSampler, ResumableSampler
    from dtrain.dist import DistEnv

    env = DistEnv(mode="single", device=torch.device("cpu"))
    rows = range(len(lengths))
    sampler = LengthGroupedSampler(rows, env, seed, lengths, batch) if grouped else ResumableSampler(rows, env, seed)
    sampler.start_epoch(0)
    return [i for _, i in sampler]


def padding(lengths: list[int], order: list[int], batch: int, first: int, last: int) -> dict[str, float]:
    """Pad and real tokens per sample in batches first..last-1 of `order` (each padded to its longest)."""
    batches = [order[i:i + batch] for i in range(first * batch, last * batch, batch)]
    samples = sum(map(len, batches))
    pad = sum(max(lengths[i] for i in b) - lengths[i] for b in batches for i in b)
    return {"pad_per_sample": pad / samples, "real_per_sample": sum(lengths[i] for b in batches for i in b) / samples}


def measure(setup: Setup, reps: int) -> dict[str, list[dict]]:
    env = child_env(setup.threads, **({"CUDA_VISIBLE_DEVICES": "0"} if setup.args.device == "cuda" else {}))

    def run(command_for):
        def one(run_dir: Path) -> dict:
            run_job(command_for(run_dir), env, run_dir / "log.txt", 1800)
            drop_checkpoints(run_dir)
            records = read_records(run_dir / "metrics.jsonl")
            measured = [r for r in records if r.get("kind") == "train"][setup.warmup_windows:]
            pads = [r["pad_per_sample"] for r in measured if "pad_per_sample" in r]
            return {"rate": steady_rate(records, setup.warmup_windows),
                    "cpu_rate": steady_cpu_rate(records, setup.warmup_windows, setup.log_every * setup.batch),
                    "pad_per_sample": statistics.mean(pads) if pads else None,
                    "fused": measured[-1].get("fused") if measured else None,
                    "process": steady_counters(records, setup.warmup_windows)}
        return one

    return interleaved({name: run(command) for name, command in setup.sides().items()}, reps, setup.work / "runs",
                       unit="seq/s")


def process_note(runs: dict[str, list[dict]]) -> str:
    """Per side, the median OS threads and voluntary/involuntary context switches per step of its process."""
    parts = []
    for name, results in runs.items():
        counts = [r["process"] for r in results if r.get("process")]
        if counts:
            med = {k: statistics.median(c[k] for c in counts) for k in counts[0]}
            parts.append(f"{name} {med['os_threads']:.0f} threads, {med['voluntary_per_step']:.1f} voluntary / "
                         f"{med['involuntary_per_step']:.1f} involuntary switches per step")
    return f"(processes: {'; '.join(parts)})" if parts else ""


def main(argv=None) -> int:
    args = parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    work = fresh_dir(args.results / "work" / "trainer")
    began = time.perf_counter()
    setup = Setup(args, work)
    print(f"{setup.settings()}, {reps} repetition(s)", flush=True)
    runs = measure(setup, reps)
    rates = {name: summary([r["rate"] for r in results]) for name, results in runs.items()}
    cpu_rates = {name: summary([r["cpu_rate"] for r in results]) for name, results in runs.items()}
    # Pad tokens of the project's sides follow from its sampler; the Trainer counts its own (hf_trainer.py).
    lengths, measured = setup.lengths, (setup.warmup_windows * setup.log_every, setup.steps)
    orders = {"project_shipped": project_order(lengths, setup.seed, setup.config.data.group_by_length, setup.batch),
              "project_identical": project_order(lengths, setup.seed, False, setup.batch)}
    pads = {name: padding(lengths, order, setup.batch, *measured)["pad_per_sample"] for name, order in orders.items()}
    pads["trainer_identical"] = pads["project_identical"]  # the same order
    pads["trainer_defaults"] = statistics.median(r["pad_per_sample"] for r in runs["trainer_defaults"])
    epoch = {grouped: padding(lengths, project_order(lengths, setup.seed, grouped, setup.batch), setup.batch, 0,
                              len(lengths) // setup.batch) for grouped in (False, True)}
    pairs = {"shipped": ("project_shipped", "trainer_defaults",
                         "project at its shipped config / Trainer at its defaults"),
             "identical": ("project_identical", "trainer_identical",
                           f"identical settings (fused AdamW, {args.precision}, same order, no grouping)")}
    comparisons = {}
    for key, (ours, theirs, what) in pairs.items():
        paired = summary([a["rate"] / b["rate"] for a, b in zip(runs[ours], runs[theirs])])
        ratio = rates[ours]["median"] / rates[theirs]["median"]
        cpu_ratio = cpu_rates[ours]["median"] / cpu_rates[theirs]["median"]
        comparisons[key] = {"what": what, "project": rates[ours], "trainer": rates[theirs], "ratio_of_medians": ratio,
                            "paired_ratio": paired, "cpu_ratio_of_medians": cpu_ratio, "target": TARGETS[key],
                            "meets_target": ratio >= TARGETS[key]}
    rows = [[c["what"], f"{fmt_summary(c['project'])} seq/s", f"{fmt_summary(c['trainer'])} seq/s",
             f"{c['ratio_of_medians']:.3f} (target >= {c['target']})", fmt_summary(c["paired_ratio"], 3),
             f"{c['cpu_ratio_of_medians']:.3f}", f"{pads[pairs[key][0]]:.1f} / {pads[pairs[key][1]]:.1f}"]
            for key, c in comparisons.items()]
    grouping = rates["project_shipped"]["median"] / rates["project_identical"]["median"]
    note = (f"(pad tokens per sample over the measured steps {measured[0] + 1}-{measured[1]}; over a whole epoch "
            f"{epoch[False]['pad_per_sample']:.1f} with uniformly random batches, {epoch[True]['pad_per_sample']:.1f} "
            f"grouped by length, for {epoch[True]['real_per_sample']:.1f} real tokens. Project shipped / project "
            f"identical: {grouping:.3f} (shipped: data.group_by_length={setup.config.data.group_by_length}, "
            f"precision={setup.config.precision}).)")
    note += "\n" + process_note(runs)
    table = print_table(
        f"BERT fine-tuning vs Hugging Face Trainer ({args.device}; {setup.settings()}; median (min-max) of {reps} "
        "interleaved repetition(s), steady-state sequences/s)",
        ["comparison", "project", "HF Trainer", "project / Trainer", "per repetition", "same, per CPU-second",
         "pad tokens/sample"], rows,
        note=note)
    payload = {"benchmark": "trainer", "device": args.device, "quick": args.quick, "reps": reps,
               "machine": machine_info(), "settings": setup.settings(), "config": str(CONFIG.relative_to(ROOT)),
               "steps": setup.steps, "warmup_windows": setup.warmup_windows, "runs": runs, "rates": rates,
               "cpu_rates": cpu_rates,
               "comparisons": comparisons, "pad_per_sample_measured_steps": pads, "epoch_padding": {
                   "random": epoch[False], "grouped": epoch[True]}, "shipped_over_identical_project": grouping,
               "table": table, "seconds": time.perf_counter() - began}
    write_json(args.results, f"trainer-{args.device}{'-quick' if args.quick else ''}", payload)
    print(f"trainer benchmark took {time.perf_counter() - began:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
