"""What a workload hands the shared loop: a model, two datasets, and the functions that read its batches.

The loop never looks inside a batch: it moves it to the device, asks ``train_loss`` for a scalar
loss, asks ``eval_sums`` for per-batch sums (reduced across ranks by the loop), and turns the
reduced sums into metrics with ``summarize``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset


@dataclass
class LoaderOptions:
    """A workload's say in its loaders; the defaults are plain shuffled batches."""

    # a random transform of a whole collated training batch (MixUp/CutMix), run under a seed made from the
    # batch's sample keys (data.SeededBatchTransform); None = none
    batch_transform: Callable[[Any], Any] | None = None
    # repeated augmentation: each training sample this many times per epoch (data.RepeatedAugmentationSampler)
    ra_reps: int = 1
    # (train, validation) size of every sample, e.g. its token count: training batches are drawn from
    # samples of similar size and evaluation walks them in size order (data.LengthGroupedSampler);
    # None = uniformly random batches
    lengths: tuple[Sequence[int], Sequence[int]] | None = None


@dataclass
class Task:
    model: nn.Module  # plain (unwrapped) model, on the CPU, seeded identically on every rank
    train_set: Dataset
    val_set: Dataset
    # batch (already on the device) -> mean loss over the batch
    train_loss: Callable[[nn.Module, Any], torch.Tensor]
    # batch -> dict of sums over the batch (scalar tensors); must include "samples"
    eval_sums: Callable[[nn.Module, Any], dict[str, torch.Tensor]]
    # globally reduced sums (scalars as floats, other shapes as CPU tensors; a key may be absent when no rank saw
    # a batch) -> metrics; must include "loss", "accuracy" and "samples"
    summarize: Callable[[dict[str, Any]], dict[str, Any]]
    collate_fn: Callable | None = None
    # whether a training sample draws random numbers (augmentation); if so each one is drawn
    # under a seed of its own (data.EpochSeeded), else batches are fetched without seeding
    random_samples: bool = True
    # what a checkpoint must agree with to be loaded into this model (e.g. arch, num_classes)
    identity: dict[str, Any] = field(default_factory=dict)
    export: Callable[[str], None] | None = None  # rank 0, at the end: export the output_dir's last checkpoint
    # model -> its repeated blocks (ResNet blocks, BERT layers): the units FSDP shards and gathers one at a
    # time and activation checkpointing recomputes; [] = the model as one unit
    units: Callable[[nn.Module], list[nn.Module]] = lambda model: []
    # model-specific parameter grouping hook for the optimizer; None = decay on >=2-d tensors only
    is_no_decay: Callable[[str, nn.Parameter], bool] | None = None
    # parameter name -> whether it belongs to the classifier head (optim.backbone_lr_scale); None = no head known
    is_head: Callable[[str], bool] | None = None
    # how the training loader draws and transforms its batches (data.make_loaders reads it; image: MixUp/CutMix,
    # repeated augmentation; BERT: length grouping)
    loading: LoaderOptions = field(default_factory=LoaderOptions)
    # reduced sums -> (class names, confusion matrix: rows are true classes, columns predictions); None = none
    confusion: Callable[[dict[str, Any]], tuple[list[str], list[list[int]]]] | None = None
