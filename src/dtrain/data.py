"""Samplers and loaders shared by every workload and every mode.

Training always uses a DistributedSampler (world size 1 outside DDP), so one process at batch B
and N processes at batch B/N see the same samples in the same steps. Each training sample is
drawn under its own seed (epoch, index), so random augmentation does not depend on the rank,
the number of workers or where a run was resumed; a transform of a whole batch (MixUp/CutMix) is
drawn under a seed made from its samples' keys. Given the samples' lengths (tokenized text),
training batches group samples of similar length (LengthGroupedSampler). Evaluation shards the
validation set without padding, so every sample is counted exactly once.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import signal
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

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

    def resume_problem(self, world_size: int, batch_size: int) -> str | None:
        """Why a mid-epoch checkpoint of a run with this world size and batch cannot continue here (None: it can).

        The permutation depends only on (seed, epoch), so the consumed samples are the same ones
        whatever the world size (the loop checks that they divide evenly).
        """
        return None


class LengthGroupedSampler(ResumableSampler):
    """ResumableSampler whose batches hold samples of similar length, so dynamic padding pads little.

    The epoch's permutation (seeded by (seed, epoch) and padded as DistributedSampler pads it) is
    cut into megabatches of up to MEGABATCH global batches (batch_size x world size); each
    megabatch is sorted by length and cut into global batches, and the global batches are shuffled
    (the longest goes first, so a batch that does not fit in memory fails at the first step). Rank r
    takes every world-size-th position, as DistributedSampler does: its batch k is a slice of
    global batch k, so all ranks' batches come from one length group and cost about the same. The
    positions left over after the last full global batch stay at the end, where the loader's
    drop_last drops them as before. The order thus depends on (seed, epoch, global batch).
    """

    MEGABATCH = 50  # global batches sorted together (the Hugging Face Trainer groups 50 batches too)

    def __init__(self, dataset: Dataset, env: DistEnv, seed: int, lengths: Sequence[int], batch_size: int):
        super().__init__(dataset, env, seed)
        if len(lengths) != len(dataset):
            raise ValueError(f"{len(lengths)} lengths for {len(dataset)} samples")
        self.lengths, self.batch_size = lengths, batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = self.global_order()[self.rank:self.total_size:self.num_replicas][self.skip:]
        return iter([(self.epoch, i) for i in indices])

    def global_order(self) -> list[int]:
        """Every rank's samples of this epoch, interleaved as DistributedSampler interleaves them."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        order = (order * math.ceil(self.total_size / len(order)))[:self.total_size]  # DistributedSampler's padding
        step = self.batch_size * self.num_replicas
        full = self.total_size // step * step
        megabatch = step * max(1, min(self.MEGABATCH, full // step // 4))
        batches = []
        for start in range(0, full, megabatch):
            group = sorted(order[start:min(start + megabatch, full)], key=self.lengths.__getitem__)
            batches += [group[i:i + step] for i in range(0, len(group), step)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        if batches:
            longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
            batches[0], batches[longest] = batches[longest], batches[0]
        return [i for batch in batches for i in batch] + order[full:]

    def resume_problem(self, world_size: int, batch_size: int) -> str | None:
        step, full = batch_size * world_size, math.ceil(len(self.dataset) / world_size) * world_size
        ours = self.batch_size * self.num_replicas
        if (step, full // step) == (ours, self.total_size // ours):
            return None
        return (f"its run had {world_size} process(es) x batch_size {batch_size}, and batches grouped by length "
                f"(data.group_by_length) follow the global batch: resume with a global batch of {step}, or "
                "from an epoch-end checkpoint")


class RepeatedAugmentationSampler(ResumableSampler):
    """Repeated augmentation (torchvision's --ra-sampler --ra-reps k): each image k times per epoch.

    The epoch's permutation (seed, epoch) is repeated element-wise (a a a b b b ...) and dealt out
    round-robin, so the k copies of an image land on k consecutive ranks (on different ranks when
    world size >= k) and each copy is augmented under a seed of its own: keys are (epoch, index,
    repeat). Each rank takes len(dataset) // world_size samples per epoch, so an epoch is as long
    as without repetition and shows about len(dataset) / k distinct images, k times each.
    (torchvision first rounds the data set down to a multiple of 256; that changes the length of
    an ImageNet epoch by 17 samples per rank on 8 GPUs.) Mid-epoch resume skips as the plain
    sampler does: consumed samples are a prefix of the dealt-out sequence, on any world size.
    """

    def __init__(self, dataset: Dataset, env: DistEnv, seed: int, repeats: int):
        super().__init__(dataset, env, seed)
        self.repeats = repeats
        self.num_samples = len(dataset) // env.world_size
        self.total_size = self.num_samples * env.world_size

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        # Position p of the repeated sequence is repeat p % k of image order[p // k]; this rank deals p = rank,
        # rank + W, ... (computed, not listed: the repeated sequence of ImageNet has 5 million entries).
        positions = torch.arange(self.rank, self.total_size, self.num_replicas)[self.skip:]
        keys = zip(order[positions // self.repeats].tolist(), (positions % self.repeats).tolist())
        return iter([(self.epoch, index, r) for index, r in keys])


@contextlib.contextmanager
def seeded(seed: int):
    """torch's CPU generator and Python's `random` start from `seed`; both are put back afterwards."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only: torch.manual_seed also seeds every CUDA device (slow, per sample).
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


class KeyedItems(list):
    """A batch's samples, carrying the sampler keys they were fetched for (for SeededBatchTransform)."""

    def __init__(self, items, keys: list[tuple[int, ...]]):
        super().__init__(items)
        self.keys = keys


class EpochSeeded(Dataset):
    """Item (epoch, i) is dataset[i] computed under a seed of its own, then the RNGs are put back.

    A key may carry a third number, the repeat of the sample in its epoch (repeated augmentation):
    each repeat is augmented differently. With random_samples=False (a dataset that draws no random
    numbers, e.g. pre-tokenized text) there is nothing to seed: a batch is fetched in one call when the
    dataset can (``__getitems__``, as Hugging Face datasets do: one Arrow read instead of one per row).
    """

    def __init__(self, dataset: Dataset, seed: int, random_samples: bool = True):
        self.dataset, self.seed, self.random_samples = dataset, seed, random_samples

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, ...]):
        if not self.random_samples:
            return self.dataset[key[1]]
        with seeded(self.sample_seed(key)):
            return self.dataset[key[1]]

    def sample_seed(self, key: tuple[int, ...]) -> int:
        epoch, index, *repeat = key
        sample_seed = ((self.seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63)
        for r in repeat:
            sample_seed = (sample_seed * 1_000_033 + r + 1) % (2**63)
        return sample_seed

    def __getitems__(self, keys: list[tuple[int, ...]]) -> KeyedItems:
        """The DataLoader's batched fetch."""
        fetch_batch = getattr(self.dataset, "__getitems__", None)
        if self.random_samples or fetch_batch is None:
            return KeyedItems([self[key] for key in keys], keys)
        return KeyedItems(fetch_batch([key[1] for key in keys]), keys)


class SeededBatchTransform:
    """Collate a batch, then transform it as a whole (MixUp/CutMix) under a seed made from its samples' keys.

    torchvision's MixUp, CutMix and RandomChoice draw from torch's global generator. Here that generator is
    seeded per batch from the keys of its samples (epoch, index[, repeat]), which are the same whatever
    the number of DataLoader workers or where a run was resumed, and differ between ranks; the caller's
    random state is put back afterwards.
    """

    def __init__(self, collate_fn: Callable | None, transform: Callable[[Any], Any], seed: int):
        self.collate_fn = collate_fn or default_collate
        self.transform, self.seed = transform, seed

    def __call__(self, items: KeyedItems):
        batch = self.collate_fn(items)
        batch_seed = (self.seed * 1_000_003 + 7) % (2**63)
        for key in items.keys:
            for part in key:
                batch_seed = (batch_seed * 10_000_019 + part) % (2**63)
        with seeded(batch_seed):
            return self.transform(batch)


class ShardSampler(Sampler[int]):
    """Rank r takes samples r, r+W, r+2W, ...: no padding, no duplicates (exact evaluation).

    Given the samples' lengths, it walks them shortest first instead, so each batch pads little.
    """

    def __init__(self, length: int, env: DistEnv, lengths: Sequence[int] | None = None):
        order = range(length) if lengths is None else sorted(range(length), key=lengths.__getitem__)
        self.indices = order[env.rank::env.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loaders(train_set: Dataset, val_set: Dataset, collate_fn, cfg: Config, env: DistEnv,
                 random_samples: bool = True, *, batch_transform: Callable[[Any], Any] | None = None,
                 ra_reps: int = 1, lengths: tuple[Sequence[int], Sequence[int]] | None = None,
                 ) -> tuple[DataLoader, ResumableSampler, DataLoader]:
    """Training and validation loaders; `lengths` (train, validation) groups batches by length,
    `ra_reps` > 1 repeats each training sample on that many ranks, `batch_transform` acts on whole
    training batches (MixUp/CutMix)."""
    workers = cfg.num_workers
    common = dict(
        num_workers=workers,
        worker_init_fn=functools.partial(ignore_signals, cfg.stop_signals) if workers > 0 else None,
        pin_memory=env.device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    seeded = EpochSeeded(train_set, cfg.seed, random_samples)
    if ra_reps > 1:
        sampler = RepeatedAugmentationSampler(seeded, env, seed=cfg.seed, repeats=ra_reps)
    elif lengths is not None:
        sampler = LengthGroupedSampler(seeded, env, cfg.seed, lengths[0], cfg.batch_size)
    else:
        sampler = ResumableSampler(seeded, env, seed=cfg.seed)
    train_collate = SeededBatchTransform(collate_fn, batch_transform, cfg.seed) if batch_transform else collate_fn
    # Each loader draws its workers' base seed from a generator of its own whenever an iterator is
    # made. From the global generator, that draw would shift dropout's random stream, and a run
    # resumed mid-epoch (which makes one iterator more) would no longer match an uninterrupted one.
    train_loader = DataLoader(seeded, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                              collate_fn=train_collate, generator=torch.Generator().manual_seed(cfg.seed), **common)
    val_sampler = ShardSampler(len(val_set), env, None if lengths is None else lengths[1])
    val_loader = DataLoader(val_set, batch_size=cfg.eval_batch_size or cfg.batch_size, sampler=val_sampler,
                            drop_last=False, collate_fn=collate_fn, generator=torch.Generator().manual_seed(cfg.seed),
                            **common)
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
