"""Checkpoints: written by rank 0 only, atomically, from the unwrapped model; loaded weights-only.

Layout under ``<output_dir>/checkpoints/``:
  step_00001234.pt  one file per save (the newest ``keep_last`` are kept; 0 = none kept)
  last.pt           the newest save (a hard link to its step file, or the file itself)
  best.pt           the save with the best validation accuracy so far
A save never overwrites a file in place: it writes ``*.tmp``, fsyncs, then renames, so a crash
leaves the previous ``last.pt`` intact. A damaged newest file falls back to the one before it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dtrain.errors import UserError

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "identity", "model", "optimizer", "scheduler", "scaler", "state", "config")
STEP_FILE = re.compile(r"step_(\d+)\.pt$")


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # epoch in progress (or next to start when samples_in_epoch == 0)
    step: int = 0  # optimizer steps taken in total
    samples_in_epoch: int = 0  # global samples consumed in `epoch` (mid-epoch resume skips them)
    best_accuracy: float = -1.0
    world_size: int = 1  # world size that wrote the checkpoint


def checkpoint_dir(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


# ---------------------------------------------------------------------------------------------
# Saving (rank 0)


def save_checkpoint(payload: dict[str, Any], ckpt_dir: Path, step: int, keep_last: int, is_best: bool) -> Path:
    """Write the checkpoint atomically, point last.pt (and best.pt) at it, prune old step files.

    Any failure (disk full, read-only or missing directory, permissions) is one UserError; the
    temporary files of this save are removed and the previous checkpoints stay as they were.
    """
    last = ckpt_dir / "last.pt"
    target = ckpt_dir / f"step_{step:08d}.pt" if keep_last > 0 else last
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(payload, target)
        if target != last:
            _atomic_link(target, last)
        if is_best:
            _atomic_link(target, ckpt_dir / "best.pt")
    # torch's zip writer reports a full disk as a RuntimeError ("file write failed", "unexpected pos")
    except (OSError, RuntimeError) as e:
        why = _write_failure(e, ckpt_dir)  # before cleaning up: a full disk is still full now
        for name in (target.name, "last.pt", "best.pt"):
            _remove_quietly(ckpt_dir / f"{name}.tmp")
        raise UserError(f"could not write checkpoint {target}: {why}; the previous "
                        "checkpoint is untouched (free space, fix permissions or choose another output_dir)") from None
    if keep_last > 0:
        for old in step_files(ckpt_dir)[keep_last:]:
            _remove_quietly(old)
    return target


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
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _remove_quietly(path: Path) -> None:
    """Best effort: on a read-only file system even removing our own temporary file fails."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
    _fsync_dir(dst.parent)


def remove_stale_temporaries(ckpt_dir: Path) -> list[Path]:
    """*.tmp files a killed save left behind (only rank 0 writes, so none is in progress now)."""
    stale = sorted(ckpt_dir.glob("*.tmp")) if ckpt_dir.is_dir() else []
    for path in stale:
        _remove_quietly(path)
    return stale


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_files(ckpt_dir: Path) -> list[Path]:
    """Step-numbered checkpoints, newest first."""
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob("step_*.pt") if (m := STEP_FILE.search(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


# ---------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and check structure. Never unpickles arbitrary objects (weights_only=True)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, foreign object: all "unreadable"
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        raise UserError(f"checkpoint {path} is not a dtrain checkpoint (missing {', '.join(missing)})")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format {ckpt['format_version']}, this code reads {FORMAT_VERSION}")
    return ckpt


def resume_candidates(resume: str, output_dir: str) -> list[Path]:
    """Files to try, in order. resume='auto': last.pt then older step files; a path: that file only."""
    if not resume:
        return []
    if resume != "auto":
        if Path(resume).is_dir():
            raise UserError(f"resume={resume!r} is a folder: give a checkpoint file in it (e.g. "
                            f"{Path(resume) / 'checkpoints' / 'last.pt'}), or resume=auto")
        if not Path(resume).is_file():
            raise UserError(f"resume file {resume!r} does not exist (give a checkpoint .pt file, or resume=auto)")
        return [Path(resume)]
    ckpt_dir = checkpoint_dir(output_dir)
    candidates = [ckpt_dir / "last.pt"] + step_files(ckpt_dir)
    return [p for p in candidates if p.exists()]


def load_latest(candidates: list[Path], warn) -> tuple[Path, dict[str, Any]] | None:
    """The first candidate that loads; a damaged one is reported and skipped (only with several)."""
    errors = []
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except UserError as e:
            if len(candidates) == 1:
                raise
            errors.append(str(e))
            warn(f"warning: {e}; trying an older checkpoint")
    if errors:
        raise UserError(f"no readable checkpoint among {len(candidates)}: {errors[-1]}")
    return None


def check_identity(ckpt: dict[str, Any], identity: dict[str, Any], path: Path) -> None:
    """A checkpoint from another workload / architecture / class count is an error naming the difference."""
    diffs = [f"{k}={ckpt['identity'].get(k)!r} (this run: {v!r})"
             for k, v in identity.items() if ckpt["identity"].get(k) != v]
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


def state_dict_of(state: TrainState) -> dict[str, Any]:
    return asdict(state)
