"""Resume on another world size, batch or accumulation mid-epoch: the rest of the epoch is dealt over the new
ranks, every sample of the epoch trained exactly once (samplers in-process here; real runs at the end)."""

from __future__ import annotations

from collections import Counter

import pytest

from dtrain.data import Layout, LengthGroupedSampler, RepeatedAugmentationSampler, ResumableSampler
from helpers import Numbers, env_of


def make(kind: str, n: int, rank: int, layout: Layout):
    env, steps = env_of(rank, layout.world_size), dict(batch_size=layout.batch_size,
                                                        grad_accum_steps=layout.grad_accum_steps)
    if kind == "plain":
        return ResumableSampler(Numbers(n), env, seed=5, **steps)
    if kind == "grouped":
        lengths = [(i * 37) % 61 + 1 for i in range(n)]
        return LengthGroupedSampler(Numbers(n), env, 5, lengths, **steps)
    return RepeatedAugmentationSampler(Numbers(n), env, seed=5, repeats=3, **steps)


def ranks(kind: str, n: int, layout: Layout) -> list:
    return [make(kind, n, r, layout) for r in range(layout.world_size)]


def first_steps(samplers, steps: int) -> list[tuple[int, ...]]:
    """The keys every rank trains in its first `steps` optimizer steps of the current pass."""
    micro = steps * samplers[0].grad_accum_steps
    return [key for s in samplers for batch in s.micro_batches()[:micro] for key in batch]


def steps_of(samplers) -> int:
    counts = {len(s.micro_batches()) for s in samplers}
    assert len(counts) == 1, f"ranks would take different numbers of steps: {counts}"  # a hang under DDP
    return counts.pop() // samplers[0].grad_accum_steps


@pytest.mark.parametrize("kind", ["plain", "grouped", "repeated"])
@pytest.mark.parametrize("layouts", [
    (Layout(2, 4), Layout(3, 4), Layout(1, 4)),  # the consumed counts do not divide by 3
    (Layout(4, 2, 2), Layout(3, 3, 1), Layout(2, 1, 3)),  # batch and accumulation change too
    (Layout(2, 5), Layout(3, 5), Layout(9, 5)),  # a last part of 5 < 9 x 1 samples joins the step before it
])
def test_resized_epochs_train_every_sample_of_the_epoch_exactly_once(kind, layouts):
    n, epoch = 203, 4
    origin, second, third = layouts
    uninterrupted = ranks(kind, n, origin)
    for s in uninterrupted:
        s.start_epoch(epoch)
    whole = Counter(first_steps(uninterrupted, steps_of(uninterrupted)))
    first = 3  # steps trained under the origin layout, then a save and a resize
    consumed = uninterrupted[0].position_after(first)
    trained = first_steps(uninterrupted, first)
    middle = ranks(kind, n, second)
    for s in middle:
        s.start_resized(epoch, consumed, origin)
    assert steps_of(middle) >= 2
    trained += first_steps(middle, 2)
    consumed = middle[0].position_after(2)
    last = ranks(kind, n, third)
    left_out = [s.start_resized(epoch, consumed, origin) for s in last]
    assert left_out == [0] * third.world_size
    trained += first_steps(last, steps_of(last))
    assert Counter(trained) == whole
    assert last[0].position_after(steps_of(last)) == last[0].trained_end(origin)


def test_same_layout_continues_exactly_as_before():
    layout = Layout(2, 4, 2)
    full, resumed = ranks("grouped", 203, layout), ranks("grouped", 203, layout)
    for a, b in zip(full, resumed):
        a.start_epoch(1)
        b.start_epoch(1, skip=a.position_after(3) // 2)
        assert b.micro_batches() == a.micro_batches()[3 * 2:]


def test_a_rest_smaller_than_one_sample_per_micro_batch_is_left_out_and_said():
    origin = Layout(1, 4)
    sampler = make("plain", 10, 0, origin)  # 2 steps of 4: the epoch trains 8 samples
    sampler.start_epoch(0)
    late = ranks("plain", 10, Layout(3, 1, 2))
    assert [s.start_resized(0, 4, origin) for s in late] == [4] * 3  # 4 left, 3 ranks x 2 micro-batches needed
    assert all(s.micro_batches() == [] for s in late)
