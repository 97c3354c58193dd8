"""The one training loop, shared by every workload and every execution mode: it drives a `dtrain.build.Trainer`.

One optimizer step is `micro_step` per micro-batch, then `take_step` (`train_step` is the two together):
the benchmarks time these very functions."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dtrain import checkpoint as ckpt
from dtrain.checkpoint import TrainState
from dtrain.data import Layout, to_device
from dtrain.dist import (agree_on_failure, barrier, broadcast_object, gather_floats, gather_objects,
                         max_over_ranks)
from dtrain.errors import StopTraining, UserError
from dtrain.metrics import Throughput
from dtrain.stopping import requeue_slurm_job

if TYPE_CHECKING:  # dtrain.build makes the Trainer and imports this module
    from dtrain.build import Trainer


class NonfiniteWatch:
    """The first optimizer step whose gradient norm was not finite.

    The norm is the check: one inf or nan gradient makes it inf or nan, so no second pass over the
    gradients is needed. Asking `bool(isfinite(norm))` after every step would make the CPU wait for
    the GPU each time, so it could not queue the next step's kernels while this one runs: on GPUs
    the norms are only kept (no op per step) and read together where the loop waits anyway: at log
    steps, before a checkpoint and at the end of an epoch (on the CPU, where nothing runs ahead,
    after every step). Steps taken after a bad one are thrown away with the run: it stops with an
    error naming the bad step and saves nothing.
    """

    most_kept = 256  # norms kept one by one before they are stacked into one tensor (still without a host sync)

    def __init__(self, device: torch.device):
        self.deferred = device.type == "cuda"
        self.steps: list[int] = []  # the step of each norm kept, in order
        self.norms: list[torch.Tensor] = []  # the newest norms (0-d, all on one device: where the gradients are)
        self.folded: torch.Tensor | None = None  # the older ones, 1-d

    def record(self, grad_norm: torch.Tensor, step: int) -> None:
        self.steps.append(step)
        self.norms.append(grad_norm)
        if len(self.norms) >= self.most_kept:  # a long interval between reads (log_every, epochs)
            self.folded, self.norms = self.joined(), []

    def joined(self) -> torch.Tensor:
        """Every norm kept, as one 1-d tensor in step order."""
        newest = torch.stack(self.norms) if self.norms else None
        if self.folded is None or newest is None:
            return self.folded if newest is None else newest
        return torch.cat([self.folded, newest])

    def raise_if_seen(self, epoch: int) -> None:
        if not self.steps:
            return
        finite, steps = torch.isfinite(self.joined()), self.steps
        self.steps, self.norms, self.folded = [], [], None
        if bool(finite.all()):
            return
        step = steps[int(finite.logical_not().nonzero()[0])]
        raise UserError(f"non-finite loss or gradient at step {step} (epoch {epoch}): "
                        "lower optim.lr, check the data, or set nonfinite_loss=skip")


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
        save(t, metrics.get(cfg.best_metric))
        log_memory(t)
        if t.stop.agreed():
            stop_after_save(t)
    if not metrics:  # resumed a finished run: report where it stands
        metrics = evaluate_and_log(t)
    t.checkpointer.finish()  # the run's last checkpoint is complete before the run reports it is done (and exports it)
    if t.task.export is not None:  # from the checkpoint just saved: no gather of the model onto one rank
        failure = None
        if t.env.is_main:
            try:
                t.task.export(cfg.output_dir)
                t.logger.outputs({"exported_model": str((Path(cfg.output_dir) / "model").resolve())})
            except UserError as e:
                failure = e
        agree_on_failure(failure, t.env)
    barrier(t.env)
    return metrics


def reached_max_steps(t: Trainer) -> bool:
    return bool(t.cfg.max_steps) and t.state.step >= t.cfg.max_steps


def train_one_epoch(t: Trainer) -> None:
    """Train from the current position to the end of the epoch (or max_steps / a mid-epoch save)."""
    cfg, env, state = t.cfg, t.env, t.state
    samples_per_step = cfg.batch_size * cfg.grad_accum_steps * env.world_size
    start_epoch_data(t)
    plan = t.sampler.micro_batches() if t.ledger is not None else []
    step_keys: list[tuple[int, ...]] = []
    steps_in_pass = 0
    t.model.train()
    t.logger.start_epoch(state.epoch, t.steps_per_epoch, state.samples_in_epoch // samples_per_step)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=env.device)  # (sum of step losses, steps)
    speed = Throughput()
    autocast = autocast_context(env.device, cfg.precision)
    micro = 0
    t.heartbeat.enter("data", state.step + 1)  # the step in progress, 1-based
    t.clock.restart()
    for batch in t.train_loader:
        t.clock.batch_arrived()
        micro += 1
        last_micro = micro % cfg.grad_accum_steps == 0
        if micro % cfg.grad_accum_steps == 1 or cfg.grad_accum_steps == 1:
            t.profiler.before_step(state.step + 1)
        t.heartbeat.enter("forward/backward")
        loss = micro_step(t, to_device(batch, env.device), last_micro, autocast)
        loss_sum[0] += loss.double() / cfg.grad_accum_steps
        if t.ledger is not None:
            step_keys += plan[micro - 1]
        if not last_micro:
            t.clock.micro_step_done()
            t.heartbeat.enter("data")
            continue
        t.heartbeat.enter("optimizer")
        take_step(t)
        loss_sum[1] += 1
        steps_in_pass += 1
        state.samples_in_epoch = t.sampler.position_after(steps_in_pass)
        if t.ledger is not None:
            t.ledger.record(state.epoch, state.step, step_keys)
            step_keys = []
        speed.samples += samples_per_step
        t.clock.step_done()
        t.profiler.after_step(state.step)
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
            t.clock.restart()  # the save is not data wait
        t.heartbeat.enter("data", state.step + 1)
    else:  # the epoch ran to its end
        state.epoch += 1
        state.samples_in_epoch = 0
    t.nonfinite.raise_if_seen(last_trained_epoch(state))  # before evaluating what a bad step reached
    t.logger.end_epoch()


def start_epoch_data(t: Trainer) -> None:
    """Point the sampler at the training position. An epoch begun under another layout (world size, batch,
    accumulation) continues with the rest of that layout's order dealt over this run's ranks."""
    state, here = t.state, t.sampler.layout
    if state.samples_in_epoch == 0:
        state.epoch_world_size, state.epoch_batch_size, state.epoch_grad_accum_steps = (
            here.world_size, here.batch_size, here.grad_accum_steps)
    origin = Layout(state.epoch_world_size, state.epoch_batch_size, state.epoch_grad_accum_steps)
    if origin == here:
        t.sampler.start_epoch(state.epoch, skip=state.samples_in_epoch // here.world_size)
        return
    left_out = t.sampler.start_resized(state.epoch, state.samples_in_epoch, origin)
    t.logger.print(f"epoch {state.epoch} began with {origin.world_size} process(es) x batch_size "
                   f"{origin.batch_size} x grad_accum_steps {origin.grad_accum_steps}: its remaining samples after "
                   f"{state.samples_in_epoch} are dealt over {here.world_size} process(es)"
                   + (f"; {left_out} sample(s) too few for a step are left out" if left_out else ""))


def stop_after_save(t: Trainer) -> None:
    """Every rank got here at the same step, after the checkpoint was written."""
    t.checkpointer.finish()  # a background write: stopped only once it is complete (and last.pt points at it)
    exit_code = StopTraining.exit_code
    if t.env.is_main:
        t.logger.print(f"stopped at step {t.state.step}: checkpoint saved in {ckpt.checkpoint_dir(t.cfg.output_dir)}")
        if t.cfg.requeue and "SLURM_JOB_ID" in os.environ:
            requeue = requeue_slurm_job()
            t.logger.print(requeue.line)
            exit_code = requeue.exit_code
    # Nobody exits before rank 0 has requeued (a launcher that sees one rank exit may kill the rest),
    # and every rank exits with rank 0's code (srun reports the highest).
    stop = StopTraining()
    stop.exit_code = broadcast_object(exit_code, t.env)
    raise stop


def micro_step(t: Trainer, batch: Any, last_micro: bool, autocast: contextlib.AbstractContextManager | None = None,
               after_forward=None) -> torch.Tensor:
    """Forward and backward of one micro-batch (on the device), its loss scaled for accumulation; the gradient
    all-reduce only on the step's last micro-batch. Returns the (detached) loss. `after_forward()`, if given,
    runs between forward and backward (a benchmark's timer)."""
    autocast = autocast_context(t.env.device, t.cfg.precision) if autocast is None else autocast
    # no_sync has to cover the forward pass too: DDP's forward prepares the backward all-reduce.
    with t.strategy.no_sync(skip=not last_micro):
        with autocast:
            loss = t.task.train_loss(t.model, batch)
        if after_forward is not None:
            after_forward()
        t.scaler.scale(loss / t.cfg.grad_accum_steps).backward()
    return loss.detach()


def train_step(t: Trainer, micro_batches: list, all_reduce: bool = True) -> torch.Tensor:
    """One optimizer step as train_one_epoch takes it, over grad_accum_steps micro-batches already on the
    device; returns the step's mean loss (a tensor: reading it would wait for the device). all_reduce=False
    skips the gradient all-reduce of the last micro-batch too (a benchmark's floor)."""
    if len(micro_batches) != t.cfg.grad_accum_steps:
        raise ValueError(f"{len(micro_batches)} micro-batches for grad_accum_steps={t.cfg.grad_accum_steps}")
    autocast = autocast_context(t.env.device, t.cfg.precision)
    loss = torch.zeros((), device=t.env.device)
    for i, batch in enumerate(micro_batches):
        loss += micro_step(t, batch, all_reduce and i == len(micro_batches) - 1, autocast) / len(micro_batches)
    take_step(t)
    return loss


def take_step(t: Trainer) -> None:
    """After the step's last backward: the optimizer step, the step count, the EMA."""
    optimizer_step(t)
    t.state.step += 1
    if t.ema is not None:
        t.ema.after_step(t.state.step)


def optimizer_step(t: Trainer) -> None:
    """Clip, step, schedule; a non-finite gradient stops the run or skips the step (nonfinite_loss)."""
    cfg = t.cfg
    t.scaler.unscale_(t.optimizer)
    # The norm is global (reduced over the shards under FSDP; after DDP's all-reduce the gradients are
    # identical everywhere), so every rank reaches the same verdict without another collective.
    scaler_checks = cfg.precision == "fp16"  # the scaler skips a non-finite step itself and lowers its scale
    if cfg.optim.grad_clip > 0 or not scaler_checks:  # otherwise nothing needs the norm: not computed
        grad_norm = t.strategy.clip_grad_norm(cfg.optim.grad_clip)
    if scaler_checks:
        pass
    elif cfg.nonfinite_loss == "stop":
        t.nonfinite.record(grad_norm, t.state.step + 1)  # read later: see NonfiniteWatch
    elif not bool(torch.isfinite(grad_norm)):  # skipping must be decided now: a host sync per step on GPUs
        t.logger.print(f"warning: non-finite gradient at step {t.state.step + 1}; step skipped")
        t.optimizer.zero_grad(set_to_none=t.strategy.zero_grad_to_none)
        t.scheduler.step()
        return
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=t.strategy.zero_grad_to_none)
    t.scheduler.step()


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def log_train(t: Trainer, loss_sum: torch.Tensor, speed: Throughput) -> None:
    """The window's global mean loss and every rank's timing: one small all-gather, only at log steps."""
    rows = gather_floats([*loss_sum.tolist(), *t.clock.take_window()], t.env)  # per rank: loss sum, steps, timing
    timing, warnings = t.timing.record([row[2:] for row in rows])
    rate = speed.rate()
    record = {
        "kind": "train",
        "epoch": t.state.epoch,
        "step": t.state.step,
        "loss": sum(row[0] for row in rows) / max(sum(row[1] for row in rows), 1.0),
        "lr": t.optimizer.param_groups[0]["lr"],
        "samples_per_sec": rate,
        **timing,
    }
    if t.flops_per_sample:  # achieved per device: what MFU compares with the device's peak
        record["tflops_per_device"] = t.flops_per_sample * rate / t.env.world_size / 1e12
        if t.cfg.peak_tflops:
            record["mfu"] = record["tflops_per_device"] / t.cfg.peak_tflops
    t.logger.record(record, t.state.step)
    for warning in warnings:
        t.logger.print(warning)
    loss_sum.zero_()
    speed.reset()


def last_trained_epoch(state: TrainState) -> int:
    """0-based epoch of the latest optimizer step (state.epoch already points past a finished epoch)."""
    return state.epoch - 1 if state.samples_in_epoch == 0 and state.epoch > 0 else state.epoch


def log_memory(t: Trainer) -> None:
    """Peak memory and this rank's parameter, gradient and optimizer-state MB, per rank."""
    held = {key.replace("_bytes", "_mb"): value / 2**20 for key, value in t.strategy.local_bytes(t.optimizer).items()}
    per_rank = gather_objects({**t.logger.memory.report(), **held}, t.env)
    record: dict[str, Any] = {"kind": "memory", "epoch": last_trained_epoch(t.state), "step": t.state.step}
    for key in per_rank[0]:
        record[key] = [round(r[key], 1) for r in per_rank]
    t.logger.record(record, t.state.step)


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def eval_totals(t: Trainer) -> dict[str, Any]:
    """The workload's evaluation sums over the whole validation set, added over the ranks: exact whatever the
    world size. Scalars come back as floats, other shapes (a confusion matrix) as CPU tensors."""
    t.heartbeat.enter("evaluation")
    model = t.strategy.eval_model()
    model.eval()
    autocast = autocast_context(t.env.device, t.cfg.precision)
    mine = len(t.val_loader)
    # Where every forward is a collective (FSDP gathers each unit's parameters), a rank with fewer
    # batches runs padding batches until the last rank is done; their sums are left out.
    batches = max_over_ranks(mine, t.env) if t.strategy.collective_forward else mine
    local: dict[str, torch.Tensor] = {}
    loader = iter(t.val_loader)
    for i in range(batches):
        batch = to_device(next(loader) if i < mine else padding_batch(t), t.env.device)
        with autocast:
            sums = t.task.eval_sums(model, batch)
        t.heartbeat.tick()
        if i >= mine:
            continue
        for key, value in sums.items():  # accumulate on the device: no host sync per batch
            local[key] = local.get(key, 0) + value.detach().double()
    totals: dict[str, Any] = {}
    local_cpu = {key: value.cpu() for key, value in local.items()}
    for rank_sums in gather_objects(local_cpu, t.env):  # ranks may hold no batch at all: merge dicts
        for key, value in rank_sums.items():
            totals[key] = totals[key] + value if key in totals else value
    return {key: value.item() if value.ndim == 0 else value for key, value in totals.items()}


def padding_batch(t: Trainer):
    """A one-sample batch to run through a collective forward whose result is discarded."""
    return t.val_loader.collate_fn([t.task.val_set[0]])


def evaluate_and_log(t: Trainer) -> dict[str, Any]:
    """Evaluate the model, then its EMA (records `eval` and `eval_ema`); the EMA's metrics come back
    prefixed with `ema_`."""
    metrics = evaluate_and_record(t, "eval")
    if t.ema is not None:
        with t.ema.swapped_in():
            ema_metrics = evaluate_and_record(t, "eval_ema")
        metrics.update({f"ema_{key}": value for key, value in ema_metrics.items()})
    return metrics


def evaluate_and_record(t: Trainer, kind: str) -> dict[str, Any]:
    totals = eval_totals(t)
    metrics = t.task.summarize(totals)
    t.logger.record({"kind": kind, "epoch": last_trained_epoch(t.state), "step": t.state.step, **metrics},
                    t.state.step)
    if t.task.confusion is not None:
        t.logger.confusion(kind, t.state.step, *t.task.confusion(totals))
    return metrics


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save(t: Trainer, score: float | None) -> None:
    """All ranks call this; the checkpointer writes every part (and stops every rank if that fails anywhere).
    `score` is this save's value of best_metric (None when it was not evaluated)."""
    t.nonfinite.raise_if_seen(last_trained_epoch(t.state))  # never checkpoint what a bad step reached
    t.heartbeat.enter("checkpoint")
    state = t.state
    is_best = score is not None and score > state.best_score
    if is_best:
        state.best_score = score
    state.world_size = t.env.world_size
    t.checkpointer.save(state.step, is_best)
    t.logger.outputs({"checkpoint_dir": str(t.checkpointer.ckpt_dir.resolve()), "checkpoint_step": str(state.step),
                      **({"best_step": str(state.step)} if is_best else {})})
