"""python -m dtrain.export: a checkpoint (one file or FSDP shards) as the plain libraries load it, without a
gather; the BERT run's own end-of-training export goes through it too (tests/test_bert.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from dtrain import export
from dtrain.checkpoint import consolidate
from helpers import SYNTH, assert_one_clear_error, run_bounded, run_torchrun, run_train, subprocess_env

# Every test here starts Python processes (tests/conftest.py: the two tiers).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A one-process run (single-file checkpoints) and a 2-rank FSDP run (sharded) of squeezenet, 4 classes."""
    root = tmp_path_factory.mktemp("export")
    single, sharded = root / "single", root / "fsdp"
    assert run_train([*SYNTH, "max_steps=3", f"output_dir={single}"]).returncode == 0
    proc = run_torchrun([*SYNTH, "max_steps=3", "mode=fsdp", f"output_dir={sharded}"])
    assert proc.returncode == 0, proc.stderr
    return {"single": single, "sharded": sharded}


def checkpoint_model(run: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    last = run / "checkpoints" / "last"
    if last.is_symlink():
        return torch.load(consolidate(last, tmp_path / "whole.pt"), weights_only=True)["model"]
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_exported_image_model_loads_into_torchvision_with_the_checkpoints_outputs(runs, kind, tmp_path):
    out = tmp_path / "model.safetensors"
    assert export.main([str(runs[kind]), str(out)]) == 0
    model = torchvision.models.get_model("squeezenet1_1", num_classes=4, dropout=0.0)
    model.load_state_dict(load_file(str(out)))  # strict: every key, every shape
    reference = torchvision.models.get_model("squeezenet1_1", num_classes=4, dropout=0.0)
    reference.load_state_dict(checkpoint_model(runs[kind], tmp_path))
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(images), reference.eval()(images))
    assert not list(tmp_path.glob("*.tmp"))


def test_export_cli_errors_are_one_line(tmp_path):
    proc = run_bounded([sys.executable, "-m", "dtrain.export", str(tmp_path / "nothing"), str(tmp_path / "x")],
                       timeout=60, env=subprocess_env())
    assert_one_clear_error(proc, "does not exist")
