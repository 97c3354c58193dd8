"""One optimizer step's own work: the gradient norm (also the non-finite check) costs a few ops, whatever
the number of gradients, and a non-finite gradient stops the run at exactly the step it happened."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from helpers import (PATCHED_TRAIN, SYNTH, TESTS, assert_one_clear_error, logged_steps, read_checkpoint, run_torchrun,
                     run_train)


def gradients(dtype: torch.dtype = torch.float32, count: int = 40) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(3 + i, 5, generator=generator).to(dtype) for i in range(count)]


def top_level_ops(fn) -> list[str]:
    """Names of the ops `fn` calls from Python (not the ops those run inside them)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.cpu_parent is None]


def test_gradient_norm_and_clipping_equal_torchs():
    from dtrain.optim import grad_norm_and_clip

    ours, theirs = gradients(), gradients()
    params = [nn.Parameter(torch.zeros_like(g)) for g in theirs]
    for p, g in zip(params, theirs):
        p.grad = g
    torch_norm = nn.utils.clip_grad_norm_(params, max_norm=1.0)
    norm = grad_norm_and_clip(ours, max_norm=1.0)
    torch.testing.assert_close(norm, torch_norm)
    for mine, p in zip(ours, params):
        torch.testing.assert_close(mine, p.grad)
    unclipped = gradients()
    assert grad_norm_and_clip(unclipped, max_norm=0.0) == pytest.approx(float(torch_norm))
    assert all(torch.equal(a, b) for a, b in zip(unclipped, gradients()))  # max_norm 0: only the norm


def test_gradient_norm_of_bf16_gradients_is_accumulated_in_fp32():
    from dtrain.optim import grad_norm_and_clip

    grads = gradients(torch.bfloat16)
    norm = grad_norm_and_clip(grads, max_norm=0.0)
    assert norm.dtype == torch.float32
    exact = torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads]))
    assert float(norm) == pytest.approx(float(exact), rel=1e-6)  # a bf16 sum is off by ~1e-3


def test_one_nonfinite_gradient_makes_the_norm_nonfinite():
    from dtrain.optim import grad_norm_and_clip

    for bad in (float("inf"), float("nan")):
        grads = gradients()
        grads[17].view(-1)[4] = bad
        assert not torch.isfinite(grad_norm_and_clip(grads, max_norm=0.0))


def test_the_gradient_norm_takes_a_few_ops_whatever_the_number_of_gradients():
    # torch's get_total_norm calls one `.to` per gradient: ~100 extra host ops per step for bert-base.
    from dtrain.optim import grad_norm_and_clip

    few, many = gradients(count=4), gradients(count=200)
    assert len(top_level_ops(lambda: grad_norm_and_clip(many, 0.0))) == \
        len(top_level_ops(lambda: grad_norm_and_clip(few, 0.0))) <= 4
    assert len(top_level_ops(lambda: grad_norm_and_clip(many, 1.0))) <= 10


def test_a_deferred_nonfinite_record_costs_no_op_per_step_and_names_the_first_bad_step():
    from dtrain.errors import UserError
    from dtrain.loop import NonfiniteWatch

    watch = NonfiniteWatch(torch.device("cpu"))
    watch.deferred = True  # as on a GPU: read only at log steps, saves and epoch ends
    norms = [torch.tensor(1.0)] * 600
    norms[300], norms[450] = torch.tensor(float("nan")), torch.tensor(float("inf"))

    def record_all():
        for step, norm in enumerate(norms, start=1):
            watch.record(norm, step)

    ops = top_level_ops(record_all)
    # 600 steps: only the two folds of 256 kept norms (a stack, then a cat), never an op per step.
    assert len(ops) <= 2 * 2, ops
    with pytest.raises(UserError, match=r"at step 301 \(epoch 2\)"):
        watch.raise_if_seen(epoch=2)
    watch.record(torch.tensor(2.0), 601)
    watch.raise_if_seen(epoch=2)  # what was read is forgotten: the next interval starts clean


@pytest.mark.slow
@pytest.mark.parametrize("deferred", [False, True], ids=["read-every-step", "read-at-log-steps"])
def test_a_nonfinite_gradient_stops_the_run_at_the_step_it_happened(tmp_path, deferred):
    out = tmp_path / "run"
    # On the CPU the record is read after every step: the run stops at step 3, before logging or saving it.
    # Read only at log steps and saves (as on a GPU): step 4's save reads it, and the error still names step 3.
    proc = run_train([*SYNTH, f"output_dir={out}", "epochs=1", "log_every=5", "checkpoint_every=2"],
                     script=PATCHED_TRAIN, NAN_GRAD_AT_STEP="3", NONFINITE_DEFERRED="1" if deferred else "0")
    assert_one_clear_error(proc, "non-finite loss or gradient at step 3 (epoch 0)", "nonfinite_loss=skip")
    steps_run = [int(line.split()[-1]) for line in proc.stdout.splitlines() if line.startswith("patched: optimizer")]
    assert steps_run == list(range(1, (4 if deferred else 3) + 1))  # deferred: step 4's save reads it
    assert logged_steps(out) == 0
    assert read_checkpoint(out)["state"]["step"] == 2  # nothing a bad step reached was saved


@pytest.mark.slow
def test_the_norm_of_fsdp_shards_and_their_clipping_equal_torchs():
    # One all-reduce of the local sum of squares instead of torch's DTensor ops (one `.to` each through
    # DTensor's Python dispatch); 2 ranks, with a layer whose rows do not divide evenly.
    proc = run_torchrun([], nproc=2, script=str(TESTS / "fsdp_grad_norm.py"), timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in (0, 1):
        assert f"rank {rank}: same norm" in proc.stdout, proc.stdout + proc.stderr


def test_cudnn_times_its_algorithms_unless_the_run_is_deterministic():
    from dtrain.build import seed_everything

    before = torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()
    try:
        seed_everything(0, deterministic=False)
        assert torch.backends.cudnn.benchmark
        seed_everything(0, deterministic=True)
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = before[0]
        torch.use_deterministic_algorithms(before[1])


def test_one_rank_broadcasts_no_buffers(tmp_path, monkeypatch):
    # FSDP broadcasts the BatchNorm buffers before every training forward; alone there is nobody to
    # send them to, and each broadcast copies every buffer into one tensor and back (about 480 host ops
    # per step for ResNet-50's 159 buffers).
    import torch.distributed as dist

    from dtrain.strategies import broadcast_coalesced

    calls = []
    buffers = [torch.ones(3), torch.zeros(2, dtype=torch.int64)]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "broadcast", lambda *a, **k: calls.append(a))
        broadcast_coalesced(buffers)
        assert calls == []
    finally:
        dist.destroy_process_group()
