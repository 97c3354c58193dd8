"""The one module that knows how the job was launched: one process, or one process per device.

``setup(cfg) -> DistEnv`` reads the launcher's environment (torchrun or srun), starts the
process group, picks the device and thread count. What a mode does with the model (DataParallel,
DDP, FSDP) lives in dtrain.strategies. Everything else receives the DistEnv and calls the small
collective helpers below; no other module touches torch.distributed set-up.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from dtrain.config import Config
from dtrain.errors import EXIT_ERROR, ConfigError, UserError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. Passed explicitly; never global."""

    mode: str  # "single" (one device), "dp" (DataParallel over local GPUs), "ddp" or "fsdp" (one process per device)
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
        """One process per device, in a process group."""
        return self.mode in ("ddp", "fsdp")


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
    launch = _read_launch(environ)
    if launch is not None and not 0 <= launch.rank < launch.world_size:
        raise UserError(f"rank {launch.rank} is outside a world of {launch.world_size} processes ({launch.source} "
                        "variables): each process needs a distinct rank 0..world size - 1", all_ranks=False)
    return launch


def _read_launch(environ: Mapping[str, str]) -> Launch | None:
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
    if cfg.mode in ("ddp", "fsdp") and launch is None:
        raise ConfigError(f"mode={cfg.mode} needs a launcher: add nproc=N, or torchrun --nproc_per_node=N train.py "
                          "..., or srun (or use mode=auto to run in one process)")
    if cfg.mode == "dp" and launch is not None and launch.world_size > 1:
        raise ConfigError("mode=dp is one process driving all local GPUs; launch it with python, not torchrun/srun "
                          "(or use mode=ddp)")
    if launch is not None and cfg.mode != "dp":
        env = _setup_process_group(cfg, launch, use_cuda)
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


def _setup_process_group(cfg: Config, launch: Launch, use_cuda: bool) -> DistEnv:
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ConfigError("backend=nccl needs CUDA GPUs and none is usable here; use backend=gloo (or backend=auto)")
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
    # DDP imports torch._dynamo; imported after the process group exists, it keeps references to the
    # default group that destroy_process_group does not clear, and the group's Gloo threads then
    # outlive cleanup() (see cleanup). Imported first, it holds none.
    import torch._dynamo as _dynamo  # noqa: F401 (binds no local `torch`)
    if backend == "nccl":  # NCCL's flight recorder: the last collectives of every rank, dumped on a timeout
        hang_dir = os.path.join(os.path.abspath(cfg.output_dir), "hang")
        os.makedirs(hang_dir, exist_ok=True)
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
        os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
        os.environ.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", os.path.join(hang_dir, "nccl_trace_rank_"))
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    where = f"the process group at {launch.master_addr}:{launch.master_port} as rank {launch.rank}/{launch.world_size}"
    # torch times out most rendezvous waits itself; a program that accepts the connection on
    # MASTER_PORT and never answers holds the store's handshake forever. This ends that wait.
    hang = (f"could not join {where}: no answer within timeout_s={cfg.timeout_s:g} "
            "(is another program listening on MASTER_PORT? are all ranks started?)")
    try:
        with deadline(cfg.timeout_s + JOIN_GRACE_S, hang, launch.rank):
            dist.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size,
                                    timeout=timeout, device_id=device if backend == "nccl" else None,
                                    **_rendezvous(launch, timeout, os.environ))
            # NCCL all-reduces device tensors, so reading a flag back would make the CPU wait for the GPU.
            host_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    except (RuntimeError, ValueError, TimeoutError) as e:  # DistStoreError/DistNetworkError are RuntimeErrors
        raise UserError(f"could not join {where} (timeout_s={cfg.timeout_s:g}): {str(e).splitlines()[0]}",
                        all_ranks=False) from None
    return DistEnv(mode="fsdp" if cfg.mode == "fsdp" else "ddp", device=device, rank=launch.rank,
                   local_rank=launch.local_rank,
                   world_size=launch.world_size, local_world_size=launch.local_world_size,
                   node_rank=launch.node_rank, backend=backend, host_group=host_group)


JOIN_GRACE_S = 10.0  # torch's own rendezvous timeout (timeout_s) reports first, in its words, when it can


@contextlib.contextmanager
def deadline(seconds: float, message: str, rank: int):
    """End this process with one error line (EXIT_ERROR) if the block is still running after `seconds`.

    For waits that nothing inside torch times out. os._exit, because the stuck call holds the main
    thread: no exception can reach it.
    """
    def give_up() -> None:
        print(f"error [rank {rank}]: {message}", file=sys.stderr, flush=True)
        os._exit(EXIT_ERROR)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


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
    """Destroy the process group while the interpreter is fully alive.

    Its backend's worker threads are joined here only if nothing else still holds the group: the
    models wrapped around it are freed first (gc, since DDP sits in reference cycles). A Gloo thread
    that outlives this point can abort the process at exit: see train.py's exit_process.
    """
    if env.distributed and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Collectives (no-ops outside DDP)


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when `flag` is True on any rank.

    A CPU tensor on a Gloo group: with NCCL the flag would go through the GPU's stream, and reading
    the result would make the CPU wait for all queued GPU work every time it is asked.
    """
    return bool(max_over_ranks(int(flag), env))


def gather_floats(values: list[float], env: DistEnv) -> list[list[float]]:
    """Every rank's `values` (the same length everywhere), in rank order, on every rank (host-side)."""
    if not env.distributed:
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(env.world_size)]
    dist.all_gather(every, mine, group=env.host_group)
    return [t.tolist() for t in every]


def max_over_ranks(value: int, env: DistEnv) -> int:
    """The largest `value` of any rank, on every rank (host-side, like any_rank)."""
    if not env.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=env.host_group)
    return int(tensor.item())


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


def agree_on_failure(failure: UserError | None, env: DistEnv) -> None:
    """Raise on every rank when any rank failed: one error for the whole job, printed once by rank 0.

    For steps every rank takes together (checking the output directory, writing a checkpoint): a
    rank that raised alone would leave the others waiting for it in the next collective.
    """
    failures = gather_objects(None if failure is None else str(failure), env)
    for rank, message in enumerate(failures):
        if message is not None:
            raise UserError(message if rank == 0 or env.world_size == 1 else f"(rank {rank}) {message}") from None


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
