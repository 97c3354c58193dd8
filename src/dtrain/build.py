"""Building a run: the process's job (offline hub, distributed set-up, strategy, clean-up), the output folder
and every part one run holds (`Trainer`), made the same way for train.py, `dtrain.train()`, the tests and the
benchmarks, so that each of them runs what train.py runs. `dtrain.loop` drives what is built here."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from dtrain import checkpoint as ckpt
from dtrain.checkpoint import TrainState
from dtrain.checkpointer import Checkpointer, EMAState, RngState
from dtrain.config import Config, save_config
from dtrain.data import ResumableSampler, make_loaders, to_device
from dtrain.dist import DistEnv, agree_on_failure, barrier
from dtrain.ema import ModelEMA
from dtrain.errors import ConfigError, UserError
from dtrain.ledger import SampleLedger, truncate_after
from dtrain.loop import NonfiniteWatch, autocast_context, evaluate_and_log, fit
from dtrain.metrics import RunLogger
from dtrain.observe import Heartbeat, Profiler, StepClock, TimingWatch, flops_per_sample
from dtrain.optim import build_optimizer, build_scheduler, warmup_steps
from dtrain.processes import OFFLINE_HUB
from dtrain.stopping import StopRequest
from dtrain.strategies import Strategy, build_strategy
from dtrain.trackers import start_trackers
from dtrain.workloads import Task, build_task


@contextlib.contextmanager
def offline_hub() -> Iterator[None]:
    """The hub libraries work offline (OFFLINE_HUB) inside the block, unless the caller set the variables; the
    caller's values come back after it. The libraries read them when first imported: dtrain imports them only
    while it builds a workload, inside the block."""
    from dtrain.launcher import restored_environ

    with restored_environ(*OFFLINE_HUB):
        for name, value in OFFLINE_HUB.items():
            os.environ.setdefault(name, value)
        yield


class Job:
    """One run in this process, as train.py and `dtrain.train()` make it: `start` (offline hub, the distributed
    environment, the mode's strategy, the run), then `close` (the process group), also after a failure.
    `env` is None until the distributed set-up is done (error reports use it)."""

    def __init__(self, cfg: Config, task: Task | None = None):
        self.cfg, self.task = cfg, task
        self.env: DistEnv | None = None
        self._offline = contextlib.ExitStack()

    def start(self) -> dict[str, float]:
        from dtrain import dist

        self._offline.enter_context(offline_hub())
        self.env = dist.setup(self.cfg)
        return run(self.cfg, self.env, build_strategy(self.cfg, self.env), self.task)

    def close(self) -> None:
        from dtrain import dist

        try:
            if self.env is not None:
                dist.cleanup(self.env)
        finally:
            self._offline.close()


def run_job(cfg: Config, task: Task | None = None) -> dict[str, float]:
    """Set up, train (or evaluate) as configured, clean up; the last evaluation metrics come back."""
    job = Job(cfg, task)
    try:
        return job.start()
    finally:
        job.close()


def run(cfg: Config, env: DistEnv, strategy: Strategy, task: Task | None = None) -> dict[str, float]:
    """Train (or only evaluate) as configured; returns the last evaluation metrics."""
    with built_trainer(cfg, env, strategy, task) as trainer:
        return evaluate_and_log(trainer) if cfg.eval_only else fit(trainer)


@contextlib.contextmanager
def built_trainer(cfg: Config, env: DistEnv, strategy: Strategy | None = None,
                  task: Task | None = None, mode: str | None = None) -> Iterator[Trainer]:
    """A run's Trainer with everything around it (output folder, stop signals, hang reports), closed after the
    block, whatever ends it. strategy: the configured mode's (None), that of `mode` (e.g. "single": each rank
    trains a copy of its own, no gradient sync) or one given; task: the workload's (None)."""
    prepare_output_dir(cfg, env)
    stop = StopRequest(cfg.stop_signals, env)  # early, so a signal during set-up is not lost
    heartbeat = Heartbeat(cfg.output_dir, env, cfg.hang_report_s).start()
    try:
        trainer = build_trainer(cfg, env, strategy or build_strategy(cfg, env, mode), stop, heartbeat, task)
        try:
            yield trainer
        finally:
            trainer.checkpointer.close()  # an error too: a write in flight ends before the process does
            trainer.profiler.close()
            trainer.logger.close()
            if trainer.ledger is not None:
                trainer.ledger.close()
    finally:
        heartbeat.close()
        stop.restore()


@dataclass
class Trainer:
    """Everything one run holds; made by `build_trainer`, driven by `loop.fit`."""

    cfg: Config
    env: DistEnv
    strategy: Strategy  # the execution mode: wrapping, gradient sync, state dicts
    task: Task
    model: nn.Module  # what training calls (strategy.model)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    train_loader: Any
    sampler: ResumableSampler
    val_loader: Any
    steps_per_epoch: int
    state: TrainState
    logger: RunLogger
    stop: StopRequest
    nonfinite: NonfiniteWatch
    ema: ModelEMA | None  # ema.enabled: the average of the weights, evaluated after the model
    heartbeat: Heartbeat  # where this rank is, for hang reports
    checkpointer: Checkpointer  # saves and restores every checkpointed part
    clock: StepClock = field(default_factory=StepClock)  # this rank's data wait and compute per step
    timing: TimingWatch | None = None  # every rank's timing -> metrics and straggler warnings
    profiler: Profiler | None = None
    flops_per_sample: float = 0.0  # training FLOPs per sample (0: not countable)
    ledger: SampleLedger | None = None  # record_samples: this rank's sample ledger


def prepare_output_dir(cfg: Config, env: DistEnv) -> None:
    """Every rank can write output_dir, rank 0 also checkpoints/: checked before any training is spent."""
    failure = None
    try:
        check_writable(Path(cfg.output_dir), env.rank)
        if env.is_main and not cfg.eval_only:
            ckpt_dir = ckpt.checkpoint_dir(cfg.output_dir)
            check_writable(ckpt_dir, env.rank)
            for stale in ckpt.remove_stale_temporaries(ckpt_dir):
                print(f"removed {stale}: left by a save that was interrupted", flush=True)
        if env.is_main:
            save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    except UserError as e:
        failure = e
    agree_on_failure(failure, env)


def check_writable(folder: Path, rank: int) -> None:
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{str(folder)!r} is a file where a folder belongs (move it, or choose another "
                        "output_dir=...)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{rank}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{str(folder)!r} is not writable: {e.strerror or e} "
                        "(fix it, or choose another output_dir=...)") from None


def build_trainer(cfg: Config, env: DistEnv, strategy: Strategy, stop: StopRequest, heartbeat: Heartbeat,
                  task: Task | None = None) -> Trainer:
    """The model wrapped by `strategy`, its optimizer, scheduler, scaler, loaders, EMA and logger, resumed from
    the checkpoint cfg.resume names; `task` replaces the configured workload's (a test's own)."""
    # Same seed on every rank for model construction: all ranks start from identical weights.
    seed_everything(cfg.seed, cfg.deterministic)
    task = build_task(cfg, env) if task is None else task
    model = strategy.wrap(task.model, task.units(task.model))
    optimizer = build_optimizer(strategy.raw_model, cfg.optim, task.is_no_decay, task.is_head,
                                say=lambda msg: print(msg, flush=True) if env.is_main else None)
    train_loader, sampler, val_loader = build_loaders(cfg, env, task)
    steps_per_epoch = len(train_loader) // cfg.grad_accum_steps
    if steps_per_epoch == 0:
        raise UserError(f"the training set ({len(task.train_set)} samples) gives no full optimizer step of "
                        f"batch_size={cfg.batch_size} x grad_accum_steps={cfg.grad_accum_steps} x "
                        f"{env.world_size} process(es); lower batch_size")
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps, steps_per_epoch)
    ema = None  # made before any forward (see ModelEMA) and before the checkpoint is loaded into it
    if cfg.ema.enabled:
        ema = ModelEMA(cfg, strategy, env.world_size, warmup_steps(cfg.optim, steps_per_epoch))
    if cfg.precision == "fp16" and env.device.type != "cuda":
        raise ConfigError("precision=fp16 needs a GPU; on the CPU use precision=bf16 or fp32")
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.precision == "fp16")
    # Different seed per rank from here on (dropout, augmentation in the main process).
    seed_everything(cfg.seed + 1000 * env.rank, cfg.deterministic)
    state = TrainState(world_size=env.world_size)
    checkpointer = Checkpointer(cfg, env, strategy, task.identity, heartbeat, parts={
        "model": strategy.checkpoint_part(optimizer), "ema": EMAState(ema, env) if ema is not None else None,
        "scheduler": scheduler, "scaler": scaler, "state": state, "rng": RngState(env)})
    checkpointer.load()
    if state.best_metric != cfg.best_metric:  # resumed with another best_metric: best.pt is chosen afresh
        state.best_metric, state.best_score = cfg.best_metric, -1.0
    logger = RunLogger(cfg.output_dir, env, cfg.progress, start_trackers(cfg, env, state))
    if ema is not None:
        logger.print(f"ema: updated every {ema.steps} steps with decay {ema.decay:.8g} (ema.decay={cfg.ema.decay} "
                     f"adjusted for {env.world_size} x {cfg.batch_size * cfg.grad_accum_steps} x {ema.steps} / "
                     f"{cfg.epochs} epochs)")
    t = Trainer(cfg, env, strategy, task, model, optimizer, scheduler, scaler, train_loader, sampler, val_loader,
                steps_per_epoch, state, logger, stop, NonfiniteWatch(env.device), ema, heartbeat,
                timing=TimingWatch(cfg.num_workers),
                profiler=Profiler(cfg.output_dir, env.rank, cfg.profile.start_step, cfg.profile.steps,
                                  cfg.profile.cuda_memory), checkpointer=checkpointer)
    t.flops_per_sample = count_flops(t)
    if cfg.record_samples and not cfg.eval_only:
        t.ledger = open_ledger(cfg, env, state.step)
    return t


def build_loaders(cfg: Config, env: DistEnv, task: Task) -> tuple[Any, ResumableSampler, Any]:
    """The training loader, its sampler and the validation loader, exactly as a run gets them."""
    return make_loaders(task, cfg, env)


def open_ledger(cfg: Config, env: DistEnv, step: int) -> SampleLedger:
    """Rank 0 first cuts every rank's records back to the resumed step (later steps were lost and are
    trained again); then each rank appends to its own file."""
    if env.is_main:
        truncate_after(cfg.output_dir, step)
    barrier(env)
    return SampleLedger(cfg.output_dir, env.rank)


def count_flops(t: Trainer) -> float:
    """Training FLOPs per sample, from one forward over the first validation samples (0 if not countable)."""
    samples = min(t.cfg.batch_size, len(t.task.val_set))
    batch = to_device(t.val_loader.collate_fn([t.task.val_set[i] for i in range(samples)]), t.env.device)
    try:
        with autocast_context(t.env.device, t.cfg.precision):
            return flops_per_sample(t.strategy.eval_model(), t.task.train_loss, batch, samples)
    except Exception as e:  # noqa: BLE001 - an operator the counter does not know: report, don't fail
        t.logger.print(f"model FLOPs not counted ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                       "no TFLOP/s in the train records")
        return 0.0


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    # cuDNN times its algorithms for each new input shape and keeps the fastest: training shapes repeat,
    # and its untimed default for bf16 channels_last convolutions can be far slower (as torchvision's
    # reference, which does the same). The choice can differ between runs, so deterministic runs go without.
    torch.backends.cudnn.benchmark = not deterministic
