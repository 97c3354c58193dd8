"""Fixtures and hooks. The helpers the tests share (running train.py, reading its outputs, ...) are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import CLUSTER_NEEDS, unmet_need, write_image_folder


def pytest_runtest_setup(item: pytest.Item) -> None:
    """The needs_* markers (pyproject.toml): a test whose need this machine lacks is skipped, before any of
    its fixtures is set up. Under DTRAIN_REQUIRE_CLUSTER=1 (set by .ci/run) a missing root or Slurm fails
    the test instead: there those tests must run."""
    for marker in item.iter_markers():
        reason = unmet_need(marker)
        if reason is None:
            continue
        if marker.name in CLUSTER_NEEDS and os.environ.get("DTRAIN_REQUIRE_CLUSTER") == "1":
            pytest.fail(f"DTRAIN_REQUIRE_CLUSTER=1 but: {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    """3 classes; 8 training images each; 7 validation images (odd: does not divide by 2 ranks)."""
    return write_image_folder(tmp_path_factory.mktemp("tiny_images"),
                              {"train": {"a": 8, "b": 8, "c": 8}, "val": {"a": 3, "b": 2, "c": 2}})
