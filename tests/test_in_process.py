"""In-process cover, for `make check`, of modules whose other tests start processes: the EMA, the sample ledger
and export after a run made through `dtrain.train(nproc=0)`, DDP and FSDP (sharded checkpoints) as one rank of a
one-rank job, CPU SyncBatchNorm in a one-rank group, the image copy of prepare_images, and the launcher's pieces
that run in the launching process or in rank 0."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torchvision
from PIL import Image
from safetensors.torch import load_file

import dtrain
from dtrain import launcher, ledger, prepare_images, syncbn
from dtrain.config import load_config
from dtrain.export import main as export_main
from helpers import SYNTH, free_port, max_difference, read_checkpoint

# 16 synthetic images in batches of 4: 4 steps an epoch, 2 epochs; the EMA updated after every step.
RUN = [*SYNTH, "data.synthetic_train_size=16", "epochs=2", "ema.enabled=true", "ema.steps=1",
       "record_samples=true", "checkpoint_every=2", "keep_last=5"]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> tuple[Path, dict, dict]:
    """A run stopped at step 4 (max_steps) and resumed to step 6: (its folder, the first and the last metrics)."""
    out = tmp_path_factory.mktemp("in_process_run")
    first = dtrain.train(overrides=[*RUN, "max_steps=4", f"output_dir={out}"], nproc=0)
    last = dtrain.train(overrides=[*RUN, "max_steps=6", f"output_dir={out}", "resume=auto"], nproc=0)
    return out, first, last


def test_a_resumed_in_process_run_evaluates_the_model_and_its_ema(resumed_run):
    out, first, last = resumed_run
    for metrics in (first, last):
        assert metrics["samples"] == metrics["ema_samples"] == 9
        assert 0.0 <= metrics["ema_accuracy"] <= 1.0
    ckpt = read_checkpoint(out)
    assert ckpt["state"]["step"] == 6
    ema, model = ckpt["ema"], ckpt["model"]
    assert ema.keys() == model.keys()
    # decay < 1 and 6 updates: the average trails the model; it is neither a copy nor the initial weights
    assert any(not torch.equal(ema[k], model[k]) for k in model if model[k].is_floating_point())


def test_the_ledger_holds_each_trained_step_once_across_the_resume(resumed_run, capsys):
    out, _, _ = resumed_run
    rows = ledger.read(out)[0]
    assert sorted(set(rows["step"].tolist())) == [1, 2, 3, 4, 5, 6]
    assert all((rows["step"] == s).sum() == 4 for s in range(1, 7))  # batch_size=4, no step recorded twice
    epoch_0 = sorted(rows[rows["epoch"] == 0]["index"].tolist())
    assert epoch_0 == list(range(16))  # steps 1-4: the whole first epoch, each sample once
    assert ledger.main([str(out), "--step", "5"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"rank 0 epoch 1 step 5: \d+ \d+ \d+ \d+", line)
    assert ledger.main([str(out / "nothing")]) == 1
    assert "record_samples=true" in capsys.readouterr().err


def test_export_writes_the_checkpoints_model_for_torchvision(resumed_run, tmp_path, capsys):
    out, _, _ = resumed_run
    target = tmp_path / "model.safetensors"
    assert export_main([str(out), str(target)]) == 0
    exported = load_file(str(target))
    model = read_checkpoint(out)["model"]
    assert exported.keys() == model.keys()
    assert all(torch.equal(exported[k], model[k]) for k in model)
    torchvision.models.squeezenet1_1(num_classes=4).load_state_dict(exported)  # strict: every key, every shape
    assert export_main([str(tmp_path / "no_run"), str(tmp_path / "x.safetensors")]) == 1
    assert capsys.readouterr().err.startswith("error: ")


@pytest.fixture(scope="module")
def one_rank_runs(tmp_path_factory) -> dict[str, Path]:
    """Per mode (ddp, fsdp), a run in this process as the only rank of a job (the variables torchrun sets),
    stopped at step 4 and resumed to step 6."""
    runs = {}
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
            env.setenv(name, value)
        for mode in ("ddp", "fsdp"):
            out = runs[mode] = tmp_path_factory.mktemp(f"one_rank_{mode}")
            for max_steps in (4, 6):
                dtrain.train(overrides=[*RUN, f"mode={mode}", f"max_steps={max_steps}", f"output_dir={out}",
                                        "resume=auto"], nproc=0)
    return runs


def test_one_rank_ddp_and_fsdp_resume_from_their_layouts_to_the_same_weights(one_rank_runs, tmp_path):
    ddp, fsdp = one_rank_runs["ddp"], one_rank_runs["fsdp"]
    assert (ddp / "checkpoints" / "step_00000006.pt").is_file()  # one file from rank 0
    assert (fsdp / "checkpoints" / "step_00000006").is_dir()  # a sharded directory
    assert read_checkpoint(ddp)["state"]["step"] == 6
    assert export_main([str(fsdp), str(tmp_path / "fsdp.safetensors")]) == 0  # the shards gathered into one file
    gathered = load_file(str(tmp_path / "fsdp.safetensors"))
    # one rank: the same job whatever the wrapper, up to float summation order
    assert max_difference(gathered, read_checkpoint(ddp)["model"]) < 1e-5


@pytest.fixture
def one_rank_group(tmp_path):
    if dist.is_initialized():
        pytest.fail("a process group is already initialized in this test process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_cpu_sync_batch_norm_is_the_batch_norm_it_replaces(one_rank_group):
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5), torch.nn.ReLU())
    synced = syncbn.convert(torch.nn.Sequential(*[m for m in plain]), torch.device("cpu"))
    assert isinstance(synced[1], syncbn.CPUSyncBatchNorm) and synced[1].weight is plain[1].weight
    assert syncbn.has_batch_norm(synced) and not syncbn.has_batch_norm(torch.nn.Linear(2, 2))
    reference = torch.nn.BatchNorm2d(5)
    reference.load_state_dict(plain[1].state_dict())
    x = torch.randn(6, 5, 4, 4, requires_grad=True)
    # the all-reduced path (what runs with 2 or more ranks) over a one-rank group: the same numbers as BatchNorm's
    got = synced[1]._cpu_forward(x)
    want = reference(x.detach().requires_grad_())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(synced[1].running_mean, reference.running_mean)
    torch.testing.assert_close(synced[1].running_var, reference.running_var)
    got.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_prepare_images_writes_each_image_once_at_the_short_side(tiny_images, tmp_path, capsys):
    dst = tmp_path / "small"
    argv = [str(tiny_images), str(dst), "--short-side", "8", "--workers", "1"]
    assert prepare_images.main(argv) == 0
    written = sorted(p.relative_to(dst) for p in dst.rglob("*") if p.is_file())
    sources = sorted(p.relative_to(tiny_images) for p in tiny_images.rglob("*") if p.is_file())
    assert [p.with_suffix(".jpg") for p in sources] == written  # each image once, as a JPEG
    assert all(min(Image.open(dst / p).size) == 8 for p in written)
    assert prepare_images.main(argv) == 0  # again: nothing left to write
    assert "0 image(s) to write" in capsys.readouterr().out
    assert prepare_images.main([str(tiny_images), str(tiny_images / "train"), "--short-side", "8"]) == 2


def test_launcher_hands_workers_their_arguments_and_rank_0s_outcome_back(tmp_path, monkeypatch):
    cfg = load_config(None, ["nproc=2", "max_restarts=1", "epochs=3"])
    words = launcher.worker_args("c.yaml", ["nproc=2", "max_restarts = 1", "epochs=3"], cfg)
    assert words == ["--config", "c.yaml", "epochs=3", "nproc=0", "max_restarts=0"]
    monkeypatch.setenv(launcher.OUTCOME_DIR, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    launcher.hand_back(exit_code=0)
    assert not list(tmp_path.iterdir())  # only rank 0 speaks for the job
    monkeypatch.setenv("RANK", "0")
    for restart, code in (("0", 1), ("1", 0)):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restart)
        launcher.hand_back(exit_code=code, metrics={"accuracy": 0.5})
        (tmp_path / "logs" / "run" / f"attempt_{restart}").mkdir(parents=True)
    assert launcher._handed_back(str(tmp_path), "exit_code") == 0  # the last round's, not the first's
    assert json.loads((tmp_path / "metrics.1.json").read_text()) == {"accuracy": 0.5}
    monkeypatch.setenv("DTRAIN_T21_SET", "before")
    monkeypatch.delenv("DTRAIN_T21_UNSET", raising=False)
    with launcher.restored_environ("DTRAIN_T21_SET", "DTRAIN_T21_UNSET"):
        os.environ["DTRAIN_T21_SET"] = os.environ["DTRAIN_T21_UNSET"] = "inside"
    assert os.environ["DTRAIN_T21_SET"] == "before" and "DTRAIN_T21_UNSET" not in os.environ
