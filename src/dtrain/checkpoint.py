"""Checkpoints: atomic, loadable in every mode, never unpickling arbitrary objects.

Layout under ``<output_dir>/checkpoints/``:
  step_00001234.pt   one file, written by rank 0 (modes that replicate the model: one device, DP, DDP)
  step_00001234/     a sharded checkpoint (FSDP), written by every rank: torch.distributed.checkpoint's
                     .metadata and __<rank>_0.distcp files hold the tensors, train_state.pt the rest
  last.pt | last     the newest save: a hard link to the step file | a symbolic link to the step folder
  best.pt | best     the save with the best validation accuracy so far, likewise
The newest ``keep_last`` step entries are kept (and the one ``best`` names). Both kinds hold the same
state keyed by parameter names, so every mode resumes from either kind (``python -m
dtrain.checkpoint consolidate`` turns a sharded one into one file).

A save never overwrites anything in place: it writes ``*.tmp``, fsyncs, then renames, so a crash
leaves the previous checkpoint intact; a damaged newest checkpoint falls back to the one before it.
Loading reads tensors and plain data only (``torch.load(weights_only=True)``, and a sharded
checkpoint's metadata is checked against an allow-list before torch.distributed.checkpoint reads it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import io
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch

from dtrain.errors import UserError

# 1: optimizer state by parameter position (torch's own format), no longer read; 2: by parameter name. Within
# format 2, older entries are read by upgrade().
FORMAT_VERSION = 2
READABLE_VERSIONS = (2,)
REQUIRED_KEYS = ("format_version", "identity", "scheduler", "scaler", "state", "config")
STATE_FILE = "train_state.pt"  # in a sharded checkpoint: everything but the tensors
STEP_ENTRY = re.compile(r"step_(\d+)(\.pt)?$")


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint (the Checkpointer's `state` part)."""

    epoch: int = 0  # epoch in progress (or next to start when samples_in_epoch == 0)
    step: int = 0  # optimizer steps taken in total
    samples_in_epoch: int = 0  # global samples consumed in `epoch` (mid-epoch resume skips them)
    best_score: float = -1.0  # the best value of best_metric so far
    world_size: int = 1  # world size that wrote the checkpoint
    best_metric: str = "accuracy"  # what best_score measures
    tracker_run_id: str = ""  # the experiment trackers' run, continued on resume ('' in older checkpoints)
    # The layout that began `epoch` (world size, batch_size, grad_accum_steps; 0: unknown, an older
    # checkpoint): it fixes the epoch's sample order and end, so a resize can deal out the rest.
    epoch_world_size: int = 0
    epoch_batch_size: int = 0
    epoch_grad_accum_steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """In place (the loop holds this object); a field the checkpoint lacks keeps its default."""
        for f in fields(self):
            setattr(self, f.name, state.get(f.name, f.default))


@dataclass
class Checkpoint:
    """A checkpoint that passed its checks. A single file's tensors are in `data`; a sharded one's are
    read by load_sharded_tensors, into tensors this rank already holds."""

    path: Path
    data: dict[str, Any]  # everything (single file) or everything but the tensors (sharded)

    @property
    def sharded(self) -> bool:
        return self.path.is_dir()


def checkpoint_dir(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


# ---------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(payload: dict[str, Any], ckpt_dir: Path, step: int, keep_last: int, is_best: bool) -> Path:
    """Rank 0: write one file atomically, point last.pt (and best.pt) at it, prune old step entries.

    Any failure (disk full, read-only or missing directory, permissions) is one UserError; the
    temporary files of this save are removed and the previous checkpoints stay as they were.
    """
    target = ckpt_dir / f"step_{step:08d}.pt" if keep_last > 0 else ckpt_dir / "last.pt"
    with _save_errors(ckpt_dir, target, [f"{target.name}.tmp", "last.pt.tmp", "best.pt.tmp"]):
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(payload, target)
        for name in ("last", "best") if is_best else ("last",):
            if target.name != f"{name}.pt":
                _atomic_link(target, ckpt_dir / f"{name}.pt")
            _remove_quietly(ckpt_dir / name)  # a sharded save's pointer: this one is newer
    prune(ckpt_dir, keep_last)
    return target


def save_sharded(tensors: dict[str, Any], meta: dict[str, Any], ckpt_dir: Path, step: int, keep_last: int,
                 is_best: bool, is_main: bool) -> Path:
    """Every rank: write this rank's tensors into step_N.tmp/ (a collective), then rank 0 adds the rest
    (meta), renames the folder to step_N/ and points last (and best) at it.

    A failure on any rank raises on every rank (torch.distributed.checkpoint gathers them); rank 0's
    own steps raise on rank 0 only (the caller makes every rank learn of it).
    """
    import torch.distributed.checkpoint as dcp

    final = ckpt_dir / f"step_{step:08d}"
    staging = final.with_name(final.name + ".tmp")
    with _save_errors(ckpt_dir, final, [staging.name]):
        dcp.save(tensors, checkpoint_id=staging, no_dist=not _distributed())
    if is_main:
        _complete_sharded(meta, ckpt_dir, final, staging, keep_last, is_best)
    return final


def _complete_sharded(meta: dict[str, Any], ckpt_dir: Path, final: Path, staging: Path, keep_last: int,
                      is_best: bool) -> None:
    """Rank 0, once every rank's shard is written: add the rest, rename step_N.tmp/, move the links, prune."""
    with _save_errors(ckpt_dir, final, [staging.name, "last.tmp", "best.tmp"]):
        _atomic_torch_save(meta, staging / STATE_FILE)
        for part in staging.iterdir():  # DCP does not fsync what it wrote
            _fsync(part)
        if final.exists():  # the same step saved again (a resumed run that stopped where it started)
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync(ckpt_dir)
        for name in ("last", "best") if is_best else ("last",):
            _atomic_symlink(final.name, ckpt_dir / name)
            _remove_quietly(ckpt_dir / f"{name}.pt")  # a single-file save's pointer: this one is newer
    prune(ckpt_dir, max(keep_last, 1))  # the folder `last` points to is the newest step entry itself


# ---------------------------------------------------------------------------------------------
# Saving in the background (async_save=true)


class HostCopy:
    """A state's tensors copied into host memory the training step does not touch, so that a background
    write sees the state of one step. The buffers are kept from save to save (pinned where the tensors
    are on a GPU: the copy off the device is then one transfer the step waits for, and nothing else);
    a save never starts before the previous write ended, so no buffer is read while it is refilled."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, state: Any) -> Any:
        on_gpu: list[bool] = []
        copied = self._copy(state, "", on_gpu)
        if any(on_gpu):  # non-blocking copies: the buffers are complete only once the stream got there
            torch.cuda.current_stream().synchronize()
        return copied

    def _copy(self, value: Any, key: str, on_gpu: list[bool]) -> Any:
        if isinstance(value, torch.Tensor):
            return self._copy_tensor(value.detach(), key, on_gpu)
        if isinstance(value, dict):
            return {k: self._copy(v, f"{key}/{k}", on_gpu) for k, v in value.items()}
        if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
            return type(value)(self._copy(v, f"{key}/{i}", on_gpu) for i, v in enumerate(value))
        return copy.deepcopy(value)  # plain values: the loop may change lists and dicts it handed over

    def _copy_tensor(self, tensor: torch.Tensor, key: str, on_gpu: list[bool]) -> torch.Tensor:
        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
            self.buffers[key] = buffer
        buffer.copy_(tensor, non_blocking=tensor.is_cuda)
        on_gpu.append(tensor.is_cuda)
        return buffer


class BackgroundWrite:
    """At most one checkpoint write in flight, in a thread of its own. A failure is kept as the
    UserError a synchronous save would have raised; `wait` hands it over once the write has ended."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._failure: UserError | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, write: Callable[[], Any]) -> None:
        if self._thread is not None:
            raise RuntimeError("a checkpoint write started before the previous one was waited for")
        self._thread = threading.Thread(target=self._run, args=(write,), name="dtrain-checkpoint-write")
        self._thread.start()

    def _run(self, write: Callable[[], Any]) -> None:
        try:
            write()
        except UserError as e:
            self._failure = e
        except Exception as e:  # noqa: BLE001 - reported by the training thread, at its next wait
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self._failure = UserError(f"the background checkpoint write failed: {type(e).__name__}: {first}")

    def wait(self) -> UserError | None:
        """Block until the write in flight (if any) has ended; its failure, or None."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        failure, self._failure = self._failure, None
        return failure


def sharded_stager(on_gpu: bool) -> Any:
    """torch.distributed.checkpoint's stager, kept for the whole run: it keeps the host copy of each
    tensor between saves (pinned on GPUs, the copy made before async_save returns)."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    return DefaultStager(StagingOptions(use_pinned_memory=on_gpu, use_shared_memory=False, use_async_staging=False,
                                        use_non_blocking_copy=on_gpu))


def save_sharded_in_background(tensors: dict[str, Any], meta: dict[str, Any], ckpt_dir: Path, step: int,
                               keep_last: int, is_best: bool, is_main: bool, process_group: Any,
                               writer: BackgroundWrite, stager: Any) -> None:
    """Every rank: torch.distributed.checkpoint.async_save copies this rank's tensors to host memory
    now (with `stager`, whose buffers are kept between saves) and writes them in its own thread
    (collectives on `process_group`, not the training's); the writer thread then waits for that and
    (rank 0) completes the save as save_sharded does."""
    import torch.distributed.checkpoint as dcp

    final = ckpt_dir / f"step_{step:08d}"
    staging = final.with_name(final.name + ".tmp")
    with _save_errors(ckpt_dir, final, [staging.name]):
        pending = dcp.async_save(tensors, checkpoint_id=staging, process_group=process_group, async_stager=stager,
                                 no_dist=not _distributed())
    meta = copy.deepcopy(meta)  # the rest: plain values the loop goes on changing

    def finish() -> None:
        with _save_errors(ckpt_dir, final, [staging.name]):
            pending.result()
        if is_main:
            _complete_sharded(meta, ckpt_dir, final, staging, keep_last, is_best)

    writer.start(finish)


@contextlib.contextmanager
def _save_errors(ckpt_dir: Path, target: Path, temporaries: list[str]):
    """Turn a failed write into one UserError, after removing this save's temporary files (names in ckpt_dir)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    # torch's zip writer reports a full disk as a RuntimeError ("file write failed", "unexpected pos");
    # torch.distributed.checkpoint gathers every rank's failure into a CheckpointException.
    except (OSError, RuntimeError, CheckpointException) as e:
        why = _write_failure(e, ckpt_dir)  # before cleaning up: a full disk is still full now
        for name in temporaries:
            _remove_quietly(ckpt_dir / name)
        raise UserError(f"could not write checkpoint {target}: {why}; the previous checkpoint is untouched "
                        "(free space, fix permissions or choose another output_dir)") from None


def _write_failure(error: BaseException, ckpt_dir: Path) -> str:
    """What went wrong, in words: the OS error's own, or a full disk behind torch's RuntimeError."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    try:
        free = shutil.disk_usage(ckpt_dir).free
    except OSError:
        free = None
    if free is not None and free < 1 << 20:
        return f"no space left on the device ({free // 1024} KiB free)"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _remove_quietly(path: Path) -> None:
    """Best effort: on a read-only file system even removing our own temporary file fails."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _atomic_link(src: Path, dst: Path) -> None:
    """dst becomes another name for src's content; readers see either the old or the new file."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        shutil.copyfile(src, tmp)  # file systems without hard links: copy instead
    os.replace(tmp, dst)
    _fsync(dst.parent)


def _atomic_symlink(target_name: str, link: Path) -> None:
    """`link` names the folder `target_name` beside it (relative: the run folder can move)."""
    tmp = link.with_name(link.name + ".tmp")
    _remove_quietly(tmp)
    os.symlink(target_name, tmp)
    os.replace(tmp, link)
    _fsync(link.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def step_entries(ckpt_dir: Path) -> list[Path]:
    """Step-numbered checkpoints, files and folders, newest first."""
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob("step_*") if (m := STEP_ENTRY.search(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Remove step entries beyond the newest keep_last, except the folder `best` names."""
    best = ckpt_dir / "best"
    kept = best.resolve() if best.is_symlink() else None
    for old in step_entries(ckpt_dir)[keep_last:]:
        if old.resolve() != kept:
            _remove_quietly(old)


def remove_stale_temporaries(ckpt_dir: Path) -> list[Path]:
    """*.tmp files and folders a killed save left behind (no save is in progress when a run starts)."""
    stale = sorted(ckpt_dir.glob("*.tmp")) if ckpt_dir.is_dir() else []
    for path in stale:
        _remove_quietly(path)
    return stale


# ---------------------------------------------------------------------------------------------
# Loading


def read_checkpoint(path: Path) -> Checkpoint:
    """Load (a single file) or check (a sharded folder) a checkpoint. Never unpickles arbitrary objects."""
    if path.is_dir():
        data = _load_weights_only(path / STATE_FILE, shown=path)
        _check_structure(data, path)
        _check_shards(path)
        return Checkpoint(path, data)
    data = _load_weights_only(path, shown=path)
    _check_structure(data, path)
    if "model" not in data or "optimizer" not in data:
        raise UserError(f"checkpoint {path} is not a dtrain checkpoint (missing model or optimizer)")
    return Checkpoint(path, data)


def _load_weights_only(path: Path, shown: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {shown} does not exist" if path == shown else
                        f"checkpoint {shown} is unreadable (no {path.name}: an interrupted save?)") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, foreign object: all "unreadable"
        raise UserError(f"checkpoint {shown} is unreadable ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def _check_structure(data: Any, path: Path) -> None:
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(data, dict) or k not in data]
        raise UserError(f"checkpoint {path} is not a dtrain checkpoint (missing {', '.join(missing)})")
    version = data["format_version"]
    if version == 1:  # optimizer state by parameter position
        raise UserError(f"checkpoint {path} has the old format 1, which this code no longer reads: resume it once "
                        "with dtrain at commit 0ca16d3 or older (not in mode=fsdp); its next save has format 2")
    if version not in READABLE_VERSIONS:
        raise UserError(f"checkpoint {path} has format {version}, this code reads "
                        f"{', '.join(map(str, READABLE_VERSIONS))}")


# What a sharded checkpoint's .metadata may contain: torch.distributed.checkpoint reads it with plain
# pickle, which would run any code a crafted file names.
METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                   torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed")


def _check_shards(path: Path) -> None:
    """The metadata is safe and plain, and every shard file holds every byte it points into."""
    try:
        with open(path / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} is unreadable (no .metadata: an interrupted save?)") from None
    except Exception as e:  # noqa: BLE001 - truncated, foreign or crafted: all "unreadable"
        raise UserError(f"checkpoint {path} is unreadable (.metadata: {type(e).__name__}: {e})") from None
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    if any(isinstance(item, BytesStorageMetadata) for item in metadata.state_dict_metadata.values()):
        raise UserError(f"checkpoint {path} holds pickled objects among its tensors; dtrain never writes those")
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        name = str(info.relative_path)
        needed[name] = max(needed.get(name, 0), info.offset + info.length)
    for name, size in needed.items():
        shard = path / name
        have = shard.stat().st_size if shard.is_file() else -1
        if have < size:
            what = "is missing" if have < 0 else f"is cut short ({have} of {size} bytes)"
            raise UserError(f"checkpoint {path} is unreadable (its shard {name} {what})")


def load_sharded_tensors(checkpoint: Checkpoint, tensors: dict[str, Any]) -> None:
    """Read a sharded checkpoint's tensors into `tensors` (this rank's part; a collective)."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(tensors, checkpoint_id=checkpoint.path, no_dist=not _distributed())
    except Exception as e:  # noqa: BLE001 - shapes that do not match this model, a damaged shard
        raise UserError(f"checkpoint {checkpoint.path} does not load into this model: "
                        f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None


def resume_candidates(resume: str, output_dir: str) -> list[Path]:
    """Checkpoints to try, in order. resume='auto': the newest (last) then older step entries; a path: that one."""
    if not resume:
        return []
    if resume != "auto":
        path = Path(resume)
        if path.is_dir() and not (path / STATE_FILE).is_file():
            raise UserError(f"resume={resume!r} is a folder, not a checkpoint: give a checkpoint in it (e.g. "
                            f"{path / 'checkpoints' / 'last.pt'}), or resume=auto")
        if not path.exists():
            raise UserError(f"resume file {resume!r} does not exist (give a checkpoint .pt file, or resume=auto)")
        return [path]
    ckpt_dir = checkpoint_dir(output_dir)
    candidates = [ckpt_dir / "last.pt", ckpt_dir / "last"] + step_entries(ckpt_dir)
    return [p for p in candidates if p.exists()]  # a dangling `last` link does not exist


def load_latest(candidates: list[Path], warn) -> Checkpoint | None:
    """The first candidate that passes its checks; a damaged one is reported and skipped (only with several)."""
    errors = []
    for path in candidates:
        try:
            return read_checkpoint(path)
        except UserError as e:
            if len(candidates) == 1:
                raise
            errors.append(str(e))
            warn(f"warning: {e}; trying an older checkpoint")
    if errors:
        raise UserError(f"no readable checkpoint among {len(candidates)}: {errors[-1]}")
    return None


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's plain entries as the current code reads them: older entries renamed or filled in."""
    state = dict(data["state"])
    if "best_accuracy" in state:  # the old name of best_score, which holds any best_metric
        state["best_score"] = state.pop("best_accuracy")
    if not state.get("epoch_world_size"):  # unknown: the epoch began under the layout that saved it
        state["epoch_world_size"] = state.get("world_size", 1)
        state["epoch_batch_size"] = data["config"]["batch_size"]
        state["epoch_grad_accum_steps"] = data["config"].get("grad_accum_steps", 1)
    return {**data, "state": state}


def check_identity(data: dict[str, Any], identity: dict[str, Any], path: Path) -> None:
    """A checkpoint from another workload / architecture / class count is an error naming the difference."""
    diffs = [f"{k}={data['identity'].get(k)!r} (this run: {v!r})"
             for k, v in identity.items() if data["identity"].get(k) != v]
    if diffs:
        raise UserError(f"checkpoint {path} does not match this run: {', '.join(diffs)}")


# ---------------------------------------------------------------------------------------------
# Random-number state, per rank


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------------------------------------
# python -m dtrain.checkpoint consolidate SHARDED OUT.pt


def consolidate(source: Path, out: Path) -> Path:
    """A sharded checkpoint -> one file in the single-file format, loadable by every mode (and by a
    plain `model.load_state_dict(torch.load(OUT)["model"])`)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    checkpoint = read_checkpoint(source.resolve() if source.is_symlink() else source)
    if not checkpoint.sharded:
        raise UserError(f"{source} is a single-file checkpoint already")
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmp:
        whole = Path(tmp) / "whole.pt"
        dcp_to_torch_save(checkpoint.path, whole)
        tensors = torch.load(whole, map_location="cpu", weights_only=True)
    from dtrain.checkpointer import consolidated_entries  # each tensor part's own format (the model's, the EMA's)

    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save(consolidated_entries(tensors, checkpoint.data), out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtrain.checkpoint", description="Checkpoint tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    cons = sub.add_parser("consolidate", help="a sharded checkpoint (FSDP) -> one .pt file any mode resumes from")
    cons.add_argument("source", type=Path, help="a step_N folder, or the `last`/`best` link to one")
    cons.add_argument("out", type=Path, help="the file to write, e.g. model.pt")
    args = parser.parse_args(argv)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch's single-process warnings
            out = consolidate(args.source, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}: resume=... any mode from it, or load its 'model' entry into the plain model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
