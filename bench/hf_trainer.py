"""The Hugging Face Trainer on a BERT classifier, timed the way the project's loop is timed.

    python bench/hf_trainer.py --out m.jsonl --model-dir DIR --train-file t.csv --max-length 64 --batch 16 ...
    python bench/hf_trainer.py --defaults --out m.jsonl --model-dir DIR --train-file t.csv --batch 16 ...

Same model directory, same CSV tokenized the same way (truncation to --max-length, DataCollatorWithPadding)
as the project's run it is compared with. Either the same batch, AdamW hyperparameters and implementation
(--optim), linear schedule with warmup, gradient clipping, precision, thread count and, with --order, the
same sample order; or (--defaults) what a Trainer user gets: only the batch, the step count and the CPU are
set, everything else (fused AdamW, random order, fp32, no weight decay) is the Trainer's default. No
evaluation, saving or reporting during training. A callback writes {"kind": "train", "step",
"samples_per_sec", "pad_per_sample"} every --log-every steps, like metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from common import process_counters


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--train-file", required=True)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--log-every", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--grad-clip", type=float, default=0.0, help="0 = no clipping (as the project's grad_clip=0)")
    p.add_argument("--optim", default="adamw_torch_fused",
                   help="Trainer optimizer: adamw_torch_fused = fused AdamW (the project's default and the Trainer's); "
                        "adamw_torch = torch.optim.AdamW unfused (the project's optim.fused=false)")
    p.add_argument("--order", default="", help="JSON list of training row indices: train in exactly this order")
    p.add_argument("--defaults", action="store_true",
                   help="the Trainer as a user runs it: only batch, steps and the CPU set; hyperparameters, optimizer, "
                        "precision and the random order are its defaults")
    return p.parse_args(argv)


def training_options(args, cuda: bool) -> dict:
    """TrainingArguments beyond the output directory: the user's few, or every setting the project uses."""
    chosen = dict(per_device_train_batch_size=args.batch, max_steps=args.steps, use_cpu=not cuda,
                  eval_strategy="no", save_strategy="no", report_to="none")
    if args.defaults:
        return chosen
    return {**chosen, "learning_rate": args.lr, "weight_decay": args.weight_decay, "lr_scheduler_type": "linear",
            "warmup_steps": args.warmup_steps, "optim": args.optim, "max_grad_norm": args.grad_clip,
            "bf16": args.precision == "bf16", "fp16": args.precision == "fp16",
            "dataloader_num_workers": args.workers, "dataloader_pin_memory": cuda, "dataloader_drop_last": True,
            "logging_strategy": "no", "disable_tqdm": True, "seed": 0,
            "train_sampling_strategy": "sequential" if args.order else "random"}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import datasets
    import transformers
    from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainerCallback, TrainingArguments)

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if args.random_init:
        model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(args.model_dir, num_labels=2))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=2)
    data = datasets.load_dataset("csv", data_files=args.train_file, split="train", cache_dir=args.cache_dir)
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length), batched=True,
                    remove_columns=["text"]).rename_column("label", "labels")
    if args.order:
        with open(args.order) as f:
            data = data.select(json.load(f))  # trained in this order: train_sampling_strategy="sequential"
    cuda = args.device.startswith("cuda")
    pad = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if cuda else None)
    padding = {"pad": 0, "samples": 0}

    def collate(features):
        """DataCollatorWithPadding, counting the pad tokens it adds (reported per sample in each window)."""
        batch = pad(features)
        padding["pad"] += int((batch["attention_mask"] == 0).sum())
        padding["samples"] += len(features)
        return batch

    class Windows(TrainerCallback):
        """samples/s over every --log-every optimizer steps (the project's train-record windows)."""

        def __init__(self, out):
            self.out, self.start = out, None

        def on_train_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, _args, state, _control, optimizer=None, **__):
            if state.global_step % args.log_every:
                return
            if cuda:
                torch.cuda.synchronize()  # the project's window ends on loss.item(), which waits too
            rate = args.log_every * args.batch / (time.perf_counter() - self.start)
            self.out.write(json.dumps({"kind": "train", "step": state.global_step, "samples_per_sec": rate,
                                       "pad_per_sample": padding["pad"] / max(padding["samples"], 1),
                                       "cpu_s": time.process_time(), "threads": torch.get_num_threads(),
                                       **process_counters(),
                                       "fused": getattr(optimizer, "optimizer", optimizer).defaults.get("fused")})
                           + "\n")
            self.out.flush()
            padding.update(pad=0, samples=0)
            self.start = time.perf_counter()

    with tempfile.TemporaryDirectory() as scratch, open(args.out, "w") as out:
        training_args = TrainingArguments(output_dir=scratch, **training_options(args, cuda))
        trainer = Trainer(model=model, args=training_args, train_dataset=data, data_collator=collate,
                          callbacks=[Windows(out)])
        trainer.train()


if __name__ == "__main__":
    main()
