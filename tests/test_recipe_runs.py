"""The ResNet-50 v2 preset as a whole, under torchrun with 2 processes.

- Killed mid-epoch and resumed, it equals an uninterrupted run bit for bit, with every piece switched on:
  random resized crop at its own training size, flips, TrivialAugmentWide, random erasing, MixUp/CutMix,
  the repeated-augmentation sampler, label smoothing, the EMA (with BatchNorm buffers), a DataLoader worker.
- Unchanged but for the data (synthetic) and a few steps, it runs.
"""

from __future__ import annotations

import pytest
import torch

from helpers import (PATCHED_TRAIN, ROOT, kill_session, losses, read_checkpoint, read_metrics, records, run_torchrun,
                     start, wait_until)


# Every test here starts Python processes (tests/conftest.py: the two tiers).
pytestmark = pytest.mark.slow
V2 = ["--config", str(ROOT / "configs" / "image" / "resnet50_v2.yaml")]
# The preset at test size: resnet18 (BatchNorm, so the EMA averages buffers too) at 32 px, crops of 24 px,
# 2 epochs of 6 steps (24 images: 12 per rank per epoch with ra_reps=4), an EMA update every 2 steps after a
# warm-up of 3 steps, a checkpoint every 2 steps.
SMALL = ["model.arch=resnet18", "data.image_size=32", "data.train_crop_size=24", "data.val_resize_size=32",
         "batch_size=2", "epochs=2", "optim.warmup_epochs=0.5", "optim.lr=0.05", "ema.steps=2", "ema.decay=0.98",
         "num_workers=1",
         "threads=1", "deterministic=true", "checkpoint_every=2", "keep_last=2", "resume=auto", "log_every=1",
         "progress=false", "timeout_s=60"]


def test_v2_recipe_killed_mid_epoch_and_resumed_equals_an_uninterrupted_run(tiny_images, tmp_path, extra=()):
    args = [*V2, *SMALL, f"data.root={tiny_images}", *extra]
    reference = tmp_path / "reference"
    proc = run_torchrun([*args, f"output_dir={reference}"])
    assert proc.returncode == 0, proc.stderr
    assert "decay 0.92 " in proc.stdout  # 1 - 0.02 x (2 ranks x 2 x 2 steps / 2 epochs): torchvision's adjustment
    out = tmp_path / "interrupted"
    # Saves at steps 2, 4, 6 (checkpoint_every), 6 (epoch end), 8, then the 6th (step 10) hangs half-written.
    launcher = start([*args, f"output_dir={out}"], script=PATCHED_TRAIN, nproc=2, HANG_ON_SAVE="6")
    hanging = out / "checkpoints" / "step_00000010.pt.tmp.hanging"
    wait_until(hanging.exists, launcher, what="the step-10 save")
    kill_session(launcher)  # SIGKILL of torchrun and both workers: the step-8 checkpoint is what is left
    hanging.unlink()
    resumed = run_torchrun([*args, f"output_dir={out}"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "epoch 1, step 8" in resumed.stdout
    assert losses(out) == losses(reference) and len(losses(reference)) == 12  # bit for bit
    a, b = read_checkpoint(reference), read_checkpoint(out)
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert any("running_mean" in k for k in a["ema"])  # the EMA carries BatchNorm statistics too
    eval_ema = records(out, "eval_ema")
    assert eval_ema and eval_ema[-1]["samples"] == 7


def test_v2_preset_runs_on_synthetic_data_under_torchrun(tmp_path):
    proc = run_torchrun([*V2, "data.synthetic=true", "data.synthetic_train_size=16", "data.synthetic_val_size=6",
                         "batch_size=2", "max_steps=2", "num_workers=0", "log_every=1", "progress=false",
                         f"output_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr
    kinds = [r["kind"] for r in read_metrics(tmp_path)]
    assert kinds.count("train") == 2 and "eval" in kinds and "eval_ema" in kinds
    assert (tmp_path / "confusion" / "step_00000002_ema.json").is_file()
