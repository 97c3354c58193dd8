"""Checkpoint files: atomic, weights-only, retention, fallback, identity checks."""

from __future__ import annotations

import collections

import pytest
import torch

from dtrain import checkpoint as ckpt
from dtrain.errors import UserError


def payload(step: int) -> dict:
    return {"format_version": ckpt.FORMAT_VERSION, "identity": {"workload": "image", "arch": "resnet18"},
            "model": {"w": torch.full((3,), float(step))}, "optimizer": {}, "scheduler": {}, "scaler": {},
            "state": ckpt.TrainState(step=step).state_dict(), "config": {"workload": "image"}}


def test_save_writes_step_file_last_and_best_without_leftovers(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(payload(step), tmp_path, step=step, keep_last=2, is_best=step == 2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.pt", "last.pt", "step_00000002.pt", "step_00000003.pt"]  # step 1 pruned, no *.tmp
    assert ckpt.read_checkpoint(tmp_path / "last.pt").data["model"]["w"][0] == 3
    assert ckpt.read_checkpoint(tmp_path / "best.pt").data["model"]["w"][0] == 2  # survives pruning of its step file


def test_keep_last_zero_keeps_only_last(tmp_path):
    ckpt.save_checkpoint(payload(1), tmp_path, step=1, keep_last=0, is_best=False)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    bad = payload(1)
    bad["state"] = collections.OrderedDict(x=object.__new__(ckpt.TrainState))  # not an allowed type
    torch.save(bad, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="unreadable"):
        ckpt.read_checkpoint(tmp_path / "evil.pt")


def test_truncated_and_foreign_files_are_clear_errors(tmp_path):
    ckpt.save_checkpoint(payload(1), tmp_path, step=1, keep_last=0, is_best=False)
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"checkpoint .*cut.pt is unreadable"):
        ckpt.read_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not a dtrain checkpoint"):
        ckpt.read_checkpoint(tmp_path / "foreign.pt")


def test_damaged_newest_falls_back_to_previous(tmp_path):
    out = tmp_path / "run"
    d = ckpt.checkpoint_dir(str(out))
    for step in (1, 2):
        ckpt.save_checkpoint(payload(step), d, step=step, keep_last=2, is_best=False)
    newest = d / "step_00000002.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # damages last.pt too: same inode
    warnings = []
    found = ckpt.load_latest(ckpt.resume_candidates("auto", str(out)), warn=warnings.append)
    assert found.path.name == "step_00000001.pt" and found.data["state"]["step"] == 1
    assert len(warnings) == 2 and "trying an older checkpoint" in warnings[0]


def test_resume_sources():
    assert ckpt.resume_candidates("", "/nonexistent") == []
    assert ckpt.resume_candidates("auto", "/nonexistent") == []  # fresh start
    with pytest.raises(UserError, match="resume file '/no/such.pt' does not exist"):
        ckpt.resume_candidates("/no/such.pt", "/nonexistent")


def test_identity_mismatch_names_the_difference(tmp_path):
    with pytest.raises(UserError, match=r"arch='resnet18' \(this run: 'resnet50'\)"):
        ckpt.check_identity(payload(1), {"workload": "image", "arch": "resnet50"}, tmp_path / "x.pt")


def test_write_failure_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(payload(1), tmp_path, step=1, keep_last=0, is_best=False)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is untouched"):
        ckpt.save_checkpoint(payload(2), tmp_path, step=2, keep_last=0, is_best=False)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert ckpt.read_checkpoint(tmp_path / "last.pt").data["state"]["step"] == 1


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    state = ckpt.rng_state()
    torch.save({"rng": state}, tmp_path / "r.pt")
    expected = (random.random(), torch.rand(1).item())
    ckpt.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    assert (random.random(), torch.rand(1).item()) == expected
