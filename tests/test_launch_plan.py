"""`make demo` / `make demo-bert` on any machine: the process count and device chosen from what is there.

The GPU cases run on the CPU by giving the plan a GPU count (--gpus, the Makefile's LAUNCH_FLAGS); on a GPU
machine the last test runs the recipe with the real count.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from dtrain.errors import ConfigError
from dtrain.launch_plan import choose, main
from helpers import ROOT, read_metrics, run_bounded, subprocess_env


@pytest.mark.parametrize("gpus, cpus, requested, nproc, device", [
    (0, 2, 0, 2, "cpu"),    # this project's machines: 2 Gloo processes, as the demo has always run
    (0, 1, 0, 1, "cpu"),    # one core: one process
    (0, 64, 0, 2, "cpu"),   # many cores: still the preset's 2
    (1, 16, 0, 1, "cuda"),  # one GPU: one process (2 would leave rank 1 without a GPU)
    (2, 16, 0, 2, "cuda"),
    (8, 64, 0, 2, "cuda"),  # at most 2 for the demo's small data
    (8, 64, 8, 8, "cuda"),  # NPROC=8 uses them all
    (0, 2, 3, 3, "cpu"),    # NPROC on the CPU is taken as it is
])
def test_the_plan_follows_the_machine(gpus, cpus, requested, nproc, device):
    plan = choose(gpus, cpus, requested, most=2)
    assert (plan.nproc, plan.device) == (nproc, device)
    assert plan.why.startswith("launch: ") and "\n" not in plan.why
    assert f"{nproc} DDP process" in plan.why and ("NCCL" if device == "cuda" else "Gloo") in plan.why


def test_more_processes_than_gpus_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"NPROC=2 but 1 GPU visible: use NPROC=1 or fewer"):
        choose(1, 16, requested=2)


def test_the_dry_run_prints_the_choice_and_the_torchrun_command_or_one_error_line(capsys):
    """What the Makefile's LAUNCH runs, in this process (the make tests below run it through make)."""
    assert main(["--gpus=0", "--cpus=2", "--dry-run", "train.py", "epochs=1"]) == 0
    choice, command = capsys.readouterr().out.splitlines()
    assert choice.startswith("launch: no GPU")
    assert command == f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node=2 train.py epochs=1"
    assert main(["--nproc=2", "--gpus=1", "--dry-run", "train.py"]) == ConfigError.exit_code
    assert capsys.readouterr().err.startswith("error: NPROC=2 but 1 GPU visible")
    assert main(["--nproc=-1", "train.py"]) == ConfigError.exit_code
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: NPROC must be a whole number >= 1")


def make_demo(target: str, *make_vars: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The Makefile's own recipe for `target`, with this interpreter as the venv's and the data taken as built
    (-o: neither .venv nor the demo data is made)."""
    data = {"demo": "data/mnist/.done", "demo-bert": "data/rotten_tomatoes/.done"}[target]
    return run_bounded(["make", "-s", "-o", data, target, f"PY={sys.executable}", *make_vars], timeout,
                       subprocess_env(), merge_output=True)


@pytest.mark.slow
@pytest.mark.parametrize("target, config", [("demo", "configs/image/mnist_demo.yaml"),
                                            ("demo-bert", "configs/bert/minilm_rotten_tomatoes.yaml")])
@pytest.mark.parametrize("gpus, nproc", [(0, 2), (1, 1), (4, 2)])
def test_make_demo_prints_its_choice_and_launches_that(target, config, gpus, nproc):
    done = make_demo(target, f"LAUNCH_FLAGS=--gpus={gpus} --cpus=2 --dry-run")
    assert done.returncode == 0, done.stdout
    choice, command = done.stdout.strip().splitlines()[-2:]
    assert choice.startswith(f"launch: {'no GPU' if gpus == 0 else f'{gpus} GPU'}")
    launch = f"-m torch.distributed.run --standalone --nproc_per_node={nproc} train.py --config {config}"
    assert command.endswith(launch), command


@pytest.mark.slow
def test_make_demo_refuses_more_processes_than_gpus():
    done = make_demo("demo", "NPROC=2", "LAUNCH_FLAGS=--gpus=1 --dry-run")
    assert done.returncode != 0
    assert "error: NPROC=2 but 1 GPU visible" in done.stdout and "Traceback" not in done.stdout


@pytest.mark.slow
def test_make_demo_trains_on_this_machine(tiny_images, tmp_path):
    """The real recipe, no flags: on a machine without GPUs, 2 Gloo processes that finish the run."""
    out = tmp_path / "run"
    done = make_demo("demo", f"ARGS=data.root={tiny_images} output_dir={out} epochs=1 batch_size=4 "
                     "data.image_size=16 num_workers=0 log_every=1", timeout=240)
    assert done.returncode == 0, done.stdout[-4000:]
    if "no GPU" not in done.stdout:
        pytest.skip("a GPU machine: the plan's GPU line is checked in tests/test_cuda.py")
    assert "launch: no GPU" in done.stdout and "2 DDP processes on the CPU, Gloo" in done.stdout
    assert any(r.get("kind") == "eval" for r in read_metrics(out))
    assert re.search(r"peak_rss_mb [\d.]+/[\d.]+ ", done.stdout), "the memory line names one figure per rank, 2 ranks"


def test_the_docs_quote_the_lines_the_plan_prints():
    """README.md and docs/troubleshooting.md quote the choice line; they must quote what is printed."""
    readme, trouble = (ROOT / "README.md").read_text(), (ROOT / "docs" / "troubleshooting.md").read_text()
    assert choose(0, 2).why.split(" (")[0] + " (...)" in readme
    assert f"`{choose(1, 16).why}`" in trouble
    with pytest.raises(ConfigError) as refused:
        choose(1, 16, requested=2)
    assert "more processes than GPUs is refused" in trouble and "NPROC=2 but 1 GPU visible" in str(refused.value)


@pytest.mark.slow
@pytest.mark.needs_cuda
def test_make_demo_on_this_gpu_machine_runs_one_process_per_gpu(tiny_images, tmp_path):
    import torch

    gpus = torch.cuda.device_count()
    out = tmp_path / "run"
    done = make_demo("demo", f"ARGS=data.root={tiny_images} output_dir={out} epochs=1 batch_size=4 "
                     "data.image_size=16 num_workers=0 log_every=1", timeout=300)
    assert done.returncode == 0, done.stdout[-4000:]
    nproc = min(gpus, 2)
    assert f"launch: {gpus} GPU" in done.stdout and f"{nproc} DDP process" in done.stdout, done.stdout[:2000]
    memory = [r for r in read_metrics(out) if r["kind"] == "memory"]
    assert memory and len(memory[0]["peak_cuda_mb"]) == nproc and min(memory[0]["peak_cuda_mb"]) > 0
