"""Samplers and loaders shared by every workload and every mode.

Training always uses a DistributedSampler (world size 1 outside DDP), so one process at batch B
and N processes at batch B/N see the same samples in the same steps. Each training sample is
drawn under its own seed (epoch, index), so random augmentation does not depend on the rank,
the number of workers or where a run was resumed. Evaluation shards the validation set without
padding, so every sample is counted exactly once.
"""

from __future__ import annotations

import functools
import random
import signal
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from dtrain.config import Config
from dtrain.dist import DistEnv


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can begin an epoch part-way through (mid-epoch resume).

    The permutation depends only on (seed, epoch), as in DistributedSampler; `skip` drops the
    first samples of this rank's share for the current epoch. It yields (epoch, index) keys for
    EpochSeeded.
    """

    def __init__(self, dataset: Dataset, env: DistEnv, seed: int):
        super().__init__(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed)
        self.skip = 0

    def start_epoch(self, epoch: int, skip: int = 0) -> None:
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.skip:]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class EpochSeeded(Dataset):
    """Item (epoch, i) is dataset[i] computed under a seed of its own, then the RNGs are put back.

    With random_samples=False (a dataset that draws no random numbers, e.g. pre-tokenized text) there is
    nothing to seed: a batch is fetched in one call when the dataset can (``__getitems__``, as
    Hugging Face datasets do: one Arrow read instead of one per row).
    """

    def __init__(self, dataset: Dataset, seed: int, random_samples: bool = True):
        self.dataset, self.seed, self.random_samples = dataset, seed, random_samples

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        if not self.random_samples:
            return self.dataset[index]
        sample_seed = ((self.seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63)
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed also seeds every CUDA device (slow, per sample).
            torch.default_generator.manual_seed(sample_seed)
            random.seed(sample_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        """The DataLoader's batched fetch."""
        fetch_batch = getattr(self.dataset, "__getitems__", None)
        if self.random_samples or fetch_batch is None:
            return [self[key] for key in keys]
        return fetch_batch([index for _, index in keys])


class ShardSampler(Sampler[int]):
    """Rank r takes samples r, r+W, r+2W, ...: no padding, no duplicates (exact evaluation)."""

    def __init__(self, length: int, env: DistEnv):
        self.indices = range(env.rank, length, env.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loaders(train_set: Dataset, val_set: Dataset, collate_fn, cfg: Config, env: DistEnv,
                 random_samples: bool = True) -> tuple[DataLoader, ResumableSampler, DataLoader]:
    workers = cfg.num_workers
    common = dict(
        num_workers=workers,
        worker_init_fn=functools.partial(ignore_signals, cfg.stop_signals) if workers > 0 else None,
        collate_fn=collate_fn,
        pin_memory=env.device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    seeded = EpochSeeded(train_set, cfg.seed, random_samples)
    sampler = ResumableSampler(seeded, env, seed=cfg.seed)
    # Each loader draws its workers' base seed from a generator of its own whenever an iterator is
    # made. From the global generator, that draw would shift dropout's random stream, and a run
    # resumed mid-epoch (which makes one iterator more) would no longer match an uninterrupted one.
    train_loader = DataLoader(seeded, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                              generator=torch.Generator().manual_seed(cfg.seed), **common)
    val_loader = DataLoader(val_set, batch_size=cfg.eval_batch_size or cfg.batch_size,
                            sampler=ShardSampler(len(val_set), env), drop_last=False,
                            generator=torch.Generator().manual_seed(cfg.seed), **common)
    return train_loader, sampler, val_loader


def ignore_signals(names: list[str], worker_id: int) -> None:
    """DataLoader workers inherit the trainer's stop handler, and Slurm or torchrun signal every
    process of the job: the main process decides when to stop, its workers ignore those signals."""
    for name in names:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def worker_failure(error: BaseException) -> str | None:
    """What to tell the user when `error` (or one it arose from) says a DataLoader worker process died."""
    while error is not None:
        text = str(error).strip()
        if isinstance(error, RuntimeError) and "DataLoader worker" in text:
            return (f"a data loading worker process died ({text.splitlines()[0].rstrip('. ')}); if the machine "
                    "ran out of memory (see dmesg), lower num_workers or batch_size; resume=auto continues "
                    "from the last checkpoint")
        error = error.__cause__ or error.__context__
    return None


def to_device(batch, device: torch.device):
    """Tensors inside tuples/lists/dicts go to the device (asynchronously from pinned memory)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
