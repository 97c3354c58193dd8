"""What a user sees while a job runs: hang reports naming the rank that stopped, per-rank timing with the
straggler named, profiler traces of the requested steps, model FLOPs. Real processes, Gloo on the CPU."""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch

from helpers import (FAST, PATCHED_TRAIN, error_lines, finish, logged_steps, records, run_torchrun, start_ranks,
                     wait_until)


# Every test here starts Python processes (tests/conftest.py: the two tiers).
pytestmark = pytest.mark.slow
LONG = [*FAST, "data.synthetic=true", "data.synthetic_train_size=100000", "data.num_classes=4"]


def test_a_stopped_rank_is_named_in_a_hang_report_and_when_the_job_gives_up(tmp_path):
    out = tmp_path / "run"
    args = [*LONG, "hang_report_s=5", "timeout_s=30", "checkpoint_every=2", "resume=auto", f"output_dir={out}"]
    ranks = start_ranks(args)
    wait_until(lambda: logged_steps(out) >= 3, *ranks, what="3 logged steps")
    ranks[1].send_signal(signal.SIGSTOP)  # a process that stops answering without dying
    stopped = time.monotonic()
    try:
        wait_until(lambda: (out / "hang" / "rank0.txt").exists(), ranks[0], timeout=15, what="rank 0's stack file")
        reported = time.monotonic() - stopped
        rank0 = finish([ranks[0]], timeout=30 + 30)[0]
        ended = time.monotonic() - stopped
    finally:
        ranks[1].kill()  # SIGKILL ends a stopped process too
        finish([ranks[1]])
    assert reported < 15
    report = [line for line in rank0.stderr.splitlines() if line.startswith("hang report")]
    assert len(report) == 1 and "rank 1 silent for" in report[0], rank0.stderr
    last = json.loads((out / "heartbeat" / "rank1.json").read_text())
    assert f"last heard at step {last['step']} in {last['phase']}" in report[0]
    assert 'File "' in rank0.stderr  # this process's Python stack follows the report
    assert "rank 0 (pid" in (out / "hang" / "rank0.txt").read_text() and "dtrain/loop.py" in (
        out / "hang" / "rank0.txt").read_text()
    assert rank0.returncode == 1 and ended < 30 + 30
    [line] = error_lines(rank0.stderr)
    assert "rank 1 silent for" in line and "timeout_s=30" in line
    resumed = run_torchrun([*args, "max_steps=8"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout


def test_a_rank_slow_to_load_data_is_named_the_straggler_with_data_as_the_cause(tmp_path):
    out = tmp_path / "run"
    ranks = start_ranks([*LONG, "log_every=2", "max_steps=14", f"output_dir={out}"], script=PATCHED_TRAIN,
                        SLOW_DATA_RANK="1", SLOW_DATA_S="0.08")
    rank0, rank1 = finish(ranks, timeout=240)
    assert rank0.returncode == 0 and rank1.returncode == 0, rank0.stderr + rank1.stderr
    windows = records(out, "train")[1:]  # the first window includes start-up
    assert all(w["slowest_rank"] == 1 for w in windows), windows
    assert all(w["data_ms"][1] > w["data_ms"][0] + 200 for w in windows), windows  # 4 samples x 80 ms
    assert all(w["slowest_behind"] > 0.2 for w in windows), windows
    assert "warning: rank 1 is a straggler" in rank0.stdout and "waiting for data" in rank0.stdout, rank0.stdout
    assert "more DataLoader workers" in rank0.stdout


def test_the_profiler_traces_exactly_the_requested_steps_on_every_rank(tmp_path):
    out = tmp_path / "run"
    proc = run_torchrun([*LONG, "max_steps=6", "profile.start_step=3", "profile.steps=2", f"output_dir={out}"])
    assert proc.returncode == 0, proc.stderr
    for rank in (0, 1):
        [trace] = (out / "profile").glob(f"rank{rank}.*.pt.trace.json")
        names = {e.get("name", "") for e in json.loads(trace.read_text())["traceEvents"]}
        assert {n for n in names if n.startswith("dtrain step")} == {"dtrain step 3", "dtrain step 4"}
        assert {n for n in names if n.startswith("ProfilerStep#")} == {"ProfilerStep#0", "ProfilerStep#1"}
        assert any(n.startswith("aten::conv") for n in names)  # the model's own operators are in it


def test_train_records_report_achieved_flops_and_mfu(tmp_path):
    from torch.utils.flop_counter import FlopCounterMode
    from torchvision.models import get_model

    out = tmp_path / "run"
    proc = run_torchrun([*LONG, "max_steps=4", "log_every=2", "peak_tflops=0.5", f"output_dir={out}"])
    assert proc.returncode == 0, proc.stderr
    model = get_model("squeezenet1_1", weights=None, num_classes=4, dropout=0.0).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 32, 32))
    per_sample = 3 * counter.get_total_flops()  # forward, and backward at twice the forward
    for record in records(out, "train"):
        expected = per_sample * record["samples_per_sec"] / 2 / 1e12
        assert record["tflops_per_device"] == pytest.approx(expected, rel=1e-6)
        assert record["mfu"] == pytest.approx(expected / 0.5, rel=1e-6)
