"""The one training loop, shared by every workload and every execution mode."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtrain import checkpoint as ckpt
from dtrain.checkpoint import TrainState
from dtrain.config import Config, save_config, to_dict
from dtrain.data import ResumableSampler, make_loaders, to_device
from dtrain.dist import DistEnv, all_reduce_sum, barrier, gather_objects, grads_to_none, no_sync, wrap
from dtrain.errors import StopTraining, UserError
from dtrain.metrics import RunLogger, Throughput
from dtrain.optim import build_optimizer, build_scheduler, load_optimizer_state
from dtrain.stopping import StopRequest, requeue_slurm_job
from dtrain.workloads import Task, build_task


@dataclass
class Trainer:
    """Everything one run holds; built by `prepare`, driven by `fit`."""

    cfg: Config
    env: DistEnv
    task: Task
    model: nn.Module  # wrapped for the mode (DDP / DataParallel / plain)
    raw_model: nn.Module  # the plain model: what checkpoints hold
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
    grads_to_none: bool  # zero_grad(set_to_none=...): see dist.grads_to_none
    nonfinite: "NonfiniteWatch"


class NonfiniteWatch:
    """The first optimizer step whose gradient norm was not finite, recorded on the device.

    Asking `bool(isfinite(norm))` after every step would make the CPU wait for the GPU each time,
    so it could not queue the next step's kernels while this one runs. The record is read where
    the loop waits anyway: at log steps, before a checkpoint and at the end of an epoch (and after
    every step on the CPU, where nothing runs ahead). Steps taken after a bad one are thrown away
    with the run: it stops with an error and saves nothing.
    """

    def __init__(self, device: torch.device):
        self.deferred = device.type == "cuda"
        self.first_bad = torch.tensor(-1, dtype=torch.int64, device=device)

    def record(self, grad_norm: torch.Tensor, step: int) -> None:
        newly_bad = torch.logical_and(~torch.isfinite(grad_norm), self.first_bad < 0)
        self.first_bad = torch.where(newly_bad, step, self.first_bad)

    def raise_if_seen(self, epoch: int) -> None:
        step = int(self.first_bad)
        if step >= 0:
            raise UserError(f"non-finite loss or gradient at step {step} (epoch {epoch}): "
                            "lower optim.lr, check the data, or set nonfinite_loss=skip")


def run(cfg: Config, env: DistEnv) -> dict[str, float]:
    """Train (or only evaluate) as configured; returns the last evaluation metrics."""
    prepare_output_dir(cfg, env)
    stop = StopRequest(cfg.stop_signals, env)  # early, so a signal during set-up is not lost
    try:
        trainer = prepare(cfg, env, stop)
        try:
            if cfg.eval_only:
                return evaluate_and_log(trainer)
            return fit(trainer)
        finally:
            trainer.logger.close()
    finally:
        stop.restore()


def prepare_output_dir(cfg: Config, env: DistEnv) -> None:
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{env.rank}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output_dir {str(out)!r} is not writable: {e.strerror or e} "
                        "(choose another output_dir=...)") from None
    if env.is_main:
        save_config(cfg, out / "config.yaml")


def prepare(cfg: Config, env: DistEnv, stop: StopRequest) -> Trainer:
    # Same seed on every rank for model construction: all ranks start from identical weights.
    seed_everything(cfg.seed, cfg.deterministic)
    task = build_task(cfg, env)
    raw_model = task.model.to(env.device)
    optimizer = build_optimizer(raw_model, cfg.optim, task.is_no_decay,
                                say=lambda msg: print(msg, flush=True) if env.is_main else None)
    train_loader, sampler, val_loader = make_loaders(task.train_set, task.val_set, task.collate_fn, cfg, env,
                                                     task.random_samples, task.lengths)
    steps_per_epoch = len(train_loader) // cfg.grad_accum_steps
    if steps_per_epoch == 0:
        raise UserError(f"the training set ({len(task.train_set)} samples) gives no full optimizer step of "
                        f"batch_size={cfg.batch_size} x grad_accum_steps={cfg.grad_accum_steps} x "
                        f"{env.world_size} process(es); lower batch_size")
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps, steps_per_epoch)
    if cfg.precision == "fp16" and env.device.type != "cuda":
        raise UserError("precision=fp16 needs a GPU; on the CPU use precision=bf16 or fp32")
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.precision == "fp16")
    # Different seed per rank from here on (dropout, augmentation in the main process).
    seed_everything(cfg.seed + 1000 * env.rank, cfg.deterministic)
    state = TrainState(world_size=env.world_size)
    state = restore(cfg, env, task, raw_model, optimizer, scheduler, scaler, sampler) or state
    if cfg.compile:
        raw_for_wrap = torch.compile(raw_model)
    else:
        raw_for_wrap = raw_model
    model = wrap(raw_for_wrap, env, cfg.ddp)
    logger = RunLogger(cfg.output_dir, env, cfg.progress)
    return Trainer(cfg, env, task, model, raw_model, optimizer, scheduler, scaler, train_loader, sampler,
                   val_loader, steps_per_epoch, state, logger, stop, grads_to_none(model, cfg.ddp),
                   NonfiniteWatch(env.device))


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


# ---------------------------------------------------------------------------------------------
# Training


def fit(t: Trainer) -> dict[str, float]:
    cfg, state = t.cfg, t.state
    metrics: dict[str, float] = {}
    while state.epoch < cfg.epochs and not reached_max_steps(t):
        train_one_epoch(t)
        epoch_done = state.samples_in_epoch == 0  # train_one_epoch resets it at the epoch's end
        finished = epoch_done and state.epoch == cfg.epochs or reached_max_steps(t)
        if finished or (epoch_done and state.epoch % cfg.eval_every == 0):
            metrics = evaluate_and_log(t)
        save(t, metrics.get("accuracy"))
        log_memory(t)
        if t.stop.agreed():
            stop_after_save(t)
    if not metrics:  # resumed a finished run: report where it stands
        metrics = evaluate_and_log(t)
    if t.env.is_main and t.task.export is not None:
        t.task.export(t.raw_model, cfg.output_dir)
    barrier(t.env)
    return metrics


def reached_max_steps(t: Trainer) -> bool:
    return bool(t.cfg.max_steps) and t.state.step >= t.cfg.max_steps


def train_one_epoch(t: Trainer) -> None:
    """Train from the current position to the end of the epoch (or max_steps / a mid-epoch save)."""
    cfg, env, state = t.cfg, t.env, t.state
    samples_per_step = cfg.batch_size * cfg.grad_accum_steps * env.world_size
    skip = state.samples_in_epoch // env.world_size
    t.sampler.start_epoch(state.epoch, skip=skip)
    t.model.train()
    t.logger.start_epoch(state.epoch, t.steps_per_epoch, state.samples_in_epoch // samples_per_step)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=env.device)  # (sum of step losses, steps)
    speed = Throughput()
    autocast = autocast_context(env.device, cfg.precision)
    micro = 0
    for batch in t.train_loader:
        micro += 1
        last_micro = micro % cfg.grad_accum_steps == 0
        batch = to_device(batch, env.device)
        with no_sync(t.model, skip=not last_micro):
            with autocast:
                loss = t.task.train_loss(t.model, batch)
            t.scaler.scale(loss / cfg.grad_accum_steps).backward()
        loss_sum[0] += loss.detach().double() / cfg.grad_accum_steps
        if not last_micro:
            continue
        optimizer_step(t)
        loss_sum[1] += 1
        state.step += 1
        state.samples_in_epoch += samples_per_step
        speed.samples += samples_per_step
        t.logger.step_done()
        log_step = state.step % cfg.log_every == 0
        if log_step or not t.nonfinite.deferred:
            t.nonfinite.raise_if_seen(state.epoch)
        if log_step:
            log_train(t, loss_sum, speed)
        if reached_max_steps(t):
            break
        if t.stop.agreed():
            save(t, None)
            stop_after_save(t)
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            save(t, None)
    else:  # the epoch ran to its end
        state.epoch += 1
        state.samples_in_epoch = 0
    t.nonfinite.raise_if_seen(last_trained_epoch(state))  # before evaluating what a bad step reached
    t.logger.end_epoch()


def stop_after_save(t: Trainer) -> None:
    """Every rank got here at the same step, after the checkpoint was written."""
    if t.env.is_main:
        t.logger.print(f"stopped at step {t.state.step}: checkpoint saved in {ckpt.checkpoint_dir(t.cfg.output_dir)}")
        if t.cfg.requeue and "SLURM_JOB_ID" in os.environ:
            t.logger.print(requeue_slurm_job())
    # Nobody exits before rank 0 has requeued: a launcher that sees one rank exit may kill the rest.
    barrier(t.env)
    raise StopTraining()


def optimizer_step(t: Trainer) -> None:
    """Clip, step, schedule; a non-finite gradient stops the run or skips the step (nonfinite_loss)."""
    cfg = t.cfg
    t.scaler.unscale_(t.optimizer)
    # After DDP's all-reduce the gradients are identical on every rank, so every rank reaches the
    # same verdict here without another collective.
    if cfg.optim.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(t.raw_model.parameters(), cfg.optim.grad_clip)
    else:  # only the norm: clip_grad_norm_ would also rescale every gradient by 1.0
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in t.raw_model.parameters() if p.grad is not None])
    if cfg.precision == "fp16":
        pass  # the scaler skips a non-finite step itself and lowers its scale
    elif cfg.nonfinite_loss == "stop":
        t.nonfinite.record(grad_norm, t.state.step + 1)  # read later: see NonfiniteWatch
    elif not bool(torch.isfinite(grad_norm)):  # skipping must be decided now: a host sync per step on GPUs
        t.logger.print(f"warning: non-finite gradient at step {t.state.step + 1}; step skipped")
        t.optimizer.zero_grad(set_to_none=t.grads_to_none)
        t.scheduler.step()
        return
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=t.grads_to_none)
    t.scheduler.step()


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def log_train(t: Trainer, loss_sum: torch.Tensor, speed: Throughput) -> None:
    """Global mean loss over the window (one small all-reduce, only at log steps)."""
    reduced = all_reduce_sum(loss_sum.clone(), t.env)  # (sum of losses, count) over ranks and steps
    t.logger.record({
        "kind": "train",
        "epoch": t.state.epoch,
        "step": t.state.step,
        "loss": reduced[0].item() / max(reduced[1].item(), 1.0),
        "lr": t.optimizer.param_groups[0]["lr"],
        "samples_per_sec": speed.rate(),
    }, t.state.step)
    loss_sum.zero_()
    speed.reset()


def last_trained_epoch(state: TrainState) -> int:
    """0-based epoch of the latest optimizer step (state.epoch already points past a finished epoch)."""
    return state.epoch - 1 if state.samples_in_epoch == 0 and state.epoch > 0 else state.epoch


def log_memory(t: Trainer) -> None:
    per_rank = gather_objects(t.logger.memory.report(), t.env)
    record: dict[str, Any] = {"kind": "memory", "epoch": last_trained_epoch(t.state), "step": t.state.step}
    for key in per_rank[0]:
        record[key] = [round(r[key], 1) for r in per_rank]
    t.logger.record(record, t.state.step)


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(t: Trainer) -> dict[str, float]:
    """Exact metrics over the whole validation set, whatever the world size."""
    # DDP's forward may sync buffers; evaluation runs the inner module so ranks stay independent.
    model = t.model.module if isinstance(t.model, nn.parallel.DistributedDataParallel) else t.model
    model.eval()
    autocast = autocast_context(t.env.device, t.cfg.precision)
    local: dict[str, torch.Tensor] = {}
    for batch in t.val_loader:
        batch = to_device(batch, t.env.device)
        with autocast:
            sums = t.task.eval_sums(model, batch)
        for key, value in sums.items():  # accumulate on the device: no host sync per batch
            local[key] = local.get(key, 0) + value.detach().double()
    totals: dict[str, float] = {}
    local_floats = {key: float(value) for key, value in local.items()}
    for rank_sums in gather_objects(local_floats, t.env):  # ranks may hold no batch at all: merge dicts
        for key, value in rank_sums.items():
            totals[key] = totals.get(key, 0.0) + value
    return t.task.summarize(totals)


def evaluate_and_log(t: Trainer) -> dict[str, float]:
    metrics = evaluate(t)
    t.logger.record({"kind": "eval", "epoch": last_trained_epoch(t.state), "step": t.state.step, **metrics},
                    t.state.step)
    return metrics


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save(t: Trainer, accuracy: float | None) -> None:
    """All ranks call this; rank 0 writes; nobody runs ahead (or exits) until the file is in place."""
    t.nonfinite.raise_if_seen(last_trained_epoch(t.state))  # never checkpoint what a bad step reached
    state = t.state
    is_best = accuracy is not None and accuracy > state.best_accuracy
    if is_best:
        state.best_accuracy = accuracy
    state.world_size = t.env.world_size
    rng = gather_objects(ckpt.rng_state(), t.env)
    if t.env.is_main:
        payload = {
            "format_version": ckpt.FORMAT_VERSION,
            "identity": t.task.identity,
            "model": t.raw_model.state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(),
            "scaler": t.scaler.state_dict(),
            "state": ckpt.state_dict_of(state),
            "rng": rng,
            "config": to_dict(t.cfg),
        }
        ckpt.save_checkpoint(payload, ckpt.checkpoint_dir(t.cfg.output_dir), state.step, t.cfg.keep_last, is_best)
    barrier(t.env)


def restore(cfg: Config, env: DistEnv, task: Task, raw_model: nn.Module, optimizer, scheduler,
            scaler, sampler: ResumableSampler) -> TrainState | None:
    """Load the checkpoint named by cfg.resume into the plain model and the optimizer state."""
    found = ckpt.load_latest(ckpt.resume_candidates(cfg.resume, cfg.output_dir),
                             warn=lambda msg: print(msg, flush=True) if env.is_main else None)
    if found is None:
        return None
    path, data = found
    ckpt.check_identity(data, task.identity, path)
    raw_model.load_state_dict(data["model"])
    load_optimizer_state(optimizer, data["optimizer"])
    scheduler.load_state_dict(data["scheduler"])
    scaler.load_state_dict(data["scaler"])
    state = TrainState(**data["state"])
    if state.world_size == env.world_size and data.get("rng"):
        ckpt.set_rng_state(data["rng"][env.rank])
    elif state.samples_in_epoch % env.world_size:
        raise UserError(f"checkpoint {path} stopped mid-epoch after {state.samples_in_epoch} samples, which "
                        f"{env.world_size} processes cannot split evenly; resume with {state.world_size} processes")
    problem = sampler.resume_problem(state.world_size, data["config"]["batch_size"])
    if state.samples_in_epoch and problem:
        raise UserError(f"checkpoint {path} stopped mid-epoch: {problem}")
    if env.is_main:
        print(f"resumed from {path}: epoch {state.epoch}, step {state.step}", flush=True)
    return state
