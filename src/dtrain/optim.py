"""Optimizer with decay/no-decay parameter groups, and a per-step LR schedule (warmup, then decay)."""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from dtrain.config import OptimConfig
from dtrain.errors import ConfigError


def build_optimizer(model: nn.Module, cfg: OptimConfig,
                    is_no_decay: Callable[[str, nn.Parameter], bool] | None = None,
                    is_head: Callable[[str], bool] | None = None,
                    say: Callable[[str], None] = print) -> torch.optim.Optimizer:
    """Biases and norm weights (1-d tensors) get no weight decay unless cfg.decay_norm_and_bias; with
    cfg.backbone_lr_scale != 1, parameters outside the classifier head get lr x that scale (fine-tuning).

    cfg.fused: the fused step where every parameter's device and dtype has the kernels, else torch's
    default implementation (foreach on CUDA, a per-tensor loop on the CPU), said once through `say`.
    """
    is_no_decay = is_no_decay or (lambda name, p: p.ndim <= 1)
    if cfg.backbone_lr_scale != 1.0 and is_head is None:
        raise ConfigError("optim.backbone_lr_scale needs a workload that names its classifier head (workload=image)")
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
    fused = None  # torch's default implementation
    if cfg.fused:
        kinds = set((p.device, p.dtype, getattr(p, "device_mesh", None)) for ps in by_kind.values() for p in ps)
        missing = next((kind for kind in sorted(kinds, key=str) if not fused_step_works(cfg.name, *kind)), None)
        if missing is None:
            fused = True
        else:
            sharded = " sharded" if missing[2] is not None else ""
            say(f"optim: no fused {cfg.name} step for{sharded} {missing[1]} parameters on {missing[0]}; using torch's "
                "default implementation")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=False, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


@functools.cache
def fused_step_works(name: str, device: torch.device, dtype: torch.dtype, mesh=None) -> bool:
    """Whether this torch build steps a fused SGD/AdamW on a parameter of this device and dtype.

    torch checks only at the first step (a RuntimeError mid-run), so one step on a one-element
    parameter finds out before training starts. FSDP's parameters are DTensors on `mesh`, whose
    ops need a sharding rule of their own (torch 2.14 has one for fused AdamW, none for fused SGD);
    a replicated one-element DTensor asks that without any communication.
    """
    probe = torch.zeros(1, device=device, dtype=dtype)
    if mesh is not None:
        from torch.distributed.tensor import DTensor, Replicate
        probe = DTensor.from_local(probe, mesh, [Replicate()], run_check=False)
    probe.requires_grad_(True)
    probe.grad = torch.zeros_like(probe)
    optimizer = torch.optim.SGD([probe], lr=0.1, momentum=0.9, fused=True) if name == "sgd" else \
        torch.optim.AdamW([probe], lr=0.1, fused=True)
    try:
        optimizer.step()
    except (RuntimeError, NotImplementedError):
        return False
    return True


def grad_norm_and_clip(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The global 2-norm of `grads` as a plain fp32 tensor; with max_norm > 0 the gradients are scaled
    so that it is at most max_norm (as torch's clip_grad_norm_ does, without a host sync).

    The norm is also the loop's non-finite check (one inf or nan gradient makes it inf or nan), so it
    must cost little: one multi-tensor norm per device and dtype (torch._foreach_norm, accumulating in
    fp32 whatever the gradients' dtype) and one norm of those. torch's get_total_norm adds a `.to` per
    gradient before its `stack` (about 100 extra small ops per step for bert-base), and on DTensors
    each of those goes through DTensor's Python dispatch.
    """
    if not any(isinstance(g, DTensor) for g in grads):
        return local_norm_and_clip(grads, max_norm)
    shards = shards_on_their_mesh(grads)
    if shards is not None:
        return sharded_norm_and_clip(grads[0].device_mesh, shards, max_norm)
    norm = nn.utils.get_total_norm(grads)  # other layouts (replicated, CPU-offloaded shards): torch's way
    if max_norm > 0:
        nn.utils.clip_grads_with_norm_(grads, max_norm, norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def local_norm_and_clip(grads: list[torch.Tensor], max_norm: float, squares_reduced=None) -> torch.Tensor:
    """`grad_norm_and_clip` of plain tensors; `squares_reduced(sum of squares)` makes the sum global first."""
    groups = by_device_and_dtype(grads)
    if not groups:
        return torch.zeros(())
    first_device = grads[0].device
    norms = [torch.linalg.vector_norm(torch.stack(torch._foreach_norm(group, 2, dtype=torch.float32)))
             for group in groups.values()]
    norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]))
    if squares_reduced is not None:
        norm = squares_reduced(norm.square()).sqrt()
    if max_norm > 0:
        # Multiplying by a factor clamped to 1 instead of asking `if norm > max_norm` keeps the host
        # from waiting for the device.
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for (device, _), group in groups.items():
            torch._foreach_mul_(group, factor.to(device))
    return norm


def shards_on_their_mesh(grads: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """FSDP2's gradients: DTensors on one 1-d mesh, sharded (each element on exactly one rank), whose shards
    live on the mesh's device type (not CPU-offloaded). Their local shards (each to_local is an op: once), or
    None for any other layout."""
    from torch.distributed.tensor import Shard

    meshes = {g.device_mesh for g in grads if isinstance(g, DTensor)}  # equal meshes, not one object
    if len(meshes) != 1 or not all(isinstance(g, DTensor) for g in grads):
        return None
    mesh = meshes.pop()
    if mesh.ndim != 1 or not all(isinstance(g.placements[0], Shard) for g in grads):
        return None
    shards = [g.to_local() for g in grads]
    return shards if all(s.device.type == mesh.device_type for s in shards) else None


def sharded_norm_and_clip(mesh, shards: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The norm from every rank's own shards: a local norm and one all-reduce of its square (a sum over
    disjoint parts is the square of the whole's norm); clipping scales the shards in place."""
    import torch.distributed as dist

    group = mesh.get_group()

    def summed_over_ranks(squares: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(squares, group=group)
        return squares

    return local_norm_and_clip(shards, max_norm, summed_over_ranks)


def by_device_and_dtype(tensors: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    return groups


def keep_implementation(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A checkpoint's optimizer state with this run's implementation (fused or torch's default) in its groups.

    Loading takes every group setting from the checkpoint, "fused" and "foreach" included: a
    checkpoint written with optim.fused=false would switch the fused kernels off, and one written
    where they exist would fail at the first step on a device without them. Setting them before the
    load also places the step counters where this implementation keeps them.
    """
    ours = [{key: group[key] for key in ("fused", "foreach")} for group in optimizer.param_groups]
    return {**state, "param_groups": [{**saved, **mine} for saved, mine in zip(state["param_groups"], ours)]}


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
