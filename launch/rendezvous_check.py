"""Pre-flight check for launch/multinode.sh: a bad rendezvous endpoint fails fast, in one line.

    python launch/rendezvous_check.py HEAD PORT TIMEOUT_S   ->  prints 1 (this node hosts the
                                                               rendezvous) or 0, for is_host=

Without it torchrun guesses which node hosts the c10d store; on the head, a port held by another
program makes it fall back to joining that program as a client and fail only after its read
timeout, with a long traceback. Exits 1 with "error: ..." when the head address does not resolve,
when this node is the head and the port is taken, or when this node is not the head and nothing
accepts connections at HEAD:PORT within TIMEOUT_S seconds (the head may start after us).
"""

from __future__ import annotations

import errno
import socket
import sys
import time


def resolve(host: str) -> list[str]:
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def is_own_address(addr: str) -> bool:
    """Binding to an address succeeds only on a machine that has it."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, 0))
            return True
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                return False
            raise


def port_is_free(port: int) -> bool:
    """As the store will bind it: on every address, reusing sockets left in TIME_WAIT."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
            return True
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            raise


def wait_until_reachable(host: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.5, min(3.0, deadline - time.monotonic()))):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)


def check(head: str, port: int, timeout_s: float) -> bool:
    """True when this node hosts the rendezvous; raises SystemExit with a message on a bad endpoint."""
    try:
        addrs = resolve(head)
    except socket.gaierror as e:
        raise SystemExit(f"error: rendezvous head {head!r} does not resolve ({e.strerror}); "
                         "pass the head node's hostname or IP address with --head")
    if any(is_own_address(a) for a in addrs):
        if not port_is_free(port):
            raise SystemExit(f"error: rendezvous port {port} on this head node ({head}) is already in use; "
                             "pick a free one with --port (the same on every node)")
        return True
    if not wait_until_reachable(head, port, timeout_s):
        raise SystemExit(f"error: rendezvous endpoint {head}:{port} is not reachable after {timeout_s:g}s; "
                         "start the same command on the head node, and check --head/--port and the firewall")
    return False


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    print(int(check(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))))
