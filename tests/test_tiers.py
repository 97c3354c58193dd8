"""The two test tiers (tests/conftest.py): what counts as starting a Python process, and that an unmarked test
doing so fails with the marker to add while a `slow` one may."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import fast_tier_guard, starts_python


@pytest.mark.parametrize("command", [
    [sys.executable, "-c", "pass"], ["torchrun", "--nproc_per_node=2", "train.py"], "python -c pass",
    ["ip", "netns", "exec", "h1", "python3", "train.py"], ["launch/ddp.sh", "--config", "c.yaml"],
    ["make", "-s", "demo"], ["sbatch", "slurm/cpu.sbatch"], ["tests/patched_train.py"]])
def test_python_and_its_launchers_count(command):
    assert starts_python(command)


@pytest.mark.parametrize("command", [["true"], ["scontrol", "requeue", "70_1"], ["mount", "-t", "tmpfs"], "ls -l"])
def test_other_programs_do_not(command):
    assert not starts_python(command)


class Item:
    """What the guard reads of a pytest item."""

    def __init__(self, slow: bool):
        self.nodeid = "tests/test_x.py::test_y"
        self.slow = slow

    def get_closest_marker(self, name):
        return pytest.mark.slow.mark if name == "slow" and self.slow else None


def test_an_unmarked_test_starting_python_fails_with_the_marker_to_add():
    # This test is itself unmarked: conftest's own guard is around it (what this checks is a second one).
    before = subprocess.Popen.__init__
    with fast_tier_guard(Item(slow=False)):
        with pytest.raises(pytest.fail.Exception, match=r"test_y starts a Python process .*@pytest.mark.slow"):
            subprocess.run([sys.executable, "-c", "pass"])
        assert subprocess.run(["true"]).returncode == 0  # other programs start
    assert subprocess.Popen.__init__ is before  # put back, also after a failure inside
    with fast_tier_guard(Item(slow=True)):
        assert subprocess.Popen.__init__ is before  # a slow test starts what it likes
