"""Which job a stopped run requeues, and what it does when it cannot (no Slurm needed: a stand-in scontrol)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtrain.stopping import REQUEUE_ME, requeue_slurm_job, slurm_requeue_target


def fake_scontrol(folder: Path, exit_code: int = 0, message: str = "") -> Path:
    """An `scontrol` that records its arguments in folder/calls and answers as told."""
    folder.mkdir(exist_ok=True)
    script = folder / "scontrol"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {folder / 'calls'}\necho '{message}' >&2\nexit {exit_code}\n")
    script.chmod(0o755)
    return folder


def test_an_array_task_requeues_itself_not_the_array():
    # The task whose SLURM_JOB_ID is the array's own id: `scontrol requeue 70` would put back every task.
    env = {"SLURM_JOB_ID": "70", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "1"}
    assert slurm_requeue_target(env) == "70_1"
    assert slurm_requeue_target({"SLURM_JOB_ID": "71"}) == "71"


def test_requeue_names_the_task_to_scontrol(tmp_path):
    bin_dir = fake_scontrol(tmp_path / "bin")
    done = requeue_slurm_job({"SLURM_JOB_ID": "70", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "1",
                              "PATH": str(bin_dir)})
    assert (done.line, done.exit_code) == ("requeued Slurm job 70_1", 3)
    assert (bin_dir / "calls").read_text() == "requeue 70_1\n"


@pytest.mark.parametrize("case", ["missing", "failing"])
def test_without_a_working_scontrol_the_run_asks_the_batch_script(tmp_path, case):
    path = str(tmp_path / "empty") if case == "missing" else str(
        fake_scontrol(tmp_path / "bin", 1, "slurm_requeue error: Unable to contact slurm controller"))
    flag = tmp_path / "requeue-me"
    done = requeue_slurm_job({"SLURM_JOB_ID": "9", "PATH": path, "DTRAIN_REQUEUE_FILE": str(flag)})
    assert done.exit_code == REQUEUE_ME == 4
    assert ("scontrol is not on PATH" if case == "missing" else "Unable to contact slurm controller") in done.line
    assert "exiting with code 4 so that the batch script requeues the job" in done.line
    assert flag.read_text().strip() == "4"  # for the torchrun scripts, where torchrun hides the exit code


def test_a_job_that_cannot_be_requeued_says_so_in_one_line(tmp_path):
    bin_dir = fake_scontrol(tmp_path / "bin", 1, "Requeue of JobId=9 returned an error: Requested operation is "
                                                  "presently disabled")
    done = requeue_slurm_job({"SLURM_JOB_ID": "9", "PATH": str(bin_dir)})
    assert done.exit_code == 3  # the batch shell would be refused as well
    assert "submitted without --requeue" in done.line and "presently disabled" in done.line


def test_a_heterogeneous_job_is_left_to_its_batch_script(tmp_path):
    bin_dir = fake_scontrol(tmp_path / "bin")
    done = requeue_slurm_job({"SLURM_JOB_ID": "9", "SLURM_HET_SIZE": "2", "PATH": str(bin_dir)})
    assert done.exit_code == REQUEUE_ME and "heterogeneous Slurm job 9" in done.line
    assert not (bin_dir / "calls").exists()
