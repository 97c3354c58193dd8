"""Real multi-process runs under torchrun (Gloo on CPU): the distributed-correctness checklist."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import pytest
import torch

from helpers import (FAST, PATCHED_TRAIN, THREADS_AFTER_MAIN, assert_one_clear_error, finish, initial_weights,
                     logged_steps, max_difference, read_checkpoint, records, run_ranks, run_torchrun, run_train,
                     start_ranks, wait_until, weights, write_image_folder)


# Every test here starts Python processes (tests/conftest.py: the two tiers).
pytestmark = pytest.mark.slow

def test_two_ranks_train_evaluate_exactly_and_only_rank0_writes(tiny_images, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "saves.log"
    proc = run_torchrun([*FAST, f"data.root={tiny_images}", f"output_dir={out}", "epochs=2", "batch_size=2"],
                        script=PATCHED_TRAIN, SAVE_LOG=str(log))
    assert proc.returncode == 0, proc.stderr
    saves = [line.split(" ", 1) for line in log.read_text().splitlines()]
    assert saves and {rank for rank, _ in saves} == {"0"}, saves  # rank 1 never called torch.save
    assert {Path(p).name for _, p in saves} == {"step_00000006.pt.tmp", "step_00000012.pt.tmp"}
    evals = records(out, "eval")
    assert [e["samples"] for e in evals] == [7, 7]  # 7 validation images, 2 ranks: none padded, none lost
    last = read_checkpoint(out)
    assert last["state"]["world_size"] == 2 and last["state"]["step"] == 12
    assert not torch.equal(last["rng"][0]["torch"], last["rng"][1]["torch"])  # per-rank seeds
    assert "Traceback" not in proc.stderr and "destroy_process_group" not in proc.stderr


def test_two_ranks_at_half_batch_match_one_process(tmp_path):
    """DDP averages gradients over ranks, so 2 x B/2 must equal 1 x B (up to float summation order)."""
    common = [*FAST, "data.synthetic=true", "data.synthetic_train_size=64", "data.synthetic_val_size=8",
              "max_steps=4", "optim.weight_decay=0"]
    one = run_train([*common, "batch_size=8", f"output_dir={tmp_path / 'one'}"])
    two = run_torchrun([*common, "batch_size=4", f"output_dir={tmp_path / 'two'}"])
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    moved = max_difference(w1, initial_weights())
    gap = max_difference(w1, w2)
    assert moved > 1e-4, "training did not change the weights: the comparison would be vacuous"
    assert gap < 1e-5, f"1-process and 2-rank weights differ by {gap} (tolerance 1e-5; they moved by {moved})"
    # The logged loss is the global mean: the same in both runs.
    loss_one = [r["loss"] for r in records(tmp_path / "one", "train")]
    loss_two = [r["loss"] for r in records(tmp_path / "two", "train")]
    assert len(loss_one) == 4 and loss_two == pytest.approx(loss_one, rel=1e-5)


def test_checkpoints_move_between_modes(tiny_images, tmp_path):
    """single process -> 2-rank DDP -> mode=dp (one device here): each resumes the previous one's last.pt."""
    out = tmp_path / "run"
    args = [*FAST, f"data.root={tiny_images}", f"output_dir={out}", "resume=auto", "batch_size=2"]
    assert run_train([*args, "epochs=1"]).returncode == 0
    ddp = run_torchrun([*args, "epochs=2"])
    assert ddp.returncode == 0, ddp.stderr
    assert "resumed from" in ddp.stdout and "epoch 1, step 12" in ddp.stdout
    dp = run_train([*args, "epochs=3", "mode=dp"])
    assert dp.returncode == 0, dp.stderr
    assert "epoch 2, step 18" in dp.stdout and dp.stdout.count("fewer than 2 GPUs visible") == 1
    steps = [r["step"] for r in records(out, "train")]
    assert steps == list(range(1, 13)) + list(range(13, 19)) + list(range(19, 31))


def test_config_error_under_torchrun_is_printed_once(tmp_path):
    proc = run_torchrun([*FAST, "data.synthetic=true", f"output_dir={tmp_path}", "optim.lrr=0.1"], timeout=120)
    assert_one_clear_error(proc, "unknown config key 'optim.lrr'")


def test_error_on_one_rank_ends_the_job_and_names_the_rank(tmp_path):
    root = write_image_folder(tmp_path / "data", {"train": {"a": 4, "b": 4}, "val": {"a": 1, "b": 1}})
    (root / "train" / "a" / "001.png").write_bytes(b"\x89PNG broken")
    start = time.monotonic()
    proc = run_torchrun([*FAST, f"data.root={root}", f"output_dir={tmp_path / 'out'}", "epochs=3", "batch_size=1"],
                        timeout=180)
    line = assert_one_clear_error(proc, "train/a/001.png")
    assert "[rank " in line
    assert time.monotonic() - start < 120


def test_stop_signal_on_one_rank_saves_once_at_the_same_step_and_exits_3(tmp_path):
    out = tmp_path / "run"
    args = [*FAST, "data.synthetic=true", "data.synthetic_train_size=4096", f"output_dir={out}", "keep_last=5",
            "resume=auto", "batch_size=2", "log_every=1"]
    ranks = start_ranks(args, world_size=2)  # no torchrun: it reports only the first worker to exit
    try:
        wait_until(lambda: logged_steps(out) >= 3, *ranks, what="3 logged steps")
        ranks[1].send_signal(signal.SIGTERM)  # one rank only: the other must learn of it at the same step
    finally:
        rank0, rank1 = finish(ranks)
    assert [rank0.returncode, rank1.returncode] == [3, 3], rank0.stderr + rank1.stderr  # the documented code
    assert "received SIGTERM (rank 1)" in rank1.stdout and "stopped at step" in rank0.stdout, rank0.stdout
    stopped = int(rank0.stdout.split("stopped at step ")[1].split(":")[0])
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"last.pt", f"step_{stopped:08d}.pt"}
    last = read_checkpoint(out)
    assert last["state"]["step"] == stopped and len(last["rng"]) == 2
    again = run_torchrun([*args, f"max_steps={stopped + 2}"])
    assert again.returncode == 0, again.stderr
    steps = [r["step"] for r in records(out, "train")]
    assert steps[-3:] == [stopped, stopped + 1, stopped + 2] and len(steps) == len(set(steps))


def test_no_backend_thread_outlives_the_run(tmp_path):
    """After main() the process group is destroyed with its Gloo threads joined. A Gloo thread still
    alive at interpreter exit can take the GIL while the interpreter finalizes, and CPython's
    pthread_exit then ends in std::terminate: SIGABRT after a finished run."""
    results = run_ranks([*FAST, "data.synthetic=true", "data.synthetic_train_size=64", "max_steps=3",
                         "num_workers=1", f"output_dir={tmp_path}"], script=THREADS_AFTER_MAIN, timeout=120)
    for r in results:
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout.strip().splitlines()[-1])
        assert report == {"exit_code": 0, "threads": ["python"]}, report


def test_a_rank_whose_master_port_never_answers_ends_within_the_timeout(tmp_path):
    """Something else listens on MASTER_PORT and never answers: torch's store handshake would wait forever."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        began = time.monotonic()
        [result] = run_ranks([*FAST, "data.synthetic=true", "max_steps=2", "timeout_s=5", f"output_dir={tmp_path}"],
                             world_size=1, timeout=90, port=squatter.getsockname()[1], RANK="1", WORLD_SIZE="2")
    assert result.returncode == 1
    line = assert_one_clear_error(result, "could not join the process group", "as rank 1/2",
                                  "no answer within timeout_s=5")
    assert time.monotonic() - began < 60, line
