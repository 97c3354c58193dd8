"""SyncBatchNorm and the model EMA across ranks (real torchrun jobs, Gloo on the CPU).

- sync_bn=true: 2 ranks x B/2 equal 1 process x B, because BatchNorm normalises with the global batch's
  statistics; without it each rank normalises with its own half, and the runs part ways (why the switch exists).
- EMA: 2 ranks (DDP, FSDP) equal 1 process at the same global batch, every rank holds the same average
  (the evaluation of the EMA adds every rank's shard of the validation set), and the average survives a
  sharded checkpoint read back by one process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import (FAST, SYNTH, max_difference, read_checkpoint, read_metrics, records, run_torchrun, run_train,
                     weights)


# Every test here starts Python processes (tests/conftest.py: the two tiers).
pytestmark = pytest.mark.slow
# resnet18 has BatchNorm everywhere; at 32 px its last stage sees 1x1 maps, so the statistics of a half batch
# differ from the whole batch's a lot. Two steps: a third and fourth step amplify float rounding through
# BatchNorm of 4-8 values per channel (max difference 1e-6 after 2 steps, 1e-3 after 4, in both directions).
BATCHNORM = [*FAST, "model.arch=resnet18", "model.dropout=-1", "data.synthetic=true", "data.synthetic_train_size=64",
             "data.synthetic_val_size=8", "max_steps=2", "optim.weight_decay=0", "optim.schedule=constant",
             "threads=1"]
PARAMETER_TOLERANCE = 1e-5  # max absolute difference of any weight; the weights move by ~0.07 in these 2 steps


def batch_norm_run(tmp_path: Path, name: str, nproc: int, *extra: str) -> dict[str, torch.Tensor]:
    out = tmp_path / name
    args = [*BATCHNORM, f"output_dir={out}", *extra]
    proc = run_train([*args, "batch_size=8"]) if nproc == 1 else run_torchrun([*args, "batch_size=4"], nproc=nproc)
    assert proc.returncode == 0, proc.stderr
    return weights(out)


def split(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(parameters, BatchNorm running statistics)."""
    stats = {k: v for k, v in state.items() if "running_" in k}
    return {k: v for k, v in state.items() if k not in stats and "num_batches" not in k}, stats


def test_sync_bn_makes_two_half_batches_equal_one_whole_batch_and_without_it_they_differ(tmp_path):
    one_params, one_stats = split(batch_norm_run(tmp_path, "one", 1))
    gaps = {}
    for name, extra in {"ddp sync": ["sync_bn=true"], "fsdp sync": ["sync_bn=true", "mode=fsdp"],
                        "ddp plain": []}.items():
        params, stats = split(batch_norm_run(tmp_path, name.replace(" ", "_"), 2, *extra))
        gaps[name] = (max_difference(one_params, params), max_difference(one_stats, stats))
    assert gaps["ddp sync"][0] < PARAMETER_TOLERANCE and gaps["fsdp sync"][0] < PARAMETER_TOLERANCE, gaps
    assert gaps["ddp sync"][1] < 10 * PARAMETER_TOLERANCE and gaps["fsdp sync"][1] < 10 * PARAMETER_TOLERANCE, gaps
    # Without sync_bn each rank normalises with the statistics of its own 4 images: other gradients, other weights.
    assert gaps["ddp plain"][0] > 1000 * PARAMETER_TOLERANCE, gaps


# ---------------------------------------------------------------------------------------------
# EMA: squeezenet (no BatchNorm, dropout 0), exact up to float summation order between modes.
# Global batch 8, an update every 2 steps: decay 0.99 adjusted to 1 - 0.01 x 8 x 2 / 1 epoch = 0.84.
EMA = [*SYNTH, "ema.enabled=true", "ema.steps=2", "ema.decay=0.99", "optim.schedule=constant",
       "best_metric=ema_accuracy"]


def ema_of(out: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(out)["ema"]


@pytest.fixture(scope="module")
def ema_reference(tmp_path_factory) -> Path:
    """One process, batch 8, 6 steps: the EMA copies at step 2, then averages at steps 4 and 6."""
    out = tmp_path_factory.mktemp("ema_reference")
    proc = run_train([*EMA, "batch_size=8", "max_steps=6", f"output_dir={out}"])
    assert proc.returncode == 0, proc.stderr
    assert "decay 0.84 " in proc.stdout
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ema_of_two_ranks_equals_one_process_and_is_evaluated_after_the_model(ema_reference, tmp_path, mode):
    proc = run_torchrun([*EMA, "batch_size=4", "max_steps=6", f"mode={mode}", f"output_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr
    last = read_checkpoint(tmp_path)
    reference, two = ema_of(ema_reference), last["ema"]
    assert max_difference(reference, two) < 1e-5
    assert max_difference(last["model"], two) > 1e-4, "the EMA equals the model: the comparison would be vacuous"
    # Each rank evaluated its share of the 9 images with its own copy (or shard) of the average: equal
    # averages on every rank are what makes the sums equal one process's.
    one_ema, two_ema = records(ema_reference, "eval_ema")[-1], records(tmp_path, "eval_ema")[-1]
    assert two_ema["samples"] == 9 and two_ema["loss"] == pytest.approx(one_ema["loss"], rel=1e-5)
    assert two_ema["loss"] != pytest.approx(records(tmp_path, "eval")[-1]["loss"], rel=1e-4)
    kinds = [r["kind"] for r in read_metrics(tmp_path) if r["kind"].startswith("eval")]
    assert kinds == ["eval", "eval_ema"]
    assert last["state"]["best_metric"] == "ema_accuracy"
    assert last["state"]["best_score"] == pytest.approx(two_ema["accuracy"])  # best.pt chosen by the EMA
    assert last["ema_updates"] == 3


def test_an_fsdp_ema_resumes_in_one_process_as_if_one_process_had_run_throughout(ema_reference, tmp_path):
    out = tmp_path / "run"
    args = [*EMA, f"output_dir={out}", "resume=auto"]
    assert run_torchrun([*args, "batch_size=4", "max_steps=4", "mode=fsdp"]).returncode == 0
    resumed = run_train([*args, "batch_size=8", "max_steps=6"])
    assert resumed.returncode == 0, resumed.stderr
    assert "step 4" in resumed.stdout and "holds no EMA" not in resumed.stdout
    assert max_difference(ema_of(ema_reference), ema_of(out)) < 1e-5
