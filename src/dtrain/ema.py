"""Model EMA (torchvision's --model-ema): an exponential moving average of the weights, in every mode.

torch's AveragedModel keeps a deep copy of the module, and FSDP2 modules refuse to be deep-copied
("FSDP does not support deepcopy"). So the average is kept as tensors shaped like the trained model's
own parameters and buffers (`strategy.raw_model`): whole tensors in one process, under DataParallel and
DDP, and this rank's shard (a DTensor) under FSDP, where an elementwise average of each shard is exactly
the shard of the average. The update is torch's own EMA function (`get_ema_multi_avg_fn`, a foreach
lerp); evaluation swaps the average into the model's tensors and back.

What torchvision's reference does, restated:
  - the decay is adjusted so that it does not depend on the global batch, the update interval and the
    run's length: alpha = 1 - decay; alpha = min(1, alpha x world size x batch per rank x steps / epochs);
    the decay used is 1 - alpha (here the batch per rank counts its accumulation micro-batches);
  - an update every `steps` optimizer steps; the first update, and every update during the learning-rate
    warm-up, copies the weights instead of averaging them (AveragedModel's n_averaged = 0);
  - buffers (BatchNorm statistics) are averaged too (use_buffers=True); integer buffers are copied.
Every rank holds the same average: buffers are made rank 0's before each update (under DDP each rank's
BatchNorm statistics moved on its own batches; the next forward would broadcast rank 0's anyway).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim.swa_utils import get_ema_multi_avg_fn

from dtrain.config import Config
from dtrain.errors import UserError
from dtrain.strategies import Strategy


def adjusted_decay(cfg: Config, world_size: int) -> float:
    """The decay per update after torchvision's adjustment for world size x batch x steps / epochs."""
    adjust = world_size * cfg.batch_size * cfg.grad_accum_steps * cfg.ema.steps / cfg.epochs
    return 1.0 - min(1.0, (1.0 - cfg.ema.decay) * adjust)


class ModelEMA:
    """The average of `strategy.raw_model`'s parameters and buffers, keyed by their names."""

    def __init__(self, cfg: Config, strategy: Strategy, world_size: int, warmup_steps: int):
        # Taken right after wrapping, before any forward: under FSDP the module's registered parameters are
        # the sharded ones only at rest (a forward may leave gathered ones in their place).
        self.strategy = strategy
        self.model_tensors = dict(strategy.raw_model.named_parameters())
        self.model_tensors.update(strategy.raw_model.named_buffers())
        with torch.no_grad():
            self.tensors = {name: t.detach().clone() for name, t in self.model_tensors.items()}
        self.decay = adjusted_decay(cfg, world_size)
        self.steps = cfg.ema.steps
        self.warmup_steps = warmup_steps
        self.updates = 0  # AveragedModel's n_averaged: 0 = the next update copies
        self.update_fn = get_ema_multi_avg_fn(self.decay)

    @torch.no_grad()
    def start_from_model(self) -> None:
        """The average becomes the model's current weights (a checkpoint without an EMA was loaded)."""
        for name, t in self.tensors.items():
            local(t).copy_(local(self.model_tensors[name]))
        self.updates = 0

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Called after optimizer step `step` (1-based) on every rank."""
        if step % self.steps:
            return
        self.strategy.sync_buffers()
        copy = self.updates == 0 or step <= self.warmup_steps
        averaged, copied = [], []
        for name, average in self.tensors.items():
            pair = (local(average), local(self.model_tensors[name]))
            (averaged if pair[0].is_floating_point() and not copy else copied).append(pair)
        if averaged:
            self.update_fn([a for a, _ in averaged], [m for _, m in averaged], None)
        for average, current in copied:  # all of them when copying; else integer buffers (batch counts)
            average.copy_(current)
        self.updates += 1

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the average inside the block and its own weights again afterwards (bit for bit)."""
        names = list(self.tensors)
        with torch.no_grad():
            kept = [local(self.model_tensors[n]).clone() for n in names]
            self.strategy.parameters_changed()
            for n in names:
                local(self.model_tensors[n]).copy_(local(self.tensors[n]))
        try:
            yield
        finally:
            with torch.no_grad():
                self.strategy.parameters_changed()
                for n, value in zip(names, kept):
                    local(self.model_tensors[n]).copy_(value)

    # Checkpoints: whole tensors in a single file (rank 0), this rank's shards in a sharded checkpoint.

    def whole_state(self, is_main: bool = True) -> dict[str, torch.Tensor]:
        """Whole tensors on the CPU where is_main ({} elsewhere: only rank 0 writes a single file). Every rank
        calls it where the average is sharded (gathering a shard is a collective)."""
        whole = {}
        for n, t in self.tensors.items():
            if isinstance(t, DTensor):
                t = t.full_tensor()
            if is_main:
                whole[n] = t.cpu().clone()
        return whole

    def load_whole(self, state: dict[str, torch.Tensor]) -> None:
        """From whole tensors (a single-file checkpoint); a sharded average takes its own shard of each."""
        missing = sorted(set(self.tensors) - set(state))
        if missing:
            raise UserError(f"the checkpoint's EMA does not fit this model (no {', '.join(missing[:3])})")
        with torch.no_grad():
            for n, t in self.tensors.items():
                whole = state[n].to(local(t).device)
                if isinstance(t, DTensor):  # src_data_rank=None: every rank has the whole tensor, no communication
                    whole = distribute_tensor(whole, t.device_mesh, t.placements, src_data_rank=None)
                local(t).copy_(local(whole))


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded) tensor, sharing its storage."""
    return t.to_local() if isinstance(t, DTensor) else t
