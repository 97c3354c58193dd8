"""The slurm/ scripts, submitted with sbatch to a real (throwaway) Slurm cluster.

The cluster has two compute nodes, n1 and n2, each a network-namespace host with its own slurmd
(tests/cluster_netns.py, tests/cluster_slurm.py), so a 2-node job really crosses two network stacks.
Runs are tiny (a few steps of a small model on the MNIST demo data) so the module takes minutes.
Every test is marked needs_slurm: skipped when Slurm cannot be started here (not root, slurm-wlm/munge
missing); with DTRAIN_REQUIRE_CLUSTER=1 (set by .ci/run) those skips become failures (tests/conftest.py).
"""

from __future__ import annotations

import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from cluster_netns import NetnsHosts, SessionLock, port_taken
from cluster_slurm import SlurmCluster
from helpers import MNIST_DEMO_CONFIG as CONFIG
from helpers import ROOT, logged_steps, read_checkpoint, records, run_bounded, wait_until

pytestmark = [pytest.mark.needs_slurm, pytest.mark.slow]  # slow: starts Python processes (tests/conftest.py)
# A few steps of a small model: fast on 2 cores. Every run logs each step (the preemption test
# watches metrics.jsonl) and fails a collective after 60 s instead of the default 600.
TINY = ["model.arch=squeezenet1_1", "model.dropout=0", "data.image_size=32", "data.val_crop_ratio=1.0",
        "batch_size=8", "num_workers=0", "log_every=1", "progress=false", "timeout_s=60"]
JOB_TIMEOUT = 300  # seconds for one tiny job, start to finish, on a busy 2-core machine


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm_hosts")
    controller = socket.gethostname().split(".")[0]
    with SessionLock(), NetnsHosts(2, workdir, controller_name=controller) as hosts, SlurmCluster(hosts) as c:
        yield c


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> Path:
    """The demo data (5,000 real MNIST digits as ImageFolder PNGs), written once for the module."""
    root = tmp_path_factory.mktemp("mnist")
    written = run_bounded([sys.executable, "-m", "dtrain.demo_data", "mnist", str(root)], 120)
    assert written.returncode == 0, written.stdout + written.stderr
    return root


def submit(cluster: SlurmCluster, script: str, sbatch_options: list[str], train_args: list[str],
           out: Path, **env: str) -> str:
    """sbatch from the repository root, as a user would; the #SBATCH lines are overridden for this cluster."""
    out.mkdir(parents=True, exist_ok=True)
    return cluster.sbatch("--partition=debug", "--time=15", f"--output={out}/%x-%j.out", *sbatch_options,
                          script, "--config", CONFIG, *train_args, cwd=ROOT,
                          env={"PYTHONUNBUFFERED": "1", "DTRAIN_TEST_PYTHON": sys.executable, **env})


def job_output(info: dict[str, str]) -> str:
    path = Path(info["StdOut"])
    return path.read_text(errors="replace") if path.is_file() else ""


# Both script styles, on one node with two ranks and on two nodes (n1, n2) with one rank each.
# The torchrun style reads NPROC_PER_NODE (workers per node) from the environment sbatch passes on.
LAYOUTS = {
    "srun-1node": ("slurm/srun_cpu.sbatch", ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"], {}),
    "torchrun-1node": ("slurm/torchrun_cpu.sbatch", ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2"],
                       {"NPROC_PER_NODE": "2"}),
    "srun-2nodes": ("slurm/srun_cpu.sbatch", ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"], {}),
    "torchrun-2nodes": ("slurm/torchrun_cpu.sbatch", ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2"],
                        {"NPROC_PER_NODE": "1"}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sbatch_script_trains_on_demo_data(mnist, cluster, tmp_path, layout):
    script, options, env = LAYOUTS[layout]
    run_dir = tmp_path / "run"
    job = submit(cluster, script, options, [f"data.root={mnist}", f"output_dir={run_dir}", "max_steps=4"],
                 tmp_path, **env)
    info = cluster.wait_job(job, JOB_TIMEOUT)
    report = cluster.job_report(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), report
    assert info["NodeList"] == ("n[1-2]" if "2nodes" in layout else info["BatchHost"]), report
    assert re.search(r"^done: .*accuracy", job_output(info), re.M), report
    state = read_checkpoint(run_dir)["state"]
    assert (state["step"], state["world_size"]) == (4, 2), state
    evals = records(run_dir, "eval")
    assert evals and evals[-1]["samples"] == 1000, evals  # every validation image counted once


# Steps long enough (resnet18, 64x64) that the signal, sent once step 2 is logged, lands mid-run.
PREEMPT_STEPS = 20
PREEMPT_ARGS = [*TINY, "model.arch=resnet18", "model.dropout=-1", "data.image_size=64", f"max_steps={PREEMPT_STEPS}"]


@pytest.mark.parametrize("style", ["srun", "torchrun"])
def test_preemption_signal_saves_requeues_and_resumes(mnist, cluster, tmp_path, style):
    """What `#SBATCH --signal=USR1@SECONDS` does before the time limit, sent now with scancel."""
    script, options, env = LAYOUTS[f"{style}-1node"]
    run_dir = tmp_path / "run"
    job = submit(cluster, script, options, [f"data.root={mnist}", f"output_dir={run_dir}", *PREEMPT_ARGS],
                 tmp_path, **env)
    wait_until(lambda: logged_steps(run_dir) >= 2, timeout=JOB_TIMEOUT, what="training step 2 in metrics.jsonl")
    cluster.run("scancel", "--signal=USR1", job)
    info = cluster.wait_job(job, JOB_TIMEOUT)
    report = cluster.job_report(job)
    log = job_output(info)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), report
    stopped = re.search(r"^stopped at step (\d+)", log, re.M)
    assert stopped and 2 <= int(stopped.group(1)) < PREEMPT_STEPS, report
    step = int(stopped.group(1))
    # Each rank got the signal once: from Slurm, which signals every process of the step (under
    # torchrun too, so torchrun must not forward it: a second signal means "exit at once").
    assert log.count("received SIGUSR1") == 2, report
    assert f"Received {int(signal.SIGUSR1)} death signal" not in log, report  # torchrun ignored it
    assert f"requeued Slurm job {job}" in log, report
    assert f"resumed from {run_dir}/checkpoints/last.pt: epoch 0, step {step}" in log, report
    assert re.search(r"^done: ", log, re.M), report
    assert read_checkpoint(run_dir)["state"]["step"] == PREEMPT_STEPS
    # The requeued run continued where the first stopped: no step trained twice, none skipped.
    train_steps = [m["step"] for m in records(run_dir, "train")]
    assert train_steps == list(range(1, PREEMPT_STEPS + 1)), train_steps


# ---------------------------------------------------------------------------------------------
# Bad input: a clear message and a non-zero exit within a bounded time.


@pytest.mark.parametrize("script", ["slurm/srun_gpu.sbatch", "slurm/torchrun_gpu.sbatch"])
def test_gpu_script_is_refused_on_a_cluster_without_gpus(cluster, tmp_path, script):
    start = time.monotonic()
    proc = cluster.run("sbatch", "--partition=debug", "--nodes=1", script, "--config", CONFIG,
                       check=False, cwd=ROOT)
    assert proc.returncode != 0 and time.monotonic() - start < 30, proc.stdout + proc.stderr
    assert "Invalid generic resource (gres) specification" in proc.stderr, proc.stderr


def test_one_failing_rank_ends_the_job_at_once(mnist, cluster, tmp_path):
    """The rendezvous port on the head node is taken: rank 0 fails at once, and --kill-on-bad-exit
    ends rank 1, which would otherwise wait for the store until timeout_s (10 minutes here)."""
    port = 29555
    head = cluster.hosts[0]
    with port_taken(head, port):
        start = time.monotonic()
        job = submit(cluster, "slurm/srun_cpu.sbatch",
                     ["--nodes=1", f"--nodelist={head.name}", "--ntasks-per-node=2", "--cpus-per-task=1"],
                     [f"data.root={mnist}", f"output_dir={tmp_path / 'run'}", "max_steps=4", "timeout_s=600"],
                     tmp_path, MASTER_PORT=str(port))
        info = cluster.wait_job(job, JOB_TIMEOUT)
        elapsed = time.monotonic() - start
    report = cluster.job_report(job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", report
    assert elapsed < 120, f"job took {elapsed:.0f}s to fail\n{report}"
    log = job_output(info)
    assert f"error [rank 0]: could not join the process group at {head.name}:{port}" in log, report
    assert "Traceback" not in log, report


def test_srun_step_without_slurm_variables_is_a_clear_error(cluster, tmp_path):
    """A step whose tasks lack SLURM_PROCID/SLURM_LOCALID (a partial launch environment)."""
    start = time.monotonic()
    proc = cluster.run("srun", "--nodes=1", "--ntasks=2", "--kill-on-bad-exit=1",
                       "env", "-u", "SLURM_PROCID", "-u", "SLURM_LOCALID", sys.executable,
                       "train.py", "--config", CONFIG, "data.synthetic=true", f"output_dir={tmp_path / 'run'}",
                       check=False, cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and time.monotonic() - start < 60, proc.stdout + proc.stderr
    assert "srun launch without SLURM_PROCID, SLURM_LOCALID" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------
# Requeue that targets the right job: an array task, and a run that cannot requeue itself.

SLURM_PYTHON = ROOT / "tests" / "slurm_python.sh"  # TASK_OUTPUT_DIR, NO_SCONTROL: see the script
ONE_RANK = ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1"]
# One rank per job, a small model and one thread: two of them run at once on this 2-core machine.
# Enough steps that the signal, sent once step 2 is logged, lands mid-run.
REQUEUE_STEPS = 40
REQUEUE_ARGS = [*TINY, "threads=1", f"max_steps={REQUEUE_STEPS}"]


def assert_requeued_and_resumed(info: dict[str, str], report: str, run_dir: Path, requeued: str) -> None:
    """Stopped mid-run, requeued by `requeued` (a line of the log), resumed at that step, finished once."""
    log = job_output(info)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), report
    assert requeued in log, report
    stopped = re.search(r"^stopped at step (\d+)", log, re.M)
    assert stopped and 2 <= int(stopped.group(1)) < REQUEUE_STEPS, report
    assert f"resumed from {run_dir}/checkpoints/last.pt: epoch 0, step {stopped.group(1)}" in log, report
    train_steps = [m["step"] for m in records(run_dir, "train")]
    assert train_steps == list(range(1, REQUEUE_STEPS + 1)), train_steps


@pytest.mark.parametrize("signalled", [0, 1])
def test_preempting_one_array_task_requeues_that_task_only(mnist, cluster, tmp_path, signalled):
    """In a 2-task array one task's SLURM_JOB_ID is the array's own id; requeueing that id would put
    back both tasks. Each task in turn gets the signal: it alone restarts, the other runs once."""
    runs = tmp_path / "runs"
    job = submit(cluster, "slurm/srun_cpu.sbatch", ["--array=0-1", *ONE_RANK, f"--output={tmp_path}/%x-%A_%a.out"],
                 [f"data.root={mnist}", *REQUEUE_ARGS], tmp_path, PYTHON=str(SLURM_PYTHON),
                 TASK_OUTPUT_DIR=str(runs))
    task, other = f"{job}_{signalled}", f"{job}_{1 - signalled}"
    wait_until(lambda: logged_steps(runs / f"task_{signalled}") >= 2, timeout=JOB_TIMEOUT,
               what=f"training step 2 of task {signalled}")
    cluster.run("scancel", "--signal=USR1", task)
    done = {t: cluster.wait_job(t, JOB_TIMEOUT) for t in (task, other)}
    report = cluster.job_report(task) + cluster.job_report(other)
    assert_requeued_and_resumed(done[task], report, runs / f"task_{signalled}", f"requeued Slurm job {task}\n")
    untouched = job_output(done[other])
    assert (done[other]["JobState"], done[other]["ExitCode"], done[other]["Restarts"]) == ("COMPLETED", "0:0", "0"), \
        report
    assert "received SIGUSR1" not in untouched and "resumed from" not in untouched, report
    assert untouched.count("done: ") == 1, report


@pytest.mark.parametrize("style", ["srun", "torchrun"])
def test_a_run_without_scontrol_is_requeued_by_the_batch_script(mnist, cluster, tmp_path, style):
    """As inside a container without Slurm's commands: the run saves and exits 4; the batch shell requeues
    (torchrun style: torchrun exits 1, and the batch shell finds rank 0's request in DTRAIN_REQUEUE_FILE)."""
    run_dir = tmp_path / "run"
    job = submit(cluster, f"slurm/{style}_cpu.sbatch", ONE_RANK,
                 [f"data.root={mnist}", f"output_dir={run_dir}", *REQUEUE_ARGS], tmp_path,
                 PYTHON=str(SLURM_PYTHON), NO_SCONTROL="1", NPROC_PER_NODE="1")
    wait_until(lambda: logged_steps(run_dir) >= 2, timeout=JOB_TIMEOUT, what="training step 2 in metrics.jsonl")
    cluster.run("scancel", "--signal=USR1", job)
    info = cluster.wait_job(job, JOB_TIMEOUT)
    report = cluster.job_report(job)
    assert "scontrol is not on PATH here (a container?); exiting with code 4" in job_output(info), report
    assert_requeued_and_resumed(info, report, run_dir, f"requeueing Slurm job {job} from the batch script")


def test_a_job_submitted_without_requeue_says_so_and_exits_3(mnist, cluster, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(cluster, "slurm/srun_cpu.sbatch", [*ONE_RANK, "--no-requeue"],
                 [f"data.root={mnist}", f"output_dir={run_dir}", *REQUEUE_ARGS], tmp_path)
    wait_until(lambda: logged_steps(run_dir) >= 2, timeout=JOB_TIMEOUT, what="training step 2 in metrics.jsonl")
    cluster.run("scancel", "--signal=USR1", job)
    info = cluster.wait_job(job, JOB_TIMEOUT)
    report = cluster.job_report(job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "3:0", "0"), report
    assert re.search(rf"^Slurm job {job} was not requeued \(.+\): it was submitted without --requeue", job_output(info),
                     re.M), report
