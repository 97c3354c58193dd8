"""One small object per execution mode: how the model is placed, wrapped, synchronised and saved.

    strategy = build_strategy(cfg, env)           # SingleDevice, DataParallel, DDP or FSDP, from env.mode
    model = strategy.wrap(task.model, units)      # what the loop trains; strategy.raw_model owns the weights

The loop, the workloads and the benchmarks use this interface and never ask which mode they are in:
  wrap(model, units)         device, SyncBatchNorm (sync_bn), activation checkpointing of `units`, the mode's wrapper
  eval_model()               what evaluation calls
  sync_buffers()             every rank's buffers (BatchNorm statistics) become rank 0's
  parameters_changed()       after raw_model's parameters were changed in place outside the optimizer (EMA swap)
  no_sync(skip)              skip the gradient reduction of a non-final accumulation micro-step
  zero_grad_to_none          what optimizer.zero_grad(set_to_none=...) should do between steps
  clip_grad_norm(max_norm)   the global gradient norm as a plain tensor (clipped when max_norm > 0)
  checkpoint_part(optimizer) the Checkpointer's model+optimizer part, over the three below
  checkpoint_layout(...)     how a checkpoint is written: one file from rank 0, or a sharded directory
  state_dicts(optimizer)     model and optimizer state keyed by parameter names: the checkpoint format
  load_state_dicts(...)      the reverse; load_target() gives the tensors a sharded checkpoint is read into
  local_bytes(optimizer)     this rank's parameter, gradient and optimizer-state bytes

Checkpoints are one format for all modes (torch.distributed.checkpoint's state-dict API keys the
optimizer state by parameter name, not by position): modes that replicate the model write a single
file from rank 0, FSDP writes a sharded directory from every rank, and every mode loads either.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from dtrain import syncbn
from dtrain.checkpointer import ModelAndOptimizer, OneFile, Sharded
from dtrain.config import Config
from dtrain.dist import DistEnv
from dtrain.errors import ConfigError
from dtrain.optim import grad_norm_and_clip

NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What rank 0 writes into a single file: every tensor whole and in CPU memory; other ranks get {}.
FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


class Strategy:
    """One process, one device: nothing to wrap. The base of the other modes."""

    checkpoint_layout = OneFile  # (env, background) -> how a save is written: rank 0 writes one file
    collective_forward = False  # every forward is a collective: all ranks must run the same number of batches

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.raw_model: nn.Module | None = None  # owns the parameters: what the optimizer steps and checkpoints hold
        self.model: nn.Module | None = None  # what training calls

    def wrap(self, model: nn.Module, units: list[nn.Module]) -> nn.Module:
        model = self.sync_batch_norm(model.to(self.env.device))
        if self.cfg.activation_checkpointing:
            checkpoint_activations(units)
        self.raw_model = model
        self.model = self._wrap(torch.compile(model) if self.cfg.compile else model)
        return self.model

    def _wrap(self, model: nn.Module) -> nn.Module:
        return model

    def sync_batch_norm(self, model: nn.Module) -> nn.Module:
        """sync_bn=true: BatchNorm layers normalise with the statistics of the global batch. Converted before
        wrapping (DDP and FSDP then see SyncBatchNorm modules); modes without ranks refuse it."""
        if not self.cfg.sync_bn:
            return model
        if self.env.world_size < 2:
            raise ConfigError("sync_bn=true needs 2 or more processes (torchrun/srun with DDP or FSDP): one process "
                              "already normalises over its whole batch")
        if not syncbn.has_batch_norm(model):
            raise ConfigError(f"sync_bn=true: {self.cfg.model.describe()} has no BatchNorm "
                              "layer to synchronise; set sync_bn=false")
        return syncbn.convert(model, self.env.device)

    def eval_model(self) -> nn.Module:
        return self.model

    def sync_buffers(self) -> None:
        """Every rank's buffers become rank 0's: each rank's BatchNorm statistics moved on its own batches
        (nothing to do in one process)."""
        broadcast_coalesced(list(self.raw_model.buffers()))

    def parameters_changed(self) -> None:
        """raw_model's parameters were changed in place outside the optimizer (nothing is cached here)."""

    def no_sync(self, skip: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @property
    def zero_grad_to_none(self) -> bool:
        return True  # nothing to zero: the next backward writes fresh gradients

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return grad_norm_and_clip([p.grad for p in self.raw_model.parameters() if p.grad is not None], max_norm)

    def checkpoint_part(self, optimizer: torch.optim.Optimizer) -> ModelAndOptimizer:
        return ModelAndOptimizer(self, optimizer)

    def state_dicts(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
        """Model and optimizer state, whole, on rank 0 (what it writes into one file); {} elsewhere."""
        return get_state_dict(self.raw_model, optimizer, options=FULL_ON_RANK0)

    def load_target(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
        """This rank's tensors, in the checkpoint format, for a sharded checkpoint to be read into."""
        return get_state_dict(self.raw_model, optimizer)

    def load_state_dicts(self, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                         optim_state: dict[str, Any], whole: bool) -> None:
        """Load state dicts in the checkpoint format: whole tensors (a single file) or this rank's part."""
        set_state_dict(self.raw_model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=whole))

    def local_bytes(self, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        """Gradients: what a step's backward writes (one per trainable parameter, this rank's part); between
        steps they are freed (set_to_none) or, under DDP with gradient_as_bucket_view, kept."""
        params = list(self.raw_model.parameters())
        states = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        return {"param_bytes": nbytes(params), "grad_bytes": nbytes(p for p in params if p.requires_grad),
                "optim_bytes": nbytes(states)}


class SingleDevice(Strategy):
    pass


class DataParallel(Strategy):
    """One process drives every visible GPU: each batch is split across them."""

    def _wrap(self, model: nn.Module) -> nn.Module:
        return nn.DataParallel(model)

    def sync_batch_norm(self, model: nn.Module) -> nn.Module:
        if self.cfg.sync_bn:  # its replicas are threads of one process, not ranks of a process group
            raise ConfigError("sync_bn=true does not work with mode=dp (nn.DataParallel): launch one process per "
                              "GPU with torchrun (DDP) instead")
        return model


class DDP(Strategy):
    """One process per device; gradients are all-reduced during backward."""

    def _wrap(self, model: nn.Module) -> nn.Module:
        ddp = self.cfg.ddp
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[self.env.device.index] if self.env.device.type == "cuda" else None,
            bucket_cap_mb=ddp.bucket_cap_mb,
            gradient_as_bucket_view=ddp.gradient_as_bucket_view,
            static_graph=ddp.static_graph,
            find_unused_parameters=ddp.find_unused_parameters,
        )

    def eval_model(self) -> nn.Module:
        """The inner module (DDP's forward would sync buffers and prepare a gradient reduction), with rank
        0's buffers: each rank's BatchNorm statistics moved on its own batches since DDP's last broadcast,
        and every rank should evaluate the model checkpoints hold."""
        self.sync_buffers()
        return self.model.module

    def no_sync(self, skip: bool) -> contextlib.AbstractContextManager:
        return self.model.no_sync() if skip else contextlib.nullcontext()

    @property
    def zero_grad_to_none(self) -> bool:
        """With gradient_as_bucket_view each .grad is a view into DDP's all-reduce bucket, so zeroing it
        in place allocates nothing. Set to None, the next backward allocates a fresh gradient and DDP
        copies it into the bucket, every step (the copy the option exists to avoid). (With
        find_unused_parameters, None keeps unused parameters out of the optimizer step.)"""
        ddp = self.cfg.ddp
        return not (ddp.gradient_as_bucket_view and not ddp.find_unused_parameters)


class FSDP(Strategy):
    """Fully sharded data parallel (FSDP2, fully_shard): each rank keeps 1/N of the parameters, gradients
    and optimizer state; a unit's parameters are all-gathered just before its forward and backward."""

    checkpoint_layout = Sharded  # every rank writes its shards
    collective_forward = True

    def wrap(self, model: nn.Module, units: list[nn.Module]) -> nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        fsdp = self.cfg.fsdp
        if fsdp.cpu_offload and self.env.device.type != "cuda":
            raise ConfigError("fsdp.cpu_offload=true needs GPUs: on the CPU the parameters are in CPU memory already")
        model = self.sync_batch_norm(model.to(self.env.device))
        # FSDP2 shards only contiguous parameters (fully_shard raises NotImplementedError on others), and
        # channels_last gives conv weights NHWC strides: they go back to contiguous. The inputs stay
        # channels_last, which is what makes cuDNN pick its NHWC kernels.
        for p in model.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
        if self.cfg.activation_checkpointing:
            checkpoint_activations(units)
        param_dtype, reduce_dtype = DTYPES[fsdp.param_dtype], DTYPES[fsdp.reduce_dtype]
        offload = CPUOffloadPolicy() if fsdp.cpu_offload else OffloadPolicy()
        if param_dtype != torch.float32:
            # Norm layers compute in fp32 (batch_norm refuses bf16 weights, and low-precision statistics
            # drift) and hand their outputs back in the units' dtype.
            norm_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                               output_dtype=param_dtype)
            for module in model.modules():
                if isinstance(module, NORM_LAYERS) and any(True for _ in module.parameters(recurse=False)):
                    fully_shard(module, mp_policy=norm_policy, reshard_after_forward=fsdp.reshard_after_forward,
                                offload_policy=offload)
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        for unit in units:
            fully_shard(unit, mp_policy=policy, reshard_after_forward=fsdp.reshard_after_forward,
                        offload_policy=offload)
        # torch warns when the root returns a view (SqueezeNet's flatten) because an in-place op on
        # it would skip the pre-backward hook; the loop's loss only reads the output.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        # The root's parameters (embeddings, head) are needed again at once when backward starts.
        fully_shard(model, mp_policy=policy, reshard_after_forward=False, offload_policy=offload)
        self.norm_buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                             for b in m.buffers(recurse=False)]
        if self.norm_buffers:
            model.register_forward_pre_hook(self._broadcast_norm_buffers)
        self.raw_model = model
        self.model = torch.compile(model) if self.cfg.compile else model
        return self.model

    def eval_model(self) -> nn.Module:
        self.sync_buffers()  # as under DDP: every rank evaluates rank 0's statistics
        return self.model

    def sync_buffers(self) -> None:
        broadcast_coalesced(self.norm_buffers)

    def parameters_changed(self) -> None:
        """A unit whose gathered parameters were kept after a forward (the root never frees them; none are
        freed after an evaluation's forward without backward) would use those stale copies in its next
        forward: free them, so the next forward gathers the shards as they are now."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.raw_model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def _broadcast_norm_buffers(self, module: nn.Module, args: Any) -> None:
        """BatchNorm statistics are buffers, which FSDP neither shards nor synchronises: each rank would
        update its own from its own batches. Like DDP, every training forward starts from rank 0's."""
        if module.training:
            broadcast_coalesced(self.norm_buffers)

    @contextlib.contextmanager
    def no_sync(self, skip: bool):
        if not skip:
            yield
            return
        self.raw_model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.raw_model.set_requires_gradient_sync(True)

    def state_dicts(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
        """This rank's shards. Replicated tensors (BatchNorm statistics) are written once, so they are
        made rank 0's first, as DDP saves them."""
        self.sync_buffers()
        return get_state_dict(self.raw_model, optimizer)


def build_strategy(cfg: Config, env: DistEnv, mode: str | None = None) -> Strategy:
    """The strategy of env.mode, or of `mode` ("single" under torchrun: each rank trains a copy of its own)."""
    modes = {"single": SingleDevice, "dp": DataParallel, "ddp": DDP, "fsdp": FSDP}
    return modes[mode or env.mode](cfg, env)


def checkpoint_activations(units: list[nn.Module]) -> None:
    """Recompute each unit's activations during backward instead of keeping them.

    The unit's own forward is replaced on the instance (not wrapped in another module), so parameter
    names, and with them checkpoints, stay as they are, and FSDP's hooks around the unit still run.
    """
    for unit in units:
        unit.forward = functools.partial(checkpoint, unit.forward, use_reentrant=False)


def broadcast_coalesced(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values into every rank's tensors, one broadcast per dtype."""
    if not tensors or not dist.is_initialized() or dist.get_world_size() < 2:
        return  # one rank (FSDP on one GPU): before every forward, a copy in and out of every buffer for nothing
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    with torch.no_grad():
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.broadcast(flat, src=0)
            for t, part in zip(group, flat.split([t.numel() for t in group])):
                t.copy_(part.view_as(t))


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by this rank (a DTensor's local shard)."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)
