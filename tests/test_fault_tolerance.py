"""Jobs die: resumed runs continue as if never stopped, checkpoints are never corrupted, nothing hangs."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from helpers import (FAST, PATCHED_TRAIN, assert_one_clear_error, assert_same_run, error_lines, finish, logged_steps,
                     read_checkpoint, run_bounded, run_elastic_killing_worker_1, run_torchrun, run_train, start,
                     start_ranks, wait_until)

# Augmentation on (random crops + flips) and a DataLoader worker: exactness must not rely on either being off.
EXACT = [*FAST, "data.augment=true", "data.min_crop_scale=0.5", "num_workers=1", "threads=1",
         "deterministic=true", "epochs=2", "checkpoint_every=2", "keep_last=2", "resume=auto", "batch_size=2"]


@pytest.mark.parametrize("model_args", [
    [],
    # dropout draws from the global generator: only exact if nothing else (e.g. making a DataLoader
    # iterator) draws from it in a different place in a resumed run
    ["model.dropout=0.5", "num_workers=0"],
], ids=["no-dropout", "dropout"])
@pytest.mark.slow
def test_killed_mid_epoch_and_resumed_equals_uninterrupted(tiny_images, tmp_path, model_args):
    args = [*EXACT, f"data.root={tiny_images}", *model_args]
    reference = tmp_path / "reference"
    assert run_train([*args, f"output_dir={reference}"]).returncode == 0
    out = tmp_path / "interrupted"
    proc = start([*args, f"output_dir={out}"])
    wait_until(lambda: logged_steps(out) >= 9, proc, what="step 9 (mid-epoch 2)")
    proc.kill()  # SIGKILL: no chance to save; the step-8 checkpoint (mid-epoch) is what is left
    proc.communicate()
    resumed = run_train([*args, f"output_dir={out}"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "epoch 1" in resumed.stdout
    assert_same_run(reference, out)


@pytest.mark.slow
def test_sigkill_of_one_worker_under_elastic_restart_finishes_identically(tiny_images, tmp_path):
    args = [*EXACT, f"data.root={tiny_images}", "num_workers=0", "batch_size=1"]
    reference = tmp_path / "reference"
    assert run_torchrun([*args, f"output_dir={reference}"]).returncode == 0
    out = tmp_path / "elastic"
    done = run_elastic_killing_worker_1(args, out)
    stdout, stderr = done.stdout, done.stderr
    assert done.returncode == 0, stderr
    assert "resumed from" in stdout
    assert_same_run(reference, out)


@pytest.mark.slow
def test_kill_during_checkpoint_write_leaves_a_loadable_checkpoint(tiny_images, tmp_path):
    out = tmp_path / "run"
    args = [*FAST, f"data.root={tiny_images}", f"output_dir={out}", "checkpoint_every=2", "keep_last=0",
            "resume=auto", "epochs=2"]
    proc = start(args, script=PATCHED_TRAIN, HANG_ON_SAVE="2")
    ckpt_dir = out / "checkpoints"
    wait_until(lambda: list(ckpt_dir.glob("*.hanging")), proc, what="the second checkpoint write")
    proc.kill()
    proc.communicate()
    assert (ckpt_dir / "last.pt.tmp").exists()  # the half-written file never replaced last.pt
    last = torch.load(ckpt_dir / "last.pt", weights_only=True)
    assert last["state"]["step"] == 2
    resumed = run_train(args)
    assert resumed.returncode == 0, resumed.stderr
    assert "epoch 0, step 2" in resumed.stdout
    assert f"removed {ckpt_dir / 'last.pt.tmp'}" in resumed.stdout
    assert not list(ckpt_dir.glob("*.tmp"))


@pytest.mark.slow
def test_nonfinite_loss_stops_with_a_clear_error_or_skips(tiny_images, tmp_path):
    args = [*FAST, f"data.root={tiny_images}", "optim.lr=1e30", "epochs=1"]
    proc = run_train([*args, f"output_dir={tmp_path / 'stop'}"])
    assert_one_clear_error(proc, "non-finite loss or gradient at step", "nonfinite_loss=skip")
    proc = run_train([*args, f"output_dir={tmp_path / 'skip'}", "nonfinite_loss=skip"])
    assert proc.returncode == 0, proc.stderr
    assert "step skipped" in proc.stdout


def test_a_nonfinite_step_read_later_is_still_named_exactly():
    # On GPUs the loop reads the record only at log steps, checkpoints and epoch ends (no host sync
    # per step); the error must still name the first bad step, not the step where it was read.
    from dtrain.errors import UserError
    from dtrain.loop import NonfiniteWatch

    watch = NonfiniteWatch(torch.device("cpu"))
    assert not watch.deferred  # on the CPU nothing runs ahead: the loop reads it after every step
    for step, norm in enumerate([1.0, 3.0], start=1):
        watch.record(torch.tensor(norm), step)
    watch.raise_if_seen(epoch=0)  # all finite: nothing to say
    for step, norm in enumerate([float("inf"), 2.0, float("nan")], start=3):
        watch.record(torch.tensor(norm), step)
    with pytest.raises(UserError, match=r"at step 3 \(epoch 1\)"):
        watch.raise_if_seen(epoch=1)


@pytest.mark.slow
def test_second_signal_exits_at_once_even_while_saving(tmp_path):
    out = tmp_path / "run"
    proc = start([*FAST, "data.synthetic=true", "data.synthetic_train_size=100000", f"output_dir={out}",
                  "stop_signals=SIGUSR1"], script=PATCHED_TRAIN, HANG_ON_SAVE="1")
    wait_until(lambda: logged_steps(out) >= 2, proc, what="2 logged steps")
    proc.send_signal(signal.SIGUSR1)  # first: stop at the next step and save (the save hangs half-way)
    wait_until(lambda: list((out / "checkpoints").glob("*.hanging")), proc, what="the stop checkpoint write")
    proc.send_signal(signal.SIGUSR1)  # second: exit now
    done = finish([proc], timeout=60)[0]
    assert done.returncode == -signal.SIGUSR1  # the signal's default action, not a saved stop (3)
    assert not (out / "checkpoints" / "last.pt").exists()  # the half-written file was never renamed


@pytest.mark.slow
def test_stop_signal_single_process_saves_and_exits_3(tmp_path):
    out = tmp_path / "run"
    proc = start([*FAST, "data.synthetic=true", "data.synthetic_train_size=100000", f"output_dir={out}"])
    wait_until(lambda: logged_steps(out) >= 2, proc, what="2 logged steps")
    proc.send_signal(signal.SIGTERM)
    done = finish([proc], timeout=60)[0]
    stdout = done.stdout
    assert done.returncode == 3
    stopped = int(stdout.split("stopped at step ")[1].split(":")[0])
    assert read_checkpoint(out)["state"]["step"] == stopped


@pytest.mark.slow
def test_signal_to_the_whole_process_group_is_handled_once_by_the_trainer(tmp_path):
    """Slurm and terminals signal every process, DataLoader workers included: only the trainer acts."""
    out = tmp_path / "run"
    proc = start([*FAST, "data.synthetic=true", "data.synthetic_train_size=100000", f"output_dir={out}",
                  "num_workers=2"])
    wait_until(lambda: logged_steps(out) >= 2, proc, what="2 logged steps")
    os.killpg(proc.pid, signal.SIGTERM)
    done = finish([proc], timeout=60)[0]
    stdout, stderr = done.stdout, done.stderr
    assert done.returncode == 3, stderr
    assert stdout.count("received SIGTERM") == 1
    assert "DataLoader worker" not in stderr


# ---------------------------------------------------------------------------------------------
# The file system fails under a save: real mounts (root only), as users meet them


def mount(*args: str) -> None:
    """mount(8), tried again a few times: another test session changing mounts at that moment makes it fail."""
    import time

    for attempt in range(5):
        done = run_bounded(["mount", *args], 30)
        if done.returncode == 0:
            return
        time.sleep(0.5)
    pytest.fail(f"mount {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")


@pytest.fixture
def mounts():
    """Mount points made by a test; unmounted afterwards (lazily, in case a process still has a file open).
    Its tests are marked needs_mounts: root and mount(8) make a real full or read-only file system."""
    made: list[Path] = []
    yield made
    for point in reversed(made):
        run_bounded(["umount", "-l", str(point)], 30)


needs_mounts = pytest.mark.needs_root("mount")


def read_only(folder: Path, mounts: list[Path]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    mount("--bind", str(folder), str(folder))
    mounts.append(folder)
    mount("-o", "remount,ro,bind", str(folder))


def assert_last_checkpoint_loads(ckpt_dir: Path, read_only_mid_save: bool = False) -> int:
    """last.pt loads weights-only, and is the newest step file; no temporary file is left. Returns its step.

    read_only_mid_save: the folder turned read-only during a save. The save may have renamed its
    step file into place and then failed to link last.pt (the new step file must then load too), and
    the temporary file it was writing cannot be removed until the folder is writable again (the next
    run's start removes it).
    """
    last = torch.load(ckpt_dir / "last.pt", weights_only=True)
    steps = sorted(ckpt_dir.glob("step_*.pt"))
    newer = [p for p in steps if int(p.stem[5:]) > last["state"]["step"]]
    assert torch.load(steps[-1], weights_only=True)["state"]["step"] == int(steps[-1].stem[5:])
    assert not newer or (read_only_mid_save and len(newer) == 1), list(ckpt_dir.iterdir())
    assert (ckpt_dir / f"step_{last['state']['step']:08d}.pt").is_file()
    tmps = [p.name for p in ckpt_dir.glob("*.tmp")]
    assert not tmps or (read_only_mid_save and len(tmps) == 1), list(ckpt_dir.iterdir())
    return last["state"]["step"]


@pytest.mark.slow
@needs_mounts
@pytest.mark.parametrize("save", [[], ["async_save=true"]], ids=["synchronous", "background"])
def test_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, mounts, save):
    disk = tmp_path / "disk"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk))  # room for a few checkpoints of ~2.9 MB
    mounts.append(disk)
    out = disk / "run"
    proc = run_train([*FAST, "data.synthetic=true", "data.synthetic_train_size=400", f"output_dir={out}",
                      "checkpoint_every=1", "keep_last=100", "max_steps=40", *save])
    line = assert_one_clear_error(proc, "could not write checkpoint", "no space left on the device",
                                  "the previous checkpoint is untouched")
    assert proc.returncode == 1, line
    assert assert_last_checkpoint_loads(out / "checkpoints") >= 1


@pytest.mark.slow
@needs_mounts
def test_checkpoints_turning_read_only_mid_run_stop_both_ranks_with_one_line(tmp_path, mounts):
    out = tmp_path / "run"
    procs = start_ranks([*FAST, "data.synthetic=true", "data.synthetic_train_size=4000", f"output_dir={out}",
                         "checkpoint_every=2", "keep_last=3"])
    wait_until(lambda: len(list((out / "checkpoints").glob("step_*.pt"))) >= 2, *procs, what="two checkpoints")
    read_only(out / "checkpoints", mounts)
    results = finish(procs, timeout=120)
    assert [r.returncode for r in results] == [1, 1], [r.stderr for r in results]
    lines = [line for r in results for line in error_lines(r.stderr)]
    assert len(lines) == 1 and "Read-only file system" in lines[0], [r.stderr for r in results]
    assert not any("Traceback" in r.stderr for r in results)
    assert_last_checkpoint_loads(out / "checkpoints", read_only_mid_save=True)


@pytest.mark.slow
@needs_mounts
@pytest.mark.parametrize("spoil", ["read-only", "a file"])
def test_an_unwritable_checkpoint_folder_is_refused_before_training(tmp_path, mounts, spoil):
    out = tmp_path / "run"
    if spoil == "read-only":
        read_only(out / "checkpoints", mounts)
    else:
        out.mkdir()
        (out / "checkpoints").write_text("not a folder")
    proc = run_train([*FAST, "data.synthetic=true", f"output_dir={out}", "max_steps=4"])
    assert_one_clear_error(proc, str(out / "checkpoints"),
                           "Read-only file system" if spoil == "read-only" else "is a file where a folder belongs")
    assert not (out / "metrics.jsonl").exists()  # refused before the first step


@pytest.mark.slow
def test_a_killed_data_loading_worker_is_one_line_and_leaves_no_process(tmp_path):
    import psutil

    out = tmp_path / "run"
    proc = start([*FAST, "data.synthetic=true", "data.synthetic_train_size=100000", f"output_dir={out}",
                  "num_workers=2"])
    wait_until(lambda: logged_steps(out) >= 2, proc, what="2 logged steps")
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2, workers
    workers[0].kill()  # as the kernel's out-of-memory killer would
    done = finish([proc], timeout=90)[0]
    assert done.returncode == 1
    assert_one_clear_error(done, "a data loading worker process died", "lower num_workers or batch_size")
    psutil.wait_procs(workers, timeout=30)  # the other worker ends too (it would hold the job open under srun)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


@pytest.mark.slow
def test_ctrl_c_outside_the_stop_signals_is_one_line_without_a_traceback(tmp_path):
    out = tmp_path / "run"
    proc = start([*FAST, "data.synthetic=true", "data.synthetic_train_size=100000", f"output_dir={out}"])
    wait_until(lambda: logged_steps(out) >= 2, proc, what="2 logged steps")
    proc.send_signal(signal.SIGINT)
    done = finish([proc], timeout=60)[0]
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("interrupted: nothing saved since the last checkpoint")
    assert "Traceback" not in done.stderr
