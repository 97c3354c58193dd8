"""A throwaway Slurm cluster for tests: munged, slurmctld and one slurmd per namespace host.

Everything lives under one temporary directory with its own SLURM_CONF, munge socket and key;
nothing under /etc is touched and no system daemon is used. The controller runs in this
machine's own network namespace on the bridge address; each compute node is a namespace host
(tests/cluster_netns.py), so a 2-node job really spans two network stacks. Tests that start one are marked
needs_slurm (helpers.unmet_need says what that takes).

    with SlurmCluster(workdir, hosts) as cluster:
        job = cluster.sbatch(["slurm/srun_cpu.sbatch", "--config", ...], "--nodes=1")
        info = cluster.wait_job(job, timeout=120)

Daemons run in the foreground as our own child processes and are stopped by pid on exit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from cluster_netns import BRIDGE_ADDR, Host, wait_until_gone
from helpers import free_port, run_bounded, wait_until, without_launcher_vars

# Pids and directory of the running test cluster: a session killed outright (SIGKILL, OOM) leaves
# its daemons behind, and the next session ends them (held under cluster_netns.SessionLock).
RECORD = Path("/run/lock/dtrain-test-slurm.json")
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
               "DEADLINE", "PREEMPTED"}


# cred_expire: a requeued job may start again only after its old credentials expired (default
# 120 s); 10 s keeps the requeue test short. sched_interval/bf_interval: schedule pending jobs
# every second instead of every minute.
def slurm_conf(root: Path, controller: str, hosts: list[Host], ctld_port: int, munge_socket: Path) -> str:
    nodes = "\n".join(f"NodeName={h.name} NodeAddr={h.addr} CPUs=2 RealMemory=1000 State=UNKNOWN" for h in hosts)
    return f"""\
ClusterName=dtrain-ci
SlurmctldHost={controller}({BRIDGE_ADDR})
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MinJobAge=300
KillWait=5
InactiveLimit=0
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def stop_leftovers() -> None:
    """Kill the daemons a killed session recorded (only pids that still run from its directory)."""
    if not RECORD.is_file():
        return
    record = json.loads(RECORD.read_text())
    for pid in record["pids"]:
        try:
            proc_files = (Path(f"/proc/{pid}/cmdline").read_bytes(), Path(f"/proc/{pid}/environ").read_bytes())
        except OSError:
            continue  # gone
        if any(record["root"].encode() in data for data in proc_files):
            os.kill(pid, signal.SIGKILL)
            wait_until_gone(lambda: Path(f"/proc/{pid}/cmdline").exists() and Path(f"/proc/{pid}/cmdline")
                            .read_bytes() == proc_files[0], f"leftover Slurm daemon {pid}")
    shutil.rmtree(record["root"], ignore_errors=True)
    RECORD.unlink(missing_ok=True)


class SlurmCluster:
    def __init__(self, hosts: list[Host]):
        # Not under pytest's tmp_path: munged refuses directories that its user cannot walk into.
        self.root = Path(tempfile.mkdtemp(prefix="dtrain-slurm-"))
        self.hosts = hosts
        self.controller = socket.gethostname().split(".")[0]  # slurmctld insists on its own short name
        self.munge_dir = self.root / "munge"
        self.conf = self.root / "slurm.conf"
        # Nothing a launcher would read as "already launched" may leak from the test process into jobs.
        self.env = {**without_launcher_vars(os.environ), "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        stop_leftovers()
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged (user munge) walks into its directory below
        self._start_munge()
        self.conf.write_text(slurm_conf(self.root, self.controller, self.hosts, free_port(),
                                        self.munge_dir / "munge.socket"))
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._wait(lambda: self.run("sinfo", "-h", check=False).returncode == 0, timeout, "slurmctld to answer")
        for host in self.hosts:
            self._spawn(f"slurmd-{host.name}", host.command(["slurmd", "-D", "-N", host.name]))
        self._wait(self.all_nodes_idle, timeout, "every node to be idle in sinfo")
        RECORD.write_text(json.dumps({"root": str(self.root), "pids": [p.pid for p in self.procs.values()]}))

    def _start_munge(self) -> None:
        self.munge_dir.mkdir(exist_ok=True)
        self.munge_dir.chmod(0o755)  # munged wants its socket directory searchable by all
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for path in (self.munge_dir, key):
            shutil.chown(path, "munge", "munge")
        socket_path = self.munge_dir / "munge.socket"
        self._spawn("munged", ["munged", "--foreground", f"--socket={socket_path}", f"--key-file={key}",
                               f"--pid-file={self.munge_dir}/munged.pid", f"--seed-file={self.munge_dir}/seed",
                               f"--log-file={self.munge_dir}/munged.log"], user="munge", group="munge")
        self._wait(socket_path.exists, 20, "munged's socket")

    def _spawn(self, name: str, argv: list[str], **kwargs) -> None:
        log = open(self.root / "log" / f"{name}.console", "w")
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)
        log.close()

    def _wait(self, ready, timeout: float, what: str) -> None:
        """Until ready(); if a daemon exits first or time runs out, fail with the daemons' logs."""
        wait_until(ready, *self.procs.values(), timeout=timeout, what=f"Slurm test cluster: {what} "
                   f"(daemons: {', '.join(self.procs)})", report=self.logs)

    def all_nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(h.name) == "idle" for h in self.hosts)

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user=root", check=False)  # job steps die with their nodes anyway
        for name in sorted(self.procs, key=lambda n: n == "munged"):  # munge last: slurmd talk to it on exit
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)
        RECORD.unlink(missing_ok=True)

    # -- commands -------------------------------------------------------------------------------

    def run(self, *argv: str, check: bool = True, timeout: float = 30, cwd: Path | str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        proc = run_bounded(list(argv), timeout, {**self.env, **(env or {})}, cwd=cwd or os.getcwd())
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def sbatch(self, *argv: str, cwd: Path | str, env: dict[str, str] | None = None) -> str:
        """Submit; returns the job id."""
        out = self.run("sbatch", "--parsable", *argv, cwd=cwd, env=env).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, NodeList, Restarts, StdOut, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout.strip()
        return dict(re.findall(r"(\S+?)=(.*?)(?= \S+?=|$)", out))

    def wait_job(self, job_id: str, timeout: float, until=lambda info: info["JobState"] in DONE_STATES
                 ) -> dict[str, str]:
        """Poll scontrol (faster than `sbatch --wait`) until `until(info)`; a timeout cancels the job."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if until(info):
                return info
            if time.monotonic() > deadline:
                self.run("scancel", "--full", job_id, check=False)
                raise TimeoutError(f"job {job_id} still {info['JobState']} after {timeout:.0f}s\n"
                                   f"{self.job_report(job_id)}")
            time.sleep(0.25)

    def job_report(self, job_id: str) -> str:
        """For assertion messages: the job record, its output file and the daemons' log tails."""
        info = self.job(job_id)
        out = Path(info.get("StdOut", ""))
        text = out.read_text(errors="replace")[-6000:] if out.is_file() else "(no output file)"
        return f"--- scontrol show job {job_id}\n{info}\n--- {out}\n{text}\n{self.logs(lines=15)}"

    def logs(self, lines: int = 30) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.munge_dir / "munged.log"]:
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)
