"""BERT text classification: a local Hugging Face model and tokenizer, text files read with `datasets`.

    python train.py --config configs/bert/minilm_rotten_tomatoes.yaml
    torchrun --standalone --nproc_per_node=2 train.py --config configs/bert/minilm_rotten_tomatoes.yaml

Data: csv/tsv/json/jsonl/parquet files with one or two text columns and a label column (an id, a
name, or for multi_label a list of them). Rank 0 parses and tokenizes first; the other ranks then
load the same result from the `datasets` cache. Batches are padded per batch (dynamic padding), and
with data.group_by_length (the default) they hold examples of similar length, so little is padded.
transformers and datasets are imported inside functions, so the image workload never pays for them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.checkpoint import Checkpoint
from dtrain.config import Config
from dtrain.dist import DistEnv, main_first
from dtrain.errors import UserError
from dtrain.workloads.bert_config import BertDataConfig, BertModelConfig
from dtrain.workloads.task import LoaderOptions, Task

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# file suffix -> (datasets builder, its options); a compression suffix may follow
FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t", "quoting": 3}),  # GLUE-style TSV: quotes are text (csv.QUOTE_NONE)
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
COMPRESSIONS = (".gz", ".bz2", ".xz")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


BertRunConfig = Config[BertModelConfig, BertDataConfig]


def build(cfg: BertRunConfig, env: DistEnv) -> Task:
    model_cfg = cfg.model
    quiet_libraries()
    # Checks every rank makes alike, before any collective: a bad model directory fails everywhere at once.
    hf_config = load_model_config(model_cfg)
    tokenizer = load_tokenizer(model_cfg.name_or_path, hf_config)
    data = main_first(env, lambda: prepare_data(cfg, tokenizer))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the Rust pool is done; DataLoader workers may fork
    model = build_model(model_cfg, hf_config, data.labels, env)
    frozen = freeze_unused_parameters(model, tokenizer, len(cfg.data.text_columns))
    if env.is_main:
        print(f"bert data: {len(data.train)} train / {len(data.val)} validation examples, "
              f"{len(data.labels.names)} labels ({', '.join(data.labels.names[:10])}"
              f"{', ...' if len(data.labels.names) > 10 else ''}), max_length {model_cfg.max_length}", flush=True)
        if frozen:
            print(f"bert model: frozen (unused in forward, so DDP needs no unused-parameter scan): "
                  f"{', '.join(frozen)}", flush=True)

    multi = model_cfg.problem_type == "multi_label"
    num_labels = len(data.labels.names)

    def train_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = forward(model, batch)
        if multi:
            return F.binary_cross_entropy_with_logits(logits, batch["labels"].float())
        return F.cross_entropy(logits, batch["labels"])

    def eval_sums(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = forward(model, batch)
        return (multi_label_sums if multi else single_label_sums)(logits, batch["labels"], num_labels)

    def export(output_dir: str) -> None:
        from dtrain.export import export as export_checkpoint

        out = export_checkpoint(Path(output_dir), Path(output_dir) / "model")  # its last checkpoint, tensor by tensor
        print(f"saved model and tokenizer to {out} (AutoModelForSequenceClassification.from_pretrained "
              "loads it)", flush=True)

    return Task(
        model=model,
        train_set=data.train,
        val_set=data.val,
        train_loss=train_loss,
        eval_sums=eval_sums,
        summarize=make_summarize(data.labels.names, multi),
        collate_fn=make_collate(tokenizer, env.device),
        random_samples=False,  # tokenized once, before training
        identity={"workload": "bert", "model_type": hf_config.model_type, "problem_type": model_cfg.problem_type,
                  "num_labels": num_labels, "labels": list(data.labels.names)},
        export=export if model_cfg.export_pretrained else None,
        is_no_decay=is_no_decay,
        units=encoder_layers,
        loading=LoaderOptions(lengths=(token_counts(data.train), token_counts(data.val)) if cfg.data.group_by_length
                              else None),
    )


def quiet_libraries() -> None:
    """Our own one-line summaries replace the libraries' progress bars and load tables."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------
# Model and tokenizer (local directories only)


def load_model_config(model_cfg: BertModelConfig):
    from transformers import AutoConfig

    path = Path(model_cfg.name_or_path)
    if not path.is_dir():
        raise UserError(f"model.name_or_path {str(path)!r} is not a local directory; nothing is downloaded "
                        "(HF_HUB_OFFLINE=1): download the model elsewhere and give its directory")
    if not (path / "config.json").is_file():
        raise UserError(f"model directory {path} has no config.json (found: {listing(path)})")
    try:
        hf_config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read {path}/config.json: {first_line(e)}") from None
    limit = getattr(hf_config, "max_position_embeddings", None)
    if limit is not None and model_cfg.max_length > limit:
        raise UserError(f"model.max_length={model_cfg.max_length} is above the model's position limit {limit} "
                        f"(max_position_embeddings in {path}/config.json); use model.max_length={limit} or less")
    return hf_config


def load_tokenizer(name_or_path: str, hf_config):
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    # AutoTokenizer quietly builds a vocabulary of only special tokens from a directory without
    # tokenizer files: that would train on [UNK]s, so insist on the files.
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"model directory {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...; "
                        f"found: {listing(path)}); save one there with tokenizer.save_pretrained()")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot load the tokenizer in {path}: {first_line(e)}") from None
    vocab_size = getattr(hf_config, "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise UserError(f"the tokenizer in {path} has {len(tokenizer)} tokens but the model's vocab_size is "
                        f"{vocab_size}: they do not belong together")
    return tokenizer


def configure_head(hf_config, label_names: list[str], problem_type: str, dropout: float) -> None:
    """The classification head's settings in the model configuration (also what an export's config.json says)."""
    hf_config.num_labels = len(label_names)
    hf_config.id2label = dict(enumerate(label_names))
    hf_config.label2id = {name: i for i, name in enumerate(label_names)}
    hf_config.problem_type = ("multi_label_classification" if problem_type == "multi_label"
                              else "single_label_classification")
    if dropout >= 0:
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            if hasattr(hf_config, key):
                setattr(hf_config, key, dropout)


def build_model(model_cfg: BertModelConfig, hf_config, labels: "LabelSpace", env: DistEnv) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    configure_head(hf_config, labels.names, model_cfg.problem_type, model_cfg.dropout)
    path = model_cfg.name_or_path
    try:
        if model_cfg.random_init:
            return AutoModelForSequenceClassification.from_config(hf_config)
        if not any((Path(path) / name).is_file() for name in WEIGHT_FILES):
            raise UserError(f"model directory {path} has no weights ({' or '.join(WEIGHT_FILES[::2])}); "
                            "add them, or set model.random_init=true to train from scratch")
        model, info = AutoModelForSequenceClassification.from_pretrained(path, config=hf_config,
                                                                         output_loading_info=True)
    except ValueError as e:  # e.g. a model type without a sequence-classification head
        raise UserError(f"cannot build a sequence classifier from {path}: {first_line(e)}") from None
    if env.is_main:
        new = sorted(info.get("missing_keys", ()))
        count = sum(p.numel() for p in model.parameters())
        size = f"{count / 1e6:.1f}M" if count >= 100_000 else f"{count:,}"
        print(f"bert model: {type(model).__name__} from {path}, {size} parameters; newly initialised: "
              f"{', '.join(new) or 'none'}", flush=True)
    return model


def freeze_unused_parameters(model: nn.Module, tokenizer, num_texts: int) -> list[str]:
    """Freeze parameters that a forward pass does not reach; returns their names.

    DDP fails (or, with find_unused_parameters, scans the graph every step) when a trainable
    parameter gets no gradient. One tiny probe on every rank finds such parameters (e.g. a
    pooler a head ignores); frozen, DDP never waits for them. BERT's classifier uses them all.
    """
    texts = [["probe text", "probe"]] * num_texts
    inputs = tokenizer(*texts, return_tensors="pt", padding=True)
    was_training = model.training
    model.eval()  # no dropout: the probe consumes no random numbers
    model(**{k: v for k, v in inputs.items() if k in MODEL_INPUTS}).logits.float().sum().backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in model.named_parameters():
        p.grad = None
        if name in unused:
            p.requires_grad_(False)
    model.train(was_training)
    return unused


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer layers of a Hugging Face encoder (BERT and its relatives: base_model.encoder.layer)."""
    encoder = getattr(model.base_model, "encoder", None)
    return list(getattr(encoder, "layer", None) or getattr(encoder, "layers", None) or [])


def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}).logits.float()


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """AdamW weight decay is off for biases and LayerNorm weights (every 1-d tensor in BERT)."""
    lowered = name.lower()
    return lowered.endswith("bias") or "layernorm" in lowered or "layer_norm" in lowered or param.ndim <= 1


def make_collate(tokenizer, device: torch.device) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Pad each batch to its longest sequence (a multiple of 8 on GPUs, for tensor cores)."""
    from transformers import DataCollatorWithPadding

    pad = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if device.type == "cuda" else None)

    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        return dict(pad(items))  # a plain dict: the loop's to_device walks dicts

    return collate


def listing(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "nothing"


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# Labels


@dataclass
class LabelSpace:
    """Label names in id order, and whether the files hold ids (int) or names (str)."""

    names: list[str]
    kind: str  # "int" or "str"
    multi: bool

    def __post_init__(self):
        self.ids = {name: i for i, name in enumerate(self.names)}

    def encode(self, value: Any) -> Any:
        """A checked raw label -> an id (single label) or a multi-hot list of floats (multi label)."""
        if not self.multi:
            return value if self.kind == "int" else self.ids[value]
        hot = [0.0] * len(self.names)
        for v in value:
            hot[v if self.kind == "int" else self.ids[v]] = 1.0
        return hot


def raw_labels(values, multi: bool, separator: str, column: str, split: str) -> list:
    """Label cells -> ids/names (single) or lists of them (multi); anything else is an error naming the row."""
    out = []
    for row, value in enumerate(values):
        if multi and isinstance(value, str):
            value = [v.strip() for v in value.split(separator) if v.strip()]
        items = value if multi else [value]
        if multi and not isinstance(value, list):
            raise UserError(f"data.label_column {column!r} row {row} of {split} holds {value!r}: multi_label needs a "
                            f"list of labels (json/parquet) or a string like 'a{separator}b' (csv)")
        for item in items:
            if item is None:
                raise UserError(f"data.label_column {column!r} row {row} of {split} has no label")
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise UserError(f"data.label_column {column!r} row {row} of {split} holds {item!r}: labels must be "
                                "integer ids 0..K-1 or label names")
        out.append(value)
    return out


def label_space(train_labels: list, data: BertDataConfig, multi: bool) -> LabelSpace:
    flat = [v for value in train_labels for v in (value if multi else [value])]
    kinds = {type(v).__name__ for v in flat}
    if len(kinds) > 1:
        raise UserError(f"data.label_column {data.label_column!r} mixes integer ids and names in train; use one kind")
    kind = kinds.pop() if kinds else "str"
    if data.labels:
        names = list(data.labels)
    elif kind == "int":
        names = [str(i) for i in range(max(flat) + 1)] if flat else []
    else:
        names = sorted(set(flat))
    if len(names) < (1 if multi else 2):
        raise UserError(f"the training data has {len(names)} distinct label(s) {names}: classification needs at "
                        f"least {1 if multi else 2} (list them in data.labels)")
    return LabelSpace(names, kind, multi)


def check_labels(labels: list, space: LabelSpace, data: BertDataConfig, split: str) -> None:
    known = set(range(len(space.names))) if space.kind == "int" else set(space.names)
    source = "data.labels" if data.labels else "the labels found in train"
    for row, value in enumerate(labels):
        for v in value if space.multi else [value]:
            if v in known and type(v).__name__ == space.kind:
                continue
            if space.kind == "int":
                raise UserError(f"label {v!r} (row {row} of {split}) is not an id 0..{len(space.names) - 1} "
                                f"({len(space.names)} labels from {source})")
            raise UserError(f"label {v!r} (row {row} of {split}) is not one of {source}: "
                            f"{', '.join(space.names[:10])}{' ...' if len(space.names) > 10 else ''}")


# ---------------------------------------------------------------------------------------------
# Data: read, split, tokenize (cached by datasets, so ranks after the first reuse rank 0's work)


@dataclass
class EncodedData:
    train: Any  # datasets.Dataset with input_ids, attention_mask, (token_type_ids), labels
    val: Any
    labels: LabelSpace


def prepare_data(cfg: BertRunConfig, tokenizer) -> EncodedData:
    data: BertDataConfig = cfg.data
    multi = cfg.model.problem_type == "multi_label"
    train, val = split_rows(cfg)
    for ds, split in ((train, "train"), (val, "validation")):
        if len(ds) == 0:
            raise UserError(f"the {split} split has no rows left (check the files, data.drop_labels and "
                            "data.validation_fraction)")
    train_labels = raw_labels(train[data.label_column], multi, data.label_separator, data.label_column, "train")
    val_labels = raw_labels(val[data.label_column], multi, data.label_separator, data.label_column, "validation")
    space = label_space(train_labels, data, multi)
    check_labels(train_labels, space, data, "train")
    check_labels(val_labels, space, data, "validation")
    return EncodedData(tokenize(train, tokenizer, space, cfg), tokenize(val, tokenizer, space, cfg), space)


def split_rows(cfg: Config):
    """The training and validation rows (datasets.Dataset, untokenized) a run trains and evaluates on: the
    validation files, or the seeded validation_fraction of the training files; then max_train_samples."""
    data: BertDataConfig = cfg.data
    multi = cfg.model.problem_type == "multi_label"
    train = drop_rows(read_files(data.train_files, "data.train_files", data), data, multi)
    if data.validation_files:
        val = drop_rows(read_files(data.validation_files, "data.validation_files", data), data, multi)
    else:
        parts = train.train_test_split(test_size=data.validation_fraction, seed=cfg.seed)
        train, val = parts["train"], parts["test"]
    if data.max_train_samples and data.max_train_samples < len(train):
        chosen = random.Random(cfg.seed).sample(range(len(train)), data.max_train_samples)
        train = train.select(sorted(chosen))
    return train, val


def read_files(files: list[str], key: str, data: BertDataConfig):
    """Local files of one format -> one datasets.Dataset, with the configured columns checked."""
    import datasets

    suffixes = set()
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"{key}: {name} does not exist")
        if path.stat().st_size == 0:
            raise UserError(f"{key}: {name} is empty")
        suffixes.add(file_suffix(name, key))
    if len(suffixes) > 1:
        raise UserError(f"{key} mixes file formats ({', '.join(sorted(suffixes))}); use one format")
    builder, options = FORMATS[suffixes.pop()]
    try:
        ds = datasets.load_dataset(builder, data_files=[str(Path(f).resolve()) for f in files], split="train",
                                   cache_dir=data.cache_dir or None, **options)
    except Exception as e:  # noqa: BLE001 - parser errors of every kind become one clear line
        if "corresponds to no data" in str(e):  # datasets' words for a file with a header and no rows
            raise UserError(f"{key}: {', '.join(files)} holds no rows") from None
        raise UserError(f"{key}: cannot read {', '.join(files)} as {builder}: {root_cause(e)}") from None
    if len(ds) == 0:
        raise UserError(f"{key}: {', '.join(files)} holds no rows")
    wanted = list(data.text_columns) + [data.label_column]
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        raise UserError(f"{key}: no column {', '.join(map(repr, missing))} in {', '.join(files)}; its columns are "
                        f"{', '.join(ds.column_names)} (set data.text_columns / data.label_column)")
    return ds.select_columns(wanted)


def file_suffix(name: str, key: str) -> str:
    """The FORMATS key of a file name (.csv, .jsonl, ...), after any compression suffix."""
    lowered = name.lower()
    for suffix in COMPRESSIONS:
        if lowered.endswith(suffix):
            lowered = lowered[: -len(suffix)]
    suffix = Path(lowered).suffix
    if suffix not in FORMATS:
        raise UserError(f"{key}: {name} is not one of {', '.join(FORMATS)} (optionally {', '.join(COMPRESSIONS)})")
    return suffix


def root_cause(error: BaseException) -> str:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {first_line(error)}"


def drop_rows(ds, data: BertDataConfig, multi: bool):
    if not data.drop_labels:
        return ds
    dropped = set(data.drop_labels)
    column = data.label_column

    def keep(batch: dict[str, list]) -> list[bool]:
        out = []
        for value in batch[column]:
            if multi and isinstance(value, str):
                value = value.split(data.label_separator)
            values = value if multi and isinstance(value, list) else [value]
            out.append(not any(str(v).strip() in dropped for v in values))
        return out

    return ds.filter(keep, batched=True, new_fingerprint=fingerprint(ds, "drop", sorted(dropped), column, multi,
                                                                     data.label_separator))


def tokenize(ds, tokenizer, space: LabelSpace, cfg: BertRunConfig):
    """Token ids + encoded labels, computed once per (data, tokenizer, settings) and cached on disk."""
    data: BertDataConfig = cfg.data
    max_length = cfg.model.max_length

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = []
        for column in data.text_columns:
            values = batch[column]
            if any(v is None for v in values):
                raise UserError(f"data.text_columns: column {column!r} has an empty cell; fill or drop such rows")
            texts.append([v if isinstance(v, str) else str(v) for v in values])
        out = dict(tokenizer(*texts, truncation=True, max_length=max_length))
        labels = raw_labels(batch[data.label_column], space.multi, data.label_separator, data.label_column, "data")
        out["labels"] = [space.encode(v) for v in labels]
        return {k: v for k, v in out.items() if k in MODEL_INPUTS or k == "labels"}

    # An explicit fingerprint: hashing the closure (tokenizer state, sets) can differ between
    # processes, and then a rank would re-tokenize instead of reading rank 0's cache.
    key = fingerprint(ds, "tokenize", tokenizer_signature(tokenizer), max_length, list(data.text_columns),
                      data.label_column, data.label_separator, space.names, space.kind, space.multi)
    return ds.map(encode, batched=True, remove_columns=ds.column_names, new_fingerprint=key)


def token_counts(ds) -> list[int]:
    """Tokens per example, read from the Arrow column (no Python lists of token ids are built)."""
    import pyarrow.compute as pc

    return pc.list_value_length(ds.with_format("arrow")["input_ids"]).to_pylist()


def tokenizer_signature(tokenizer) -> list:
    """What identifies a tokenizer on disk: its class, directory and files (name, size, mtime)."""
    path = Path(tokenizer.name_or_path)
    files = [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in sorted(path.iterdir())
             if p.name.startswith(("tokenizer", "vocab", "special_tokens", "added_tokens", "merges"))
             or p.name.endswith(".model")] if path.is_dir() else []
    return [type(tokenizer).__name__, str(path.resolve()), files]


def fingerprint(ds, *parts: Any) -> str:
    text = json.dumps([ds._fingerprint, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Metrics: per-batch sums (reduced across ranks by the loop) -> accuracy, macro-F1


def single_label_sums(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict[str, torch.Tensor]:
    preds = logits.argmax(dim=1)
    classes = torch.arange(num_labels, device=logits.device)
    pred_is = preds[:, None] == classes  # (batch, labels)
    true_is = labels[:, None] == classes
    counts = torch.stack([
        torch.tensor(float(labels.numel()), device=logits.device, dtype=torch.float64),
        F.cross_entropy(logits, labels, reduction="sum").double(),
        (preds == labels).sum().double(),
    ])
    return to_sums(counts, pred_is, true_is)


def multi_label_sums(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict[str, torch.Tensor]:
    pred_is = logits > 0  # sigmoid(logit) > 0.5
    true_is = labels > 0.5
    per_example = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(dim=1)
    counts = torch.stack([
        torch.tensor(float(labels.shape[0]), device=logits.device, dtype=torch.float64),
        per_example.sum().double(),
        (pred_is == true_is).all(dim=1).sum().double(),  # exact match of the whole label set
    ])
    return to_sums(counts, pred_is, true_is)


def to_sums(counts: torch.Tensor, pred_is: torch.Tensor, true_is: torch.Tensor) -> dict[str, torch.Tensor]:
    per_label = torch.stack([(pred_is & true_is).sum(0), (pred_is & ~true_is).sum(0),
                             (~pred_is & true_is).sum(0)]).double()  # (tp/fp/fn, labels), left on the device
    sums = {"samples": counts[0], "loss_sum": counts[1], "correct": counts[2]}
    for i in range(per_label.shape[1]):
        sums[f"tp_{i}"], sums[f"fp_{i}"], sums[f"fn_{i}"] = per_label[0, i], per_label[1, i], per_label[2, i]
    return sums


def make_summarize(names: list[str], multi: bool) -> Callable[[dict[str, float]], dict[str, float]]:
    def summarize(sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("samples", 0.0), 1.0)
        f1 = {}
        for i, name in enumerate(names):
            tp, fp, fn = (sums.get(f"{kind}_{i}", 0.0) for kind in ("tp", "fp", "fn"))
            if tp + fp + fn > 0:  # a label neither present nor predicted is left out of the average
                f1[name] = 2 * tp / (2 * tp + fp + fn)
        metrics = {
            "loss": sums.get("loss_sum", 0.0) / n,
            "accuracy": sums.get("correct", 0.0) / n,
            "macro_f1": sum(f1.values()) / max(len(f1), 1),
        }
        if multi:
            metrics.update({f"f1_{metric_name(name)}": value for name, value in f1.items()})
        metrics["samples"] = int(sums.get("samples", 0))
        return metrics

    return summarize


def metric_name(label: str) -> str:
    return re.sub(r"\W+", "_", label).strip("_") or "label"


def export_pretrained(checkpoint: Checkpoint, out: Path) -> Path:
    """A save_pretrained folder: the run's model configuration (labels, problem type), weights, tokenizer."""
    from dtrain.export import write_safetensors
    from transformers import AutoConfig, AutoModelForSequenceClassification

    quiet_libraries()
    saved, identity = checkpoint.data["config"], checkpoint.data["identity"]
    source = saved["model"]["name_or_path"]
    try:
        hf_config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the run's model configuration in {source} (needed for config.json): "
                        f"{str(e).splitlines()[0]}") from None
    configure_head(hf_config, identity["labels"], saved["model"]["problem_type"], saved["model"]["dropout"])
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(checkpoint, out / "model.safetensors")
    hf_config.architectures = [AutoModelForSequenceClassification._model_mapping[type(hf_config)].__name__]
    hf_config.save_pretrained(out)
    load_tokenizer(source, hf_config).save_pretrained(out)
    return out
