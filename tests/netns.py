"""A network partition for integration tests: one process (a broker node) in its own Linux network namespace.

``IsolatedHost()`` builds, with ``ip`` (iproute2) only, no iptables/nft/netem::

    host netns                                          namespace shoalmq-<pid>-<n>
    bridge shq<pid>x<n>b  host_ip/30  <-- port --  veth shq<pid>x<n>h  ====  veth shq<pid>x<n>n  ns_ip/30, lo

and permanent neighbour (ARP) entries on both sides. Host processes listening on 0.0.0.0 or ``host_ip`` are
reachable from inside at ``host_ip``; whatever listens inside on 0.0.0.0 or ``ns_ip`` is reachable from the host at
``ns_ip``. Inside, 127.0.0.1 is the namespace's own loopback, not the host's.

``cut()`` sets the host-side veth (the bridge port) down: every frame either way is dropped silently in the kernel
(the bridge no longer forwards to a disabled port; the namespace side's veth drops what it transmits because its
peer is down). Nothing else changes: the addresses and routes stay on the bridge and the namespace veth (their
links stay administratively up, only the carrier goes), and the permanent neighbour entries survive a carrier loss,
so no ARP fails and no ICMP is generated. Established TCP connections stall (unacknowledged data is retransmitted
with back-off, no RST, no error), and new connections time out (SYNs are lost) rather than fail fast -- as in a real
partition. ``heal()`` sets the port up again; stalled connections resume at their next retransmission (after a long
cut that can take several seconds of back-off). (Setting both veth ends down instead would remove the connected
routes: connects from inside fail with ENETUNREACH at once, and the host would route ``ns_ip`` via its default
gateway.)

``popen(args, **kw)`` runs ``ip netns exec <ns> args...``: ``ip`` joins the namespace (setns, plus a private mount
namespace with /sys remounted) and then exec()s the command, so the Popen's pid *is* the command's pid and
SIGSTOP/SIGCONT/SIGKILL sent to ``popen.pid`` reach it; ``popen`` returns only once that exec has happened.

``close()`` (also on leaving the ``with`` block, and at interpreter exit) kills whatever still runs in the
namespace and deletes the links and the namespace; it is idempotent. Creating an ``IsolatedHost`` first removes
namespaces and links of this naming scheme whose creator pid is dead (a crashed run), killing what ran in them.
``available()`` / ``unavailable_reason()`` tell whether this machine can do all this (root, ``ip``, bridges, veths).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support import wait_until

NS_PREFIX = "shoalmq-"
LINK_PREFIX = "shq"
_NS_NAME = re.compile(rf"^{NS_PREFIX}(\d+)-(\d+)$")
_LINK_NAME = re.compile(rf"^{LINK_PREFIX}([0-9a-f]+)x([0-9a-f]+)[bhn]$")
#: /30 blocks are taken from here (10.128.0.0 - 10.255.255.255), skipping any that overlap an address or route.
POOL = ipaddress.ip_network("10.128.0.0/9")
_BLOCKS = POOL.num_addresses // 4
_counter = itertools.count()
COMMAND_TIMEOUT = 15.0


def _ip_binary() -> str:
    return shutil.which("ip") or "/usr/sbin/ip"


def _run(*args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([_ip_binary(), *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _poll(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    return wait_until(predicate, timeout, what, interval=0.01)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespaces() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    return [line.split()[0] for line in _run("netns", "list").stdout.splitlines() if line.strip()]


def links() -> list[str]:
    """Names of the host namespace's links (``ip link``)."""
    return [line.split(":")[1].strip().split("@")[0] for line in _run("-o", "link", "show").stdout.splitlines()
            if line.count(":") >= 2]


def namespace_pids(name: str) -> list[int]:
    """Pids of the processes in namespace ``name`` (``ip netns pids``); empty if it does not exist."""
    result = _run("netns", "pids", name, check=False)
    return [int(pid) for pid in result.stdout.split()] if result.returncode == 0 else []


def _kill_all_in(name: str, timeout: float = 10.0) -> None:
    def remaining() -> list[int]:
        return [pid for pid in namespace_pids(name) if pid != os.getpid()]

    for pid in remaining():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # our own children only leave the list once reaped: reap any that are (Popen.wait does it for tracked ones)
    def gone() -> bool:
        for pid in remaining():
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        return not remaining()

    _poll(gone, timeout, f"the processes in namespace {name} to exit")


def cleanup_stale() -> list[str]:
    """Remove namespaces and links of this naming scheme whose creator pid is dead. Returns what was removed."""
    removed = []
    for name in namespaces():
        match = _NS_NAME.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _kill_all_in(name)
            _run("netns", "delete", name, check=False)
            removed.append(name)
    for name in links():
        match = _LINK_NAME.match(name)
        if match and not _pid_alive(int(match.group(1), 16)):
            if _run("link", "delete", name, check=False).returncode == 0:
                removed.append(name)
    return removed


def _used_networks() -> list[ipaddress.IPv4Network]:
    used = []
    for link in json.loads(_run("-j", "-4", "addr", "show").stdout or "[]"):
        for info in link.get("addr_info", []):
            used.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for route in json.loads(_run("-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = route.get("dst", "default")
        if dst != "default" and route.get("type", "unicast") != "broadcast":
            try:
                used.append(ipaddress.ip_network(dst, strict=False))
            except ValueError:
                pass
    return [net for net in used if net.prefixlen > 0]


def _pick_subnet(pid: int, number: int) -> ipaddress.IPv4Network:
    used = _used_networks()
    start = (pid * 64 + number * 7919) % _BLOCKS
    for step in range(4096):
        block = ipaddress.ip_network((int(POOL.network_address) + 4 * ((start + step * 131) % _BLOCKS), 30))
        if not any(block.overlaps(net) for net in used):
            return block
    raise RuntimeError("no free /30 subnet in 10.128.0.0/9")


class IsolatedHost:
    """A network namespace joined to the host through a bridge and a veth pair; ``cut()``/``heal()`` the link."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.number = next(_counter)
        tag = f"{LINK_PREFIX}{self.pid:x}x{self.number:x}"
        self.name = f"{NS_PREFIX}{self.pid}-{self.number}"
        self.bridge, self.host_veth, self.ns_veth = f"{tag}b", f"{tag}h", f"{tag}n"
        if len(self.host_veth) > 15:
            raise RuntimeError(f"interface name {self.host_veth} too long")
        self._procs: list[subprocess.Popen[Any]] = []
        self._closed = False
        self._is_cut = False
        cleanup_stale()
        self.subnet = _pick_subnet(self.pid, self.number)
        hosts = list(self.subnet.hosts())
        self.host_ip, self.ns_ip = str(hosts[0]), str(hosts[1])
        mac = f"02:{(self.pid >> 16) & 0xff:02x}:{(self.pid >> 8) & 0xff:02x}:{self.pid & 0xff:02x}:" \
              f"{self.number & 0xff:02x}"
        self.bridge_mac, self.host_mac, self.ns_mac = f"{mac}:01", f"{mac}:02", f"{mac}:03"
        atexit.register(self.close)
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        ns = ("-n", self.name)
        _run("netns", "add", self.name)
        _run("link", "add", self.bridge, "address", self.bridge_mac, "type", "bridge")
        _run("link", "add", self.host_veth, "address", self.host_mac, "type", "veth",
             "peer", "name", self.ns_veth, "address", self.ns_mac, "netns", self.name)
        _run("link", "set", self.host_veth, "master", self.bridge)
        _run("addr", "add", f"{self.host_ip}/{self.subnet.prefixlen}", "dev", self.bridge)
        _run("neigh", "replace", self.ns_ip, "lladdr", self.ns_mac, "dev", self.bridge, "nud", "permanent")
        _run("link", "set", self.bridge, "up")
        _run(*ns, "link", "set", "lo", "up")
        _run(*ns, "addr", "add", f"{self.ns_ip}/{self.subnet.prefixlen}", "dev", self.ns_veth)
        _run(*ns, "neigh", "replace", self.host_ip, "lladdr", self.bridge_mac, "dev", self.ns_veth, "nud",
             "permanent")
        _run(*ns, "link", "set", self.ns_veth, "up")
        self._set_port(up=True)

    # -- the link ------------------------------------------------------------------------------------------

    def _port_state(self) -> int:
        """The bridge port's STP state: 0 disabled, 3 forwarding."""
        return int(Path(f"/sys/class/net/{self.host_veth}/brport/state").read_text())

    def _ns_operstate(self) -> str:
        return json.loads(_run("-n", self.name, "-j", "link", "show", self.ns_veth).stdout)[0]["operstate"]

    def _set_port(self, up: bool, timeout: float = 10.0) -> None:
        self._check_open()
        _run("link", "set", self.host_veth, "up" if up else "down")
        if up:
            _poll(lambda: self._port_state() == 3 and self._ns_operstate() == "UP", timeout,
                  f"{self.host_veth} forwarding and {self.ns_veth} up")
        else:
            _poll(lambda: self._port_state() == 0 and self._ns_operstate() != "UP", timeout,
                  f"{self.host_veth} disabled and {self.ns_veth} without carrier")

    def cut(self) -> None:
        """Drop every packet to and from the namespace (silently: connections stall, connects time out)."""
        self._set_port(up=False)
        self._is_cut = True

    def heal(self) -> None:
        """Let packets through again."""
        self._set_port(up=True)
        self._is_cut = False

    @property
    def is_cut(self) -> bool:
        return self._is_cut

    # -- processes -----------------------------------------------------------------------------------------

    def command(self, args: Sequence[str | os.PathLike[str]]) -> list[str]:
        """``args`` prefixed to run inside the namespace (exec()s: the pid stays the command's)."""
        return [_ip_binary(), "netns", "exec", self.name, *map(os.fspath, args)]

    def popen(self, args: Sequence[str | os.PathLike[str]], **kwargs: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` of ``args`` inside the namespace; returns once ``ip`` has exec()ed the command, so
        signals to ``.pid`` reach the command itself. Killed by ``close()`` if still running."""
        self._check_open()
        command = self.command(args)
        proc = subprocess.Popen(command, **kwargs)  # returns once the child has exec()ed `ip`
        self._procs.append(proc)
        wrapper = "\0".join(command).encode() + b"\0"
        target = "\0".join(command[4:]).encode() + b"\0"
        ip_exe = os.path.realpath(_ip_binary())

        def execed() -> bool:  # `ip` has joined the namespace and exec()ed the command (or exited)
            if proc.poll() is not None:
                return True
            try:
                cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()  # b"" for a moment during exec()
                exe = os.readlink(f"/proc/{proc.pid}/exe")
            except (FileNotFoundError, ProcessLookupError):
                return proc.poll() is not None
            done = cmdline == target or (cmdline not in (b"", wrapper) and exe != ip_exe)
            return done and self.contains(proc.pid)

        _poll(execed, 10.0, f"{args[0]} to start in namespace {self.name}")
        return proc

    def contains(self, pid: int) -> bool:
        """Whether process ``pid`` is in this namespace."""
        try:
            return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{self.name}").st_ino
        except FileNotFoundError:
            return False

    # -- teardown ------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name} is closed")

    def close(self) -> None:
        """Kill what still runs inside, delete the links and the namespace. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        errors = []
        try:
            _kill_all_in(self.name)
        except TimeoutError as exc:
            errors.append(str(exc))
        # deleting the host end deletes its peer at once; deleting only the namespace would leave it to the
        # kernel's asynchronous namespace cleanup (and keep it while any process still holds the namespace)
        for link in (self.host_veth, self.bridge):
            result = _run("link", "delete", link, check=False)
            if result.returncode != 0 and "Cannot find device" not in result.stderr:
                errors.append(result.stderr.strip())
        result = _run("netns", "delete", self.name, check=False)
        if result.returncode != 0 and "No such file" not in result.stderr:
            errors.append(result.stderr.strip())
        try:
            _poll(lambda: self.name not in namespaces() and not {self.bridge, self.host_veth} & set(links()),
                  10.0, f"{self.name} and its links to disappear")
        except TimeoutError as exc:
            errors.append(str(exc))
        if errors:
            raise RuntimeError(f"closing {self.name}: {'; '.join(errors)}")

    def __enter__(self) -> IsolatedHost:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"IsolatedHost({self.name}, host {self.host_ip}, ns {self.ns_ip}{', cut' if self._is_cut else ''})"


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str | None:
    """Why this machine cannot run an ``IsolatedHost`` (None if it can): tried once per process."""
    if not os.path.isdir("/proc/self/ns"):
        return "no Linux namespaces (/proc/self/ns)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` (iproute2)"
    try:
        IsolatedHost().close()
    except (OSError, RuntimeError, TimeoutError, subprocess.SubprocessError) as exc:
        return f"cannot build a network namespace with a bridge and a veth pair: {exc}"
    return None


def available() -> bool:
    """Whether ``IsolatedHost`` works here (root, ``ip netns``, veth and bridge links)."""
    return unavailable_reason() is None


@contextlib.contextmanager
def isolated_host_or_skip() -> Iterator[IsolatedHost]:
    """An ``IsolatedHost`` for a test, or the test skipped with the reason namespaces cannot be made here."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    with IsolatedHost() as host:
        yield host
