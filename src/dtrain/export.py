"""Export a checkpoint as the plain library loads it, tensor by tensor, without gathering a model.

    python -m dtrain.export RUN_DIR_OR_CHECKPOINT OUT

- image runs: OUT is one safetensors file; ``torchvision.models.get_model(arch, num_classes=N)
  .load_state_dict(safetensors.torch.load_file(OUT))`` loads it (strict).
- BERT runs: OUT is a ``save_pretrained`` folder (config.json, model.safetensors, the tokenizer);
  ``AutoModelForSequenceClassification.from_pretrained(OUT)`` loads it.

The source is a single file (step_N.pt, last.pt) or a sharded folder (FSDP: step_N/, last), or a run's
output_dir (its newest readable checkpoint). Each tensor is read, written and dropped before the next:
from a sharded checkpoint through torch.distributed.checkpoint one tensor at a time, from a single file
through a memory map whose pages are handed back once written. Peak memory is about the largest tensor,
not the model (bench/results: export_memory_*).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import struct
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from dtrain import checkpoint as ckpt
from dtrain.errors import UserError
from dtrain.workloads import WORKLOADS

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint's model tensors one at a time


def find_source(source: Path) -> ckpt.Checkpoint:
    """The checkpoint `source` names: a run's output_dir (its newest readable one), a file or a folder."""
    if (source / "checkpoints").is_dir():
        for candidate in ckpt.resume_candidates("auto", str(source)):
            try:
                return read_mapped(candidate)
            except UserError as e:
                print(f"warning: {e}; trying an older checkpoint", flush=True)
        raise UserError(f"{source} holds no readable checkpoint to export")
    if not source.exists():
        raise UserError(f"{source} does not exist: give a run's output_dir or a checkpoint")
    return read_mapped(source)


def read_mapped(path: Path) -> ckpt.Checkpoint:
    """A checkpoint whose tensors stay on disk: a sharded folder's are read on demand, a single file's through
    a memory map (so checking it does not read the whole file into memory, as resuming does)."""
    path = path.resolve() if path.is_symlink() else path
    if path.is_dir():
        return ckpt.read_checkpoint(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, foreign object: all "unreadable"
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    ckpt._check_structure(data, path)
    if "model" not in data:
        raise UserError(f"checkpoint {path} is not a dtrain checkpoint (missing model)")
    return ckpt.Checkpoint(path, data)


def model_specs(checkpoint: ckpt.Checkpoint) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) of every model tensor, read from the metadata only."""
    if checkpoint.sharded:
        from torch.distributed.checkpoint import FileSystemReader

        # read_checkpoint has checked this .metadata against the allow-list before it is unpickled here.
        metadata = FileSystemReader(str(checkpoint.path)).read_metadata()
        return {key[len("model."):]: (item.properties.dtype, tuple(item.size))
                for key, item in metadata.state_dict_metadata.items() if key.startswith("model.")}
    return {name: (t.dtype, tuple(t.shape)) for name, t in checkpoint.data["model"].items()
            if isinstance(t, torch.Tensor)}


def model_tensors(checkpoint: ckpt.Checkpoint, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each of `names`, one at a time; a tensor is only valid until the next one."""
    if checkpoint.sharded:
        import torch.distributed.checkpoint as dcp

        specs = model_specs(checkpoint)
        for name in names:
            dtype, shape = specs[name]
            target = {"model": {name: torch.empty(shape, dtype=dtype)}}
            with warnings.catch_warnings():  # "torch.distributed is disabled...": one process is the intent
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(target, checkpoint_id=checkpoint.path, no_dist=True)
            yield name, target["model"].pop(name)
        return
    for name in names:
        tensor = checkpoint.data["model"][name]
        yield name, tensor
        _release_pages(tensor)


def _release_pages(tensor: torch.Tensor) -> None:
    """Hand a memory-mapped tensor's pages back to the kernel (the map is private and unmodified: a later
    read would fetch them from the file again), so the resident set does not grow to the whole file."""
    start = tensor.untyped_storage().data_ptr()
    size = tensor.untyped_storage().nbytes()
    page = mmap.PAGESIZE
    first, last = (start + page - 1) // page * page, (start + size) // page * page
    if last > first:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


# ---------------------------------------------------------------------------------------------
# Writing safetensors one tensor at a time


def write_safetensors(checkpoint: ckpt.Checkpoint, out: Path, rename=lambda name: name) -> Path:
    """The checkpoint's model tensors as one safetensors file (format "pt"), written atomically."""
    specs = model_specs(checkpoint)
    names = sorted(specs)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        dtype, shape = specs[name]
        if dtype not in SAFETENSORS_DTYPES:
            raise UserError(f"tensor {name} has dtype {dtype}, which safetensors cannot hold")
        size = torch.Size(shape).numel() * dtype.itemsize
        header[rename(name)] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, tensor in model_tensors(checkpoint, names):
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------
# Per workload


def export(source: Path, out: Path) -> Path:
    """Write `source`'s model to `out` as its workload's plain library loads it."""
    checkpoint = find_source(source)
    workload = checkpoint.data["identity"].get("workload")
    entry = WORKLOADS.get(workload)
    exporter = None if entry is None else entry.exporter()
    if exporter is None:
        raise UserError(f"checkpoint {checkpoint.path} is of workload {workload!r}, which has no export")
    return exporter(checkpoint, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtrain.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a run's output_dir, a step_N(.pt) checkpoint, or last/best")
    parser.add_argument("out", type=Path, help="image: the .safetensors file to write; bert: the folder")
    args = parser.parse_args(argv)
    try:
        out = export(args.source, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
