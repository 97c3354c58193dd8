"""GPU paths: one device, DataParallel, NCCL DDP. Skipped on machines without CUDA (like CI here)."""

from __future__ import annotations

import pytest
import torch

from conftest import FAST, read_metrics, run_torchrun, run_train

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_gpu = pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA GPUs")
SYNTHETIC = [*FAST, "data.synthetic=true", "data.synthetic_train_size=64", "data.synthetic_val_size=9",
             "max_steps=4", "num_workers=1"]


@needs_gpu
def test_one_gpu_trains_and_reports_cuda_memory(tmp_path):
    proc = run_train([*SYNTHETIC, f"output_dir={tmp_path}", "mode=auto"])
    assert proc.returncode == 0, proc.stderr
    records = read_metrics(tmp_path)
    memory = [r for r in records if r["kind"] == "memory"][0]
    assert memory["peak_cuda_mb"][0] > 0
    assert [r["samples"] for r in records if r["kind"] == "eval"] == [9]


@needs_two_gpus
def test_data_parallel_uses_every_gpu_in_one_process(tmp_path):
    proc = run_train([*SYNTHETIC, f"output_dir={tmp_path}", "mode=dp", "batch_size=8"])
    assert proc.returncode == 0, proc.stderr
    assert "fewer than 2 GPUs" not in proc.stdout
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])


@needs_two_gpus
def test_nccl_ddp_one_process_per_gpu(tmp_path):
    proc = run_torchrun([*SYNTHETIC, f"output_dir={tmp_path}", "backend=nccl"])
    assert proc.returncode == 0, proc.stderr
    assert [r["samples"] for r in read_metrics(tmp_path) if r["kind"] == "eval"] == [9]
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["state"]["world_size"] == 2
