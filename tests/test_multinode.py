"""The launch/ scripts, run as a user would; multi-node torchrun across two namespace hosts.

The two "nodes" n1 (10.200.0.1) and n2 (10.200.0.2) are network namespaces on a private bridge
(tests/cluster_netns.py): separate network stacks, hostnames and hosts files, no route off the
machine. The multi-node tests are marked needs_root: they skip when namespaces cannot be made here (not
root, no iproute2); with DTRAIN_REQUIRE_CLUSTER=1 (set by .ci/run) they fail instead.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from cluster_netns import Host, NetnsHosts, SessionLock, port_taken
from helpers import MNIST_DEMO_CONFIG as CONFIG
from helpers import (NETNS_TOOLS, finish, read_checkpoint, run_bounded, start_command, subprocess_env,
                     wait_until)


# Every test here starts Python processes (tests/conftest.py: the two tiers).
pytestmark = pytest.mark.slow
# A few steps of a small model on synthetic images: fast on 2 cores; collectives fail after 60 s.
TINY = ["data.synthetic=true", "data.synthetic_train_size=256", "data.synthetic_val_size=64",
        "model.arch=squeezenet1_1", "model.dropout=0", "data.image_size=32", "data.val_crop_ratio=1.0",
        "batch_size=8", "num_workers=0", "log_every=1", "progress=false", "timeout_s=60", "resume="]


# Made on two namespace hosts: root and the tools that make them.
needs_hosts = pytest.mark.needs_root(*NETNS_TOOLS)

# ---------------------------------------------------------------------------------------------
# launch/ on this machine


@pytest.mark.parametrize("script, mentions", [
    ("launch/single.sh", ["--config FILE", "CUDA_VISIBLE_DEVICES"]),
    ("launch/ddp.sh", ["NPROC", "torchrun --standalone", "NPROC=1", "SIGINT (Ctrl-C)", "not a stop signal"]),
    ("launch/multinode.sh", ["--nnodes N", "--head ADDR", "--port P", "HEAD_ADDR", "RDZV_TIMEOUT",
                             "not a stop signal", "every node sees"]),
])
def test_launch_script_help_says_what_it_takes(script, mentions):
    proc = run_bounded([script, "--help"], 30)
    assert proc.returncode == 0, proc.stderr
    for text in mentions:
        assert text in proc.stdout, proc.stdout


def test_single_script_trains_in_one_process(tmp_path):
    proc = run_bounded(["launch/single.sh", "--config", CONFIG, *TINY, "max_steps=2", f"output_dir={tmp_path}"], 240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "done:" in proc.stdout
    assert read_checkpoint(tmp_path)["state"]["world_size"] == 1


@pytest.mark.cpu_only  # the 2-process default applies to machines without GPUs
def test_ddp_script_starts_two_cpu_processes_without_gpus(tmp_path):
    proc = run_bounded(["launch/ddp.sh", "--config", CONFIG, *TINY, "max_steps=2", f"output_dir={tmp_path}"], 240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert read_checkpoint(tmp_path)["state"]["world_size"] == 2


def test_ddp_script_forwards_sigusr1_to_every_rank_which_save_and_resume(tmp_path):
    """`kill -USR1 <torchrun>` (a batch shell forwarding a preemption notice, say): torchrun passes it
    on (--signals-to-handle), every rank stops at the same step and saves; a rerun resumes."""
    args = ["--config", CONFIG, *TINY, "data.synthetic_train_size=4096", "batch_size=2", "resume=auto",
            f"output_dir={tmp_path}"]
    launcher = start_command(["launch/ddp.sh", *args], subprocess_env(NPROC="2"))
    metrics = tmp_path / "metrics.jsonl"
    wait_until(lambda: metrics.is_file() and '"step": 2' in metrics.read_text(), launcher, timeout=180,
               what="training step 2")
    launcher.send_signal(signal.SIGUSR1)
    done = finish([launcher], timeout=120)[0]
    stdout, stderr = done.stdout, done.stderr
    assert done.returncode != 0, stdout + stderr
    assert stdout.count("received SIGUSR1") == 2, stdout + stderr
    stopped = int(stdout.split("stopped at step ")[1].split(":")[0])
    assert read_checkpoint(tmp_path)["state"]["step"] == stopped
    again = run_bounded(["launch/ddp.sh", *args, f"max_steps={stopped + 2}"], 240, subprocess_env(NPROC="2"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from {tmp_path}/checkpoints/last.pt: epoch 0, step {stopped}" in again.stdout
    assert read_checkpoint(tmp_path)["state"]["step"] == stopped + 2


def test_multinode_script_without_head_is_a_usage_error():
    proc = run_bounded(["launch/multinode.sh", "--nnodes", "2", "--config", CONFIG], 30)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: launch/multinode.sh needs --nnodes and --head"), proc.stderr


# ---------------------------------------------------------------------------------------------
# Two namespace hosts


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with SessionLock(), NetnsHosts(2, tmp_path_factory.mktemp("netns_hosts")) as made:
        yield made


def start_on(host: Host, argv: list[str], **env: str) -> subprocess.Popen:
    """argv on a namespace host, from the repository root; stderr goes into stdout, as on a terminal."""
    return start_command(host.command(argv), subprocess_env(**env), merge_output=True)


@needs_hosts
def test_torchrun_across_two_hosts_trains_and_only_global_rank_0_saves(hosts, tmp_path):
    """launch/multinode.sh on n1 (the head) and n2: 2 nodes x 2 processes, c10d rendezvous on n1.

    Each node writes to its own output_dir, so a save by any rank but global rank 0 (a local
    rank 0 on the other node, say) would show up in the other node's directory."""
    head, other = hosts
    procs = {}
    for host in (other, head):  # the worker node first: it waits for the head's endpoint
        procs[host.name] = start_on(host, [
            "launch/multinode.sh", "--nnodes", "2", "--nproc", "2", "--head", head.name, "--port", "29400",
            "--id", "test-2nodes", "--timeout", "60", "--join-timeout", "120",
            "--config", CONFIG, *TINY, "max_steps=4", f"output_dir={tmp_path / host.name}"])
    logs = dict(zip(procs, (done.stdout for done in finish(list(procs.values()), timeout=300))))
    codes = {name: proc.returncode for name, proc in procs.items()}
    output = "\n".join(f"--- {name}\n{log}" for name, log in logs.items())
    assert codes == {"n1": 0, "n2": 0}, output
    saved = [name for name in procs if (tmp_path / name / "checkpoints").exists()]
    assert len(saved) == 1, f"checkpoints written on {saved}\n{output}"
    rank0_dir, other_dir = tmp_path / saved[0], tmp_path / ({"n1", "n2"} - set(saved)).pop()
    state = read_checkpoint(rank0_dir)["state"]
    assert (state["step"], state["world_size"]) == (4, 4), state
    assert (rank0_dir / "metrics.jsonl").is_file() and (rank0_dir / "config.yaml").is_file()
    # The other host writes nothing but its own ranks' heartbeats (the hang watch of observe.py).
    assert sorted(p.name for p in other_dir.iterdir()) == ["heartbeat"], list(other_dir.iterdir())
    assert sorted(p.name for p in (other_dir / "heartbeat").iterdir()) == ["rank2.json", "rank3.json"]
    assert "done:" in logs[saved[0]], output


@needs_hosts
def test_unreachable_rendezvous_endpoint_fails_fast(hosts):
    """Nothing answers at the head's address (10.200.0.77 is on the bridge, but no host has it)."""
    start = time.monotonic()
    proc = start_on(hosts[0], ["launch/multinode.sh", "--nnodes", "2", "--head", "10.200.0.77", "--port", "29400",
                               "--timeout", "5", "--config", CONFIG, *TINY])
    done = finish([proc], timeout=120)[0]
    code, text = done.returncode, done.stdout
    assert code == 1 and time.monotonic() - start < 60, text
    assert text.strip().splitlines()[-1] == (
        "error: rendezvous endpoint 10.200.0.77:29400 is not reachable after 5s; start the same command "
        "on the head node, and check --head/--port and the firewall"), text


@needs_hosts
def test_head_name_that_does_not_resolve_fails_at_once(hosts):
    proc = start_on(hosts[0], ["launch/multinode.sh", "--nnodes", "2", "--head", "n9", "--config", CONFIG])
    done = finish([proc], timeout=60)[0]
    assert done.returncode == 1, done.stdout
    assert "error: rendezvous head 'n9' does not resolve" in done.stdout


@needs_hosts
def test_rendezvous_port_in_use_on_the_head_fails_at_once(hosts):
    head = hosts[0]
    with port_taken(head, 29401):
        start = time.monotonic()
        proc = start_on(head, ["launch/multinode.sh", "--nnodes", "2", "--head", head.name, "--port", "29401",
                               "--config", CONFIG, *TINY])
        done = finish([proc], timeout=120)[0]
    code, text = done.returncode, done.stdout
    assert code == 1 and time.monotonic() - start < 30, text
    assert text.strip().splitlines()[-1] == (
        "error: rendezvous port 29401 on this head node (n1) is already in use; pick a free one with --port "
        "(the same on every node)"), text
