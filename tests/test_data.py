"""Samplers and the loop's use of them: set_epoch every epoch, mid-epoch skip, exact evaluation shards."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from dtrain import loop
from dtrain.config import load_config
from dtrain.data import EpochSeeded, ResumableSampler, ShardSampler
from dtrain.dist import DistEnv
from dtrain.strategies import build_strategy
from dtrain.workloads import Task


def env_of(rank: int, world_size: int) -> DistEnv:
    return DistEnv(mode="ddp" if world_size > 1 else "single", device=torch.device("cpu"), rank=rank,
                   world_size=world_size)


class Numbers(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


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


def test_loop_reshuffles_each_epoch_and_evaluates_every_sample(tmp_path, monkeypatch):
    train, val = Recording(12), Recording(5)
    model = torch.nn.Linear(1, 2)
    task = Task(model=model, train_set=train, val_set=val,
                train_loss=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]),
                eval_sums=lambda m, b: {"samples": torch.tensor(float(len(b[1]))), "loss_sum": torch.tensor(0.0),
                                        "correct1": (m(b[0]).argmax(1) == b[1]).sum()},
                summarize=lambda s: {"loss": 0.0, "accuracy": s["correct1"] / s["samples"],
                                     "samples": int(s["samples"])},
                identity={"workload": "test"})
    monkeypatch.setattr(loop, "build_task", lambda cfg, env: task)
    cfg = load_config(None, [f"output_dir={tmp_path}", "epochs=2", "batch_size=4", "num_workers=0",
                             "progress=false"])
    env = env_of(0, 1)
    metrics = loop.run(cfg, env, build_strategy(cfg, env))
    epochs = [train.seen[:12], train.seen[12:24]]
    assert len(train.seen) == 24 and all(sorted(e) == list(range(12)) for e in epochs)
    assert epochs[0] != epochs[1]  # set_epoch reached the sampler
    # two evaluations of all samples, and the FLOP count's one batch (the first batch_size samples) at the start
    assert metrics["samples"] == 5 and sorted(val.seen) == sorted([0, 1, 2, 3, 4] * 2 + [0, 1, 2, 3])
