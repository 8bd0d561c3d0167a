"""The network-partition helper (``tests/netns.py``): reachability both ways, cut/heal on a live TCP connection,
signals to processes inside, and a teardown that leaves nothing behind. Skipped where namespaces can't be built."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import netns
from tests.netns import IsolatedHost

pytestmark = pytest.mark.timeout(60)

#: An echo server: listens on 0.0.0.0:<argv[1] or any>, prints its port, echoes every connection.
ECHO_SERVER = """
import socket, sys, threading
server = socket.create_server(("0.0.0.0", int(sys.argv[1]) if len(sys.argv) > 1 else 0))
print(server.getsockname()[1], flush=True)
def echo(conn):
    with conn:
        for data in iter(lambda: conn.recv(4096), b""):
            conn.sendall(data)
while True:
    threading.Thread(target=echo, args=(server.accept()[0],), daemon=True).start()
"""

#: Connects to argv[1]:argv[2] with a timeout of argv[3] s, sends "hello", prints what came back or the error type.
CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as sock:
        sock.sendall(b"hello")
        print("got", sock.recv(100).decode(), flush=True)
except OSError as exc:
    print("error", type(exc).__name__, exc.errno, flush=True)
"""


@pytest.fixture
def host() -> Iterator[IsolatedHost]:
    with netns.isolated_host_or_skip() as isolated:
        yield isolated


@contextlib.contextmanager
def host_echo_server(address: str = "0.0.0.0") -> Iterator[int]:
    """An echo server in this (host) process; yields its port."""
    server = socket.create_server((address, 0))
    stop = threading.Event()

    def echo(conn: socket.socket) -> None:
        with conn:
            try:
                for data in iter(lambda: conn.recv(4096), b""):
                    conn.sendall(data)
            except OSError:
                pass

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()


def namespace_echo_server(host: IsolatedHost) -> tuple[subprocess.Popen[str], int]:
    proc = host.popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())  # the server prints its port once it listens (killed by close())


def run_client(host: IsolatedHost, address: str, port: int, timeout: float = 5.0) -> str:
    proc = host.popen([sys.executable, "-c", CLIENT, address, str(port), str(timeout)], stdout=subprocess.PIPE,
                      text=True)
    out, _ = proc.communicate(timeout=timeout + 20)
    return out.strip()


def state(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("State:"):
            return line.split()[1]
    raise AssertionError(f"no State in /proc/{pid}/status")


def poll(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
    return result


def test_host_and_namespace_reach_each_other(host: IsolatedHost) -> None:
    assert host.host_ip != host.ns_ip and host.subnet.prefixlen == 30
    with host_echo_server() as port:
        assert run_client(host, host.host_ip, port) == "got hello"
        # inside, 127.0.0.1 is the namespace's own loopback: nothing listens there
        assert run_client(host, "127.0.0.1", port) == f"error ConnectionRefusedError {111}"
    proc, port = namespace_echo_server(host)
    assert host.contains(proc.pid) and not host.contains(os.getpid())
    with socket.create_connection((host.ns_ip, port), timeout=5) as sock:
        sock.sendall(b"ping")
        assert sock.recv(100) == b"ping"


def test_cut_stalls_a_connection_and_heal_resumes_it(host: IsolatedHost) -> None:
    _, port = namespace_echo_server(host)
    with socket.create_connection((host.ns_ip, port), timeout=5) as sock:
        sock.sendall(b"before")
        assert sock.recv(100) == b"before"

        host.cut()
        assert host.is_cut
        sock.settimeout(0.5)
        sock.sendall(b"during")  # buffered: no error
        with pytest.raises(TimeoutError):
            sock.recv(100)
        # new connections time out (SYNs are dropped), they are not refused or unreachable -- either way
        with pytest.raises(TimeoutError):
            socket.create_connection((host.ns_ip, port), timeout=1)
        with host_echo_server() as host_port:
            assert run_client(host, host.host_ip, host_port, timeout=1) == "error TimeoutError None"
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0

        host.heal()
        assert not host.is_cut
        sock.settimeout(30)  # the stalled segment comes at its next retransmission (exponential back-off)
        got = b""
        while len(got) < len(b"during"):
            got += sock.recv(100)
        assert got == b"during"
        sock.settimeout(5)
        sock.sendall(b"after")
        assert sock.recv(100) == b"after"
    with host_echo_server() as host_port:
        assert run_client(host, host.host_ip, host_port) == "got hello"


def test_signals_reach_the_process_itself(host: IsolatedHost) -> None:
    proc = host.popen(["sleep", "60"])
    assert os.readlink(f"/proc/{proc.pid}/exe") == os.path.realpath(subprocess.check_output(
        ["sh", "-c", "command -v sleep"], text=True).strip())
    assert host.contains(proc.pid)
    os.kill(proc.pid, signal.SIGSTOP)
    poll(lambda: state(proc.pid) == "T", 5, "the process to be stopped")
    os.kill(proc.pid, signal.SIGCONT)
    poll(lambda: state(proc.pid) in ("S", "R"), 5, "the process to run again")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(5) == -signal.SIGKILL


def test_close_leaves_nothing_behind() -> None:
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    first, second = IsolatedHost(), IsolatedHost()
    try:
        assert first.name != second.name and not first.subnet.overlaps(second.subnet)
        sleeper = first.popen(["sleep", "60"])  # left running: close() kills it
        first.cut()  # closing while cut works too
    finally:
        first.close()
        second.close()
    assert sleeper.returncode == -signal.SIGKILL
    first.close()  # idempotent
    names = {first.name, second.name}
    link_names = {first.bridge, first.host_veth, first.ns_veth, second.bridge, second.host_veth, second.ns_veth}
    assert not names & set(netns.namespaces())
    assert not link_names & set(netns.links())

    with pytest.raises(RuntimeError, match="boom"):
        with IsolatedHost() as third:
            raise RuntimeError("boom")
    assert third.name not in netns.namespaces()
    assert not {third.bridge, third.host_veth} & set(netns.links())


def test_stale_namespaces_of_dead_runs_are_removed() -> None:
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale_ns = f"{netns.NS_PREFIX}{dead.pid}-0"
    stale_link = f"{netns.LINK_PREFIX}{dead.pid:x}x0b"
    subprocess.run(["ip", "netns", "add", stale_ns], check=True)
    subprocess.run(["ip", "link", "add", stale_link, "type", "bridge"], check=True)
    try:
        with IsolatedHost():
            assert stale_ns not in netns.namespaces()
            assert stale_link not in netns.links()
    finally:
        subprocess.run(["ip", "netns", "delete", stale_ns], capture_output=True)
        subprocess.run(["ip", "link", "delete", stale_link], capture_output=True)
