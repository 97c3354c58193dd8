"""Samplers and loaders shared by every workload and every mode.

Training always uses a DistributedSampler (world size 1 outside DDP), so one process at batch B
and N processes at batch B/N see the same samples in the same steps. Evaluation shards the
validation set without padding, so every sample is counted exactly once.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from dtrain.config import Config
from dtrain.dist import DistEnv


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can begin an epoch part-way through (mid-epoch resume).

    The permutation depends only on (seed, epoch), as in DistributedSampler; `skip` drops the
    first samples of this rank's share for the current epoch.
    """

    def __init__(self, dataset: Dataset, env: DistEnv, seed: int):
        super().__init__(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed)
        self.skip = 0

    def start_epoch(self, epoch: int, skip: int = 0) -> None:
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class ShardSampler(Sampler[int]):
    """Rank r takes samples r, r+W, r+2W, ...: no padding, no duplicates (exact evaluation)."""

    def __init__(self, length: int, env: DistEnv):
        self.indices = range(env.rank, length, env.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loaders(train_set: Dataset, val_set: Dataset, collate_fn, cfg: Config, env: DistEnv
                 ) -> tuple[DataLoader, ResumableSampler, DataLoader]:
    workers = cfg.num_workers
    common = dict(
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=env.device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    sampler = ResumableSampler(train_set, env, seed=cfg.seed)
    # Worker seeds come from this generator; seeded per rank so augmentations differ across ranks.
    generator = torch.Generator().manual_seed(cfg.seed + 7919 * env.rank)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                              generator=generator, **common)
    val_loader = DataLoader(val_set, batch_size=cfg.eval_batch_size or cfg.batch_size,
                            sampler=ShardSampler(len(val_set), env), drop_last=False, **common)
    return train_loader, sampler, val_loader


def to_device(batch, device: torch.device):
    """Tensors inside tuples/lists/dicts go to the device (asynchronously from pinned memory)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
