"""`python train.py` in one process: outputs a user watches, resume, eval-only, and bad input."""

from __future__ import annotations

import re
import shutil

import pytest

from helpers import (FAST, assert_one_clear_error, read_checkpoint, read_metrics, records, run_train,
                     write_image_folder)


# Every test here starts Python processes (tests/conftest.py: the two tiers).
pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def two_epoch_run(tiny_images, tmp_path_factory):
    """`python train.py` for 2 epochs of tiny_images: (its output_dir, the finished process)."""
    out = tmp_path_factory.mktemp("two_epochs") / "run"
    return out, run_train([*FAST, f"data.root={tiny_images}", f"output_dir={out}", "epochs=2", "keep_last=1"])


def test_single_process_run_leaves_every_output(two_epoch_run):
    out, proc = two_epoch_run
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.yaml").is_file()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"last.pt", "best.pt", "step_00000012.pt"}
    metrics = read_metrics(out)
    train = [r for r in metrics if r["kind"] == "train"]
    evals = [r for r in metrics if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 13))  # 24 images / batch 4 = 6 steps per epoch
    assert set(train[0]) == {"kind", "epoch", "step", "loss", "lr", "samples_per_sec", "tflops_per_device",
                             "data_ms", "compute_ms", "step_ms", "step_ms_max", "slowest_rank", "slowest_behind"}
    assert [(e["epoch"], e["samples"]) for e in evals] == [(0, 7), (1, 7)]
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in evals)
    # Each evaluation prints its per-class table: a header, then one row per class with the support.
    tables = re.findall(r"^ +class +precision +recall +f1 +support\n((?: +\d+ +[\d.]+ +[\d.]+ +[\d.]+ +\d+\n)+)",
                        proc.stdout, re.M)
    assert [[int(row.split()[-1]) for row in table.splitlines()] for table in tables] == [[3, 2, 2]] * 2, proc.stdout
    assert [e["per_class"]["support"] for e in evals] == [[3, 2, 2]] * 2
    memory = [r for r in metrics if r["kind"] == "memory"]
    assert memory and memory[0]["peak_rss_mb"][0] > 50
    last = read_checkpoint(out)
    assert not any(k.startswith("module.") for k in last["model"])
    assert last["state"]["epoch"] == 2 and last["state"]["step"] == 12


def test_resume_auto_continues_and_eval_only_evaluates(tiny_images, tmp_path):
    out = tmp_path / "run"
    args = [*FAST, f"data.root={tiny_images}", f"output_dir={out}", "resume=auto"]
    assert run_train([*args, "epochs=1"]).returncode == 0
    proc = run_train([*args, "epochs=2"])
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout and "epoch 1, step 6" in proc.stdout
    steps = [r["step"] for r in records(out, "train")]
    assert steps == list(range(1, 13))  # no step repeated, none lost
    proc = run_train([*FAST, f"data.root={tiny_images}", f"output_dir={tmp_path / 'eval'}", "eval_only=true",
                      f"resume={out / 'checkpoints' / 'best.pt'}"])
    assert proc.returncode == 0, proc.stderr
    evals = read_metrics(tmp_path / "eval")
    assert [r["kind"] for r in evals] == ["eval"] and evals[0]["samples"] == 7
    assert not (tmp_path / "eval" / "checkpoints").exists()


def test_corrupt_image_stops_with_its_name_or_is_skipped(tmp_path):
    root = write_image_folder(tmp_path / "data", {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}})
    (root / "train" / "b" / "002.png").write_bytes(b"not a png at all")
    proc = run_train([*FAST, f"data.root={root}", f"output_dir={tmp_path / 'o1'}", "epochs=1"])
    assert_one_clear_error(proc, "train/b/002.png", "data.on_bad_image=skip")
    proc = run_train([*FAST, f"data.root={root}", f"output_dir={tmp_path / 'o2'}", "epochs=1",
                      "data.on_bad_image=skip"])
    assert proc.returncode == 0, proc.stderr
    assert "skipping unreadable image" in proc.stdout and "train/b/002.png" in proc.stdout


def _bad_inputs(tmp_path, tiny_images):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    no_images = write_image_folder(tmp_path / "noimg", {"train": {"a": 2}, "val": {"a": 1}})
    (no_images / "train" / "b").mkdir()
    (tmp_path / "file").write_text("x")
    return {
        "missing data dir": (["data.root=/no/such/dir"], ["/no/such/dir", "no train/ folder"]),
        "empty data dir": ([f"data.root={empty}"], ["is empty", "one sub-folder of images per class"]),
        "class without images": ([f"data.root={no_images}"], ["Found no valid file for the classes b"]),
        "unknown arch": ([f"data.root={tiny_images}", "model.arch=resnet181"], ["resnet181", "resnet18"]),
        "batch_size=0": ([f"data.root={tiny_images}", "batch_size=0"], ["batch_size", ">= 1"]),
        "missing resume": ([f"data.root={tiny_images}", "resume=/no/ckpt.pt"], ["/no/ckpt.pt", "does not exist"]),
        "unknown mode": ([f"data.root={tiny_images}", "mode=fast"], ["mode", "auto, cpu, dp, ddp"]),
        "unwritable output": ([f"data.root={tiny_images}", f"output_dir={tmp_path / 'file' / 'out'}"],
                              ["is not writable"]),
        "batch too large": ([f"data.root={tiny_images}", "batch_size=100"], ["no full optimizer step"]),
    }


@pytest.mark.parametrize("case", ["missing data dir", "empty data dir", "class without images", "unknown arch",
                                  "batch_size=0", "missing resume", "unknown mode", "unwritable output",
                                  "batch too large"])
def test_bad_input_gives_one_clear_error(case, tmp_path, tiny_images):
    args, needles = _bad_inputs(tmp_path, tiny_images)[case]
    out = [] if any(a.startswith("output_dir=") for a in args) else [f"output_dir={tmp_path / 'out'}"]
    proc = run_train([*FAST, *out, *args], timeout=120)
    assert_one_clear_error(proc, *needles)


def test_checkpoint_of_another_architecture_is_refused(tiny_images, tmp_path, two_epoch_run):
    out, finished = two_epoch_run
    assert finished.returncode == 0, finished.stderr
    proc = run_train([*FAST, f"data.root={tiny_images}", f"output_dir={tmp_path / 'o'}", "model.arch=resnet18",
                      "model.dropout=-1", f"resume={out / 'checkpoints' / 'last.pt'}"])
    assert_one_clear_error(proc, "does not match this run", "arch='squeezenet1_1' (this run: 'resnet18')")


def test_damaged_last_checkpoint_falls_back_with_a_warning(tiny_images, tmp_path):
    out = tmp_path / "run"
    args = [*FAST, f"data.root={tiny_images}", f"output_dir={out}", "resume=auto", "keep_last=3",
            "checkpoint_every=2"]
    assert run_train([*args, "max_steps=4"]).returncode == 0
    newest = out / "checkpoints" / "step_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # last.pt is the same file
    proc = run_train([*args, "max_steps=6"])
    assert proc.returncode == 0, proc.stderr
    assert "trying an older checkpoint" in proc.stdout and "step 2" in proc.stdout
    shutil.rmtree(out)
