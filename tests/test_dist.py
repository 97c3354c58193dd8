"""The CPU / DataParallel / DDP / FSDP switch: launcher detection, mode resolution, each mode's wrapping."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import pytest
from torch import nn

from dtrain import dist as dtrain_dist
from dtrain.config import load_config
from dtrain.dist import DistEnv, first_host, read_launch, setup, slurm_port, threads_per_process
from dtrain.strategies import build_strategy
from dtrain.errors import UserError

TORCHRUN_ENV = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
                "MASTER_ADDR": "head", "MASTER_PORT": "29555"}
SRUN_ENV = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
            "SLURM_NODEID": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[03-06]",
            "SLURM_JOB_NUM_NODES": "4", "SLURM_TASKS_PER_NODE": "2(x4)"}


def test_torchrun_variables_are_read():
    launch = read_launch(TORCHRUN_ENV)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.local_world_size, launch.node_rank) == \
        (3, 4, 1, 2, 1)
    assert (launch.master_addr, launch.master_port, launch.source) == ("head", 29555, "torchrun")


def test_srun_variables_are_mapped(monkeypatch):
    monkeypatch.setattr(dtrain_dist.shutil, "which", lambda name: None)  # parse the node list ourselves
    launch = read_launch(SRUN_ENV)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.local_world_size, launch.node_rank) == \
        (5, 8, 1, 2, 1)
    assert launch.master_addr == "gpu03"
    assert launch.master_port == slurm_port("4242") and launch.source == "slurm"


def test_torchrun_inside_slurm_wins():
    assert read_launch({**SRUN_ENV, **TORCHRUN_ENV}).source == "torchrun"


def test_batch_script_without_srun_is_not_distributed():
    no_step = {k: v for k, v in SRUN_ENV.items() if k != "SLURM_STEP_ID"}
    assert read_launch(no_step) is None
    assert read_launch({**SRUN_ENV, "SLURM_NTASKS": "1"}) is None
    assert read_launch({}) is None


def test_partial_slurm_environment_is_a_clear_error():
    partial = {k: v for k, v in SRUN_ENV.items() if k not in ("SLURM_LOCALID", "SLURM_JOB_NODELIST")}
    with pytest.raises(UserError, match="SLURM_LOCALID.*SLURM_JOB_NODELIST"):
        read_launch(partial)
    with pytest.raises(UserError, match="RANK='x' is not an integer"):
        read_launch({**TORCHRUN_ENV, "RANK": "x"})


@pytest.mark.parametrize("nodelist, head", [("node7", "node7"), ("gpu[03-06]", "gpu03"), ("a[1,4-5],b2", "a1"),
                                            ("cn-[010-012]", "cn-010")])
def test_first_host_of_a_node_list(monkeypatch, nodelist, head):
    monkeypatch.setattr(dtrain_dist.shutil, "which", lambda name: None)
    assert first_host(nodelist) == head


def test_ports_differ_between_jobs():
    assert slurm_port("1001") != slurm_port("1002")
    assert 1024 < slurm_port("99999999") < 65536


def test_thread_count_explicit_then_environment_then_cores_per_process():
    cores = len(os.sched_getaffinity(0))
    assert threads_per_process(0, 1, environ={}) == (cores, f"{cores} cores / 1 process on this node")
    assert threads_per_process(0, cores * 4, environ={})[0] == 1  # never 0
    # A thread variable set by the user or the launcher (torchrun sets OMP_NUM_THREADS=1) is honoured ...
    count, source = threads_per_process(0, 2, environ={"OMP_NUM_THREADS": "3"})
    assert count == 3 and source.startswith("OMP_NUM_THREADS=3 in the environment")
    assert threads_per_process(0, 1, environ={"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "5"})[0] == 5  # as torch
    assert threads_per_process(0, 1, environ={"OMP_NUM_THREADS": ""})[0] == cores  # empty = unset
    # ... and threads=N wins over it.
    assert threads_per_process(4, 2, environ={"OMP_NUM_THREADS": "1"}) == (4, "threads=4")
    for bad in ("two", "0"):
        with pytest.raises(UserError, match="OMP_NUM_THREADS"):
            threads_per_process(0, 1, environ={"OMP_NUM_THREADS": bad})


def test_single_process_modes(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env = setup(load_config(None, ["mode=auto"]), environ={})
    assert (env.mode, env.device.type, env.world_size, env.is_main) == ("single", "cpu", 1, True)
    env = setup(load_config(None, ["mode=dp"]), environ={})
    assert env.mode == "single"
    assert capsys.readouterr().out.count("fewer than 2 GPUs visible") == 1


def test_impossible_modes_are_clear_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="mode=ddp needs a launcher"):
        setup(load_config(None, ["mode=ddp"]), environ={})
    with pytest.raises(UserError, match="mode=dp is one process"):
        setup(load_config(None, ["mode=dp"]), environ=TORCHRUN_ENV)
    with pytest.raises(UserError, match="backend=nccl needs CUDA"):
        setup(load_config(None, ["backend=nccl"]), environ=TORCHRUN_ENV)


def test_unreachable_rendezvous_fails_within_the_timeout(monkeypatch):
    import time

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # setup() exports RANK/MASTER_* for env:// : keep them out of the environment later tests inherit.
    monkeypatch.setattr(os, "environ", dict(os.environ))
    environ = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"}  # nobody there
    start = time.monotonic()
    with pytest.raises(UserError, match="could not join the process group at 127.0.0.1:9"):
        setup(load_config(None, ["timeout_s=3"]), environ=environ)
    assert time.monotonic() - start < 60


def test_each_mode_wraps_the_model_and_keeps_the_plain_one(tmp_path):
    cfg = load_config(None, [])
    single = build_strategy(cfg, DistEnv(mode="single", device=torch.device("cpu")))
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert single.wrap(model, []) is model and single.raw_model is model and single.eval_model() is model
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = build_strategy(cfg, DistEnv(mode="ddp", device=torch.device("cpu"), backend="gloo"))
        wrapped = ddp.wrap(model, [])
        assert isinstance(wrapped, nn.parallel.DistributedDataParallel)
        assert ddp.raw_model is model and ddp.eval_model() is model  # evaluation skips DDP's forward
        assert all(k.startswith("module.") for k in wrapped.state_dict())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model_state, _ = ddp.state_dicts(optimizer)
        assert set(model_state) == set(model.state_dict())  # the checkpoint format has no "module." prefix
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_stay_views_of_the_all_reduce_buckets_between_steps(tmp_path):
    cfg = load_config(None, [])
    single = build_strategy(cfg, DistEnv(mode="single", device=torch.device("cpu")))
    assert single.zero_grad_to_none  # a plain model: None is cheapest
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        env = DistEnv(mode="ddp", device=torch.device("cpu"), backend="gloo")
        ddp = build_strategy(cfg, env)
        wrapped = ddp.wrap(model, [])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(3):  # DDP rebuilds its buckets once, after the first step
            wrapped(torch.randn(5, 4)).sum().backward()
            in_bucket = [p.grad.data_ptr() for p in model.parameters()]
            optimizer.step()
            optimizer.zero_grad(set_to_none=ddp.zero_grad_to_none)
            # Zeroed in place, still the bucket's memory: the next backward allocates and copies nothing.
            assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in model.parameters())
            assert [p.grad.data_ptr() for p in model.parameters()] == in_bucket
        for option in ("ddp.find_unused_parameters=true", "ddp.gradient_as_bucket_view=false"):
            assert build_strategy(load_config(None, [option]), env).zero_grad_to_none
    finally:
        dist.destroy_process_group()


def test_environment_of_the_test_process_stays_clean():
    """Guards the other tests: a leaked MASTER_PORT would send later jobs to a dead rendezvous."""
    assert not [k for k in os.environ if k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")]
