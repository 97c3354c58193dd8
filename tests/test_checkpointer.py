"""The Checkpointer in one process: every part round-trips through both layouts, and adding a piece of
state is one entry in its parts (a small extra part, added here, round-trips too)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dtrain import checkpoint as ckpt
from dtrain.checkpointer import Checkpointer, OneFile, RngState, Sharded
from dtrain.config import load_config
from dtrain.dist import DistEnv
from dtrain.errors import UserError
from dtrain.strategies import SingleDevice

ENV = DistEnv(mode="single", device=torch.device("cpu"))
IDENTITY = {"workload": "test", "arch": "linear"}


class SampleCounter:
    """The extra piece of state: a plain object with state_dict / load_state_dict."""

    def __init__(self, seen: int = 0):
        self.seen = seen

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"]


class ShardedSingleDevice(SingleDevice):
    """One device whose checkpoints are sharded directories: the layout is the strategy's choice alone."""

    checkpoint_layout = Sharded


class Run:
    """What a run checkpoints: a small model, its optimizer, scheduler, scaler, train state and RNG."""

    def __init__(self, out, strategy_class=SingleDevice, extra=None, **extra_parts):
        self.cfg = load_config(None, [f"output_dir={out}", "resume=auto", "keep_last=2"])
        self.strategy = strategy_class(self.cfg, ENV)
        self.strategy.wrap(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), [])
        self.optimizer = torch.optim.SGD(self.strategy.raw_model.parameters(), lr=0.1, momentum=0.9)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=0.5)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.state = ckpt.TrainState()
        parts = {"model": self.strategy.checkpoint_part(self.optimizer), "scheduler": self.scheduler,
                 "scaler": self.scaler, "state": self.state, "rng": RngState(ENV), **extra_parts}
        self.checkpointer = Checkpointer(self.cfg, ENV, self.strategy, IDENTITY, parts=parts)

    def train(self, steps: int) -> None:
        model = self.strategy.raw_model.train()
        for _ in range(steps):
            model(torch.randn(8, 4)).square().mean().backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.scheduler.step()
            self.state.step += 1


def momentum(run: Run) -> dict[str, torch.Tensor]:
    return {name: run.optimizer.state[p]["momentum_buffer"] for name, p in run.strategy.raw_model.named_parameters()}


@pytest.mark.parametrize("strategy_class", [SingleDevice, ShardedSingleDevice], ids=["one_file", "sharded"])
def test_every_part_and_an_added_one_round_trip(strategy_class, tmp_path):
    torch.manual_seed(0)
    saved = Run(tmp_path, strategy_class, counter=SampleCounter(seen=123))
    saved.train(3)
    saved.state.best_score = 0.75
    saved.checkpointer.save(saved.state.step, is_best=True)
    expected_rng = torch.get_rng_state()
    written = ckpt.checkpoint_dir(str(tmp_path)) / "step_00000003"
    assert (written.is_dir() if strategy_class is ShardedSingleDevice else written.with_suffix(".pt").is_file())

    torch.manual_seed(1)  # another model, optimizer state and RNG: everything below comes from the checkpoint
    resumed = Run(tmp_path, strategy_class, counter=SampleCounter())
    assert resumed.checkpointer.load()
    assert resumed.checkpointer.parts["counter"].seen == 123
    assert (resumed.state.step, resumed.state.best_score) == (3, 0.75)
    for key, value in saved.strategy.raw_model.state_dict().items():
        assert torch.equal(resumed.strategy.raw_model.state_dict()[key], value), key
    for key, value in momentum(saved).items():
        assert torch.equal(momentum(resumed)[key], value), key
    assert resumed.scheduler.state_dict() == saved.scheduler.state_dict()
    assert torch.equal(torch.get_rng_state(), expected_rng)


def test_the_strategy_alone_picks_the_layout():
    cfg = load_config(None, [])
    assert isinstance(SingleDevice(cfg, ENV).checkpoint_layout(ENV, False), OneFile)
    assert isinstance(ShardedSingleDevice(cfg, ENV).checkpoint_layout(ENV, False), Sharded)


def test_a_part_the_checkpoint_lacks_is_an_error_naming_it_unless_it_says_what_then(tmp_path):
    saved = Run(tmp_path)
    saved.checkpointer.save(0, is_best=False)
    with pytest.raises(UserError, match="holds no 'counter' state"):
        Run(tmp_path, counter=SampleCounter()).checkpointer.load()

    class Optional(SampleCounter):
        def load_missing(self, path):
            self.seen = -1

    resumed = Run(tmp_path, counter=Optional(seen=5))
    assert resumed.checkpointer.load() and resumed.checkpointer.parts["counter"].seen == -1


def test_nothing_to_resume_leaves_every_part_as_it_is(tmp_path):
    run = Run(tmp_path, counter=SampleCounter(seen=7))
    assert not run.checkpointer.load()
    assert run.checkpointer.parts["counter"].seen == 7 and run.state.step == 0


def test_format_1_is_one_clear_error(tmp_path):
    saved = Run(tmp_path)
    saved.checkpointer.save(0, is_best=False)
    last = ckpt.checkpoint_dir(str(tmp_path)) / "last.pt"
    data = torch.load(last, weights_only=True)
    torch.save({**data, "format_version": 1}, tmp_path / "old.pt")
    with pytest.raises(UserError, match=r"has the old format 1, which this code no longer reads: resume it once"):
        ckpt.read_checkpoint(tmp_path / "old.pt")


def test_old_train_state_entries_are_upgraded_on_read():
    old = {"state": {"epoch": 1, "step": 9, "best_accuracy": 0.5, "world_size": 2},
           "config": {"batch_size": 16, "grad_accum_steps": 2}}
    state = ckpt.TrainState()
    state.load_state_dict(ckpt.upgrade(old)["state"])
    assert (state.best_score, state.step) == (0.5, 9)
    assert (state.epoch_world_size, state.epoch_batch_size, state.epoch_grad_accum_steps) == (2, 16, 2)
