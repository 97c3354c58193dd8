"""Throwaway "hosts" on this machine for multi-node tests: one network namespace per host.

Each host is a network namespace with a veth pair on a private bridge (10.200.0.0/24, the bridge
itself is 10.200.0.254). There is no default route in the namespaces and nothing is forwarded, so
no traffic leaves the machine. A command runs "on" a host through `Host.command()`: it enters the
namespace, takes a private mount and UTS namespace, binds the host's own hosts file over /etc/hosts
and sets the hostname, so every host resolves every other host by name (torchrun's c10d and
Slurm both need that), and never resolves its own name to 127.0.0.1.

`ip netns exec` is not used: it remounts /sys, and slurmd then fails to start (FACTS.md).
A lock file serialises concurrent test sessions; leftovers of a crashed session are removed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "10.200.0"
BRIDGE = "dtrain-br0"
BRIDGE_ADDR = f"{PREFIX}.254"
LOCK_FILE = Path("/run/lock/dtrain-test-cluster.lock")


@dataclass(frozen=True)
class Host:
    name: str  # hostname inside the namespace, e.g. "n1"
    addr: str  # its address on the bridge, e.g. "10.200.0.1"
    netns: str  # namespace name under /run/netns
    hosts_file: Path

    def command(self, argv: list[str]) -> list[str]:
        """argv wrapped to run on this host (exec chain: the returned pid is argv's own pid)."""
        setup = 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--uts", "--",
                "sh", "-c", setup, "on-host", str(self.hosts_file), self.name, *argv]


def unavailable_reason() -> str | None:
    """Why namespace hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "multi-node tests need root (network namespaces, a bridge, bind mounts)"
    missing = [tool for tool in ("ip", "nsenter", "unshare", "mount") if shutil.which(tool) is None]
    if missing:
        return f"multi-node tests need {', '.join(missing)} (apt-get install iproute2 util-linux mount)"
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


class SessionLock:
    """One test session at a time owns the bridge, the namespaces and the Slurm ports."""

    def __init__(self, timeout_s: float = 600):
        self.timeout_s = timeout_s
        self.fd: int | None = None

    def __enter__(self) -> "SessionLock":
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise TimeoutError(f"another test session held {LOCK_FILE} for {self.timeout_s:.0f}s")
                time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        assert self.fd is not None
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class NetnsHosts:
    """`with NetnsHosts(2, workdir) as hosts:` hosts n1, n2 at 10.200.0.1 and .2; all removed on exit."""

    def __init__(self, count: int, workdir: Path, controller_name: str | None = None):
        self.workdir = workdir
        self.controller_name = controller_name  # the root namespace's name on the bridge (Slurm controller)
        self.hosts = [Host(f"n{i}", f"{PREFIX}.{i}", f"dtrain-n{i}", workdir / f"hosts.n{i}")
                      for i in range(1, count + 1)]

    def __enter__(self) -> list[Host]:
        remove_leftovers()
        try:
            self._create()
        except BaseException:
            self.remove()
            raise
        return self.hosts

    def __exit__(self, *exc) -> None:
        self.remove()

    def _create(self) -> None:
        ip("link", "add", BRIDGE, "type", "bridge")
        ip("addr", "add", f"{BRIDGE_ADDR}/24", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")
        lines = ["127.0.0.1 localhost"] + [f"{h.addr} {h.name}" for h in self.hosts]
        if self.controller_name:
            lines.append(f"{BRIDGE_ADDR} {self.controller_name}")
        for i, host in enumerate(self.hosts, start=1):
            outside, inside = f"dtrain-v{i}", f"dtrain-v{i}p"
            ip("netns", "add", host.netns)
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            ip("link", "set", outside, "master", BRIDGE)
            ip("link", "set", outside, "up")
            ip("link", "set", inside, "netns", host.netns)
            ip("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", inside)
            ip("-n", host.netns, "link", "set", inside, "up")
            ip("-n", host.netns, "link", "set", "lo", "up")
            host.hosts_file.write_text("\n".join(lines) + "\n")

    def remove(self) -> None:
        for host in self.hosts:
            remove_netns(host.netns)
        ip("link", "del", BRIDGE, check=False)


def remove_netns(netns: str) -> None:
    """Kill what still runs in the namespace (daemons, job steps we started), then delete it."""
    if not Path("/run/netns", netns).exists():
        return
    deadline = time.monotonic() + 15
    sig = signal.SIGTERM
    while time.monotonic() < deadline:
        pids = [int(p) for p in ip("netns", "pids", netns, check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.3)
        sig = signal.SIGKILL  # whatever survived a SIGTERM gets no second chance
    ip("netns", "del", netns, check=False)


def remove_leftovers() -> None:
    """A crashed session may have left namespaces or the bridge behind (we hold the lock: none is live)."""
    netns_dir = Path("/run/netns")
    if netns_dir.is_dir():
        for entry in netns_dir.iterdir():
            if entry.name.startswith("dtrain-n"):
                remove_netns(entry.name)
    if ip("link", "show", BRIDGE, check=False).returncode == 0:
        ip("link", "del", BRIDGE, check=False)
