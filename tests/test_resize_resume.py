"""Resume on another world size, batch or accumulation mid-epoch: the rest of the epoch is dealt over the new
ranks, every sample of the epoch trained exactly once (samplers in-process here; real runs at the end)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from dtrain import ledger
from dtrain.data import Layout, LengthGroupedSampler, RepeatedAugmentationSampler, ResumableSampler
from helpers import PATCHED_TRAIN, SYNTH, Numbers, env_of, finish, kill_session, start_ranks, wait_until


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


# 96 samples; 2 ranks x batch 2 save at step 5 (20 samples consumed: 3 does not divide it), 3 ranks x 2 at step 10.
RESIZED = [*SYNTH, "batch_size=2", "epochs=2", "checkpoint_every=5", "keep_last=2", "resume=auto",
           "record_samples=true", "threads=1"]


def kill_in_second_save(args: list[str], world_size: int, out: Path, hang: str) -> None:
    """Run `world_size` ranks until the second checkpoint save blocks (after the steps since the first were
    trained and recorded), then SIGKILL every rank: the first save is what is left."""
    for marker in (out / "checkpoints").glob("*.hanging"):  # the previous attempt's
        marker.unlink()
    procs = start_ranks(args, world_size, script=PATCHED_TRAIN, **{hang: "2"})
    try:
        wait_until(lambda: list((out / "checkpoints").glob("*.hanging")), *procs, timeout=180,
                   what="the second checkpoint save")
    finally:
        for proc in procs:
            kill_session(proc)
    finish(procs)


@pytest.mark.slow
@pytest.mark.parametrize("mode, hang", [("ddp", "HANG_ON_SAVE"), ("fsdp", "HANG_IN_SHARDED_SAVE")])
def test_killed_and_resumed_on_3_then_1_ranks_trains_every_sample_of_each_epoch_once(tmp_path, mode, hang, capsys):
    out = tmp_path / "run"
    args = [*RESIZED, f"mode={mode}", f"output_dir={out}"]
    kill_in_second_save(args, 2, out, hang)  # saved at step 5; steps 6-10 trained, then lost
    assert max(ledger.read(out)[0]["step"]) == 10
    kill_in_second_save(args, 3, out, hang)  # resumed at step 5 on 3 ranks, saved at step 10, lost 11-15
    assert sorted(ledger.read(out)) == [0, 1, 2]
    done = finish(start_ranks(args, 1), timeout=240)[0]  # one process (a world of 1 in this mode) from step 10
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout and "step 10" in done.stdout
    assert "remaining samples after 50 are dealt over 1 process(es)" in done.stdout
    rows = ledger.read(out)
    for epoch in (0, 1):
        seen = Counter(i for r in rows.values() for i in r["index"][r["epoch"] == epoch].tolist())
        assert seen == Counter(range(96)), f"epoch {epoch}: not every sample exactly once"
    steps = sorted(set(rows[0]["step"].tolist()))
    assert steps == list(range(1, 34 + 48))  # no step lost, none recorded twice: 33 steps, then 48 at batch 2
    # Steps 6-10 ran on 3 ranks (the 2-rank attempt was rolled back): 6 samples a step, 2 on each.
    at_7 = ledger.samples_at(out, 7)
    assert sorted(at_7) == [0, 1, 2] and all(len(v) == 2 for v in at_7.values())
    assert ledger.main([str(out), "--step", "7", "--rank", "1"]) == 0
    assert capsys.readouterr().out == f"rank 1 epoch 0 step 7: {' '.join(map(str, at_7[1]))}\n"
