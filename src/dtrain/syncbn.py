"""sync_bn=true: BatchNorm over the global batch, on GPUs (torch's nn.SyncBatchNorm) and on CPUs (here).

torch's nn.SyncBatchNorm refuses CPU tensors (its statistics kernels, batch_norm_stats and the rest,
exist for GPUs only) and DDP refuses it in a CPU model. On the CPU the same result comes from three
all-reduced sums per channel (sum, sum of squares, count), with the gradient flowing back through the
all-reduce, whose backward is another all-reduce: the gradient of every rank's loss reaches every
rank's inputs, as in torch's own backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of every rank's batch together, for CPU tensors (Gloo).

    Not an nn.SyncBatchNorm: DDP refuses those on the CPU. Same parameters, buffers and state dict keys as
    the BatchNorm it replaces, so checkpoints move between sync_bn=true and false.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size(self.process_group) == 1:
            return super().forward(input)
        return self._cpu_forward(input)

    def _cpu_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        # float64 sums: the variance as E[x^2] - E[x]^2 would lose digits in float32.
        wide = x.double()
        local = torch.cat([wide.sum(dims), (wide * wide).sum(dims),
                           torch.full((1,), x.numel() / channels, dtype=torch.float64)])
        total = AllReduceSum.apply(local, self.process_group or dist.group.WORLD)
        count = total[-1]
        mean = total[:channels] / count
        var = total[channels:2 * channels] / count - mean * mean  # biased: what normalises the batch
        self._update_running_stats(mean.detach(), var.detach(), count.item())
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale, shift = scale * self.weight.double(), shift * self.weight.double() + self.bias.double()
        shape = [1, channels] + [1] * (x.dim() - 2)
        return x * scale.to(x.dtype).view(shape) + shift.to(x.dtype).view(shape)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        """As F.batch_norm does: the unbiased variance goes into running_var."""
        if not self.track_running_stats:
            return
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        unbiased = var * count / max(count - 1, 1)
        self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)


class AllReduceSum(torch.autograd.Function):
    """A sum over the ranks whose gradient is the sum of every rank's gradient (each rank's loss depends on
    every rank's inputs through it)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


def convert(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer becomes torch's nn.SyncBatchNorm, or on the CPU a CPUSyncBatchNorm (sharing its
    parameters and buffers, as torch's conversion does)."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if isinstance(model, nn.modules.batchnorm._BatchNorm) and not isinstance(model, CPUSyncBatchNorm):
        synced = CPUSyncBatchNorm(model.num_features, model.eps, model.momentum, model.affine,
                                  model.track_running_stats)
        if model.affine:
            synced.weight, synced.bias = model.weight, model.bias
        if model.track_running_stats:
            synced.running_mean, synced.running_var = model.running_mean, model.running_var
            synced.num_batches_tracked = model.num_batches_tracked
        synced.train(model.training)
        return synced
    for name, child in model.named_children():
        model.add_module(name, convert(child, device))
    return model


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
