"""Checkpoints written before the Checkpointer (commit 0ca16d3) still resume with the current code.

The fixtures in tests/data/checkpoints_0ca16d3/ were written by that commit's train.py with the
settings below (make_fixtures.sh there is the command). Each test copies a fixture into tmp_path
first: nothing writes into tests/data.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from helpers import TESTS, run_torchrun, run_train

FIXTURES = TESTS / "data" / "checkpoints_0ca16d3"
SINGLE_FILE = FIXTURES / "step_00000002.pt"
SHARDED = FIXTURES / "sharded" / "step_00000002"
FIXTURE_STEP = 2
# make_fixtures.sh's settings, without max_steps (each test says where to stop).
ARGS = ["workload=image", "model.arch=shufflenet_v2_x0_5", "model.dropout=-1", "data.synthetic=true",
        "data.image_size=32", "data.val_crop_ratio=1.0", "data.synthetic_train_size=16", "data.synthetic_val_size=4",
        "data.num_classes=2", "batch_size=4", "eval_batch_size=4", "num_workers=0", "epochs=1", "ema.enabled=true",
        "ema.steps=1", "optim.lr=0.01", "optim.warmup_steps=0", "log_every=1", "progress=false", "keep_last=1",
        "timeout_s=60"]


def copy_fixture(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "fixture" / source.name
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        target.parent.mkdir(parents=True)
        shutil.copy2(source, target)
    return target


def fixture_tensors(source: Path, tmp_path: Path) -> dict:
    """The fixture's tensors as one dict, read with torch's own tools (not the code under test)."""
    if source.is_file():
        return torch.load(source, map_location="cpu", weights_only=True)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = tmp_path / "fixture_whole.pt"
    dcp_to_torch_save(source, whole)
    return torch.load(whole, map_location="cpu", weights_only=True)


def prepared_trainer(overrides: list[str]):
    """A Trainer built in this process by the run builder, as train.py builds it (one process, CPU)."""
    from dtrain.config import load_config
    from dtrain.dist import DistEnv
    from dtrain.observe import Heartbeat
    from dtrain.stopping import StopRequest
    from dtrain.build import build_trainer
    from dtrain.strategies import build_strategy

    cfg = load_config(None, overrides)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    env = DistEnv(mode="single", device=torch.device("cpu"))
    stop = StopRequest([], env)
    try:
        return build_trainer(cfg, env, build_strategy(cfg, env), stop, Heartbeat(cfg.output_dir, env, 0))
    finally:
        stop.restore()


def assert_equal_tensors(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key, value in expected.items():
        assert torch.equal(actual[key].cpu(), value), f"{what}: {key} differs from the fixture"


@pytest.mark.parametrize("source", [SINGLE_FILE, SHARDED], ids=["single_file", "sharded"])
def test_old_checkpoint_loads_every_part(source, tmp_path):
    """Resumed at the fixture's step with its weights, EMA, optimizer and scheduler state, exactly."""
    expected = fixture_tensors(source, tmp_path)
    meta = torch.load(source / "train_state.pt", weights_only=True) if source.is_dir() else expected
    path = copy_fixture(source, tmp_path)
    t = prepared_trainer([*ARGS, f"resume={path}", f"output_dir={tmp_path / 'out'}"])
    try:
        assert t.state.step == FIXTURE_STEP and t.state.epoch == 0
        assert t.state.samples_in_epoch == meta["state"]["samples_in_epoch"] > 0
        assert t.state.best_score == meta["state"]["best_accuracy"]  # the old name of best_score
        assert_equal_tensors(t.strategy.raw_model.state_dict(), expected["model"], "model")
        ema_whole = t.ema.whole_state()
        assert_equal_tensors(ema_whole, expected["ema"], "EMA")
        assert t.ema.updates == meta["ema_updates"] == FIXTURE_STEP
        assert any((ema_whole[k] != expected["model"][k]).any() for k in ema_whole), "the EMA is not the model"
        momentum = {name: t.optimizer.state[p]["momentum_buffer"]
                    for name, p in t.strategy.raw_model.named_parameters()}
        expected_momentum = {name: s["momentum_buffer"] for name, s in (
            expected["optimizer"]["state"].items() if "optimizer" in expected else
            expected["optimizer_state"].items())}
        assert_equal_tensors(momentum, expected_momentum, "optimizer momentum")
        assert t.scheduler.last_epoch == meta["scheduler"]["last_epoch"] == FIXTURE_STEP
    finally:
        t.logger.close()


@pytest.mark.slow
def test_old_single_file_checkpoint_trains_on(tmp_path):
    path = copy_fixture(SINGLE_FILE, tmp_path)
    out = tmp_path / "out"
    result = run_train([*ARGS, "epochs=2", "max_steps=4", f"resume={path}", f"output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {path}: epoch 0, step {FIXTURE_STEP}" in result.stdout
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["state"]["step"] == 4


@pytest.mark.slow
def test_old_sharded_checkpoint_trains_on_under_fsdp(tmp_path):
    path = copy_fixture(SHARDED, tmp_path)
    out = tmp_path / "out"
    result = run_torchrun([*ARGS, "mode=fsdp", "epochs=2", "max_steps=4", f"resume={path}", f"output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {path}: epoch 0, step {FIXTURE_STEP}" in result.stdout
    state = torch.load(out / "checkpoints" / "last" / "train_state.pt", weights_only=True)["state"]
    assert state["step"] == 4
