"""Run train.py with checkpoint writes instrumented, for tests that need to see or break them.

SAVE_LOG=path               append '<RANK> <target file>' for every torch.save to a file
HANG_ON_SAVE=N              on the N-th file save: write half of it, create '<target>.hanging', then block
                            (the test kills the process there: a crash in the middle of a checkpoint write)
HANG_IN_SHARDED_SAVE=N      on the N-th sharded save (torch.distributed.checkpoint.save): let every rank
                            write its shard, cut rank 0's shard to half, create '<folder>.hanging', then
                            block before the folder is renamed (a crash in the middle of a sharded save)
SLOW_SAVE_S=S               every file save: create '<target>.slow', then take S seconds longer before writing
SLOW_DATA_RANK=R            on rank R, every training sample takes SLOW_DATA_S seconds longer to load
                            (a rank held up by its data: slow storage, too few loader workers)
NAN_GRAD_AT_STEP=N          optimizer step N (1-based) finds a nan in one gradient (a bad batch at a known step);
                            every optimizer step prints 'patched: optimizer step N' (how far the run went)
NONFINITE_DEFERRED=1        the non-finite record is read only where a GPU run reads it (log steps, saves, epoch ends)
"""

import io
import os
import sys
import time
from pathlib import Path

import torch

from helpers import load_train

_original_save = torch.save
_file_saves = 0


def _instrumented_save(obj, f, *args, **kwargs):
    global _file_saves
    target = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", None)
    if target is None:  # in-memory buffers (e.g. all_gather_object's pickling) are not writes
        return _original_save(obj, f, *args, **kwargs)
    _file_saves += 1
    if "SAVE_LOG" in os.environ:
        with open(os.environ["SAVE_LOG"], "a") as log:
            log.write(f"{os.environ.get('RANK', '-')} {target}\n")
    if "SLOW_SAVE_S" in os.environ:
        Path(f"{target}.slow").touch()
        time.sleep(float(os.environ["SLOW_SAVE_S"]))
    if os.environ.get("HANG_ON_SAVE") == str(_file_saves):
        buffer = io.BytesIO()
        _original_save(obj, buffer)
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        f.flush()
        Path(f"{target}.hanging").touch()
        _block()
    return _original_save(obj, f, *args, **kwargs)


def _block() -> None:
    """Stay here until the test kills this process. A process the test's kill missed (a launcher's worker
    reparented when the launcher died) must not live on: it leaves after 5 minutes."""
    time.sleep(300)
    os._exit(99)


torch.save = _instrumented_save

_sharded_saves = 0


def _instrumented_dcp_save(state_dict, *args, checkpoint_id=None, **kwargs):
    global _sharded_saves
    metadata = _original_dcp_save(state_dict, *args, checkpoint_id=checkpoint_id, **kwargs)
    _sharded_saves += 1
    if os.environ.get("HANG_IN_SHARDED_SAVE") == str(_sharded_saves):
        folder = Path(checkpoint_id)
        if os.environ.get("RANK", "0") == "0":
            shard = folder / "__0_0.distcp"
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
            Path(f"{folder}.hanging").touch()
        _block()
    return metadata


if "HANG_IN_SHARDED_SAVE" in os.environ:
    import torch.distributed.checkpoint as dcp

    _original_dcp_save = dcp.save
    dcp.save = _instrumented_dcp_save
if os.environ.get("SLOW_DATA_RANK") == os.environ.get("RANK"):
    import dtrain.data

    _original_getitem = dtrain.data.EpochSeeded.__getitem__

    def _slow_getitem(self, key):
        time.sleep(float(os.environ.get("SLOW_DATA_S", "0.05")))
        return _original_getitem(self, key)

    dtrain.data.EpochSeeded.__getitem__ = _slow_getitem

if "NAN_GRAD_AT_STEP" in os.environ:
    import dtrain.loop

    _original_optimizer_step = dtrain.loop.optimizer_step

    def _optimizer_step_with_nan(t):
        print(f"patched: optimizer step {t.state.step + 1}", flush=True)
        if t.state.step + 1 == int(os.environ["NAN_GRAD_AT_STEP"]):
            next(p for p in t.strategy.raw_model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
        _original_optimizer_step(t)

    dtrain.loop.optimizer_step = _optimizer_step_with_nan
if os.environ.get("NONFINITE_DEFERRED") == "1":
    import dtrain.loop

    _original_watch_init = dtrain.loop.NonfiniteWatch.__init__

    def _deferred_watch_init(self, device):
        _original_watch_init(self, device)
        self.deferred = True

    dtrain.loop.NonfiniteWatch.__init__ = _deferred_watch_init

load_train(sys.argv[1:], run_name="__main__")
