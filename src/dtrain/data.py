"""Samplers and loaders shared by every workload and every mode.

Training always uses a DistributedSampler (world size 1 outside DDP), so one process at batch B
and N processes at batch B/N see the same samples in the same steps. Each training sample is
drawn under its own seed (epoch, index), so random augmentation does not depend on the rank,
the number of workers or where a run was resumed; a transform of a whole batch (MixUp/CutMix) is
drawn under a seed made from its samples' keys. Given the samples' lengths (tokenized text),
training batches group samples of similar length (LengthGroupedSampler). An epoch interrupted under
one world size, batch or accumulation continues under another with the rest of its order dealt over
the new ranks (ResumableSampler.start_resized). Evaluation shards the
validation set without padding, so every sample is counted exactly once.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from dtrain.config import Config
from dtrain.dist import DistEnv

if TYPE_CHECKING:
    from dtrain.workloads.task import Task


@dataclass(frozen=True)
class Layout:
    """How a run cuts an epoch into optimizer steps: processes, samples per micro-batch and micro-batches per step.

    The layout that began an epoch fixes that epoch's sample order (padding, length groups) and its end."""

    world_size: int
    batch_size: int
    grad_accum_steps: int = 1

    @property
    def step_samples(self) -> int:
        return self.world_size * self.batch_size * self.grad_accum_steps


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can begin an epoch part-way through (mid-epoch resume), on any world size.

    The permutation depends only on (seed, epoch), as in DistributedSampler; `skip` drops the
    first samples of this rank's share for the current epoch. It yields (epoch, index) keys for
    EpochSeeded. Its batches (`micro_batches`) are whole optimizer steps of `batch_size` x
    `grad_accum_steps` samples.

    The samples every rank has consumed are a prefix of the epoch's global order (rank r takes
    positions r, r + W, ...). An epoch interrupted under one layout and continued under another
    (`start_resized`) deals the rest of that order, up to where the first layout would have ended the
    epoch, over the new ranks: each remaining sample is trained exactly once.
    """

    def __init__(self, dataset: Dataset, env: DistEnv, seed: int, *, batch_size: int = 1,
                 grad_accum_steps: int = 1):
        super().__init__(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed)
        self.skip = 0
        self.batch_size, self.grad_accum_steps = batch_size, grad_accum_steps
        self.resized: list[list[tuple[int, ...]]] | None = None  # this rank's micro-batches of a resized epoch
        self.resized_ends: list[int] = []  # global samples consumed after each step of the resized rest
        self._plan: list[list[tuple[int, ...]]] | None = None

    @property
    def layout(self) -> Layout:
        return Layout(self.num_replicas, self.batch_size, self.grad_accum_steps)

    def start_epoch(self, epoch: int, skip: int = 0) -> None:
        self.set_epoch(epoch)
        self.skip, self.resized, self._plan = skip, None, None

    def start_resized(self, epoch: int, consumed: int, origin: Layout) -> int:
        """Continue `epoch`, begun under `origin` and `consumed` global samples in, under this sampler's layout.

        The rest of origin's order (up to the end of its last whole step) is cut into global steps of
        this layout; a final part of fewer than world_size x grad_accum_steps samples joins the step
        before it (its micro-batches grow by at most one sample), and each step's samples are dealt as
        DistributedSampler deals them. Returns how many samples could not be given out (fewer than one
        per micro-batch of every rank, and no step to join).
        """
        self.start_epoch(epoch)
        rest = self.order_keys(range(consumed, self.trained_end(origin)), origin)
        step = self.layout.step_samples
        steps = len(rest) // step
        if len(rest) - steps * step >= self.num_replicas * self.grad_accum_steps:
            steps += 1
        ends = [min((s + 1) * step, len(rest)) for s in range(steps)]
        if ends:
            ends[-1] = len(rest)
        self.resized, self.resized_ends, begin = [], [], 0
        for end in ends:
            mine = rest[begin:end][self.rank::self.num_replicas]
            self.resized += split_evenly(mine, self.grad_accum_steps)
            self.resized_ends.append(consumed + end)
            begin = end
        return len(rest) - (ends[-1] if ends else 0)

    def trained_end(self, layout: Layout) -> int:
        """Global position where an epoch under `layout` ends: after its last whole optimizer step."""
        per_rank = self.order_length(layout.world_size) // layout.world_size
        steps = per_rank // layout.batch_size // layout.grad_accum_steps
        return steps * layout.step_samples

    def order_length(self, world_size: int) -> int:
        """Length of the epoch's global order under `world_size` (padded as DistributedSampler pads)."""
        return math.ceil(len(self.dataset) / world_size) * world_size

    def order_keys(self, positions: range, layout: Layout) -> list[tuple[int, ...]]:
        """The keys at `positions` of this epoch's global order under `layout`."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        order = (order * math.ceil(self.order_length(layout.world_size) / len(order)))
        return [(self.epoch, order[p]) for p in positions]

    def position_after(self, steps: int) -> int:
        """Global samples of the epoch consumed once `steps` optimizer steps of this pass are done."""
        if self.resized is not None:
            return self.resized_ends[steps - 1]
        return self.skip * self.num_replicas + steps * self.layout.step_samples

    def micro_batches(self) -> list[list[tuple[int, ...]]]:
        """This rank's micro-batches of the current pass: whole optimizer steps only."""
        if self._plan is None:
            if self.resized is not None:
                self._plan = self.resized
            else:
                keys, size = list(self.rank_keys()), self.batch_size
                batches = [keys[i:i + size] for i in range(0, len(keys) - size + 1, size)]
                self._plan = batches[:len(batches) // self.grad_accum_steps * self.grad_accum_steps]
        return self._plan

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        if self.resized is not None:
            return iter([key for batch in self.resized for key in batch])
        return self.rank_keys()

    def rank_keys(self) -> Iterator[tuple[int, ...]]:
        indices = list(super().__iter__())[self.skip:]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self) -> int:
        if self.resized is not None:
            return sum(len(batch) for batch in self.resized)
        return self.num_samples - self.skip


def split_evenly(items: list, parts: int) -> list[list]:
    """`items` in `parts` consecutive pieces whose sizes differ by at most one (the larger first)."""
    size, extra = divmod(len(items), parts)
    pieces, begin = [], 0
    for part in range(parts):
        end = begin + size + (part < extra)
        pieces.append(items[begin:end])
        begin = end
    return pieces


class PlannedBatches(Sampler[list]):
    """The training loader's batch sampler: the sampler's micro-batches, so that a resized epoch's last
    step may hold fewer (or a few more) samples than batch_size."""

    def __init__(self, sampler: ResumableSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        return iter(self.sampler.micro_batches())

    def __len__(self) -> int:
        if self.sampler.resized is not None:
            return len(self.sampler.resized)
        batches = len(self.sampler) // self.sampler.batch_size
        return batches // self.sampler.grad_accum_steps * self.sampler.grad_accum_steps


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

    def __init__(self, dataset: Dataset, env: DistEnv, seed: int, lengths: Sequence[int], batch_size: int,
                 grad_accum_steps: int = 1):
        super().__init__(dataset, env, seed, batch_size=batch_size, grad_accum_steps=grad_accum_steps)
        if len(lengths) != len(dataset):
            raise ValueError(f"{len(lengths)} lengths for {len(dataset)} samples")
        self.lengths = lengths

    def rank_keys(self) -> Iterator[tuple[int, int]]:
        indices = self.global_order()[self.rank:self.total_size:self.num_replicas][self.skip:]
        return iter([(self.epoch, i) for i in indices])

    def order_keys(self, positions: range, layout: Layout) -> list[tuple[int, ...]]:
        order = self.global_order(layout)
        return [(self.epoch, order[p]) for p in positions]

    def global_order(self, layout: Layout | None = None) -> list[int]:
        """Every rank's samples of this epoch, interleaved as DistributedSampler interleaves them (under
        `layout`'s world size and batch; this sampler's own by default)."""
        layout = layout or self.layout
        total_size = self.order_length(layout.world_size)
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        order = (order * math.ceil(total_size / len(order)))[:total_size]  # DistributedSampler's padding
        step = layout.batch_size * layout.world_size
        full = total_size // step * step
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

    def __init__(self, dataset: Dataset, env: DistEnv, seed: int, repeats: int, *, batch_size: int = 1,
                 grad_accum_steps: int = 1):
        super().__init__(dataset, env, seed, batch_size=batch_size, grad_accum_steps=grad_accum_steps)
        self.repeats = repeats
        self.num_samples = len(dataset) // env.world_size
        self.total_size = self.num_samples * env.world_size

    def order_length(self, world_size: int) -> int:
        return len(self.dataset) // world_size * world_size

    def order_keys(self, positions: range, layout: Layout) -> list[tuple[int, ...]]:
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        at = torch.tensor(positions, dtype=torch.int64)
        keys = zip(order[at // self.repeats].tolist(), (at % self.repeats).tolist())
        return [(self.epoch, index, r) for index, r in keys]

    def rank_keys(self) -> Iterator[tuple[int, int, int]]:
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        # Position p of the repeated sequence is repeat p % k of image order[p // k]; this rank deals p = rank,
        # rank + W, ... (computed, not listed: the repeated sequence of ImageNet has 5 million entries).
        positions = torch.arange(self.rank, self.total_size, self.num_replicas)[self.skip:]
        keys = zip(order[positions // self.repeats].tolist(), (positions % self.repeats).tolist())
        return iter([(self.epoch, index, r) for index, r in keys])


@contextlib.contextmanager
def seeded(seed: int):
    """torch's CPU generator and Python's `random` start from `seed`; both are put back afterwards."""
    # The CPU generator only: torch.manual_seed also seeds every CUDA device (slow, per sample); its state is
    # kept and put back directly (torch.random.fork_rng does the same with several times the Python overhead).
    generator = torch.default_generator
    torch_state, python_state = generator.get_state(), random.getstate()
    generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        generator.set_state(torch_state)


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


def make_loaders(task: Task, cfg: Config, env: DistEnv) -> tuple[DataLoader, ResumableSampler, DataLoader]:
    """The task's training and validation loaders, drawn and transformed as its `loading` options say:
    `lengths` (train, validation) groups batches by length, `ra_reps` > 1 repeats each training sample
    on that many ranks, `batch_transform` acts on whole training batches (MixUp/CutMix)."""
    train_set, val_set, collate_fn = task.train_set, task.val_set, task.collate_fn
    batch_transform, ra_reps, lengths = task.loading.batch_transform, task.loading.ra_reps, task.loading.lengths
    workers = cfg.num_workers
    common = dict(
        num_workers=workers,
        worker_init_fn=functools.partial(ignore_signals, cfg.stop_signals) if workers > 0 else None,
        pin_memory=env.device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    seeded = EpochSeeded(train_set, cfg.seed, task.random_samples)
    steps = dict(batch_size=cfg.batch_size, grad_accum_steps=cfg.grad_accum_steps)
    if ra_reps > 1:
        sampler = RepeatedAugmentationSampler(seeded, env, seed=cfg.seed, repeats=ra_reps, **steps)
    elif lengths is not None:
        sampler = LengthGroupedSampler(seeded, env, cfg.seed, lengths[0], **steps)
    else:
        sampler = ResumableSampler(seeded, env, seed=cfg.seed, **steps)
    train_collate = SeededBatchTransform(collate_fn, batch_transform, cfg.seed) if batch_transform else collate_fn
    # Each loader draws its workers' base seed from a generator of its own whenever an iterator is
    # made. From the global generator, that draw would shift dropout's random stream, and a run
    # resumed mid-epoch (which makes one iterator more) would no longer match an uninterrupted one.
    train_loader = DataLoader(seeded, batch_sampler=PlannedBatches(sampler), collate_fn=train_collate,
                              generator=torch.Generator().manual_seed(cfg.seed), **common)
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
