"""Fixtures and hooks. The helpers the tests share (running train.py, reading its outputs, ...) are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

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


def pytest_runtest_setup(item: pytest.Item) -> None:
    missing = unmet(item)
    if missing and missing[1]:
        pytest.fail(f"DTRAIN_REQUIRE_CLUSTER=1 but: {missing[0]}", pytrace=False)


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    """3 classes; 8 training images each; 7 validation images (odd: does not divide by 2 ranks)."""
    return write_image_folder(tmp_path_factory.mktemp("tiny_images"),
                              {"train": {"a": 8, "b": 8, "c": 8}, "val": {"a": 3, "b": 2, "c": 2}})
