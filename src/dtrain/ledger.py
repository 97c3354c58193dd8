"""The sample ledger (record_samples=true): which dataset indices each rank trained at each optimizer step.

Each rank appends one fixed-width record per training sample to ``<output_dir>/ledger/rank<r>.bin``:
little-endian uint32 epoch, uint32 optimizer step (1-based, the step the sample's gradient went into),
uint64 dataset index: 16 bytes a sample, written once per step. `r` is the rank in the run (or resumed
run) that trained the step, so after a resume on another world size a step's rank files are those of the
world size that trained it.

A resumed run first cuts every rank's file back to the checkpoint's step: steps trained after the last save
were lost with the process, and are trained again (possibly on other ranks), so the ledger keeps only what
the model holds. ``python -m dtrain.ledger RUN_DIR --step S [--rank R]`` prints what was trained.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

RECORD = np.dtype([("epoch", "<u4"), ("step", "<u4"), ("index", "<u8")])


def ledger_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "ledger"


def rank_file(output_dir: str | Path, rank: int) -> Path:
    return ledger_dir(output_dir) / f"rank{rank}.bin"


def truncate_after(output_dir: str | Path, step: int) -> None:
    """Cut every rank file back to the records of steps <= `step` (and to whole records)."""
    for path in sorted(ledger_dir(output_dir).glob("rank*.bin")):
        whole = path.stat().st_size // RECORD.itemsize
        steps = np.memmap(path, dtype=RECORD, mode="r", shape=(whole,))["step"] if whole else np.empty(0)
        keep = int(np.searchsorted(steps, step, side="right"))  # records are appended in step order
        del steps
        with open(path, "r+b") as f:
            f.truncate(keep * RECORD.itemsize)


class SampleLedger:
    """This rank's appending writer: one write (and flush) per optimizer step."""

    def __init__(self, output_dir: str | Path, rank: int):
        path = rank_file(output_dir, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "ab")

    def record(self, epoch: int, step: int, keys: list[tuple[int, ...]]) -> None:
        rows = np.empty(len(keys), dtype=RECORD)
        rows["epoch"], rows["step"] = epoch, step
        rows["index"] = [key[1] for key in keys]
        self.file.write(rows.tobytes())
        self.file.flush()  # in the OS's hands: a killed process loses nothing it recorded

    def close(self) -> None:
        self.file.close()


def read(output_dir: str | Path, rank: int | None = None) -> dict[int, np.ndarray]:
    """Every rank's records (or one rank's), as structured arrays with fields epoch, step, index."""
    paths = [rank_file(output_dir, rank)] if rank is not None else sorted(ledger_dir(output_dir).glob("rank*.bin"))
    found = {}
    for path in paths:
        if path.exists():
            data = path.read_bytes()
            found[int(path.stem[4:])] = np.frombuffer(data[:len(data) // RECORD.itemsize * RECORD.itemsize],
                                                      dtype=RECORD)
    return found


def samples_at(output_dir: str | Path, step: int, rank: int | None = None) -> dict[int, list[int]]:
    """rank -> the dataset indices it trained at optimizer step `step`."""
    return {r: rows["index"][rows["step"] == step].tolist() for r, rows in read(output_dir, rank).items()
            if (rows["step"] == step).any()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtrain.ledger",
                                     description="Which samples each rank trained (a run with record_samples=true).")
    parser.add_argument("run_dir", type=Path, help="the run's output_dir")
    parser.add_argument("--step", type=int, help="one optimizer step (1-based)")
    parser.add_argument("--epoch", type=int, help="every step of one epoch (0-based)")
    parser.add_argument("--rank", type=int, help="one rank only")
    args = parser.parse_args(argv)
    found = read(args.run_dir, args.rank)
    if not found:
        print(f"error: no sample ledger in {ledger_dir(args.run_dir)} (was the run started with "
              "record_samples=true?)", file=sys.stderr)
        return 1
    for rank, rows in sorted(found.items()):
        if args.step is not None:
            rows = rows[rows["step"] == args.step]
        if args.epoch is not None:
            rows = rows[rows["epoch"] == args.epoch]
        for step in np.unique(rows["step"]):
            at = rows[rows["step"] == step]
            print(f"rank {rank} epoch {int(at['epoch'][0])} step {int(step)}: {' '.join(map(str, at['index']))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
