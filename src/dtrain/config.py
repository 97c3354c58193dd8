"""Typed, closed configuration: dataclasses + a YAML preset + ``key=value`` overrides.

Every key has a type, a default and a one-line help text. An unknown key or a value of the
wrong type is a ``ConfigError`` that names the key; ``python train.py --help`` prints them all.
The ``model`` and ``data`` sections depend on ``workload``: each workload (dtrain.workloads.WORKLOADS)
declares its own closed set. Each section checks its own values (``Section.check``), then
``Config.check`` what sections must agree on; every such mistake is a ConfigError, exit code 2.
Torch-free: ``train.py`` loads the config before it imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import signal
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import yaml

from dtrain.errors import ConfigError
from dtrain.sections import DataSection, ModelSection, Section, opt
from dtrain.workloads import WORKLOADS


@dataclass
class OptimConfig(Section):
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

    prefix = "optim."

    def check(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"config key 'optim.lr' must be > 0, got {self.lr}")
        self.at_least(0, "warmup_epochs")
        if self.warmup_epochs and self.warmup_steps:
            raise ConfigError("set optim.warmup_steps or optim.warmup_epochs, not both")
        if self.backbone_lr_scale <= 0:
            raise ConfigError(f"config key 'optim.backbone_lr_scale' must be > 0, got {self.backbone_lr_scale}")


@dataclass
class DDPConfig(Section):
    bucket_cap_mb: float = opt(25.0, "DDP gradient bucket size in MiB")
    gradient_as_bucket_view: bool = opt(True, "gradients alias the all-reduce buckets (saves a copy and memory)")
    static_graph: bool = opt(False, "declare the graph static (valid when the same parameters are used every step)")
    find_unused_parameters: bool = opt(False, "scan for parameters unused in forward (slower; only if the model needs it)")


@dataclass
class FSDPConfig(Section):
    reshard_after_forward: bool = opt(True, "free the gathered parameters after each unit's forward (less memory, "
                                            "one more all-gather in backward)")
    param_dtype: Literal["fp32", "bf16", "fp16"] = opt("fp32", "dtype of the gathered parameters in forward and "
                                                               "backward (norm layers stay fp32)")
    reduce_dtype: Literal["fp32", "bf16", "fp16"] = opt("fp32", "dtype of the gradient reduce-scatter")
    cpu_offload: bool = opt(False, "keep parameters, gradients and optimizer state in CPU memory (GPUs only)")


@dataclass
class EMAConfig(Section):
    enabled: bool = opt(False, "keep an exponential moving average of the weights, evaluated after the model "
                               "(torchvision --model-ema)")
    steps: int = opt(32, "update the average every N optimizer steps (torchvision --model-ema-steps)")
    decay: float = opt(0.99998, "decay per update before the adjustment for world size x batch x steps / epochs "
                                "(torchvision --model-ema-decay)")

    prefix = "ema."

    def check(self) -> None:
        self.at_least(1, "steps")
        if not 0.0 < self.decay < 1.0:
            raise ConfigError(f"config key 'ema.decay' must be between 0 and 1 (exclusive), got {self.decay}")


@dataclass
class ProfileConfig(Section):
    start_step: int = opt(0, "record a torch.profiler trace from this optimizer step on (0 = off), per rank, in "
                             "<output_dir>/profile/")
    steps: int = opt(3, "how many steps the trace covers")
    cuda_memory: bool = opt(False, "GPUs: also write a CUDA memory snapshot of those steps")

    prefix = "profile."

    def check(self) -> None:
        self.at_least(0, "start_step")
        self.at_least(1, "steps")


ModelT = TypeVar("ModelT", bound=ModelSection)
DataT = TypeVar("DataT", bound=DataSection)


@dataclass
class Config(Section, Generic[ModelT, DataT]):
    """The whole run. ``model`` and ``data`` are the sections of `workload`: a workload's builder takes
    e.g. ``Config[ImageModelConfig, ImageDataConfig]``."""

    workload: str = opt("image", "what to train: a workload of dtrain.workloads.WORKLOADS (built in: image, bert)")
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
    model: ModelT = field(default_factory=lambda: WORKLOADS["image"].model())
    data: DataT = field(default_factory=lambda: WORKLOADS["image"].data())

    def check(self) -> None:
        """Each section's own checks, then what the keys must agree on across sections."""
        for name in SECTIONS:
            getattr(self, name).check()
        workload_check = WORKLOADS[self.workload].check
        if workload_check is not None:
            workload_check(self.model, self.data)
        check_top_level(self)


SECTIONS = ("optim", "ddp", "fsdp", "ema", "profile", "model", "data")


def section_types(workload: str) -> dict[str, type]:
    return {"optim": OptimConfig, "ddp": DDPConfig, "fsdp": FSDPConfig, "ema": EMAConfig, "profile": ProfileConfig,
            "model": WORKLOADS[workload].model, "data": WORKLOADS[workload].data}


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
    _check_choice("workload", workload, list(WORKLOADS))
    cfg = Config(workload=workload, model=WORKLOADS[workload].model(), data=WORKLOADS[workload].data())
    _apply_mapping(cfg, raw, prefix="")
    for key, value in parsed:
        _set_from_string(cfg, key, value)
    cfg.check()
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


def check_top_level(cfg: Config) -> None:
    """Range checks of the top-level keys, and what they must agree on with the sections."""
    at_least = {1: ("epochs", "batch_size", "grad_accum_steps", "eval_every", "log_every"),
                0: ("max_steps", "eval_batch_size", "num_workers", "threads", "checkpoint_every", "keep_last",
                    "nproc", "max_restarts", "hang_report_s", "peak_tflops")}
    for low, names in at_least.items():
        cfg.at_least(low, *names)
    if cfg.timeout_s <= 0:
        raise ConfigError(f"config key 'timeout_s' must be > 0, got {cfg.timeout_s}")
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
    if cfg.best_metric == "ema_accuracy" and not cfg.ema.enabled:
        raise ConfigError("best_metric=ema_accuracy needs the EMA: add ema.enabled=true")


# ---------------------------------------------------------------------------------------------
# Output


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def key_groups() -> list[tuple[str, str, type]]:
    """(title, key prefix, dataclass) of every group of keys, in the order --help and the docs list them."""
    groups = [("top level", "", Config)]
    groups += [(f"[{name}]", f"{name}.", cls) for name, cls in section_types("image").items()
               if name not in ("model", "data")]
    for name, workload in WORKLOADS.items():
        groups += [(f"[model] for workload={name}", "model.", workload.model),
                   (f"[data] for workload={name}", "data.", workload.data)]
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

**Adding a workload** is one module and one registration line. The module declares the workload's `model`
and `data` sections: dataclasses subclassing `dtrain.sections.ModelSection` and `DataSection`, every key
written `opt(default, help)`, each section's `check()` raising `ConfigError` for a value its type cannot rule
out; optionally a `check(model, data)` for what the two must agree on; and a builder `build(cfg, env) -> Task`
(the model, the data sets, the loss and metric sums the loop asks for: `src/dtrain/workloads/task.py`);
optionally an exporter for `python -m dtrain.export`. The line is an entry of `WORKLOADS` in
`src/dtrain/workloads/__init__.py`, or `register(name, Workload(...))` in your own script before
`dtrain.train()`; `workload=name`, `--help` and this page then list its keys. Checks
that need the run (files, the model directory, world size, device) belong in the builder or where the run
learns them, with the [exit codes](checkpoints.md#stop-signals-and-exit-codes) there. The built-in workloads
keep their sections in torch-free modules (`image_config.py`, `bert_config.py`) and name their builders as
`"module:function"`, so config mistakes and `--help` are answered before torch is imported;
`tests/tiny_workload.py` is a whole workload in one file, trained under torchrun by `tests/test_workloads.py`.
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
