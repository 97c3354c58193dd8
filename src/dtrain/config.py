"""Typed, closed configuration: dataclasses + a YAML preset + ``key=value`` overrides.

Every key has a type, a default and a one-line help text. An unknown key or a value of the
wrong type is a ``ConfigError`` that names the key; ``python train.py --help`` prints them all.
The ``model`` and ``data`` sections depend on ``workload``: each workload has its own closed set.
"""

from __future__ import annotations

import dataclasses
import difflib
import signal
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dtrain.errors import ConfigError


def opt(default: Any, help: str) -> Any:
    """A config field with its help text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = opt("sgd", "optimizer")
    lr: float = opt(0.1, "peak learning rate (after warmup), for the global batch as configured")
    momentum: float = opt(0.9, "SGD momentum")
    betas: list[float] = opt([0.9, 0.999], "AdamW betas")
    eps: float = opt(1e-8, "AdamW epsilon")
    weight_decay: float = opt(1e-4, "weight decay (not applied to biases and norm weights unless decay_norm_and_bias)")
    decay_norm_and_bias: bool = opt(False, "also apply weight decay to 1-d parameters (biases, norm weights)")
    warmup_steps: int = opt(0, "linear warmup from 0 to lr over this many optimizer steps")
    warmup_epochs: float = opt(0.0, "linear warmup over this many epochs, in steps of the run's own epoch length "
                                    "(instead of warmup_steps)")
    schedule: Literal["cosine", "linear", "step", "constant"] = opt("cosine", "decay after warmup")
    step_epochs: int = opt(30, "schedule=step: multiply lr by gamma every this many epochs")
    gamma: float = opt(0.1, "schedule=step: decay factor")
    min_lr_ratio: float = opt(0.0, "cosine/linear: final lr as a fraction of lr")
    grad_clip: float = opt(0.0, "clip the global gradient norm to this value (0 = off)")
    fused: bool = opt(True, "fused optimizer step (one kernel over all parameters) where the device and dtype have "
                            "it, else torch's default, said once; false = torch's default (for-loop on CPUs)")
    backbone_lr_scale: float = opt(1.0, "lr multiplier for every parameter but the classifier head (fine-tuning: "
                                        "e.g. 0.1; image workload)")


@dataclass
class DDPConfig:
    bucket_cap_mb: float = opt(25.0, "DDP gradient bucket size in MiB")
    gradient_as_bucket_view: bool = opt(True, "gradients alias the all-reduce buckets (saves a copy and memory)")
    static_graph: bool = opt(False, "declare the graph static (valid when the same parameters are used every step)")
    find_unused_parameters: bool = opt(False, "scan for parameters unused in forward (slower; only if the model needs it)")


@dataclass
class ImageModelConfig:
    arch: str = opt("resnet18", "torchvision classification model name, e.g. resnet50, vit_b_16")
    weights: str = opt("", "local state_dict file to fine-tune from (head replaced when class counts differ)")
    dropout: float = opt(-1.0, "dropout for models that take one (negative = the model's default)")
    label_smoothing: float = opt(0.0, "cross-entropy label smoothing")


@dataclass
class ImageDataConfig:
    root: str = opt("data/mnist", "ImageFolder root with train/<class>/* and val/<class>/*")
    synthetic: bool = opt(False, "random images generated per index instead of files (benchmarks, tests)")
    synthetic_train_size: int = opt(1024, "synthetic: number of training images")
    synthetic_val_size: int = opt(256, "synthetic: number of validation images")
    num_classes: int = opt(10, "synthetic: number of classes (with files, taken from the folders)")
    image_size: int = opt(224, "validation center-crop size in pixels (and the training crop unless train_crop_size)")
    train_crop_size: int = opt(0, "training random-resized-crop size (0 = image_size); torchvision --train-crop-size")
    val_resize_size: int = opt(0, "validation: resize the short side to this before the center crop "
                                  "(0 = image_size / val_crop_ratio); torchvision --val-resize-size")
    interpolation: Literal["bilinear", "bicubic", "nearest"] = opt("bilinear", "resampling of every resize and crop")
    augment: bool = opt(True, "random resized crop (+ flip) for training; false = validation transform")
    min_crop_scale: float = opt(0.08, "smallest area fraction kept by the random resized crop")
    hflip: bool = opt(True, "random horizontal flip when augmenting")
    auto_augment: Literal["none", "ta_wide", "ra", "imagenet", "augmix"] = opt(
        "none", "policy after crop and flip: TrivialAugmentWide, RandAugment, AutoAugment's ImageNet policy, AugMix "
                "(torchvision --auto-augment)")
    random_erase: float = opt(0.0, "probability of erasing a random rectangle of a training image "
                                   "(torchvision --random-erase)")
    mixup_alpha: float = opt(0.0, "MixUp of each training batch with Beta(alpha, alpha) weights (0 = off); with "
                                  "cutmix_alpha one of the two is picked per batch")
    cutmix_alpha: float = opt(0.0, "CutMix of each training batch with Beta(alpha, alpha) areas (0 = off)")
    ra_reps: int = opt(1, "repeated augmentation: each image k times per epoch on consecutive ranks, epoch length "
                          "unchanged (1 = off); torchvision --ra-sampler --ra-reps")
    val_crop_ratio: float = opt(0.875, "validation: resize to image_size / ratio, then center crop")
    on_bad_image: Literal["stop", "skip"] = opt("stop", "an unreadable image: stop with its path, or skip it (one warning line per file)")
    decode: Literal["tensor", "pil"] = opt("tensor", "image files decoded to uint8 tensors (JPEG by torchvision.io) "
                                                     "and transformed as tensors, or as PIL images (torchvision's "
                                                     "reference)")


@dataclass
class BertModelConfig:
    name_or_path: str = opt("", "local directory with a Hugging Face BERT (config.json, weights) and its tokenizer "
                                "(never downloaded)")
    random_init: bool = opt(False, "untrained model from name_or_path's config.json (no weights file needed; tests)")
    max_length: int = opt(128, "truncate token sequences (a sentence or a pair) to this many tokens")
    problem_type: Literal["single_label", "multi_label"] = opt(
        "single_label", "one label per example (cross-entropy), or a list of labels per example (BCE with logits)")
    dropout: float = opt(-1.0, "hidden, attention and classifier dropout (negative = the model's default)")
    export_pretrained: bool = opt(True, "at the end, save_pretrained() the model and tokenizer to <output_dir>/model")


@dataclass
class BertDataConfig:
    train_files: list[str] = opt([], "training files: csv, tsv, json, jsonl or parquet (.gz/.bz2/.xz too)")
    validation_files: list[str] = opt([], "validation files; empty = split off validation_fraction of train")
    validation_fraction: float = opt(0.2, "held-out fraction when validation_files is empty (split seeded by seed)")
    text_columns: list[str] = opt(["text"], "one column (a sentence) or two (a sentence pair)")
    label_column: str = opt("label", "label column: an integer id or a label name; multi_label: a list of them")
    labels: list[str] = opt([], "label names in id order; empty = sorted distinct names (or 0..max id) in train")
    label_separator: str = opt("|", "multi_label in csv/tsv: separator of the labels inside one cell, e.g. 'a|b'")
    drop_labels: list[str] = opt([], "drop rows whose label (multi_label: any label) is one of these")
    max_train_samples: int = opt(0, "use only N training rows, chosen by a seeded shuffle (0 = all)")
    cache_dir: str = opt("", "datasets cache for the parsed and tokenized files ('' = HF_DATASETS_CACHE or ~/.cache)")
    group_by_length: bool = opt(True, "training batches of similar token counts (less padding), shuffled batch by "
                                      "batch; false = uniformly random batches")


@dataclass
class FSDPConfig:
    reshard_after_forward: bool = opt(True, "free the gathered parameters after each unit's forward (less memory, "
                                            "one more all-gather in backward)")
    param_dtype: Literal["fp32", "bf16", "fp16"] = opt("fp32", "dtype of the gathered parameters in forward and "
                                                               "backward (norm layers stay fp32)")
    reduce_dtype: Literal["fp32", "bf16", "fp16"] = opt("fp32", "dtype of the gradient reduce-scatter")
    cpu_offload: bool = opt(False, "keep parameters, gradients and optimizer state in CPU memory (GPUs only)")


@dataclass
class EMAConfig:
    enabled: bool = opt(False, "keep an exponential moving average of the weights, evaluated after the model "
                               "(torchvision --model-ema)")
    steps: int = opt(32, "update the average every N optimizer steps (torchvision --model-ema-steps)")
    decay: float = opt(0.99998, "decay per update before the adjustment for world size x batch x steps / epochs "
                                "(torchvision --model-ema-decay)")


@dataclass
class ProfileConfig:
    start_step: int = opt(0, "record a torch.profiler trace from this optimizer step on (0 = off), per rank, in "
                             "<output_dir>/profile/")
    steps: int = opt(3, "how many steps the trace covers")
    cuda_memory: bool = opt(False, "GPUs: also write a CUDA memory snapshot of those steps")


# Per-workload types of the `model` and `data` sections.
WORKLOAD_SECTIONS: dict[str, tuple[type, type]] = {
    "image": (ImageModelConfig, ImageDataConfig),
    "bert": (BertModelConfig, BertDataConfig),
}


@dataclass
class Config:
    workload: Literal["image", "bert"] = opt("image", "what to train")
    mode: Literal["auto", "cpu", "dp", "ddp", "fsdp"] = opt(
        "auto", "auto: DDP under torchrun/srun, DataParallel with >1 visible GPU, else one device; cpu forces the "
                "CPU; fsdp shards parameters, gradients and optimizer state over the ranks (torchrun/srun)")
    backend: Literal["auto", "nccl", "gloo"] = opt("auto", "process-group backend (auto: nccl on GPUs, gloo on CPU)")
    epochs: int = opt(1, "training epochs")
    max_steps: int = opt(0, "stop after this many optimizer steps in total (0 = no limit)")
    batch_size: int = opt(32, "samples per step per process (DataParallel splits it across its GPUs)")
    eval_batch_size: int = opt(0, "validation batch per process (0 = batch_size)")
    grad_accum_steps: int = opt(1, "micro-batches per optimizer step (all-reduce only on the last)")
    precision: Literal["fp32", "bf16", "fp16"] = opt("fp32", "autocast dtype; fp16 adds a gradient scaler (GPU only)")
    channels_last: bool = opt(False, "image models: NHWC memory format (faster with tensor cores)")
    sync_bn: bool = opt(False, "BatchNorm statistics over the global batch (every rank's samples), converted before "
                               "wrapping; DDP and FSDP with 2+ processes")
    compile: bool = opt(False, "torch.compile the model (before DDP wrapping)")
    activation_checkpointing: bool = opt(False, "recompute each block's activations in backward instead of keeping "
                                                "them (less memory, ~1/3 more compute)")
    seed: int = opt(0, "base seed; each rank seeds its own generators with seed + 1000 x rank (data order and "
                          "augmentation are drawn from seed alone)")
    deterministic: bool = opt(False, "deterministic algorithms (bit-exact reruns, slower)")
    output_dir: str = opt("runs/default", "where config.yaml, metrics.jsonl, tb/, checkpoints/ and heartbeat/ go")
    resume: str = opt("", "'' = start fresh, 'auto' = <output_dir>/checkpoints/last.pt if present, or a file")
    eval_only: bool = opt(False, "evaluate the resumed checkpoint and exit (needs resume)")
    eval_every: int = opt(1, "evaluate every N epochs (and after the last)")
    best_metric: Literal["accuracy", "ema_accuracy"] = opt(
        "accuracy", "what best.pt is chosen by: the model's validation accuracy or the EMA's (needs ema.enabled)")
    checkpoint_every: int = opt(0, "also save last.pt every N optimizer steps, mid-epoch (0 = each epoch only)")
    keep_last: int = opt(2, "keep this many step-numbered checkpoints besides last.pt/best.pt (0: no step "
                                 "files, only last.pt and best.pt)")
    async_save: bool = opt(False, "write checkpoints in the background: a save blocks training only while the state "
                                  "is copied to host memory (costs a host copy of the state; docs/checkpoints.md)")
    num_workers: int = opt(2, "DataLoader worker processes per rank")
    threads: int = opt(0, "torch intra-op threads per process (0 = OMP_NUM_THREADS / MKL_NUM_THREADS if set, "
                          "else CPU cores / processes on this node)")
    record_samples: bool = opt(False, "sample ledger: each rank appends the dataset indices of every step it "
                                      "trains to <output_dir>/ledger/rank<r>.bin (python -m dtrain.ledger reads it)")
    log_every: int = opt(20, "log train metrics every N optimizer steps")
    hang_report_s: float = opt(120.0, "a rank that made no progress for this long reports which ranks are silent or "
                                      "elsewhere, and every live rank writes its stacks to <output_dir>/hang/ (0 = off)")
    peak_tflops: float = opt(0.0, "the device's peak TFLOP/s at the run's precision: train records then report MFU "
                                  "(0 = achieved TFLOP/s only)")
    progress: bool = opt(True, "rank-0 progress bar when stderr is a terminal (plain lines otherwise)")
    timeout_s: float = opt(600.0, "collective/rendezvous timeout in seconds: a dead peer fails the job after this")
    nonfinite_loss: Literal["stop", "skip"] = opt(
        "stop", "non-finite loss or gradient: stop with an error, or skip the step (skip waits for the GPU every "
        "step); with precision=fp16 the gradient scaler alone handles it (skips the step, lowers its scale)")
    stop_signals: list[str] = opt(["SIGTERM", "SIGUSR1"],
                                  "signals that make all ranks stop at the same step, save, and exit with code 3")
    requeue: bool = opt(True, "after a stop signal inside a Slurm job, rank 0 requeues it (`scontrol requeue`; in "
                              "an array the task itself); where it cannot, the run exits 4 and the sbatch script does")
    nproc: int = opt(0, "start N local DDP workers from plain `python train.py`, as torchrun --standalone "
                        "--nproc_per_node=N would (0 = off)")
    max_restarts: int = opt(0, "with nproc: restart all workers up to N times when one fails (torchrun's --max-restarts)")
    trackers: list[str] = opt(["tensorboard"], "rank 0 also sends metrics.jsonl's records to these: tensorboard "
                                               "(<output_dir>/tb), mlflow, wandb, csv (<output_dir>/csv); [] = none")
    tracker_project: str = opt("dtrain", "the MLflow experiment / W&B project the run goes to")
    mlflow_tracking_uri: str = opt("", "MLflow server or store ('' = MLFLOW_TRACKING_URI, else "
                                       "<output_dir>/mlruns)")
    optim: OptimConfig = field(default_factory=OptimConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    model: Any = field(default_factory=ImageModelConfig)
    data: Any = field(default_factory=ImageDataConfig)


SECTIONS = ("optim", "ddp", "fsdp", "ema", "profile", "model", "data")


def section_types(workload: str) -> dict[str, type]:
    model_t, data_t = WORKLOAD_SECTIONS[workload]
    return {"optim": OptimConfig, "ddp": DDPConfig, "fsdp": FSDPConfig, "ema": EMAConfig, "profile": ProfileConfig,
            "model": model_t, "data": data_t}


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(config_path: str | None, overrides: list[str]) -> Config:
    """Preset file (optional) + ``key=value`` overrides -> validated Config."""
    raw: dict[str, Any] = {}
    if config_path:
        raw = _read_yaml(config_path)
    parsed = [_split_override(word) for word in overrides]
    workload = raw.get("workload", "image")
    for key, value in parsed:
        if key == "workload":
            workload = value
    _check_choice("workload", workload, list(WORKLOAD_SECTIONS))
    cfg = Config(workload=workload, model=section_types(workload)["model"](), data=section_types(workload)["data"]())
    _apply_mapping(cfg, raw, prefix="")
    for key, value in parsed:
        _set_from_string(cfg, key, value)
    validate(cfg)
    return cfg


def _read_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist (pass --config configs/<workload>/<name>.yaml)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path!r} is not a text file (a checkpoint or an archive?): give a YAML "
                          "preset, e.g. --config configs/image/mnist_demo.yaml") from None
    except OSError as e:
        raise ConfigError(f"config file {path!r} cannot be read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of keys, not {type(data).__name__}")
    return data


def yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's problem with its place (1-based line and column) and, for tabs, what to do."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    hint = " (YAML indents with spaces, never tabs: replace the tab)" if "'\\t'" in problem else ""
    return f"{where}{problem}{hint}"


def _split_override(word: str) -> tuple[str, str]:
    key, sep, value = word.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {word!r} is not key=value (e.g. optim.lr=0.05)")
    return key.strip(), value


def _resolve(cfg: Config, dotted: str) -> tuple[Any, dataclasses.Field]:
    """The dataclass that holds `dotted` and its field, or a ConfigError naming the valid keys."""
    obj: Any = cfg
    parts = dotted.split(".")
    for i, name in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(obj)}
        where = ".".join(parts[:i]) or "top level"
        if name not in fields:
            raise ConfigError(_unknown_key_message(dotted, name, list(fields), where))
        f = fields[name]
        if i == len(parts) - 1:
            if name in SECTIONS and obj is cfg:
                raise ConfigError(f"{dotted!r} is a section; set its keys, e.g. {dotted}.{dataclasses.fields(getattr(cfg, name))[0].name}=...")
            return obj, f
        if name not in SECTIONS or obj is not cfg:
            raise ConfigError(f"{dotted!r}: {'.'.join(parts[:i + 1])} is not a section")
        obj = getattr(obj, name)
    raise AssertionError("unreachable")


def _unknown_key_message(dotted: str, name: str, valid: list[str], where: str) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown config key {dotted!r}{hint}; valid keys at {where}: {', '.join(valid)}"


def _apply_mapping(cfg: Config, mapping: dict[str, Any], prefix: str) -> None:
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if prefix == "" and key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"config key {dotted!r} must be a mapping of keys")
            _apply_mapping(cfg, value, prefix=f"{key}.")
            continue
        obj, f = _resolve(cfg, dotted)
        setattr(obj, f.name, _coerce(dotted, value, _field_type(type(obj), f.name)))


def _set_from_string(cfg: Config, dotted: str, text: str) -> None:
    obj, f = _resolve(cfg, dotted)
    typ = _field_type(type(obj), f.name)
    setattr(obj, f.name, _coerce(dotted, _parse_text(text, typ), typ))


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _parse_text(text: str, typ: Any) -> Any:
    """Command-line text -> Python value, guided by the field type (strings stay strings)."""
    if typ is str or typing.get_origin(typ) is Literal:
        return text
    if typing.get_origin(typ) is list:
        text = text.strip()
        if text.startswith("["):
            return yaml.safe_load(text)
        return [] if text == "" else [item.strip() for item in text.split(",")]
    return yaml.safe_load(text) if text.strip() else text


def _coerce(key: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin is Literal:
        _check_choice(key, value, list(typing.get_args(typ)))
        return value
    if origin is list:
        (item_t,) = typing.get_args(typ)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list of {item_t.__name__}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_t) for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None:
            return ""
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"config key {key!r} must be {name}, got {value!r}")


def _check_choice(key: str, value: Any, choices: list[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"config key {key!r} must be one of {', '.join(map(str, choices))}; got {value!r}")


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    positive = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "grad_accum_steps": cfg.grad_accum_steps,
                "eval_every": cfg.eval_every, "log_every": cfg.log_every}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {value}")
    non_negative = {"max_steps": cfg.max_steps, "eval_batch_size": cfg.eval_batch_size, "num_workers": cfg.num_workers,
                    "threads": cfg.threads, "checkpoint_every": cfg.checkpoint_every, "keep_last": cfg.keep_last,
                    "nproc": cfg.nproc, "max_restarts": cfg.max_restarts}
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {value}")
    if cfg.timeout_s <= 0:
        raise ConfigError(f"config key 'timeout_s' must be > 0, got {cfg.timeout_s}")
    for key, value in {"hang_report_s": cfg.hang_report_s, "peak_tflops": cfg.peak_tflops,
                       "profile.start_step": cfg.profile.start_step}.items():
        if value < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {value}")
    if cfg.profile.steps < 1:
        raise ConfigError(f"config key 'profile.steps' must be >= 1, got {cfg.profile.steps}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"config key 'optim.lr' must be > 0, got {cfg.optim.lr}")
    for name in cfg.stop_signals:
        if not isinstance(getattr(signal, name, None), signal.Signals):
            raise ConfigError(f"config key 'stop_signals': {name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
    if cfg.max_restarts and not cfg.nproc:
        raise ConfigError("max_restarts restarts the workers that nproc=N starts: add nproc=N "
                          "(under torchrun use its --max-restarts)")
    if cfg.nproc and cfg.mode == "dp":
        raise ConfigError("mode=dp is one process driving all local GPUs; nproc=N starts N DDP workers: "
                          "drop one of them")
    if cfg.eval_only and not cfg.resume:
        raise ConfigError("eval_only=true needs a checkpoint: add resume=auto or resume=PATH")
    if cfg.optim.warmup_epochs < 0:
        raise ConfigError(f"config key 'optim.warmup_epochs' must be >= 0, got {cfg.optim.warmup_epochs}")
    if cfg.optim.warmup_epochs and cfg.optim.warmup_steps:
        raise ConfigError("set optim.warmup_steps or optim.warmup_epochs, not both")
    if cfg.optim.backbone_lr_scale <= 0:
        raise ConfigError(f"config key 'optim.backbone_lr_scale' must be > 0, got {cfg.optim.backbone_lr_scale}")
    if cfg.ema.steps < 1:
        raise ConfigError(f"config key 'ema.steps' must be >= 1, got {cfg.ema.steps}")
    if not 0.0 < cfg.ema.decay < 1.0:
        raise ConfigError(f"config key 'ema.decay' must be between 0 and 1 (exclusive), got {cfg.ema.decay}")
    if cfg.best_metric == "ema_accuracy" and not cfg.ema.enabled:
        raise ConfigError("best_metric=ema_accuracy needs the EMA: add ema.enabled=true")
    if cfg.workload == "image":
        validate_image_data(cfg.data)


def validate_image_data(data: ImageDataConfig) -> None:
    at_least = {"data.image_size": (data.image_size, 1), "data.train_crop_size": (data.train_crop_size, 0),
                "data.val_resize_size": (data.val_resize_size, 0), "data.ra_reps": (data.ra_reps, 1)}
    for key, (value, low) in at_least.items():
        if value < low:
            raise ConfigError(f"config key {key!r} must be >= {low}, got {value}")
    if 0 < data.val_resize_size < data.image_size:
        raise ConfigError(f"config key 'data.val_resize_size' ({data.val_resize_size}) must be >= data.image_size "
                          f"({data.image_size}), the center crop taken from it")
    if data.auto_augment == "augmix" and data.interpolation == "bicubic":  # torchvision's AugMix works on tensors
        raise ConfigError("data.auto_augment=augmix takes data.interpolation=bilinear or nearest (AugMix resamples "
                          "tensors, which have no bicubic affine transform)")
    if not 0.0 <= data.random_erase <= 1.0:
        raise ConfigError(f"config key 'data.random_erase' is a probability (0 to 1), got {data.random_erase}")
    for key, value in (("data.mixup_alpha", data.mixup_alpha), ("data.cutmix_alpha", data.cutmix_alpha)):
        if value < 0:
            raise ConfigError(f"config key {key!r} must be >= 0 (0 = off), got {value}")


# ---------------------------------------------------------------------------------------------
# Output


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from to_dict() output (e.g. the copy stored in a checkpoint)."""
    cfg = Config(workload=data["workload"], model=section_types(data["workload"])["model"](),
                 data=section_types(data["workload"])["data"]())
    _apply_mapping(cfg, data, prefix="")
    return cfg


def key_groups() -> list[tuple[str, str, type]]:
    """(title, key prefix, dataclass) of every group of keys, in the order --help and the docs list them."""
    groups = [("top level", "", Config)]
    groups += [(f"[{name}]", f"{name}.", cls) for name, cls in section_types("image").items()
               if name not in ("model", "data")]
    for workload, (model_t, data_t) in WORKLOAD_SECTIONS.items():
        groups += [(f"[model] for workload={workload}", "model.", model_t),
                   (f"[data] for workload={workload}", "data.", data_t)]
    return groups


def keys_of(cls: type, prefix: str) -> list[tuple[str, str, Any, str]]:
    """(dotted key, type name, default, help) of a group's keys (a section itself is not a key)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if cls is Config and f.name in SECTIONS:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append((prefix + f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return out


def help_text() -> str:
    """Every key with its type, default and meaning (the body of ``train.py --help``)."""
    lines = ["config keys (set in the YAML preset or as key=value after it; nested keys are dotted):"]
    for title, prefix, cls in key_groups():
        lines += ["", title] if prefix else [""]
        for key, type_name, default, help in keys_of(cls, prefix):
            lines += [f"  {key:<28} {type_name:<26} default={default!r}", f"      {help}"]
    return "\n".join(lines)


MARKDOWN_INTRO = """\
# Configuration

Every key, with its type, default and meaning. This page is generated from the help texts of the
config dataclasses in `src/dtrain/config.py`; regenerate it after changing them:

```bash
python -m dtrain.config --markdown > docs/configuration.md
```

`tests/test_docs.py` fails when the page is stale. `python train.py --help` prints the same keys.

Keys are set in a YAML preset (`--config configs/...yaml`; sections as nested mappings) and
overridden on the command line as `key=value` (nested keys dotted: `optim.lr=0.05`); the command line
wins. The config is closed: an unknown key, a value of the wrong type or out of range is one
`error:` line naming the key, exit code 2. Lists are written `a,b` or `[a, b]`. The `model` and
`data` sections depend on `workload`. The resolved config is saved as `<output_dir>/config.yaml`
and in every checkpoint.

What the keys do in context: [execution modes](modes.md), [checkpoints and failures](checkpoints.md),
[image workload](image.md), [BERT workload](bert.md), [observability](observability.md),
[performance switches](performance.md#switches-to-use-on-gpus).
"""


def markdown() -> str:
    """docs/configuration.md: a contents line, then one table per group of keys."""
    groups = [(_markdown_title(title, prefix), prefix, cls) for title, prefix, cls in key_groups()]
    contents = ", ".join(f"[{title}](#{_slug(title)})" for title, _, _ in groups)
    lines = [MARKDOWN_INTRO, f"Sections: {contents}.", ""]
    for title, prefix, cls in groups:
        lines += [f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, type_name, default, help in keys_of(cls, prefix):
            cells = [f"`{key}`", type_name.replace("|", " | "), f"`{_default_text(default)}`", help]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _markdown_title(title: str, prefix: str) -> str:
    """'[model] for workload=image' -> 'model (workload: image)'; the top level has no prefix."""
    if not prefix:
        return "Top level"
    section, _, workload = title.partition(" for workload=")
    section = section.strip("[]")
    return f"{section} (workload: {workload})" if workload else section


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (not - or _), spaces to hyphens."""
    kept = "".join(c for c in heading.lower() if c.isalnum() or c in "-_ ")
    return kept.replace(" ", "-")


def _default_text(value: Any) -> str:
    """A default as it is written in YAML or after key= (true, not True; '' for an empty string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    if value == "":
        return "''"
    return str(value)


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) is Literal:
        return "|".join(map(str, typing.get_args(typ)))
    if typing.get_origin(typ) is list:
        return f"list[{typing.get_args(typ)[0].__name__}]"
    return typ.__name__


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m dtrain.config --markdown > docs/configuration.md")
    print(markdown(), end="")
