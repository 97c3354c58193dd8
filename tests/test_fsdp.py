"""mode=fsdp (FSDP2, fully_shard): the same promises as DDP, with sharded checkpoints.

Real torchrun jobs and plain rank processes, Gloo on the CPU: parity with one process (accumulation
too), exact evaluation with uneven shards, exact resume after a killed worker, resharding to other
world sizes, crash-safe sharded saves, stop signals, moves between modes, and the memory it saves.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from helpers import (FAST, PATCHED_TRAIN, SYNTH, assert_one_clear_error, finish, logged_steps, losses, max_difference,
                     records, run_elastic_killing_worker_1, run_torchrun, run_train, start_ranks, wait_until, weights)


# Every test here starts Python processes (tests/conftest.py: the two tiers).
pytestmark = pytest.mark.slow
# Runs continued with a larger max_steps: a constant lr, as the schedule's length depends on max_steps.
CONSTANT_LR = ["optim.schedule=constant"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, batch 8, 8 steps."""
    out = tmp_path_factory.mktemp("fsdp_reference")
    proc = run_train([*SYNTH, "batch_size=8", "max_steps=8", f"output_dir={out}"])
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("split", [["batch_size=4"], ["batch_size=2", "grad_accum_steps=2"],
                                   ["batch_size=4", "channels_last=true"]],
                         ids=["half-batch", "accumulation", "channels-last"])
def test_two_ranks_match_one_process_and_evaluate_every_sample_once(reference, tmp_path, split):
    proc = run_torchrun([*SYNTH, *split, "max_steps=8", "mode=fsdp", f"output_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr
    gap = max_difference(weights(reference), weights(tmp_path))
    assert gap < 1e-5, f"FSDP and one process differ by {gap} (tolerance 1e-5)"
    assert losses(tmp_path) == pytest.approx(losses(reference), rel=1e-5)
    evals = records(tmp_path, "eval")
    one = records(reference, "eval")
    assert [e["samples"] for e in evals] == [9]  # rank 1 ran a padding batch that was not counted
    assert evals[-1]["loss"] == pytest.approx(one[-1]["loss"], rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "last").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "train_state.pt"]


def test_killed_worker_under_elastic_restart_finishes_identically(tmp_path):
    args = [*SYNTH, "mode=fsdp", "batch_size=2", "checkpoint_every=2", "keep_last=2", "resume=auto",
            "epochs=2", "threads=1", "deterministic=true"]
    reference = tmp_path / "reference"
    assert run_torchrun([*args, f"output_dir={reference}"]).returncode == 0
    out = tmp_path / "elastic"
    done = run_elastic_killing_worker_1(args, out, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout
    assert losses(out) == losses(reference)  # bit for bit
    a, b = weights(reference), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


RESHARDED = [*SYNTH, *CONSTANT_LR, "data.synthetic_train_size=144"]


@pytest.fixture(scope="module")
def one_process_at_batch_12(tmp_path_factory) -> Path:
    """What each resharded run must end at: one process, batch 12, 8 steps (one run for every world size pair)."""
    one = tmp_path_factory.mktemp("one_process_at_batch_12")
    assert run_train([*RESHARDED, "batch_size=12", "max_steps=8", f"output_dir={one}"]).returncode == 0
    return one


@pytest.mark.parametrize("first, then", [((2, 6), (1, 12)), ((1, 12), (2, 6)), ((2, 6), (3, 4))],
                         ids=["2->1", "1->2", "2->3"])
def test_resharding_to_another_world_size_continues_where_one_process_goes(tmp_path, first, then,
                                                                          one_process_at_batch_12):
    """The global batch stays 12; a checkpoint written by N ranks is read by M (DCP reshards it)."""
    common = [*RESHARDED, "resume=auto", f"output_dir={tmp_path / 'run'}", "mode=fsdp"]
    (nproc, batch), (nproc2, batch2) = first, then
    proc = run_torchrun([*common, f"batch_size={batch}", "max_steps=4"], nproc=nproc)
    assert proc.returncode == 0, proc.stderr
    proc = run_torchrun([*common, f"batch_size={batch2}", "max_steps=8"], nproc=nproc2, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout and "step 4" in proc.stdout
    gap = max_difference(weights(one_process_at_batch_12), weights(tmp_path / "run"))
    assert gap < 1e-5, f"resharded run differs from one process by {gap}"


def test_a_crash_inside_a_sharded_save_leaves_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = [*SYNTH, "mode=fsdp", "batch_size=2", "checkpoint_every=2", "keep_last=3", "resume=auto",
            f"output_dir={out}", "max_steps=8"]
    ranks = start_ranks(args, script=PATCHED_TRAIN, HANG_IN_SHARDED_SAVE="2")
    ckpt_dir = out / "checkpoints"
    wait_until(lambda: (ckpt_dir / "step_00000004.tmp.hanging").exists(), *ranks, what="the second save")
    for rank in ranks:
        rank.kill()
    finish(ranks)
    (ckpt_dir / "step_00000004.tmp.hanging").unlink()
    assert (ckpt_dir / "step_00000004.tmp").is_dir()  # written, cut short, never renamed
    assert os.readlink(ckpt_dir / "last") == "step_00000002"
    resumed = run_torchrun(args)
    assert resumed.returncode == 0, resumed.stderr
    assert "epoch 0, step 2" in resumed.stdout and f"removed {ckpt_dir / 'step_00000004.tmp'}" in resumed.stdout
    assert not list(ckpt_dir.glob("*.tmp"))


def test_a_cut_shard_falls_back_to_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = [*SYNTH, "mode=fsdp", "batch_size=4", "checkpoint_every=2", "keep_last=2", "resume=auto",
            f"output_dir={out}"]
    assert run_torchrun([*args, "max_steps=4"]).returncode == 0
    shard = out / "checkpoints" / "step_00000004" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    resumed = run_torchrun([*args, "max_steps=6"])
    assert resumed.returncode == 0, resumed.stderr
    assert "__1_0.distcp is cut short" in resumed.stdout and "trying an older checkpoint" in resumed.stdout
    assert "resumed from" in resumed.stdout and "step 2" in resumed.stdout


def test_a_stop_signal_to_one_rank_saves_a_sharded_checkpoint_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    args = [*SYNTH, "mode=fsdp", "data.synthetic_train_size=4096", "batch_size=2", "resume=auto",
            f"output_dir={out}"]
    ranks = start_ranks(args)
    wait_until(lambda: logged_steps(out) >= 3, *ranks, what="3 logged steps")
    ranks[1].send_signal(signal.SIGTERM)
    rank0, rank1 = finish(ranks)
    assert [rank0.returncode, rank1.returncode] == [3, 3], rank0.stderr + rank1.stderr
    stopped = int(rank0.stdout.split("stopped at step ")[1].split(":")[0])
    assert os.readlink(out / "checkpoints" / "last") == f"step_{stopped:08d}"
    again = run_torchrun([*args, f"max_steps={stopped + 2}"])
    assert again.returncode == 0, again.stderr
    assert f"step {stopped}" in again.stdout


def test_errors_are_one_line_under_fsdp(tmp_path):
    proc = run_torchrun([*SYNTH, "mode=fsdp", "fsdp.cpu_offload=true", f"output_dir={tmp_path / 'a'}"])
    assert_one_clear_error(proc, "fsdp.cpu_offload=true needs GPUs")
    proc = run_torchrun([*SYNTH, "mode=fsdp", "optim.lr=1e30", f"output_dir={tmp_path / 'b'}"])
    assert_one_clear_error(proc, "non-finite loss or gradient at step")
    proc = run_train([*SYNTH, "mode=fsdp", f"output_dir={tmp_path / 'c'}"])
    assert_one_clear_error(proc, "mode=fsdp needs a launcher")


def test_checkpoints_move_between_ddp_fsdp_and_one_process(tmp_path):
    out = tmp_path / "run"
    args = [*SYNTH, *CONSTANT_LR, "batch_size=4", "resume=auto", f"output_dir={out}"]
    assert run_torchrun([*args, "max_steps=4"]).returncode == 0
    fsdp = run_torchrun([*args, "mode=fsdp", "max_steps=8"])
    assert fsdp.returncode == 0, fsdp.stderr
    assert "last.pt: epoch 0, step 4" in fsdp.stdout
    single = run_train([*args, "batch_size=8", "max_steps=12"])
    assert single.returncode == 0, single.stderr
    assert "checkpoints/last: epoch" in single.stdout and "step 8" in single.stdout
    assert sorted(losses(out)) == list(range(1, 13))
    reference = tmp_path / "reference"
    assert run_train([*SYNTH, *CONSTANT_LR, "batch_size=8", "max_steps=12",
                      f"output_dir={reference}"]).returncode == 0
    assert max_difference(weights(reference), weights(out)) < 1e-5


def test_each_rank_holds_about_half_the_state_at_two_ranks(tmp_path):
    """Parameters and optimizer state per rank, from each rank's own tensors: FSDP <= 0.55 x DDP."""
    args = [*FAST, "data.synthetic=true", "model.arch=resnet18", "model.dropout=-1", "optim.name=adamw", "max_steps=2"]
    held = {}
    for mode in ("ddp", "fsdp"):
        proc = run_torchrun([*args, f"mode={mode}", f"output_dir={tmp_path / mode}"])
        assert proc.returncode == 0, proc.stderr
        memory = records(tmp_path / mode, "memory")[-1]
        held[mode] = [p + o for p, o in zip(memory["param_mb"], memory["optim_mb"])]
    assert all(f <= 0.55 * d for f, d in zip(held["fsdp"], held["ddp"])), held
    assert min(held["ddp"]) > 50  # resnet18: 11.7M parameters and two AdamW moments, ~134 MB
