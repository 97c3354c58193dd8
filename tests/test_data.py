"""Samplers and the loop's use of them: set_epoch every epoch, mid-epoch skip, exact evaluation shards."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from dtrain import build
from dtrain.config import load_config
from dtrain.data import EpochSeeded, LengthGroupedSampler, ResumableSampler, ShardSampler
from dtrain.strategies import build_strategy
from dtrain.workloads import Task
from helpers import Numbers, env_of

def indices(sampler) -> list[int]:
    return [i for _, i in sampler]


def test_ranks_split_an_epoch_and_epochs_reshuffle():
    samplers = [ResumableSampler(Numbers(10), env_of(r, 2), seed=0) for r in range(2)]
    for s in samplers:
        s.start_epoch(0)
    epoch0 = [indices(s) for s in samplers]
    assert sorted(epoch0[0] + epoch0[1]) == list(range(10))
    for s in samplers:
        s.start_epoch(1)
    assert [indices(s) for s in samplers] != epoch0


def test_skip_resumes_mid_epoch_on_the_same_or_another_world_size():
    one = ResumableSampler(Numbers(12), env_of(0, 1), seed=3)
    one.start_epoch(2)
    full = indices(one)
    one.start_epoch(2, skip=4)
    assert indices(one) == full[4:] and len(one) == 8
    # 4 samples consumed by one process = 2 per rank on two ranks; the rest is the same set.
    two = [ResumableSampler(Numbers(12), env_of(r, 2), seed=3) for r in range(2)]
    for s in two:
        s.start_epoch(2, skip=2)
    assert sorted(indices(two[0]) + indices(two[1])) == sorted(full[4:])


def test_eval_shards_count_every_sample_once():
    shards = [list(ShardSampler(7, env_of(r, 2))) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(7))
    assert [len(s) for s in (ShardSampler(1, env_of(r, 3)) for r in range(3))] == [1, 0, 0]


def test_sample_augmentation_depends_only_on_epoch_and_index():
    class Noise(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(1).item()

    seeded = EpochSeeded(Noise(), seed=1)
    before = torch.get_rng_state()
    first = [seeded[(0, i)] for i in range(4)]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched
    assert [seeded[(0, i)] for i in reversed(range(4))] == first[::-1]  # order does not matter
    assert seeded[(1, 0)] != first[0]  # a new epoch draws new augmentation


def test_seeded_draws_the_same_numbers_and_puts_both_generators_back_even_after_an_error():
    import random

    from dtrain.data import seeded

    torch.manual_seed(3)
    random.seed(3)
    torch_before, python_before = torch.get_rng_state(), random.getstate()
    draws = []
    for _ in range(2):
        with seeded(11):
            draws.append((torch.rand(3), random.random()))
    assert torch.equal(draws[0][0], draws[1][0]) and draws[0][1] == draws[1][1]
    with pytest.raises(KeyError):
        with seeded(12):
            torch.rand(3), random.random()
            raise KeyError("a sample that fails")
    assert torch.equal(torch.get_rng_state(), torch_before) and random.getstate() == python_before


def test_datasets_without_randomness_are_fetched_a_batch_at_a_time_and_unseeded():
    class Rows(Dataset):
        calls: list = []

        def __len__(self):
            return 6

        def __getitem__(self, i):
            return {"x": i}

        def __getitems__(self, indices):
            self.calls.append(list(indices))
            return [{"x": i} for i in indices]

    keys = [(3, 5), (3, 0), (3, 2)]
    plain = EpochSeeded(Rows(), seed=1, random_samples=False)
    assert plain.__getitems__(keys) == [{"x": 5}, {"x": 0}, {"x": 2}] and Rows.calls == [[5, 0, 2]]
    augmented = EpochSeeded(Rows(), seed=1)  # a random dataset keeps its per-sample seeds
    assert augmented.__getitems__(keys) == [{"x": 5}, {"x": 0}, {"x": 2}] and Rows.calls == [[5, 0, 2]]


class Recording(Dataset):
    """Records which index each training epoch asks for."""

    def __init__(self, n: int):
        self.n, self.seen = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.seen.append(i)
        return torch.tensor([float(i)]), torch.tensor(i % 2)


def test_loop_reshuffles_each_epoch_and_evaluates_every_sample(tmp_path):
    train, val = Recording(12), Recording(5)
    model = torch.nn.Linear(1, 2)
    task = Task(model=model, train_set=train, val_set=val,
                train_loss=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]),
                eval_sums=lambda m, b: {"samples": torch.tensor(float(len(b[1]))), "loss_sum": torch.tensor(0.0),
                                        "correct1": (m(b[0]).argmax(1) == b[1]).sum()},
                summarize=lambda s: {"loss": 0.0, "accuracy": s["correct1"] / s["samples"],
                                     "samples": int(s["samples"])},
                identity={"workload": "test"})
    cfg = load_config(None, [f"output_dir={tmp_path}", "epochs=2", "batch_size=4", "num_workers=0",
                             "progress=false"])
    env = env_of(0, 1)
    metrics = build.run(cfg, env, build_strategy(cfg, env), task=task)  # the test's own workload
    epochs = [train.seen[:12], train.seen[12:24]]
    assert len(train.seen) == 24 and all(sorted(e) == list(range(12)) for e in epochs)
    assert epochs[0] != epochs[1]  # set_epoch reached the sampler
    # two evaluations of all samples, and the FLOP count's one batch (the first batch_size samples) at the start
    assert metrics["samples"] == 5 and sorted(val.seen) == sorted([0, 1, 2, 3, 4] * 2 + [0, 1, 2, 3])


# ---------------------------------------------------------------------------------------------
# Length-grouped batches (the BERT workload's data.group_by_length)


def lengths_of(n: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 65, (n,), generator=generator).tolist()


def grouped(n: int, rank: int, world_size: int, batch_size: int, seed: int = 0, lengths=None) -> LengthGroupedSampler:
    return LengthGroupedSampler(Numbers(n), env_of(rank, world_size), seed, lengths or lengths_of(n), batch_size)


def batches_of(sampler, batch_size: int) -> list[list[int]]:
    """What the loader makes of the sampler: consecutive batch_size slices, an incomplete last one dropped."""
    order = indices(sampler)
    return [order[i:i + batch_size] for i in range(0, len(order) // batch_size * batch_size, batch_size)]


def padding_per_sample(batches: list[list[int]], lengths: list[int]) -> float:
    return sum(max(lengths[i] for i in b) - lengths[i] for b in batches for i in b) / sum(map(len, batches))


def test_grouped_ranks_split_the_epoch_like_distributed_sampler():
    for n, world_size in ((400, 2), (403, 3)):  # 403 does not divide by 3: padded as DistributedSampler pads
        plain = [ResumableSampler(Numbers(n), env_of(r, world_size), seed=0) for r in range(world_size)]
        ranks = [grouped(n, r, world_size, batch_size=4) for r in range(world_size)]
        for s in plain + ranks:
            s.start_epoch(0)
        assert [len(s) for s in ranks] == [len(s) for s in plain] == [len(indices(s)) for s in ranks]
        # Every sample once, plus the same number of padding repeats as the plain sampler.
        assert sorted(sum(map(indices, ranks), [])) == sorted(sum(map(indices, plain), []))
        assert set(sum(map(indices, ranks), [])) == set(range(n))
        if n % world_size == 0:  # no padding: the ranks' shares are disjoint
            assert len(set(sum(map(indices, ranks), []))) == n


def test_grouped_batches_pad_little_and_every_rank_gets_the_same_length_group():
    lengths = lengths_of(800)
    ranks = [grouped(800, r, 2, batch_size=8, lengths=lengths) for r in range(2)]
    plain = ResumableSampler(Numbers(800), env_of(0, 2), seed=0)
    for s in ranks + [plain]:
        s.start_epoch(0)
    per_rank = [batches_of(s, 8) for s in ranks]
    assert padding_per_sample(per_rank[0], lengths) < padding_per_sample(batches_of(plain, 8), lengths) / 5
    # Step k: both ranks' batches come from one sorted run of 16, so they need about the same padded length.
    longest = [[max(lengths[i] for i in b) for b in batches] for batches in per_rank]
    assert max(abs(a - b) for a, b in zip(*longest)) <= 4
    assert longest[0][0] == max(lengths)  # the longest batch first: out-of-memory shows at step 1


def test_grouped_order_depends_on_seed_and_epoch_and_reshuffles_batches():
    def epoch(seed: int, number: int) -> list[int]:
        s = grouped(400, 0, 1, batch_size=8, seed=seed)
        s.start_epoch(number)
        return indices(s)

    assert epoch(0, 1) == epoch(0, 1)
    assert epoch(0, 1) != epoch(0, 2) and epoch(0, 1) != epoch(1, 1)
    first = [set(b) for b in batches_of(grouped(400, 0, 1, 8), 8)]  # epoch 0 of a fresh sampler
    again = grouped(400, 0, 1, 8)
    again.start_epoch(1)
    assert sum(set(b) in first for b in batches_of(again, 8)) < len(first) / 2  # new batches, not a new batch order
    # Batches are shuffled, not served in length order megabatch by megabatch (that would be mostly ascents).
    lengths = lengths_of(400)
    longest = [max(lengths[i] for i in b) for b in batches_of(grouped(400, 0, 1, 8, lengths=lengths), 8)]
    assert sum(b > a for a, b in zip(longest, longest[1:])) < 0.7 * (len(longest) - 1)


def test_grouped_skip_resumes_mid_epoch_exactly():
    full = grouped(403, 1, 2, batch_size=4)
    full.start_epoch(3)
    uninterrupted = indices(full)
    for skip in (0, 4, 100, len(uninterrupted)):
        resumed = grouped(403, 1, 2, batch_size=4)
        resumed.start_epoch(3, skip=skip)
        assert indices(resumed) == uninterrupted[skip:] and len(resumed) == len(uninterrupted) - skip


def test_grouped_order_follows_the_global_batch_across_world_sizes():
    one = grouped(400, 0, 1, batch_size=8)
    two = [grouped(400, r, 2, batch_size=4) for r in range(2)]
    for s in [one, *two]:
        s.start_epoch(1)
    assert one.global_order() == two[0].global_order()  # same global batch of 8: same epoch order
    consumed = 3 * 8  # 3 steps of 2 x 4, resumed by one process at batch 8
    for s in two:
        s.start_epoch(1, skip=consumed // 2)
    one.start_epoch(1, skip=consumed)
    assert sorted(indices(one)) == sorted(indices(two[0]) + indices(two[1]))


def test_eval_shards_in_length_order_count_every_sample_once():
    lengths = lengths_of(7)
    shards = [list(ShardSampler(7, env_of(r, 2), lengths)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(7))
    assert all([lengths[i] for i in shard] == sorted(lengths[i] for i in shard) for shard in shards)
