"""async_save=true: checkpoints written in the background, with the guarantees of a synchronous save."""

from __future__ import annotations

import signal

import pytest
import torch

from dtrain.checkpoint import BackgroundWrite, HostCopy, consolidate
from dtrain.errors import UserError
from helpers import (FAST, PATCHED_TRAIN, SYNTH, error_lines, finish, logged_steps, records,
                     run_torchrun, run_train, start, start_ranks, wait_until)
from test_fault_tolerance import (assert_last_checkpoint_loads, mounts, needs_mounts,  # noqa: F401 - fixture
                                  read_only)

ASYNC = ["async_save=true"]


def test_the_host_copy_is_the_state_of_its_step_in_buffers_kept_between_saves():
    weight = torch.arange(6.0).reshape(2, 3)
    state = {"model": {"w": weight}, "optimizer": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}, "step": 3}
    host = HostCopy()
    first = host.take(state)
    weight.add_(100)  # the next training step, while the write of `first` runs
    state["optimizer"]["param_groups"][0]["lr"] = 0.2
    assert torch.equal(first["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert first["optimizer"]["param_groups"][0] == {"lr": 0.1, "betas": (0.9, 0.99)} and first["step"] == 3
    buffer = first["model"]["w"]
    second = host.take(state)
    assert second["model"]["w"] is buffer  # reused: no new host memory per save
    assert torch.equal(buffer, weight)


def test_a_background_failure_is_handed_over_once_by_wait():
    write = BackgroundWrite()

    def failing() -> None:
        raise UserError("could not write checkpoint x: No space left on device")

    write.start(failing)
    with pytest.raises(RuntimeError, match="before the previous one was waited for"):
        write.start(lambda: None)
    failure = write.wait()
    assert isinstance(failure, UserError) and "No space left" in str(failure)
    assert write.wait() is None
    write.start(lambda: 1 / 0)  # not a UserError: still one line, naming what failed
    assert "ZeroDivisionError" in str(write.wait())


def same_position(a: dict, b: dict) -> bool:
    """Train states of two separate runs: equal but for each run's own experiment-tracker run."""
    return {**a, "tracker_run_id": ""} == {**b, "tracker_run_id": ""}


@pytest.mark.slow
def test_background_checkpoints_equal_synchronous_ones(tmp_path):
    """Every saved step, bit for bit: the host copy holds the state of its step, not a later one."""
    args = [*SYNTH, "checkpoint_every=2", "keep_last=100", "max_steps=8", "epochs=1"]
    for name, extra in (("sync", []), ("async", ASYNC)):
        done = run_train([*args, f"output_dir={tmp_path / name}", *extra])
        assert done.returncode == 0, done.stderr
    saved = sorted(p.name for p in (tmp_path / "sync" / "checkpoints").glob("step_*.pt"))
    assert saved == [f"step_{s:08d}.pt" for s in (2, 4, 6, 8)]
    listing = [sorted(p.name for p in (tmp_path / run / "checkpoints").iterdir()) for run in ("sync", "async")]
    assert listing[0] == listing[1] == sorted([*saved, "best.pt", "last.pt"])
    for name in saved:
        a, b = (torch.load(tmp_path / run / "checkpoints" / name, weights_only=True) for run in ("sync", "async"))
        assert same_position(a["state"], b["state"])
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name
        assert all(torch.equal(a["optimizer"]["state"][p][k], b["optimizer"]["state"][p][k])
                   for p in a["optimizer"]["state"] for k in a["optimizer"]["state"][p]), name


@pytest.mark.slow
def test_kill_during_a_background_write_leaves_the_previous_checkpoint(tiny_images, tmp_path):
    out = tmp_path / "run"
    args = [*FAST, f"data.root={tiny_images}", f"output_dir={out}", "checkpoint_every=2", "keep_last=0",
            "resume=auto", "epochs=2", *ASYNC]
    proc = start(args, script=PATCHED_TRAIN, HANG_ON_SAVE="2")  # the step-4 write stops half-way
    ckpt_dir = out / "checkpoints"
    wait_until(lambda: list(ckpt_dir.glob("*.hanging")), proc, what="the second checkpoint write")
    # Training goes on while the write hangs, up to the next save, which waits for it.
    wait_until(lambda: logged_steps(out) >= 6, proc, what="steps 5 and 6 during the write")
    proc.kill()
    proc.communicate()
    assert logged_steps(out) == 6  # the step-6 save waited for the write in flight: no step 7
    assert (ckpt_dir / "last.pt.tmp").exists()  # the half-written file never replaced last.pt
    assert torch.load(ckpt_dir / "last.pt", weights_only=True)["state"]["step"] == 2
    resumed = run_train(args)
    assert resumed.returncode == 0, resumed.stderr
    assert "epoch 0, step 2" in resumed.stdout
    assert f"removed {ckpt_dir / 'last.pt.tmp'}" in resumed.stdout
    assert not list(ckpt_dir.glob("*.tmp"))
    assert torch.load(ckpt_dir / "last.pt", weights_only=True)["state"]["step"] == 12


@pytest.mark.slow
def test_a_stop_signal_waits_for_the_write_in_flight(tmp_path):
    out = tmp_path / "run"
    proc = start([*FAST, "data.synthetic=true", "data.synthetic_train_size=100000", f"output_dir={out}",
                  "checkpoint_every=1", "keep_last=1", *ASYNC])
    wait_until(lambda: logged_steps(out) >= 3, proc, what="3 logged steps")
    proc.send_signal(signal.SIGTERM)
    done = finish([proc], timeout=60)[0]
    assert done.returncode == 3, done.stderr
    stopped = int(done.stdout.split("stopped at step ")[1].split(":")[0])
    ckpt_dir = out / "checkpoints"
    assert torch.load(ckpt_dir / "last.pt", weights_only=True)["state"]["step"] == stopped
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.pt", f"step_{stopped:08d}.pt"]  # pruned after


@pytest.mark.slow
def test_an_error_waits_for_the_write_in_flight(tmp_path):
    """Ctrl-C (not a stop signal: no save of its own) while a slow background write runs: the process ends
    only after the write, and last.pt is that save."""
    out = tmp_path / "run"
    proc = start([*FAST, "data.synthetic=true", "data.synthetic_train_size=100000", f"output_dir={out}",
                  "checkpoint_every=2", "keep_last=0", *ASYNC], script=PATCHED_TRAIN, SLOW_SAVE_S="4")
    ckpt_dir = out / "checkpoints"
    wait_until(lambda: (ckpt_dir / "last.pt.tmp.slow").exists(), proc, what="the first checkpoint write")
    proc.send_signal(signal.SIGINT)
    done = finish([proc], timeout=60)[0]
    assert done.returncode == 130, done.stderr
    assert torch.load(ckpt_dir / "last.pt", weights_only=True)["state"]["step"] == 2
    assert not list(ckpt_dir.glob("*.tmp"))


@pytest.mark.slow
def test_fsdp_background_saves_equal_synchronous_ones_and_resume(tmp_path):
    """Sharded: torch.distributed.checkpoint.async_save on a group of its own, completed by rank 0."""
    out = tmp_path / "run"
    args = [*SYNTH, "mode=fsdp", f"output_dir={out}", "checkpoint_every=2", "keep_last=2", "resume=auto", *ASYNC]
    done = run_torchrun([*args, "max_steps=6"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reference = tmp_path / "sync"
    done = run_torchrun([*SYNTH, "mode=fsdp", f"output_dir={reference}", "checkpoint_every=2", "keep_last=2",
                         "max_steps=6"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Step 4 was written while steps 5 and 6 trained: it must hold step 4's state all the same.
    a, b = (torch.load(consolidate(run / "checkpoints" / "step_00000004", tmp_path / f"{run.name}4.pt"),
                       weights_only=True) for run in (reference, out))
    assert same_position(a["state"], b["state"]) and a["state"]["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    ckpt_dir = out / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best", "last", "step_00000004", "step_00000006"]
    assert (ckpt_dir / "last").resolve().name == "step_00000006"
    resumed = run_torchrun([*args, "max_steps=8"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {ckpt_dir / 'last'}: epoch 0, step 6" in resumed.stdout
    assert [r["step"] for r in records(out, "train")] == list(range(1, 9))


@pytest.mark.slow
@needs_mounts
def test_checkpoints_turning_read_only_stop_both_ranks_with_one_line(tmp_path, mounts):
    """DDP: rank 0's background write fails; rank 1 learns it at the next save, and both stop with its line."""
    out = tmp_path / "run"
    procs = start_ranks([*FAST, "data.synthetic=true", "data.synthetic_train_size=4000", f"output_dir={out}",
                         "checkpoint_every=2", "keep_last=3", *ASYNC])
    wait_until(lambda: len(list((out / "checkpoints").glob("step_*.pt"))) >= 2, *procs, what="two checkpoints")
    read_only(out / "checkpoints", mounts)
    results = finish(procs, timeout=120)
    assert [r.returncode for r in results] == [1, 1], [r.stderr for r in results]
    lines = [line for r in results for line in error_lines(r.stderr)]
    assert len(lines) == 1 and "Read-only file system" in lines[0], [r.stderr for r in results]
    assert not any("Traceback" in r.stderr for r in results)
    assert_last_checkpoint_loads(out / "checkpoints", read_only_mid_save=True)
