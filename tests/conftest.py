"""Fixtures and hooks. The helpers the tests share (running train.py, reading its outputs, ...) are in helpers.py."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from helpers import CLUSTER_NEEDS, unmet_need, write_image_folder


# The needs_* markers (pyproject.toml): a test whose need this machine lacks is skipped (reported at the
# test), none of its fixtures set up. Under DTRAIN_REQUIRE_CLUSTER=1 (set by .ci/run) a missing root or
# Slurm fails the test instead: there those tests must run.

def unmet(item: pytest.Item) -> tuple[str, bool] | None:
    """(why this machine cannot run the test, whether that fails it), or None."""
    for marker in item.iter_markers():
        reason = unmet_need(marker)
        if reason is not None:
            return reason, marker.name in CLUSTER_NEEDS and os.environ.get("DTRAIN_REQUIRE_CLUSTER") == "1"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        missing = unmet(item)
        if missing and not missing[1]:
            item.add_marker(pytest.mark.skip(reason=missing[0]))


def fail_missing_cluster(item: pytest.Item) -> None:
    missing = unmet(item)
    if missing and missing[1]:
        pytest.fail(f"DTRAIN_REQUIRE_CLUSTER=1 but: {missing[0]}", pytrace=False)


# The two tiers: `make check` runs the tests not marked slow, `make test` runs all. What puts a test in the
# slow tier is starting a Python process (a fresh interpreter imports torch: seconds per process on 2 cores),
# so a test not marked slow that starts one fails, during its fixtures' set-up too, with the marker to add:
# a new test cannot land in the fast tier by being forgotten. Other programs (a stand-in scontrol, a shell)
# stay allowed: they start in milliseconds.
# Any word of the command that names one counts (`ip netns exec h1 python ...`, `bash launch/ddp.sh`): the
# repository's launch scripts, sbatch files and Makefile targets all start Python.
PYTHON_PROGRAMS = ("python", "torchrun", "srun", "sbatch", "salloc", "make")
PYTHON_SCRIPTS = (".py", ".sh", ".sbatch")


def starts_python(args) -> bool:
    """Whether a Popen command (a list or a shell string) starts a Python interpreter or a launcher of one."""
    words = args.split() if isinstance(args, (str, bytes)) else [os.fspath(a) for a in args]
    names = [os.path.basename(str(w)) for w in words]
    return any(n.startswith(PYTHON_PROGRAMS) or n.endswith(PYTHON_SCRIPTS) for n in names)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    fail_missing_cluster(item)
    with fast_tier_guard(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    with fast_tier_guard(item):
        return (yield)


@contextlib.contextmanager
def fast_tier_guard(item: pytest.Item) -> Iterator[None]:
    """While a test not marked slow sets up and runs, starting a Python process fails it."""
    if item.get_closest_marker("slow") is not None:
        yield
        return
    original = subprocess.Popen.__init__

    def guarded(popen, args, *rest, **kwargs):
        if starts_python(args):
            command = args if isinstance(args, str) else " ".join(map(str, args))
            pytest.fail(f"{item.nodeid} starts a Python process ({command[:120]}): mark it @pytest.mark.slow "
                        "(make test runs it; make check leaves it out)", pytrace=False)
        original(popen, args, *rest, **kwargs)

    subprocess.Popen.__init__ = guarded
    try:
        yield
    finally:
        subprocess.Popen.__init__ = original


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    """3 classes; 8 training images each; 7 validation images (odd: does not divide by 2 ranks)."""
    return write_image_folder(tmp_path_factory.mktemp("tiny_images"),
                              {"train": {"a": 8, "b": 8, "c": 8}, "val": {"a": 3, "b": 2, "c": 2}})
