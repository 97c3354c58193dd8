"""Throwaway "hosts" on this machine for multi-node tests: one network namespace per host.

Each host is a network namespace with a veth pair on a private bridge (10.200.0.0/24, the bridge
itself is 10.200.0.254). There is no default route in the namespaces and nothing is forwarded, so
no traffic leaves the machine. A command runs "on" a host through `Host.command()`: it enters the
namespace, takes a private mount and UTS namespace, binds the host's own hosts file over /etc/hosts
and sets the hostname, so every host resolves every other host by name (torchrun's c10d and
Slurm both need that), and never resolves its own name to 127.0.0.1.

`ip netns exec` is not used: it remounts /sys, and slurmd then fails to start ("Unable to
initialize cgroup plugin").

Every set of hosts gets names of its own (a random tag in every namespace, veth and bridge
name), and tearing down waits until the kernel has really removed each of them: deleting a
namespace frees its veth pairs asynchronously, so a next set that reused the names could find
them still there. A lock file serialises concurrent test sessions; the leftovers of a crashed
session are removed (and waited for) before new hosts are made.

Tests that make hosts are marked `needs_root(*helpers.NETNS_TOOLS)` (or needs_slurm): they are skipped,
or failed under DTRAIN_REQUIRE_CLUSTER=1, where this machine cannot make them.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from helpers import kill_session, run_bounded, start_command, wait_until

PREFIX = "10.200.0"
BRIDGE_ADDR = f"{PREFIX}.254"
NAME_PREFIXES = ("dt-", "dtrain-")  # ours, and the fixed names of older versions of this harness
REMOVAL_TIMEOUT_S = 30
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


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = run_bounded(["ip", *args], 30)
    if check:
        done.check_returncode()
    return done


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
        tag = secrets.token_hex(3)[:5]  # interface names have at most 15 characters
        self.bridge = f"dt-{tag}-br"
        self.veths = [f"dt-{tag}-v{i}" for i in range(1, count + 1)]
        self.hosts = [Host(f"n{i}", f"{PREFIX}.{i}", f"dt-{tag}-n{i}", workdir / f"hosts.n{i}")
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
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{BRIDGE_ADDR}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        lines = ["127.0.0.1 localhost"] + [f"{h.addr} {h.name}" for h in self.hosts]
        if self.controller_name:
            lines.append(f"{BRIDGE_ADDR} {self.controller_name}")
        for host, outside in zip(self.hosts, self.veths):
            inside = outside.replace("-v", "-p")
            ip("netns", "add", host.netns)
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            ip("link", "set", outside, "master", self.bridge)
            ip("link", "set", outside, "up")
            ip("link", "set", inside, "netns", host.netns)
            ip("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", inside)
            ip("-n", host.netns, "link", "set", inside, "up")
            ip("-n", host.netns, "link", "set", "lo", "up")
            host.hosts_file.write_text("\n".join(lines) + "\n")

    def remove(self) -> None:
        for host in self.hosts:
            remove_netns(host.netns)
        remove_links([*self.veths, self.bridge])


def remove_netns(netns: str) -> None:
    """Kill what still runs in the namespace (daemons, job steps we started), then delete it and wait."""
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
    wait_until_gone(lambda: Path("/run/netns", netns).exists(), f"network namespace {netns}")


def remove_links(names: list[str]) -> None:
    """Delete the links (a veth takes its peer with it) and wait until the kernel no longer lists them."""
    for name in names:
        ip("link", "del", name, check=False)
    wait_until_gone(lambda: set(names) & set(link_names()), f"links {', '.join(names)}")


def link_names() -> list[str]:
    """Names of this namespace's network links (a veth shows as 'name@peer')."""
    out = ip("-o", "link", "show", check=False).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.count(":") >= 2]


def wait_until_gone(present, what: str) -> None:
    wait_until(lambda: not present(), timeout=REMOVAL_TIMEOUT_S, what=f"{what} to be gone after its removal")


def remove_leftovers() -> None:
    """A crashed session may have left namespaces, veths or bridges behind (we hold the lock: none is live)."""
    netns_dir = Path("/run/netns")
    if netns_dir.is_dir():
        for entry in netns_dir.iterdir():
            if entry.name.startswith(NAME_PREFIXES):
                remove_netns(entry.name)
    stale = [name for name in link_names() if name.startswith(NAME_PREFIXES)]
    if stale:
        remove_links(stale)


@contextmanager
def port_taken(host: Host, port: int):
    """While the block runs, a process on `host` listens on `port` and never answers."""
    squatter = start_command(host.command([sys.executable, "-c", (
        "import socket, time; s = socket.socket(); s.bind(('', %d)); s.listen(); print('listening', flush=True); "
        "time.sleep(600)") % port]))
    try:
        assert squatter.stdout.readline().strip() == "listening"
        yield
    finally:
        kill_session(squatter)
