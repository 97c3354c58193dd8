"""The speed switches change how fast training runs, never what it computes.

Real runs of train.py (and torchrun) on synthetic images with squeezenet1_1 (dropout 0, no BatchNorm):
with the same samples per optimizer step, every switch must end where the plain fp32 run ends,
within a stated tolerance, and each test checks that its switch really took effect.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from helpers import (FAST, ROOT, TRAIN, assert_one_clear_error, initial_weights, losses, max_difference,
                     read_checkpoint, run_bounded, run_torchrun, run_train, subprocess_env, weights)

STEPS = 3
# 48 images: 6 steps of 8 per epoch, so STEPS steps stay inside the first epoch. On the CPU even
# where a GPU exists: the comparisons hold to float32 rounding, and cuDNN's default TF32
# convolutions differ by ~1e-4 between batch sizes (seen on an H100).
SYNTHETIC = [*FAST, "data.synthetic=true", "data.synthetic_train_size=48", "data.synthetic_val_size=8",
             f"max_steps={STEPS}", "optim.schedule=constant", "mode=cpu"]
BIG_BATCH = ["batch_size=8"]


def train(tmp: Path, *overrides: str, **env: str) -> Path:
    proc = run_train([*SYNTHETIC, *overrides, f"output_dir={tmp}"], **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Plain fp32, contiguous, eager: batch 8 per optimizer step."""
    return train(tmp_path_factory.mktemp("reference"), *BIG_BATCH)


@pytest.mark.slow
def test_reference_run_trains(reference: Path):
    moved = max_difference(weights(reference), initial_weights())
    assert moved > 1e-3, "the reference run did not change the weights: the comparisons below would be vacuous"
    assert len(losses(reference)) == STEPS


@pytest.mark.slow
def test_accumulating_k_micro_batches_equals_one_step_at_k_times_the_batch(reference: Path, tmp_path: Path):
    run = train(tmp_path, "batch_size=2", "grad_accum_steps=4")
    # Same 8 samples per step; only the summation order of the gradient differs (float rounding).
    assert losses(run) == pytest.approx(losses(reference), rel=1e-5)
    assert max_difference(weights(run), weights(reference)) < 1e-5


# torchrun: the wrapped model gets a DDP communication hook that counts all-reduce rounds
# (one per backward that synchronizes), and each rank reports its thread count at exit.
COUNTING_TRAIN = """
import json, os, runpy, sys
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
import dtrain.strategies

rounds = []
def counting_hook(state, bucket):
    if bucket.is_last():
        rounds.append(1)
    return allreduce_hook(state, bucket)

original_wrap = dtrain.strategies.DDP._wrap
def wrap(self, model):
    wrapped = original_wrap(self, model)
    wrapped.register_comm_hook(None, counting_hook)
    return wrapped
dtrain.strategies.DDP._wrap = wrap

torch.set_num_threads(3)  # what the process would keep if the project did not set its own count
sys.argv = [os.environ["TRAIN"], *sys.argv[1:]]
train = runpy.run_path(os.environ["TRAIN"], run_name="train")
code = train["main"]()
with open(os.environ["REPORT"] + "." + os.environ["RANK"], "w") as f:
    json.dump({"all_reduce_rounds": len(rounds), "threads": torch.get_num_threads()}, f)
train["exit_process"](code)
"""


@pytest.mark.slow
def test_ddp_accumulation_all_reduces_once_per_optimizer_step(reference: Path, tmp_path: Path):
    script = tmp_path / "counting_train.py"
    script.write_text(COUNTING_TRAIN)
    out = tmp_path / "run"
    # 2 processes x batch 2 x 2 micro-steps = the reference's 8 samples per step; DDP options that cut copies on.
    proc = run_torchrun([*SYNTHETIC, "batch_size=2", "grad_accum_steps=2", "ddp.gradient_as_bucket_view=true",
                         "ddp.bucket_cap_mb=1", f"output_dir={out}"], script=str(script),
                        REPORT=str(tmp_path / "report"), TRAIN=TRAIN)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reports = [json.loads((tmp_path / f"report.{rank}").read_text()) for rank in (0, 1)]
    # no_sync on the non-final micro-step: STEPS rounds, not STEPS x grad_accum_steps.
    assert [r["all_reduce_rounds"] for r in reports] == [STEPS, STEPS]
    # threads=0: OMP_NUM_THREADS=1 from the environment (set by helpers.subprocess_env; torchrun sets 1 itself
    # when it is unset), not the 3 the process started with.
    assert [r["threads"] for r in reports] == [1, 1]
    assert losses(out) == pytest.approx(losses(reference), rel=1e-5)
    assert max_difference(weights(out), weights(reference)) < 1e-5


@pytest.mark.slow
def test_ddp_static_graph_matches(reference: Path, tmp_path: Path):
    proc = run_torchrun([*SYNTHETIC, "batch_size=4", "ddp.static_graph=true", f"output_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert max_difference(weights(tmp_path), weights(reference)) < 1e-5


@pytest.mark.slow
def test_channels_last_gives_the_same_losses(reference: Path, tmp_path: Path):
    run = train(tmp_path, *BIG_BATCH, "channels_last=true")
    assert losses(run) == pytest.approx(losses(reference), rel=1e-4)
    assert max_difference(weights(run), weights(reference)) < 1e-4
    # The switch took effect: the trained conv weights are stored NHWC (checkpoints keep strides).
    conv = weights(run)["features.0.weight"]
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


@pytest.mark.slow
def test_compile_gives_the_same_losses(reference: Path, tmp_path: Path):
    cache = tmp_path / "inductor"
    # One compile worker: on 2 cores a pool of compile processes only competes with itself.
    run = train(tmp_path / "run", *BIG_BATCH, "compile=true", TORCHINDUCTOR_CACHE_DIR=str(cache),
                TORCHINDUCTOR_COMPILE_THREADS="1")
    assert losses(run) == pytest.approx(losses(reference), rel=1e-3)
    assert max_difference(weights(run), weights(reference)) < 1e-4
    assert any(cache.rglob("*.py")), "torch.compile wrote no generated kernels: the model ran eagerly"
    assert not any(k.startswith("_orig_mod.") for k in weights(run)), "checkpoint holds the compiled wrapper"


THREADS_TRAIN = """
import os, runpy, sys
import torch

torch.set_num_threads(3)  # what the process would keep if the project did not set its own count
sys.argv = [os.environ["TRAIN"], *sys.argv[1:]]
train = runpy.run_path(os.environ["TRAIN"], run_name="train")
code = train["main"]()
open(os.environ["REPORT"], "w").write(str(torch.get_num_threads()))  # train.py's own exit skips atexit
train["exit_process"](code)
"""


@pytest.mark.parametrize("setting, env, expected, said", [
    ([], {"OMP_NUM_THREADS": "1"}, 1, "threads: 1 per process (OMP_NUM_THREADS=1 in the environment"),
    (["threads=3"], {"OMP_NUM_THREADS": "1"}, 3, "threads: 3 per process (threads=3)"),
    ([], {}, len(os.sched_getaffinity(0)), "cores / 1 process on this node)"),
])
@pytest.mark.slow
def test_thread_count_follows_the_setting_then_the_environment_then_the_cores(tmp_path: Path, setting, env,
                                                                               expected, said):
    script, report = tmp_path / "threads_train.py", tmp_path / "threads"
    script.write_text(THREADS_TRAIN)
    environ = {k: v for k, v in subprocess_env().items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    proc = run_bounded([sys.executable, str(script), *SYNTHETIC, "max_steps=1", *setting, f"output_dir={tmp_path}"],
                       180, {**environ, **env, "REPORT": str(report), "TRAIN": TRAIN}, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert int(report.read_text()) == expected
    assert said in proc.stdout and proc.stdout.count("threads: ") == 1


@pytest.mark.slow
def test_fused_optimizer_steps_by_default_and_train_like_the_unfused_ones(reference: Path, tmp_path: Path):
    from dtrain.config import load_config
    from dtrain.optim import build_optimizer

    model = torch.nn.Linear(3, 2)
    for name in ("sgd", "adamw"):
        assert build_optimizer(model, load_config(None, [f"optim.name={name}"]).optim).defaults["fused"] is True
        assert not build_optimizer(model, load_config(None, [f"optim.name={name}", "optim.fused=false"]).optim
                                   ).defaults["fused"]
    run = train(tmp_path, *BIG_BATCH, "optim.fused=false")
    assert losses(run) == pytest.approx(losses(reference), rel=1e-4)
    assert max_difference(weights(run), weights(reference)) < 1e-4


def test_fused_fallback_is_said_once_and_trains():
    """A parameter the fused kernels do not take (complex here) falls back to torch's default, in one line."""
    from dtrain.config import load_config
    from dtrain.optim import build_optimizer

    model = torch.nn.Linear(3, 2)
    model.register_parameter("phase", torch.nn.Parameter(torch.ones(2, dtype=torch.complex64)))
    said = []
    for name in ("sgd", "adamw"):
        optimizer = build_optimizer(model, load_config(None, [f"optim.name={name}"]).optim, say=said.append)
        assert not optimizer.defaults["fused"]
        (model(torch.ones(1, 3)).sum() + model.phase.abs().sum()).backward()
        optimizer.step()
    assert said == [f"optim: no fused {name} step for torch.complex64 parameters on cpu; using torch's default "
                    "implementation" for name in ("sgd", "adamw")]


def test_resume_keeps_this_runs_optimizer_implementation():
    """A checkpoint of an unfused run resumed with the fused default steps fused, with the same state."""
    from dtrain.config import load_config
    from dtrain.dist import DistEnv
    from dtrain.optim import build_optimizer, keep_implementation
    from dtrain.strategies import build_strategy

    torch.manual_seed(0)
    cfg = load_config(None, ["optim.name=adamw", "optim.fused=false"])
    strategy = build_strategy(cfg, DistEnv(mode="single", device=torch.device("cpu")))
    model = strategy.wrap(torch.nn.Linear(3, 2), [])
    unfused = build_optimizer(model, cfg.optim)
    model(torch.ones(1, 3)).sum().backward()
    unfused.step()
    unfused.zero_grad(set_to_none=True)  # as in a process that resumes: no gradients yet
    model_state, optim_state = strategy.state_dicts(unfused)  # what a checkpoint holds
    fused = build_optimizer(model, load_config(None, ["optim.name=adamw"]).optim)
    strategy.load_state_dicts(fused, model_state, keep_implementation(fused, optim_state), whole=True)
    assert all(group["fused"] is True for group in fused.param_groups)
    saved, loaded = unfused.state_dict()["state"], fused.state_dict()["state"]
    assert all(torch.equal(saved[i]["exp_avg"], loaded[i]["exp_avg"]) for i in saved)
    fused.step()  # the fused kernel accepts the loaded state


@pytest.mark.slow
def test_bf16_autocast_on_cpu_stays_close_to_fp32(reference: Path, tmp_path: Path):
    run = train(tmp_path, *BIG_BATCH, "precision=bf16")
    got, want = list(losses(run).values()), list(losses(reference).values())
    assert all(abs(g - w) <= 0.02 * abs(w) for g, w in zip(got, want)), (got, want)
    assert got != want, "bf16 gave bit-identical losses: autocast did not take effect"


@pytest.mark.slow
def test_fp16_on_cpu_is_a_clear_error(tmp_path: Path):
    proc = run_train([*SYNTHETIC, "precision=fp16", "mode=cpu", f"output_dir={tmp_path}"])
    assert_one_clear_error(proc, "fp16", "GPU", "bf16")


@pytest.mark.slow
@pytest.mark.needs_cuda
def test_fp16_with_gradient_scaler_on_gpu(tmp_path: Path):
    # 8 steps: the scaler may skip the first few while it lowers its initial scale (65536) to fit fp16.
    gpu = [*BIG_BATCH, "mode=auto", "max_steps=8"]
    fp32 = train(tmp_path / "fp32", *gpu, CUDA_VISIBLE_DEVICES="0")
    fp16 = train(tmp_path / "fp16", *gpu, "precision=fp16", CUDA_VISIBLE_DEVICES="0")
    got, want = list(losses(fp16).values()), list(losses(fp32).values())
    assert got[0] == pytest.approx(want[0], rel=1e-2)  # same initial weights, same batch
    assert all(map(torch.isfinite, torch.tensor(got)))
    scaler = read_checkpoint(fp16)["scaler"]
    assert scaler.get("scale", 0) > 0, f"the gradient scaler was not enabled: {scaler}"
    assert max_difference(weights(fp16), initial_weights()) > 1e-3, "every fp16 step was skipped"


def test_loader_switches():
    """Workers persist and prefetch; pinned memory only where there is a GPU to copy to."""
    from dtrain.config import load_config
    from dtrain.data import make_loaders
    from dtrain.dist import DistEnv
    from dtrain.workloads.image import SyntheticImages
    from dtrain.workloads.task import Task

    data = SyntheticImages(16, 10, 8, seed=0)
    task = Task(model=torch.nn.Identity(), train_set=data, val_set=data, train_loss=None, eval_sums=None,
                summarize=None)
    cpu, gpu = DistEnv(mode="single", device=torch.device("cpu")), DistEnv(mode="single", device=torch.device("cuda", 0))
    train_loader, _, val_loader = make_loaders(task, load_config(None, ["num_workers=2"]), cpu)
    for loader in (train_loader, val_loader):
        assert (loader.num_workers, loader.persistent_workers, loader.prefetch_factor, loader.pin_memory) == \
               (2, True, 4, False)
    assert make_loaders(task, load_config(None, ["num_workers=2"]), gpu)[0].pin_memory
    no_workers = make_loaders(task, load_config(None, ["num_workers=0"]), cpu)[0]
    assert (no_workers.persistent_workers, no_workers.prefetch_factor) == (False, None)
