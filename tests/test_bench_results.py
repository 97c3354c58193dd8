"""bench/results/ holds only full runs: a --quick smoke run never writes there or over a committed file."""

from __future__ import annotations

import re
import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import common  # noqa: E402  (bench/common.py: the one writer of result files)

WRITE_CALL = re.compile(r"write_json\(\s*[^,]+,\s*(f?\"[^\"]*\"[^,]*),", re.S)


def test_a_quick_result_goes_to_the_ignored_quick_folder(tmp_path):
    full = common.write_json(tmp_path, "overhead-cpu", {"machine": {"date": "2026-01-02"}, "table": "t"})
    quick = common.write_json(tmp_path, "overhead-cpu-quick", {"machine": {"date": "2026-01-02"}, "table": "t"})
    assert full.parent == tmp_path and quick.parent == tmp_path / "quick"
    assert "/bench/results/quick/" in (ROOT / ".gitignore").read_text()


def test_every_benchmark_names_its_quick_runs_apart():
    """Each script that writes results gives a --quick run the -quick suffix, which sends it to quick/."""
    for script in sorted((ROOT / "bench").glob("*.py")):
        source = script.read_text()
        for name in WRITE_CALL.findall(source):
            if "--quick" in source:
                assert "-quick" in name, f"{script.name}: write_json({name}, ...) would put a --quick run in bench/results/"
