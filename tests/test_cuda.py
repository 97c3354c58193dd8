"""GPU paths: one device, DataParallel, NCCL DDP. Skipped on machines without CUDA (like CI here)."""

from __future__ import annotations

import pytest
import torch

from helpers import FAST, assert_one_clear_error, read_checkpoint, read_metrics, records, run_torchrun, run_train

# Every test here starts Python processes (tests/conftest.py: the two tiers).
pytestmark = pytest.mark.slow

SYNTHETIC = [*FAST, "data.synthetic=true", "data.synthetic_train_size=64", "data.synthetic_val_size=9",
             "max_steps=4", "num_workers=1"]


@pytest.mark.needs_cuda
def test_one_gpu_trains_and_reports_cuda_memory(tmp_path):
    proc = run_train([*SYNTHETIC, f"output_dir={tmp_path}", "mode=auto"])
    assert proc.returncode == 0, proc.stderr
    metrics = read_metrics(tmp_path)
    memory = [r for r in metrics if r["kind"] == "memory"][0]
    assert memory["peak_cuda_mb"][0] > 0
    assert [r["samples"] for r in metrics if r["kind"] == "eval"] == [9]


@pytest.mark.needs_2_gpus
def test_data_parallel_uses_every_gpu_in_one_process(tmp_path):
    proc = run_train([*SYNTHETIC, f"output_dir={tmp_path}", "mode=dp", "batch_size=8"])
    assert proc.returncode == 0, proc.stderr
    assert "fewer than 2 GPUs" not in proc.stdout
    ckpt = read_checkpoint(tmp_path)
    assert not any(k.startswith("module.") for k in ckpt["model"])


@pytest.mark.needs_2_gpus
def test_nccl_ddp_one_process_per_gpu(tmp_path):
    proc = run_torchrun([*SYNTHETIC, f"output_dir={tmp_path}", "backend=nccl"])
    assert proc.returncode == 0, proc.stderr
    assert [r["samples"] for r in records(tmp_path, "eval")] == [9]
    assert read_checkpoint(tmp_path)["state"]["world_size"] == 2


def host_syncs_in_one_epoch(tmp_path, steps: int) -> list[str]:
    """Where the host waited for the GPU (torch.cuda sync-debug warnings) in an epoch of `steps` steps
    with no log step, after a first epoch that pays the one-time lazy initialisations."""
    import warnings

    from dtrain import loop
    from dtrain.build import built_trainer
    from dtrain.config import load_config
    from dtrain.dist import setup

    cfg = load_config(None, [*SYNTHETIC, f"output_dir={tmp_path}", "mode=auto", "num_workers=0", "batch_size=4",
                             f"data.synthetic_train_size={4 * steps}", "max_steps=0", "epochs=2", "log_every=1000"])
    env = setup(cfg)
    with built_trainer(cfg, env) as trainer:
        loop.train_one_epoch(trainer)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loop.train_one_epoch(trainer)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    assert trainer.state.step == 2 * steps
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


@pytest.mark.needs_cuda
def test_training_steps_do_not_wait_for_the_gpu(tmp_path):
    # Each host sync stops the CPU from queueing the next step's kernels while the GPU runs this one;
    # the loop may wait at log steps and epoch ends, never once per step. (Seen on an H100: the
    # epoch-end read of the non-finite record, and at most one sync inside torch.cuda.)
    syncs = host_syncs_in_one_epoch(tmp_path, steps=12)
    assert len(syncs) < 12, syncs


@pytest.mark.needs_cuda
def test_a_nonfinite_gradient_on_the_gpu_stops_before_anything_is_saved(tmp_path):
    proc = run_train([*SYNTHETIC, f"output_dir={tmp_path}", "mode=auto", "optim.lr=1e30", "log_every=3",
                      "data.synthetic_train_size=64", "max_steps=0", "epochs=1"])
    line = assert_one_clear_error(proc, "non-finite loss or gradient at step", "nonfinite_loss=skip")
    bad_step = int(line.split("at step ")[1].split()[0])
    assert 1 <= bad_step <= 3, line  # read at step 3 at the latest (the first log step), named exactly
    assert not (tmp_path / "checkpoints" / "last.pt").exists()
