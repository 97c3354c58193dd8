"""The Checkpointer: a run's checkpointed state as named parts, saved and restored in one place.

    checkpointer = Checkpointer(cfg, env, strategy, task.identity, heartbeat, parts={
        "model": strategy.checkpoint_part(optimizer),   # model + optimizer, keyed by parameter names
        "ema": EMAState(ema, env),                      # optional: None leaves a part out
        "scheduler": scheduler, "scaler": scaler, "state": train_state, "rng": RngState(env)})
    checkpointer.load()                  # resume=...: every part takes its state back (False: nothing to resume)
    checkpointer.save(step, is_best)     # every rank calls it; a failure anywhere stops every rank
    checkpointer.finish()                # the background write in flight (async_save) is complete
    checkpointer.close()                 # on the way out, whatever the reason

Two kinds of part:
  - plain: any object with state_dict() / load_state_dict(state) (torch's schedulers and scalers, TrainState,
    RngState). Its state is stored under the part's name, in the file or in a sharded checkpoint's
    train_state.pt. A part added after checkpoints were written meets checkpoints without its name: it can
    say what then happens with load_missing(path); without that method resuming them is an error naming it.
  - tensor parts (TensorPart: the model with its optimizer, the EMA): their tensors follow the model's
    layout, whole in a single file, this rank's shards in a sharded checkpoint.
The strategy alone decides the layout (strategy.checkpoint_layout: OneFile or Sharded) and gives the
model+optimizer part; the loop never asks which one it is. Reading follows the checkpoint's own kind,
so every mode resumes from either.

The on-disk format is checkpoint.py's (its docstring); upgrade() there reads older formats.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from dtrain import checkpoint as ckpt
from dtrain.config import Config, to_dict
from dtrain.dist import DistEnv, agree_on_failure, broadcast_object, gather_objects
from dtrain.errors import UserError
from dtrain.optim import keep_implementation


class TensorPart:
    """State whose tensors are laid out like the model's. Each part owns its entries of the file (a sharded
    checkpoint keeps their tensors in the shards, under the same names, and the rest in train_state.pt)."""

    rest_keys: tuple[str, ...] = ()  # what sharded_entries puts into train_state.pt besides plain entries

    def found_in(self, data: dict[str, Any]) -> bool:
        """Whether a checkpoint (its plain entries) holds this part."""
        raise NotImplementedError

    def whole_entries(self) -> dict[str, Any]:
        """The entries of a single file: whole tensors, complete on rank 0 ({} elsewhere is fine). Every
        rank calls it (gathering may be a collective)."""
        raise NotImplementedError

    def sharded_entries(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(this rank's tensors, for the shards; the plain rest, for train_state.pt)."""
        raise NotImplementedError

    def shard_target(self) -> dict[str, Any]:
        """This rank's own tensors, keyed as in the shards: a sharded checkpoint is read into them."""
        raise NotImplementedError

    def load_whole(self, data: dict[str, Any]) -> None:
        raise NotImplementedError

    def load_sharded(self, tensors: dict[str, Any], data: dict[str, Any]) -> None:
        """After the shards were read into shard_target()'s tensors (`tensors`); `data` is train_state.pt."""
        raise NotImplementedError

    def load_missing(self, path: Path) -> None:
        raise UserError(f"checkpoint {path} holds no {type(self).__name__}")

    @staticmethod
    def consolidated(tensors: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """A sharded checkpoint's whole tensors and train_state.pt -> this part's single-file entries."""
        raise NotImplementedError


class ModelAndOptimizer(TensorPart):
    """The model and optimizer state keyed by parameter names (the strategy's state dicts). A single file holds
    `model` and `optimizer`; a sharded checkpoint keeps their tensors in the shards (`model`, `optimizer_state`)
    and the optimizer's param_groups and any non-tensor value in train_state.pt."""

    rest_keys = ("model_other", "optimizer_param_groups", "optimizer_state_other")

    def __init__(self, strategy: Any, optimizer: torch.optim.Optimizer):
        self.strategy, self.optimizer = strategy, optimizer

    def found_in(self, data: dict[str, Any]) -> bool:
        return True  # read_checkpoint refuses a checkpoint without a model

    def whole_entries(self) -> dict[str, Any]:
        model_state, optim_state = self.strategy.state_dicts(self.optimizer)
        return {"model": model_state, "optimizer": optim_state}

    def sharded_entries(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.split(*self.strategy.state_dicts(self.optimizer))

    def shard_target(self) -> dict[str, Any]:
        return self.split(*self.strategy.load_target(self.optimizer))[0]

    def load_whole(self, data: dict[str, Any]) -> None:
        self._load(data["model"], data["optimizer"], whole=True)

    def load_sharded(self, tensors: dict[str, Any], data: dict[str, Any]) -> None:
        self._load(*self.join(tensors, data), whole=False)

    def _load(self, model_state: dict[str, Any], optim_state: dict[str, Any], whole: bool) -> None:
        self.strategy.load_state_dicts(self.optimizer, model_state, keep_implementation(self.optimizer, optim_state),
                                       whole=whole)

    @staticmethod
    def split(model_state: dict[str, Any], optim_state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(what the shards hold, what train_state.pt holds): tensors go to the shards; the optimizer's
        param_groups and any non-tensor value go with the rest, where weights-only loading reads them."""
        per_param = optim_state.get("state", {})
        tensors = {"model": _tensors_of(model_state),
                   "optimizer_state": {name: _tensors_of(s) for name, s in per_param.items()}}
        rest = {"model_other": _others_of(model_state),
                "optimizer_param_groups": optim_state.get("param_groups", []),
                "optimizer_state_other": {name: _others_of(s) for name, s in per_param.items()}}
        return tensors, rest

    @staticmethod
    def join(tensors: dict[str, Any], rest: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The reverse of split: (model state, optimizer state)."""
        model_state = {**tensors["model"], **rest.get("model_other", {})}
        others = rest.get("optimizer_state_other", {})
        names = set(tensors["optimizer_state"]) | set(others)
        state = {name: {**tensors["optimizer_state"].get(name, {}), **others.get(name, {})} for name in names}
        return model_state, {"state": state, "param_groups": rest["optimizer_param_groups"]}

    @staticmethod
    def consolidated(tensors: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        model_state, optim_state = ModelAndOptimizer.join(tensors, data)
        return {"model": model_state, "optimizer": optim_state}


def _tensors_of(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _others_of(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}


class EMAState(TensorPart):
    """The model EMA (ema.enabled): its tensors go with the model's (`ema`), its update count is plain
    (`ema_updates`). A checkpoint without an EMA starts the average from the loaded weights."""

    def __init__(self, ema: Any, env: DistEnv):
        self.ema, self.env = ema, env

    def found_in(self, data: dict[str, Any]) -> bool:
        return "ema_updates" in data

    def whole_entries(self) -> dict[str, Any]:
        return {"ema": self.ema.whole_state(self.env.is_main), "ema_updates": self.ema.updates}

    def sharded_entries(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"ema": self.ema.tensors}, {"ema_updates": self.ema.updates}  # this rank's shards, as the model's

    def shard_target(self) -> dict[str, Any]:
        return {"ema": self.ema.tensors}

    def load_whole(self, data: dict[str, Any]) -> None:
        self.ema.load_whole(data["ema"])
        self.ema.updates = data["ema_updates"]

    def load_sharded(self, tensors: dict[str, Any], data: dict[str, Any]) -> None:
        self.ema.updates = data["ema_updates"]  # the tensors were read in place

    def load_missing(self, path: Path) -> None:
        self.ema.start_from_model()
        if self.env.is_main:
            print(f"checkpoint {path} holds no EMA: the average starts from its weights", flush=True)

    @staticmethod
    def consolidated(tensors: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        return {"ema": tensors["ema"]} if "ema" in tensors else {}


# Every kind of tensor part a checkpoint may hold: consolidate turns each back into its single-file entries.
TENSOR_PARTS: tuple[type[TensorPart], ...] = (ModelAndOptimizer, EMAState)


class RngState:
    """Every rank's Python, torch and CUDA RNG state (a list, one per rank: gathering it is a collective).
    Restored only at the world size that wrote it; at another one each rank keeps its fresh seed."""

    def __init__(self, env: DistEnv):
        self.env = env

    def state_dict(self) -> list[dict[str, Any]]:
        return gather_objects(ckpt.rng_state(), self.env)

    def load_state_dict(self, per_rank: list[dict[str, Any]]) -> None:
        if len(per_rank) == self.env.world_size:
            ckpt.set_rng_state(per_rank[self.env.rank])

    def load_missing(self, path: Path) -> None:
        """Older checkpoints may hold none: each rank keeps its fresh seed."""


# ---------------------------------------------------------------------------------------------
# Layouts: how one save is written, chosen by the strategy


class OneFile:
    """Modes that replicate the model: rank 0 writes every part, whole, into one file."""

    def __init__(self, env: DistEnv, background: bool):
        self.env = env
        self.host = ckpt.HostCopy() if background else None  # async_save: the host buffers, kept between saves

    def write(self, parts: list[TensorPart], plain: dict[str, Any], ckpt_dir: Path, step: int, keep_last: int,
              is_best: bool, writer: ckpt.BackgroundWrite | None) -> None:
        payload = dict(plain)
        for part in parts:
            payload.update(part.whole_entries())
        if not self.env.is_main:
            return
        if writer is None:
            ckpt.save_checkpoint(payload, ckpt_dir, step, keep_last, is_best)
            return
        copied = self.host.take(payload)
        writer.start(lambda: ckpt.save_checkpoint(copied, ckpt_dir, step, keep_last, is_best))

    def close(self) -> None:
        pass


class Sharded:
    """Sharded modes (FSDP): every rank writes its shards of the tensor parts (torch.distributed.checkpoint),
    rank 0 adds the plain rest as train_state.pt."""

    def __init__(self, env: DistEnv, background: bool):
        self.env = env
        # async_save: torch.distributed.checkpoint's background thread runs collectives, on a group of its
        # own so that they never interleave with the training's on the default group.
        self.group, self.stager = None, None
        if background:
            self.stager = ckpt.sharded_stager(env.device.type == "cuda")
        if background and env.distributed:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo")

    def write(self, parts: list[TensorPart], plain: dict[str, Any], ckpt_dir: Path, step: int, keep_last: int,
              is_best: bool, writer: ckpt.BackgroundWrite | None) -> None:
        tensors, rest = {}, dict(plain)
        for part in parts:
            part_tensors, part_rest = part.sharded_entries()
            tensors.update(part_tensors)
            rest.update(part_rest)
        if writer is None:
            ckpt.save_sharded(tensors, rest, ckpt_dir, step, keep_last, is_best, self.env.is_main)
        else:
            ckpt.save_sharded_in_background(tensors, rest, ckpt_dir, step, keep_last, is_best, self.env.is_main,
                                            self.group, writer, self.stager)

    def close(self) -> None:
        if self.stager is not None:
            self.stager.close()
            self.stager = None


# ---------------------------------------------------------------------------------------------
# The Checkpointer


class Checkpointer:
    """Saves and restores the named parts (see the module docstring). `heartbeat` (optional) is told when
    this rank waits for a checkpoint write, for hang reports."""

    def __init__(self, cfg: Config, env: DistEnv, strategy: Any, identity: dict[str, Any], heartbeat: Any = None,
                 parts: dict[str, Any] | None = None):
        self.cfg, self.env, self.identity, self.heartbeat = cfg, env, identity, heartbeat
        self.parts = {name: part for name, part in (parts or {}).items() if part is not None}
        background = cfg.async_save and not cfg.eval_only
        self.layout = strategy.checkpoint_layout(env, background)
        self.writer = ckpt.BackgroundWrite() if background else None
        self.ckpt_dir = ckpt.checkpoint_dir(cfg.output_dir)

    @property
    def tensor_parts(self) -> list[TensorPart]:
        return [part for part in self.parts.values() if isinstance(part, TensorPart)]

    @property
    def plain_parts(self) -> dict[str, Any]:
        return {name: part for name, part in self.parts.items() if not isinstance(part, TensorPart)}

    # Saving

    def save(self, step: int, is_best: bool) -> None:
        """All ranks call this. Nobody runs ahead (or exits) until the checkpoint is in place (async_save:
        until its state is copied off the device), and a failure anywhere stops every rank."""
        self.finish()  # one write at a time: a save waits for the previous one (and stops if it failed)
        plain = {"format_version": ckpt.FORMAT_VERSION, "identity": self.identity, "config": to_dict(self.cfg)}
        plain.update({name: part.state_dict() for name, part in self.plain_parts.items()})  # collectives: all ranks
        failure = None
        try:
            self.layout.write(self.tensor_parts, plain, self.ckpt_dir, step, self.cfg.keep_last, is_best, self.writer)
        except UserError as e:
            failure = e
        # Also the barrier; a background write's failure is learnt at the next finish().
        agree_on_failure(failure, self.env)

    def finish(self) -> None:
        """All ranks: wait for the background write in flight; if it failed anywhere, every rank stops with its error."""
        if self.writer is None:
            return
        if self.writer.busy and self.heartbeat is not None:  # a hang report would name where this rank waits
            self.heartbeat.enter("checkpoint")
        agree_on_failure(self.writer.wait(), self.env)

    def close(self) -> None:
        """On the way out, whatever the reason: the write in flight ends (complete or failed) first. No
        collective here: the other ranks may be gone."""
        if self.writer is None:
            return
        failure = self.writer.wait()
        self.layout.close()
        if failure is not None:
            print(f"warning [rank {self.env.rank}]: {failure}", file=sys.stderr, flush=True)

    # Loading

    def load(self) -> bool:
        """Load the checkpoint named by cfg.resume (either kind, from any mode) into every part; False when
        there is none to resume from."""
        checkpoint = find_checkpoint(self.cfg, self.env)
        if checkpoint is None:
            if self.cfg.eval_only:  # evaluating freshly initialised weights would report a meaningless score
                raise UserError(f"eval_only=true found no checkpoint in {self.ckpt_dir}: "
                                "give resume=PATH, or the output_dir of a trained run")
            return False
        data, path = ckpt.upgrade(checkpoint.data), checkpoint.path
        ckpt.check_identity(data, self.identity, path)
        found = [part for part in self.tensor_parts if part.found_in(data)]
        if checkpoint.sharded:
            self._load_shards(checkpoint, found, data)
        else:
            for part in found:
                part.load_whole(data)
        for part in self.tensor_parts:
            if part not in found:  # after the others: the EMA starts from the loaded model
                part.load_missing(path)
        for name, part in self.plain_parts.items():
            if name in data:
                part.load_state_dict(data[name])
            elif hasattr(part, "load_missing"):
                part.load_missing(path)
            else:
                raise UserError(f"checkpoint {path} holds no {name!r} state (it was written before that part was "
                                "added): start without resume, or resume in the version that wrote it")
        if self.env.is_main:
            state = data["state"]
            print(f"resumed from {path}: epoch {state['epoch']}, step {state['step']}", flush=True)
        return True

    def _load_shards(self, checkpoint: ckpt.Checkpoint, parts: list[TensorPart], data: dict[str, Any]) -> None:
        """One read of every part's shards into this rank's own tensors (a collective), then each part loads."""
        tensors: dict[str, Any] = {}
        for part in parts:
            tensors.update(part.shard_target())
        ckpt.load_sharded_tensors(checkpoint, tensors)
        for part in parts:
            part.load_sharded(tensors, data)


def find_checkpoint(cfg: Config, env: DistEnv) -> ckpt.Checkpoint | None:
    """Rank 0 picks the checkpoint (reporting damaged ones it skips); every rank then reads that one."""
    found, failure = None, None
    if env.is_main:
        try:
            found = ckpt.load_latest(ckpt.resume_candidates(cfg.resume, cfg.output_dir),
                                     warn=lambda msg: print(msg, flush=True))
        except UserError as e:
            failure = e
    agree_on_failure(failure, env)
    chosen = broadcast_object(None if found is None else str(found.path), env)
    if chosen is None:
        return None
    if not env.is_main:
        try:
            found = ckpt.read_checkpoint(Path(chosen))
        except UserError as e:  # e.g. an output_dir that is not on a file system every node shares
            failure = UserError(f"{e} (rank 0 could read it: is output_dir shared by every node?)")
    agree_on_failure(failure, env)
    return found


def consolidated_entries(tensors: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """A sharded checkpoint (its whole tensors and train_state.pt) -> the entries of the single file."""
    rest_keys = {key for kind in TENSOR_PARTS for key in kind.rest_keys}
    entries = {key: value for key, value in data.items() if key not in rest_keys}
    for kind in TENSOR_PARTS:
        entries.update(kind.consolidated(tensors, data))
    return entries
