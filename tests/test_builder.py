"""One builder for a run and one for a step: the benchmarks get their Trainer from dtrain.build and take the
loop's own step, so what they time is what train.py runs."""

from __future__ import annotations

import os
import re

import torch

from helpers import ROOT, env_of

from dtrain import loop
from dtrain.build import built_trainer, run_job
from dtrain.processes import OFFLINE_HUB
from dtrain.config import load_config
from dtrain.data import to_device
from dtrain.workloads import Task

# The builders of a run's parts, and the project's strategy classes: only dtrain.build calls them.
RUN_PARTS = re.compile(r"\b(build_strategy|build_optimizer|build_scheduler|make_loaders)\b"
                       r"|\b(SingleDevice|DataParallel|DDP|FSDP)\(")


def test_no_benchmark_builds_a_strategy_optimizer_scheduler_or_loader_itself():
    found = [f"bench/{script.name}:{number}: {line.strip()}"
             for script in sorted((ROOT / "bench").glob("*.py"))
             for number, line in enumerate(script.read_text().splitlines(), 1) if RUN_PARTS.search(line)]
    assert not found, "bench/ must get these from dtrain.build:\n" + "\n".join(found)


def linear_task(seed: int) -> Task:
    """A linear classifier on 16 one-number samples."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(1, 2)
    samples = [(torch.tensor([float(i) / 16]), torch.tensor(i % 2)) for i in range(16)]
    return Task(model=model, train_set=samples, val_set=samples[:4],
                train_loss=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]),
                eval_sums=lambda m, b: {"samples": torch.tensor(float(len(b[1])))},
                summarize=lambda s: {"loss": 0.0, "samples": int(s["samples"])},
                identity={"workload": "test"})


def test_train_step_is_the_step_the_loop_takes(tmp_path):
    """Two optimizer steps of 2 micro-batches each: train_step over the loader's batches ends with the very
    weights, optimizer state, learning rate and step count that train_one_epoch reaches."""
    env = env_of(0, 1)
    words = ["batch_size=2", "grad_accum_steps=2", "num_workers=0", "progress=false", "max_steps=2",
             "optim.grad_clip=0.5", "optim.lr=0.5", "resume="]
    by_loop = load_config(None, [*words, f"output_dir={tmp_path / 'loop'}"])
    by_step = load_config(None, [*words, f"output_dir={tmp_path / 'step'}"])
    with built_trainer(by_loop, env, task=linear_task(0)) as a:
        loop.train_one_epoch(a)
    with built_trainer(by_step, env, task=linear_task(0)) as b:
        b.sampler.start_epoch(0)
        b.model.train()
        batches = [to_device(batch, env.device) for batch in b.train_loader][:4]
        for step in range(2):
            loop.train_step(b, batches[2 * step:2 * step + 2])
    assert a.state.step == b.state.step == 2
    assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"]
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(a.model.weight, linear_task(0).model.weight)  # the steps did change the weights


def test_a_job_runs_offline_and_gives_the_callers_environment_back(tmp_path, monkeypatch):
    """run_job (dtrain.train(), and train.py through the same Job): the hub variables are set while the run
    builds and trains, and as the caller had them afterwards."""
    for name in OFFLINE_HUB:
        monkeypatch.delenv(name, raising=False)
    seen = []
    task = linear_task(0)
    plain_loss = task.train_loss
    task.train_loss = lambda m, b: seen.append({name: os.environ.get(name) for name in OFFLINE_HUB}) or plain_loss(m, b)
    cfg = load_config(None, ["batch_size=4", "num_workers=0", "progress=false", "epochs=1", "resume=",
                             f"output_dir={tmp_path}"])
    metrics = run_job(cfg, task=task)
    assert metrics["samples"] == 4 and len(seen) == 1 + 4  # the FLOP count's forward, then 16 samples by 4
    assert all(values == OFFLINE_HUB for values in seen)
    assert not any(name in os.environ for name in OFFLINE_HUB)
