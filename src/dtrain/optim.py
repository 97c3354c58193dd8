"""Optimizer with decay/no-decay parameter groups, and a per-step LR schedule (warmup, then decay)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from dtrain.config import OptimConfig
from dtrain.errors import UserError


def build_optimizer(model: nn.Module, cfg: OptimConfig,
                    is_no_decay: Callable[[str, nn.Parameter], bool] | None = None,
                    is_head: Callable[[str], bool] | None = None) -> torch.optim.Optimizer:
    """Biases and norm weights (1-d tensors) get no weight decay unless cfg.decay_norm_and_bias; with
    cfg.backbone_lr_scale != 1, parameters outside the classifier head get lr x that scale (fine-tuning)."""
    is_no_decay = is_no_decay or (lambda name, p: p.ndim <= 1)
    if cfg.backbone_lr_scale != 1.0 and is_head is None:
        raise UserError("optim.backbone_lr_scale needs a workload that names its classifier head (workload=image)")
    by_kind: dict[tuple[bool, bool], list[nn.Parameter]] = {}  # (decays, backbone) -> parameters
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (is_no_decay(name, p) and not cfg.decay_norm_and_bias)
        backbone = cfg.backbone_lr_scale != 1.0 and not is_head(name)
        by_kind.setdefault((decays, backbone), []).append(p)
    # The (decay, no decay) pair always exists, in this order: checkpoints of plain runs keep their layout.
    order = [(True, False), (False, False), (True, True), (False, True)]
    groups = [{"params": by_kind.get(key, []), "weight_decay": cfg.weight_decay if key[0] else 0.0,
               "lr": cfg.lr * (cfg.backbone_lr_scale if key[1] else 1.0)}
              for key in order if key in by_kind or not key[1]]
    fused = True if cfg.fused else None  # None: torch picks its default (foreach)
    try:
        if cfg.name == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=False, fused=fused)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
    except RuntimeError as e:  # e.g. parameters on a device without fused kernels
        raise UserError(f"optim.fused=true is not available here ({str(e).splitlines()[0]}); "
                        "set optim.fused=false") from None


def warmup_steps(cfg: OptimConfig, steps_per_epoch: int) -> int:
    """Warm-up length in optimizer steps (optim.warmup_steps, or optim.warmup_epochs of this run's epochs)."""
    return cfg.warmup_steps or round(cfg.warmup_epochs * steps_per_epoch)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based)."""
    warmup = warmup_steps(cfg, steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.gamma ** (step // max(1, cfg.step_epochs * steps_per_epoch))
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    # A closure (not a callable object): LambdaLR then stores only counters in its state_dict,
    # which keeps checkpoints loadable with weights_only=True.
    def factor(step: int) -> float:
        return lr_factor(step, cfg, total_steps, steps_per_epoch)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
