"""The BERT workload's config sections (torch-free: read before torch is imported).

Its builder is dtrain.workloads.bert.build; dtrain.workloads registers the two. Whether the model
directory and the data files exist is learnt when the run reads them (exit code 1), not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dtrain.errors import ConfigError
from dtrain.sections import DataSection, ModelSection, opt


@dataclass
class BertModelConfig(ModelSection):
    name_or_path: str = opt("", "local directory with a Hugging Face BERT (config.json, weights) and its tokenizer "
                                "(never downloaded)")
    random_init: bool = opt(False, "untrained model from name_or_path's config.json (no weights file needed; tests)")
    max_length: int = opt(128, "truncate token sequences (a sentence or a pair) to this many tokens")
    problem_type: Literal["single_label", "multi_label"] = opt(
        "single_label", "one label per example (cross-entropy), or a list of labels per example (BCE with logits)")
    dropout: float = opt(-1.0, "hidden, attention and classifier dropout (negative = the model's default)")
    export_pretrained: bool = opt(True, "at the end, save_pretrained() the model and tokenizer to <output_dir>/model")

    def describe(self) -> str:
        return f"model.name_or_path={self.name_or_path}"

    def check(self) -> None:
        if not self.name_or_path:
            raise ConfigError("model.name_or_path is empty: give a local model directory, e.g. "
                              "model.name_or_path=/models/bert-base-uncased (make demo-bert prepares a small one)")


@dataclass
class BertDataConfig(DataSection):
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

    def check(self) -> None:
        if not self.train_files:
            raise ConfigError("data.train_files is empty: give csv/tsv/json/jsonl/parquet files, e.g. "
                              "data.train_files=data/train.csv")
        if len(self.text_columns) not in (1, 2):
            raise ConfigError(f"data.text_columns must name one column (a sentence) or two (a pair), "
                              f"got {len(self.text_columns)}: {self.text_columns}")
        if not self.validation_files and not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError(f"data.validation_fraction must be between 0 and 1 (exclusive) when "
                              f"data.validation_files is empty, got {self.validation_fraction}")
        self.at_least(0, "max_train_samples")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"data.labels lists a name twice: {self.labels}")


def check(model: BertModelConfig, data: BertDataConfig) -> None:
    """What the two sections must agree on."""
    if model.max_length < 2 + len(data.text_columns):
        raise ConfigError(f"model.max_length={model.max_length} leaves no room for text after the special tokens")
