"""The one module that knows how the job was launched: single device, DataParallel or DDP.

``setup(cfg) -> DistEnv`` reads the launcher's environment (torchrun or srun), starts the
process group, picks the device and thread count. ``wrap``/``unwrap`` put the model in and out
of DataParallel / DistributedDataParallel. Everything else receives the DistEnv and calls the
small collective helpers below; no other module touches torch.distributed set-up.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from dtrain.config import Config, DDPConfig
from dtrain.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. Passed explicitly; never global."""

    mode: str  # "single" (one device), "dp" (DataParallel over local GPUs) or "ddp"
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    backend: str = ""  # process-group backend under DDP
    # Gloo group for host-side flags (see any_rank); None means the default group, already Gloo on CPUs.
    host_group: Any = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mode == "ddp"


@dataclass(frozen=True)
class Launch:
    """What the launcher told us through environment variables."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" or "slurm"


# ---------------------------------------------------------------------------------------------
# Reading the launcher's environment


def read_launch(environ: Mapping[str, str] = os.environ) -> Launch | None:
    """torchrun/env:// variables first; else srun's SLURM_* (only inside a job step); else None."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        world_size = _int_var(environ, "WORLD_SIZE")
        local_world_size = _int_var(environ, "LOCAL_WORLD_SIZE", default=world_size)
        return Launch(
            rank=_int_var(environ, "RANK"),
            local_rank=_int_var(environ, "LOCAL_RANK", default=0),
            world_size=world_size,
            local_world_size=local_world_size,
            node_rank=_int_var(environ, "GROUP_RANK", default=0),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int_var(environ, "MASTER_PORT", default=29500),
            source="torchrun",
        )
    # A batch script also carries SLURM_PROCID/SLURM_NTASKS, but only `srun` starts one process per
    # task; SLURM_STEP_ID tells us we are such a task.
    in_step = "SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ
    if in_step and _int_var(environ, "SLURM_NTASKS", default=1) > 1:
        return _slurm_launch(environ)
    return None


def _slurm_launch(environ: Mapping[str, str]) -> Launch:
    missing = [v for v in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_ID") if v not in environ]
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    if missing or not nodelist:
        missing += [] if nodelist else ["SLURM_JOB_NODELIST"]
        raise UserError(f"srun launch without {', '.join(missing)}: run inside a full allocation with "
                        "`srun` (one task per device), or set RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT yourself")
    world_size = _int_var(environ, "SLURM_NTASKS")
    num_nodes = _int_var(environ, "SLURM_STEP_NUM_NODES", default=_int_var(environ, "SLURM_JOB_NUM_NODES", default=1))
    tasks_per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "")
    local_world_size = _first_count(tasks_per_node) or max(1, world_size // num_nodes)
    return Launch(
        rank=_int_var(environ, "SLURM_PROCID"),
        local_rank=_int_var(environ, "SLURM_LOCALID"),
        world_size=world_size,
        local_world_size=local_world_size,
        node_rank=_int_var(environ, "SLURM_NODEID"),
        master_addr=environ.get("MASTER_ADDR") or first_host(nodelist),
        master_port=_int_var(environ, "MASTER_PORT", default=slurm_port(environ["SLURM_JOB_ID"])),
        source="slurm",
    )


def slurm_port(job_id: str) -> int:
    """A rendezvous port derived from the job id, so concurrent jobs on one node differ."""
    return 15000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[03-05,9],cpu1' -> 'gpu03' (scontrol when present)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass  # fall back to parsing it ourselves
    head = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist.strip())
    prefix, ranges = head.group(1), head.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _first_count(tasks_per_node: str) -> int:
    """SLURM_TASKS_PER_NODE looks like '4(x2),3': tasks on the first node."""
    match = re.match(r"(\d+)", tasks_per_node)
    return int(match.group(1)) if match else 0


def _int_var(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name)
    if value is None:
        if default is None:
            raise UserError(f"environment variable {name} is not set; launch with torchrun or srun")
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


# ---------------------------------------------------------------------------------------------
# Setting up and tearing down


def setup(cfg: Config, environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Resolve cfg.mode against the launcher and the hardware; start the process group if DDP."""
    launch = read_launch(environ)
    use_cuda = cfg.mode != "cpu" and torch.cuda.is_available()
    if cfg.mode == "ddp" and launch is None:
        raise UserError("mode=ddp needs a launcher: torchrun --nproc_per_node=N train.py ... or srun "
                        "(or use mode=auto to run in one process)")
    if cfg.mode == "dp" and launch is not None and launch.world_size > 1:
        raise UserError("mode=dp is one process driving all local GPUs; launch it with python, not torchrun/srun "
                        "(or use mode=ddp)")
    if launch is not None and cfg.mode != "dp":
        env = _setup_ddp(cfg, launch, use_cuda)
    elif use_cuda and torch.cuda.device_count() > 1 and cfg.mode in ("auto", "dp"):
        env = DistEnv(mode="dp", device=torch.device("cuda", 0))
    else:
        if cfg.mode == "dp":
            print("mode=dp: fewer than 2 GPUs visible, running on one device", flush=True)
        env = DistEnv(mode="single", device=torch.device("cuda", 0) if use_cuda else torch.device("cpu"))
    threads, source = threads_per_process(cfg.threads, env.local_world_size, environ)
    torch.set_num_threads(threads)
    if env.is_main:
        print(f"threads: {threads} per process ({source})", flush=True)
    return env


def _setup_ddp(cfg: Config, launch: Launch, use_cuda: bool) -> DistEnv:
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise UserError("backend=nccl needs CUDA GPUs and none is usable here; use backend=gloo (or backend=auto)")
    if use_cuda:
        if launch.local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {launch.local_rank} has no GPU: {torch.cuda.device_count()} visible on this "
                            "node; start one process per GPU (--nproc_per_node / --gpus-per-node)")
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # env:// reads these; under srun we derived them ourselves. Under torchrun they are already set.
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank),
                      MASTER_ADDR=launch.master_addr, MASTER_PORT=str(launch.master_port))
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    try:
        dist.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size, timeout=timeout,
                                device_id=device if backend == "nccl" else None,
                                **_rendezvous(launch, timeout, os.environ))
        # NCCL all-reduces device tensors, so reading a flag back would make the CPU wait for the GPU.
        host_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    except (RuntimeError, ValueError, TimeoutError) as e:  # DistStoreError/DistNetworkError are RuntimeErrors
        raise UserError(f"could not join the process group at {launch.master_addr}:{launch.master_port} "
                        f"as rank {launch.rank}/{launch.world_size} (timeout_s={cfg.timeout_s:g}): "
                        f"{str(e).splitlines()[0]}", all_ranks=False) from None
    return DistEnv(mode="ddp", device=device, rank=launch.rank, local_rank=launch.local_rank,
                   world_size=launch.world_size, local_world_size=launch.local_world_size,
                   node_rank=launch.node_rank, backend=backend, host_group=host_group)


def _rendezvous(launch: Launch, timeout: datetime.timedelta, environ: Mapping[str, str]) -> dict[str, Any]:
    """init_process_group arguments: env:// normally; under a torchrun restart, a fresh key prefix.

    torchrun shares its rendezvous TCPStore with the workers, and that store outlives a restart:
    keys written by the previous round (a peer's address, an NCCL id) are still there and a new
    worker may read them before they are rewritten, then dial a dead port (pytorch/pytorch#135712).
    Prefixing the keys with the restart count gives every round a clean namespace. (Multi-node
    elastic jobs should also export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: see launch/.)
    """
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {"init_method": "env://"}
    store = dist.TCPStore(launch.master_addr, launch.master_port, world_size=launch.world_size, is_master=False,
                          timeout=timeout)
    restart = environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"dtrain/restart_{restart}/", store)}


# torch reads both at start-up and MKL_NUM_THREADS wins when both are set; so does the rule below.
THREAD_VARIABLES = ("MKL_NUM_THREADS", "OMP_NUM_THREADS")


def threads_per_process(requested: int, local_world_size: int,
                        environ: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """Intra-op threads for each process, and where the number comes from (for the start-up line).

    threads=N wins. Else a thread variable set by the user or the launcher is honoured: torchrun
    sets OMP_NUM_THREADS=1 when it is unset and starts several processes, and that counts as the
    launcher's setting like any other. Else the node's cores are shared among its processes so
    they do not oversubscribe.
    """
    if requested > 0:
        return requested, f"threads={requested}"
    for name in THREAD_VARIABLES:
        value = environ.get(name, "").strip()
        if value:
            count = _int_var(environ, name)
            if count < 1:
                raise UserError(f"environment variable {name}={value!r} must be >= 1 (or unset it, or set threads=N)")
            return count, f"{name}={count} in the environment; threads=N overrides"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = max(1, local_world_size)
    return max(1, cores // processes), f"{cores} cores / {processes} process{'es' * (processes > 1)} on this node"


PEER_FAILURE_SIGNS = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out",
                      "timeout", "communicator was aborted", "socket closed")


def is_peer_failure(error: BaseException) -> bool:
    """A collective failed because another rank died or hung (its own error is reported by that rank)."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(sign in text for sign in PEER_FAILURE_SIGNS)


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Model wrapping


def wrap(model: nn.Module, env: DistEnv, ddp_cfg: DDPConfig) -> nn.Module:
    """Move to the device and wrap for the mode. The unwrapped model stays reachable via unwrap()."""
    model = model.to(env.device)
    if env.mode == "dp":
        return nn.DataParallel(model)
    if env.mode == "ddp":
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[env.device.index] if env.device.type == "cuda" else None,
            bucket_cap_mb=ddp_cfg.bucket_cap_mb,
            gradient_as_bucket_view=ddp_cfg.gradient_as_bucket_view,
            static_graph=ddp_cfg.static_graph,
            find_unused_parameters=ddp_cfg.find_unused_parameters,
        )
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DataParallel / DDP / torch.compile: what checkpoints hold."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce for a non-final accumulation micro-step."""
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def grads_to_none(model: nn.Module, ddp_cfg: DDPConfig) -> bool:
    """What zero_grad(set_to_none=...) should do between steps for this wrapping.

    With gradient_as_bucket_view each .grad is a view into DDP's all-reduce bucket, so zeroing it
    in place is free of allocations. Set to None, the next backward allocates a fresh gradient and
    DDP copies it into the bucket, every step (the copy the option exists to avoid). Elsewhere None
    is cheaper: nothing to zero. (With find_unused_parameters, None keeps unused parameters out of
    the optimizer step.)
    """
    keeps_bucket_views = ddp_cfg.gradient_as_bucket_view and not ddp_cfg.find_unused_parameters
    return not (isinstance(model, nn.parallel.DistributedDataParallel) and keeps_bucket_views)


# ---------------------------------------------------------------------------------------------
# Collectives (no-ops outside DDP)


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when `flag` is True on any rank.

    A CPU tensor on a Gloo group: with NCCL the flag would go through the GPU's stream, and reading
    the result would make the CPU wait for all queued GPU work every time it is asked.
    """
    if not env.distributed:
        return flag
    tensor = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=env.host_group)
    return bool(tensor.item())


def barrier(env: DistEnv) -> None:
    if env.distributed:
        # gloo's barrier honours the group timeout; nccl's needs the device to be known.
        dist.barrier(device_ids=[env.device.index]) if env.backend == "nccl" else dist.barrier()


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_first(env: DistEnv, fn: Callable[[], Any]) -> Any:
    """Run fn on rank 0 first (e.g. to fill a cache), then on the other ranks, which reuse its result.

    Unlike a bare barrier, a failure on rank 0 reaches every rank: the others stop with the same
    error at once instead of waiting at the barrier until the timeout.
    """
    result, failure = None, None
    if env.is_main:
        try:
            result = fn()
        except UserError as e:
            failure = str(e)
        except BaseException:
            broadcast_object("rank 0 failed (see its traceback)", env)
            raise
    failure = broadcast_object(failure, env)
    if failure is not None:
        raise UserError(failure)
    if env.is_main:
        return result
    try:
        return fn()
    except UserError as e:  # rank 0 succeeded, so this failure is this rank's alone
        raise UserError(str(e), all_ranks=False) from None
