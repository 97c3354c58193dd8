"""What the benchmarks train, written once: the project's config overrides and the baselines' flags.

One ``ImageCase`` / ``BertCase`` describes model, data, batch, precision and threads; ``project_args``
turns it into ``train.py`` overrides and ``handwritten_args`` into the same settings for
bench/handwritten.py, so the two sides of a comparison cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from common import BENCH, write_bert_base_dir, minilm_dir, write_token_csv

HANDWRITTEN = BENCH / "handwritten.py"
HF_TRAINER = BENCH / "hf_trainer.py"


@dataclass(frozen=True)
class ImageCase:
    arch: str = "resnet18"
    image_size: int = 64
    batch: int = 32  # per process
    steps: int = 24  # optimizer steps per epoch (per process)
    epochs: int = 1
    log_every: int = 3
    warmup_windows: int = 2  # first train windows dropped from the throughput
    threads: int = 1  # per process
    workers: int = 0
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    device: str = "cpu"
    num_classes: int = 10
    fused: bool = True  # fused optimizer step on both sides (the project's default, optim.fused=true)

    def project_args(self, out: Path, processes: int = 1) -> list[str]:
        """train.py overrides: one epoch is exactly `steps` optimizer steps on every process."""
        return [
            "workload=image", f"model.arch={self.arch}", "data.synthetic=true", f"data.image_size={self.image_size}",
            f"data.num_classes={self.num_classes}", f"data.synthetic_train_size={self.batch * self.steps * processes}",
            f"data.synthetic_val_size={self.batch * processes}", f"batch_size={self.batch}",
            f"epochs={self.epochs}", f"log_every={self.log_every}", f"threads={self.threads}",
            f"num_workers={self.workers}", f"precision={self.precision}", f"channels_last={self.channels_last}",
            f"compile={self.compile}", "optim.name=sgd", "optim.lr=0.1", "optim.weight_decay=1e-4",
            f"optim.fused={self.fused}",
            "optim.warmup_steps=0", "keep_last=0", "progress=false", f"output_dir={out}",
            "mode=cpu" if self.device == "cpu" else "mode=auto",
        ]

    def handwritten_args(self, out: Path) -> list[str]:
        args = ["image", f"--out={out}", f"--arch={self.arch}", f"--image-size={self.image_size}",
                f"--num-classes={self.num_classes}", f"--batch={self.batch}", f"--steps={self.steps * self.epochs}",
                f"--log-every={self.log_every}", f"--threads={self.threads}", f"--workers={self.workers}",
                f"--device={self.device}", f"--precision={self.precision}", "--lr=0.1", "--weight-decay=1e-4",
                "--fused" if self.fused else "--no-fused"]
        return args + ["--channels-last"] * self.channels_last + ["--compile"] * self.compile

    def label(self) -> str:
        extras = [self.precision] + ["channels_last"] * self.channels_last + ["compile"] * self.compile
        return f"{self.arch} {self.image_size}px, batch {self.batch}, {'+'.join(extras)}"


@dataclass(frozen=True)
class BertCase:
    model_dir: str = ""
    random_init: bool = False  # GPU mode: a bert-base-sized model from a config, no weights needed
    max_length: int = 64
    batch: int = 16
    steps: int = 12
    log_every: int = 2
    warmup_windows: int = 2
    threads: int = 1
    workers: int = 0
    precision: str = "fp32"
    compile: bool = False
    device: str = "cpu"
    lr: float = 5e-5
    weight_decay: float = 0.01
    grad_clip: float = 0.0
    fused: bool = True  # fused AdamW on both sides (the project's default, optim.fused=true)
    group_by_length: bool = False  # the hand-written loop draws uniformly random batches
    train_file: str = ""
    val_file: str = ""
    cache_dir: str = ""

    def with_data(self, work: Path) -> "BertCase":
        """Write the fixed-length token files (and the bert-base config in random-init mode) once."""
        model_dir = self.model_dir or str(minilm_dir())
        if self.random_init and not (Path(model_dir) / "config.json").is_file():
            model_dir = str(write_bert_base_dir(work / "bert-base-random"))
        train = write_token_csv(work / "tokens_train.csv", self.batch * self.steps, self.max_length, seed=0)
        val = write_token_csv(work / "tokens_val.csv", self.batch, self.max_length, seed=1)
        return replace(self, model_dir=model_dir, train_file=str(train), val_file=str(val),
                       cache_dir=str(work / "datasets-cache"))

    def project_args(self, out: Path) -> list[str]:
        return [
            "workload=bert", f"model.name_or_path={self.model_dir}", f"model.random_init={self.random_init}",
            f"model.max_length={self.max_length}", "model.export_pretrained=false",
            f"data.train_files={self.train_file}", f"data.validation_files={self.val_file}",
            f"data.cache_dir={self.cache_dir}", f"batch_size={self.batch}", f"max_steps={self.steps}",
            f"log_every={self.log_every}", f"threads={self.threads}", f"num_workers={self.workers}",
            f"precision={self.precision}", f"compile={self.compile}", "optim.name=adamw", f"optim.lr={self.lr}",
            f"optim.weight_decay={self.weight_decay}", "optim.warmup_steps=0", "optim.schedule=linear",
            f"optim.grad_clip={self.grad_clip}", f"optim.fused={self.fused}",
            f"data.group_by_length={self.group_by_length}", "keep_last=0", "progress=false", f"output_dir={out}",
            "mode=cpu" if self.device == "cpu" else "mode=auto",
        ]

    def handwritten_args(self, out: Path) -> list[str]:
        args = ["bert", f"--out={out}", f"--model-dir={self.model_dir}", f"--train-file={self.train_file}",
                f"--cache-dir={self.cache_dir}", f"--max-length={self.max_length}", f"--batch={self.batch}",
                f"--steps={self.steps}", f"--log-every={self.log_every}", f"--threads={self.threads}",
                f"--workers={self.workers}", f"--device={self.device}", f"--precision={self.precision}",
                f"--lr={self.lr}", f"--weight-decay={self.weight_decay}", "--fused" if self.fused else "--no-fused"]
        return args + ["--random-init"] * self.random_init + ["--compile"] * self.compile

    def trainer_args(self, out: Path) -> list[str]:
        """bench/hf_trainer.py flags: the Trainer gets the same model, data, batch, optimizer and precision."""
        args = [f"--out={out}", f"--model-dir={self.model_dir}", f"--train-file={self.train_file}",
                f"--cache-dir={self.cache_dir}", f"--max-length={self.max_length}", f"--batch={self.batch}",
                f"--steps={self.steps}", f"--log-every={self.log_every}", f"--threads={self.threads}",
                f"--workers={self.workers}", f"--device={self.device}", f"--precision={self.precision}",
                f"--lr={self.lr}", f"--weight-decay={self.weight_decay}", f"--grad-clip={self.grad_clip}"]
        return args + ["--random-init"] * self.random_init

    def label(self) -> str:
        name = "bert-base (random init)" if self.random_init else Path(self.model_dir or "MiniLM-L6").name
        if name == "model":  # the MiniLM package's directory
            name = "all-MiniLM-L6-v2"
        return f"{name}, seq {self.max_length}, batch {self.batch}, {self.precision}"
