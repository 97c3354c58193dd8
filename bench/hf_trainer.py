"""The Hugging Face Trainer on a BERT classifier, timed the way the project's loop is timed.

    python bench/hf_trainer.py --out m.jsonl --model-dir DIR --train-file t.csv --max-length 64 --batch 16 ...

Same model directory, same CSV tokenized the same way (truncation to --max-length, dynamic padding),
same batch, AdamW hyperparameters, linear schedule, gradient clipping, precision and thread count as
the project's run it is compared with. No evaluation, saving or reporting during training. A callback
writes {"kind": "train", "step", "samples_per_sec"} every --log-every steps, like metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


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
    p.add_argument("--grad-clip", type=float, default=0.0, help="0 = no clipping (as the project's grad_clip=0)")
    p.add_argument("--optim", default="adamw_torch",
                   help="Trainer optimizer: adamw_torch = torch.optim.AdamW as the project builds it; "
                        "adamw_torch_fused = the Trainer's own default")
    return p.parse_args(argv)


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
    cuda = args.device.startswith("cuda")

    class Windows(TrainerCallback):
        """samples/s over every --log-every optimizer steps (the project's train-record windows)."""

        def __init__(self, out):
            self.out, self.start = out, None

        def on_train_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, _args, state, _control, **__):
            if state.global_step % args.log_every:
                return
            if cuda:
                torch.cuda.synchronize()  # the project's window ends on loss.item(), which waits too
            rate = args.log_every * args.batch / (time.perf_counter() - self.start)
            self.out.write(json.dumps({"kind": "train", "step": state.global_step, "samples_per_sec": rate,
                                       "cpu_s": time.process_time(), "threads": torch.get_num_threads()}) + "\n")
            self.out.flush()
            self.start = time.perf_counter()

    with tempfile.TemporaryDirectory() as scratch, open(args.out, "w") as out:
        training_args = TrainingArguments(
            output_dir=scratch, per_device_train_batch_size=args.batch, max_steps=args.steps,
            learning_rate=args.lr, weight_decay=args.weight_decay, lr_scheduler_type="linear", warmup_steps=0,
            optim=args.optim, max_grad_norm=args.grad_clip,
            bf16=args.precision == "bf16", fp16=args.precision == "fp16", use_cpu=not cuda,
            dataloader_num_workers=args.workers, dataloader_pin_memory=cuda, dataloader_drop_last=True,
            eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
            disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=training_args, train_dataset=data,
                          data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if cuda else None),
                          callbacks=[Windows(out)])
        trainer.train()


if __name__ == "__main__":
    main()
