"""The launch/ scripts, run as a user would; multi-node torchrun across two namespace hosts.

The two "nodes" n1 (10.200.0.1) and n2 (10.200.0.2) are network namespaces on a private bridge
(tests/cluster_netns.py): separate network stacks, hostnames and hosts files, no route off the
machine. The multi-node tests skip when namespaces cannot be made here (not root, no iproute2);
with DTRAIN_REQUIRE_CLUSTER=1 (set by .ci/run) they fail instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cluster_netns
from cluster_netns import Host, NetnsHosts, SessionLock
from conftest import finish as finish_all
from conftest import kill_session, output_tail, run_bounded, wait_until

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/image/mnist_demo.yaml"
# A few steps of a small model on synthetic images: fast on 2 cores; collectives fail after 60 s.
TINY = ["data.synthetic=true", "data.synthetic_train_size=256", "data.synthetic_val_size=64",
        "model.arch=squeezenet1_1", "model.dropout=0", "data.image_size=32", "data.val_crop_ratio=1.0",
        "batch_size=8", "num_workers=0", "log_every=1", "progress=false", "timeout_s=60", "resume="]


def launch_env(**extra: str) -> dict[str, str]:
    """This environment minus anything a launcher would read as "already launched"."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "TORCHELASTIC",
                                "NNODES", "HEAD_", "NPROC", "RDZV_", "JOIN_TIMEOUT"))}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def run_script(argv: list[str], timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    return run_bounded(argv, timeout, launch_env(**env))


def load_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["state"]


# ---------------------------------------------------------------------------------------------
# launch/ on this machine


@pytest.mark.parametrize("script, mentions", [
    ("launch/single.sh", ["--config FILE", "CUDA_VISIBLE_DEVICES"]),
    ("launch/ddp.sh", ["NPROC", "torchrun --standalone"]),
    ("launch/multinode.sh", ["--nnodes N", "--head ADDR", "--port P", "HEAD_ADDR", "RDZV_TIMEOUT"]),
])
def test_launch_script_help_says_what_it_takes(script, mentions):
    proc = run_script([script, "--help"], timeout=30)
    assert proc.returncode == 0, proc.stderr
    for text in mentions:
        assert text in proc.stdout, proc.stdout


def test_single_script_trains_in_one_process(tmp_path):
    proc = run_script(["launch/single.sh", "--config", CONFIG, *TINY, "max_steps=2", f"output_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "done:" in proc.stdout
    assert load_state(tmp_path)["world_size"] == 1


def test_ddp_script_starts_two_cpu_processes_without_gpus(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the 2-process default applies to machines without GPUs")
    proc = run_script(["launch/ddp.sh", "--config", CONFIG, *TINY, "max_steps=2", f"output_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert load_state(tmp_path)["world_size"] == 2


def test_ddp_script_forwards_sigusr1_to_every_rank_which_save_and_resume(tmp_path):
    """`kill -USR1 <torchrun>` (a batch shell forwarding a preemption notice, say): torchrun passes it
    on (--signals-to-handle), every rank stops at the same step and saves; a rerun resumes."""
    args = ["--config", CONFIG, *TINY, "data.synthetic_train_size=4096", "batch_size=2", "resume=auto",
            f"output_dir={tmp_path}"]
    launcher = subprocess.Popen(["launch/ddp.sh", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=launch_env(NPROC="2"), start_new_session=True)
    metrics = tmp_path / "metrics.jsonl"
    wait_until(lambda: metrics.is_file() and '"step": 2' in metrics.read_text(), launcher, timeout=180,
               what="training step 2")
    launcher.send_signal(signal.SIGUSR1)
    done = finish_all([launcher], timeout=120)[0]
    stdout, stderr = done.stdout, done.stderr
    assert done.returncode != 0, stdout + stderr
    assert stdout.count("received SIGUSR1") == 2, stdout + stderr
    stopped = int(stdout.split("stopped at step ")[1].split(":")[0])
    assert load_state(tmp_path)["step"] == stopped
    again = run_script(["launch/ddp.sh", *args, f"max_steps={stopped + 2}"], NPROC="2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from {tmp_path}/checkpoints/last.pt: epoch 0, step {stopped}" in again.stdout
    assert load_state(tmp_path)["step"] == stopped + 2


def test_multinode_script_without_head_is_a_usage_error():
    proc = run_script(["launch/multinode.sh", "--nnodes", "2", "--config", CONFIG], timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: launch/multinode.sh needs --nnodes and --head"), proc.stderr


# ---------------------------------------------------------------------------------------------
# Two namespace hosts


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    reason = cluster_netns.unavailable_reason()
    if reason:
        if os.environ.get("DTRAIN_REQUIRE_CLUSTER") == "1":
            pytest.fail(f"DTRAIN_REQUIRE_CLUSTER=1 but: {reason}")
        pytest.skip(reason)
    with SessionLock(), NetnsHosts(2, tmp_path_factory.mktemp("netns_hosts")) as made:
        yield made


def start_on(host: Host, argv: list[str], log: Path, **env: str) -> subprocess.Popen:
    """argv on a namespace host, from the repository root, output to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(host.command(argv), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env=launch_env(**env), start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float, log: Path) -> int:
    """Wait; on timeout kill the launcher and its workers (its own session) and fail with its log's tail."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        pytest.fail(f"{proc.args[-1]} still running after {timeout:.0f}s; killed\n"
                    f"{output_tail(str(log), log.read_text(errors='replace'), '')}")


def test_torchrun_across_two_hosts_trains_and_only_global_rank_0_saves(hosts, tmp_path):
    """launch/multinode.sh on n1 (the head) and n2: 2 nodes x 2 processes, c10d rendezvous on n1.

    Each node writes to its own output_dir, so a save by any rank but global rank 0 (a local
    rank 0 on the other node, say) would show up in the other node's directory."""
    head, other = hosts
    procs, logs = {}, {}
    for host in (other, head):  # the worker node first: it waits for the head's endpoint
        logs[host.name] = tmp_path / f"{host.name}.log"
        procs[host.name] = start_on(host, [
            "launch/multinode.sh", "--nnodes", "2", "--nproc", "2", "--head", head.name, "--port", "29400",
            "--id", "test-2nodes", "--timeout", "60", "--join-timeout", "120",
            "--config", CONFIG, *TINY, "max_steps=4", f"output_dir={tmp_path / host.name}"], logs[host.name])
    codes = {name: finish(proc, timeout=300, log=logs[name]) for name, proc in procs.items()}
    output = "\n".join(f"--- {name}\n{log.read_text()}" for name, log in logs.items())
    assert codes == {"n1": 0, "n2": 0}, output
    saved = [name for name in procs if (tmp_path / name / "checkpoints").exists()]
    assert len(saved) == 1, f"checkpoints written on {saved}\n{output}"
    rank0_dir, other_dir = tmp_path / saved[0], tmp_path / ({"n1", "n2"} - set(saved)).pop()
    state = load_state(rank0_dir)
    assert (state["step"], state["world_size"]) == (4, 4), state
    assert (rank0_dir / "metrics.jsonl").is_file() and (rank0_dir / "config.yaml").is_file()
    # The other host writes nothing but its own ranks' heartbeats (the hang watch of observe.py).
    assert sorted(p.name for p in other_dir.iterdir()) == ["heartbeat"], list(other_dir.iterdir())
    assert sorted(p.name for p in (other_dir / "heartbeat").iterdir()) == ["rank2.json", "rank3.json"]
    assert "done:" in logs[saved[0]].read_text(), output


def test_unreachable_rendezvous_endpoint_fails_fast(hosts, tmp_path):
    """Nothing answers at the head's address (10.200.0.77 is on the bridge, but no host has it)."""
    start = time.monotonic()
    log = tmp_path / "n1.log"
    proc = start_on(hosts[0], ["launch/multinode.sh", "--nnodes", "2", "--head", "10.200.0.77", "--port", "29400",
                               "--timeout", "5", "--config", CONFIG, *TINY], log)
    code = finish(proc, timeout=120, log=log)
    text = log.read_text()
    assert code == 1 and time.monotonic() - start < 60, text
    assert text.strip().splitlines()[-1] == (
        "error: rendezvous endpoint 10.200.0.77:29400 is not reachable after 5s; start the same command "
        "on the head node, and check --head/--port and the firewall"), text


def test_head_name_that_does_not_resolve_fails_at_once(hosts, tmp_path):
    log = tmp_path / "n1.log"
    proc = start_on(hosts[0], ["launch/multinode.sh", "--nnodes", "2", "--head", "n9", "--config", CONFIG], log)
    assert finish(proc, timeout=60, log=log) == 1, log.read_text()
    assert "error: rendezvous head 'n9' does not resolve" in log.read_text()


def test_rendezvous_port_in_use_on_the_head_fails_at_once(hosts, tmp_path):
    head = hosts[0]
    squatter = subprocess.Popen(head.command([sys.executable, "-c", (
        "import socket, time; s = socket.socket(); s.bind(('', 29401)); s.listen(); print('listening', flush=True); "
        "time.sleep(600)")]), stdout=subprocess.PIPE, text=True)
    try:
        assert squatter.stdout.readline().strip() == "listening"
        start = time.monotonic()
        log = tmp_path / "n1.log"
        proc = start_on(head, ["launch/multinode.sh", "--nnodes", "2", "--head", head.name, "--port", "29401",
                               "--config", CONFIG, *TINY], log)
        code = finish(proc, timeout=120, log=log)
    finally:
        squatter.kill()
        squatter.wait(timeout=10)
    text = log.read_text()
    assert code == 1 and time.monotonic() - start < 30, text
    assert text.strip().splitlines()[-1] == (
        "error: rendezvous port 29401 on this head node (n1) is already in use; pick a free one with --port "
        "(the same on every node)"), text
