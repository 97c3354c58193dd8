"""Run train.py with every torch.save call recorded as '<RANK> <target>' lines in $SAVE_LOG.

Used under torchrun to check that only global rank 0 ever writes a checkpoint.
"""

import os
import runpy
import sys
from pathlib import Path

import torch

_original_save = torch.save


def _recording_save(obj, f, *args, **kwargs):
    target = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", None)
    if target is not None:  # a file; in-memory buffers (e.g. all_gather_object's pickling) are not writes
        with open(os.environ["SAVE_LOG"], "a") as log:
            log.write(f"{os.environ.get('RANK', '-')} {target}\n")
    return _original_save(obj, f, *args, **kwargs)


torch.save = _recording_save
train = Path(__file__).resolve().parents[1] / "train.py"
sys.argv = [str(train), *sys.argv[1:]]
runpy.run_path(str(train), run_name="__main__")
