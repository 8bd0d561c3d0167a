"""A real network partition: node n3 in its own network namespace (``tests/netns.IsolatedHost``), cut off from
the other two nodes and from etcd for longer than its lease, while a client on its side of the cut (a process in
the same namespace) keeps publishing to it and a client of n1 keeps publishing on the majority side.

With replication factor 3 and min_insync 2, n3 alone can acknowledge nothing during the cut; the majority elects
new leaders (epoch + 1) and goes on acknowledging; after the heal n3 rejoins every in-sync set as a follower, its
uncommitted tail cut off; and every publish acknowledged on either side is consumed.

Addresses: etcd listens on the bridge address (``host_ip``), n1 and n2 on it too (a host address, reachable from
the host and from inside), n3 on ``ns_ip`` inside; inside the namespace 127.0.0.1 is the namespace's own loopback.

Leadership: a partition's record is created by the first node that finds itself the assigner's leader among the
live nodes: started one after the other as n1, n2, n3, n1 alone creates and leads every partition, and n3 leads
one only if something later hands it its preferred partitions (a preferred-leader rebalance). So n3 is started
first: it creates and leads all four, and keeps at least the ones the assigner prefers it for whether or not
leadership is rebalanced. The cut comes once the records have been still for a while.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests import netns
from tests.cluster_support import Cluster, Drain
from tests.netns import IsolatedHost
from tests.support import EtcdProcess, wait_until

QUEUE = "orders"
PARTITIONS = 4
NODES = {"n1", "n2", "n3"}
LEASE_TTL = 3
#: How long the link stays down: well past n3's lease.
CUT_SECONDS = 8.0
#: A PUBACK that n3 sends after the cut can only be for a publish whose commit (every in-sync follower's durable
#: report) reached n3 before it: this much later than the link went down is allowed for reports already in n3's
#: socket buffers then, and the publisher's own scheduling (observed: none later than the cut itself took).
GRACE = 0.5
#: Seconds the records must stay unchanged before the publishers start (a preferred-leader rebalance hands a
#: partition over after its leader has led it for 2 s).
STILL = 3.5
#: Seconds between two publishes of one publisher.
INTERVAL = 0.01
REPO = Path(__file__).resolve().parent.parent
#: The partition of key k<n> (FNV-1a of the key, modulo 4), n = 0..7: the publishers' keys cover every partition.
PARTITION_OF_KEY = [2, 1, 0, 3, 2, 1, 0, 3]

#: A QoS 1 publisher (paho, publishes never wait for each other) that prints what it sent and every PUBACK, with
#: CLOCK_MONOTONIC times (one clock for every process of the machine, in any network namespace), until its stdin
#: closes. Lines: ``sent <t> <mid> <payload> <rc>``, ``ack <t> <mid>``, ``connect <t> <reason>``,
#: ``disconnect <t> <reason>``. argv: host port queue name interval.
PUBLISHER = r"""
import sys, threading, time
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

host, port, queue, name, interval = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
lock = threading.Lock()

def emit(*fields):
    line = " ".join(str(f).replace(" ", "_") for f in fields) + "\n"
    with lock:  # (never held while calling paho: paho may hold its own locks when it calls us)
        sys.stdout.write(line)
        sys.stdout.flush()

connected = threading.Event()

def on_connect(client, userdata, flags, reason, properties):
    emit("connect", "%.6f" % time.monotonic(), reason)
    if not reason.is_failure:
        connected.set()

def on_disconnect(client, userdata, flags, reason, properties):
    emit("disconnect", "%.6f" % time.monotonic(), reason)

def on_publish(client, userdata, mid, reason, properties):
    emit("ack", "%.6f" % time.monotonic(), mid)

client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, clean_session=True)
client.max_inflight_messages_set(20000)
client.reconnect_delay_set(1, 1)
client.on_connect, client.on_disconnect, client.on_publish = on_connect, on_disconnect, on_publish
client.connect(host, port, keepalive=30)
client.loop_start()
if not connected.wait(10):
    emit("error", "%.6f" % time.monotonic(), "no CONNACK")
    sys.exit(1)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
seq = 0
while not stop.is_set() and seq < 60000:  # (mids are unique below 65536)
    payload = "%s:%d" % (name, seq)
    sent = time.monotonic()
    info = client.publish("$queue/%s/k%d" % (queue, seq % 8), payload, qos=1)
    emit("sent", "%.6f" % sent, info.mid, payload, info.rc)
    seq += 1
    stop.wait(interval)
client.disconnect()
client.loop_stop()
"""


class Publisher:
    """``PUBLISHER`` in a subprocess (in a namespace if ``isolated`` is given), its lines parsed as they come."""

    def __init__(self, name: str, host: str, port: int, log_dir: Path, isolated: IsolatedHost | None = None
                 ) -> None:
        self.name = name
        args: list[str] = [sys.executable, "-c", PUBLISHER, host, str(port), QUEUE, name, str(INTERVAL)]
        self.stderr = open(log_dir / f"publisher-{name}.log", "wb")  # noqa: SIM115 (closed by stop())
        kwargs: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": self.stderr,
                                  "cwd": REPO}
        self.proc = isolated.popen(args, **kwargs) if isolated is not None else subprocess.Popen(args, **kwargs)
        #: mid -> (sent at, payload); mid -> first PUBACK at; (kind, at, reason) of connects and disconnects.
        self.sent: dict[int, tuple[float, bytes]] = {}
        self.acks: dict[int, float] = {}
        self.events: list[tuple[str, float, str]] = []
        self.errors: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            fields = raw.decode(errors="replace").split()
            if not fields:
                continue
            kind, at = fields[0], float(fields[1])
            if kind == "sent":
                self.sent[int(fields[2])] = (at, fields[3].encode())
            elif kind == "ack":
                self.acks.setdefault(int(fields[2]), at)
            elif kind in ("connect", "disconnect"):
                self.events.append((kind, at, " ".join(fields[2:])))
            else:
                self.errors.append(" ".join(fields))

    def acked(self) -> list[tuple[bytes, float, float]]:
        """(payload, sent at, PUBACKed at) of every acknowledged publish, in PUBACK order."""
        sent, acks = dict(self.sent), dict(self.acks)
        return sorted(((sent[mid][1], sent[mid][0], at) for mid, at in acks.items() if mid in sent),
                      key=lambda entry: entry[2])

    def ack_times(self) -> list[float]:
        return sorted(self.acks.values())

    def wait_acks(self, count: int, after: float = 0.0, timeout: float = 30.0) -> float:
        """Wait until ``count`` PUBACKs came after ``after``; returns the time of the first of them."""
        def enough() -> float | None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"publisher {self.name} exited ({self.proc.returncode}): {self.errors}")
            later = [t for t in self.ack_times() if t > after]
            return later[0] if len(later) >= count else None
        return wait_until(enough, timeout, f"{count} PUBACKs to publisher {self.name}")

    def stop(self) -> None:
        """Stop publishing (close its stdin), let it disconnect; kill it if it does not exit."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._reader.join(10)
        self.stderr.close()


@pytest.fixture
def isolated() -> Iterator[IsolatedHost]:
    with netns.isolated_host_or_skip() as host:
        yield host


@pytest.fixture
def etcd(isolated: IsolatedHost, tmp_path: Path) -> Iterator[EtcdProcess]:
    server = EtcdProcess(tmp_path / "etcd", host=isolated.host_ip)  # reachable from inside the namespace
    server.start(timeout=30)
    try:
        yield server
    finally:
        server.stop()
        server.remove_data()


@pytest.fixture
def cluster(etcd: EtcdProcess, isolated: IsolatedHost, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(etcd, tmp_path / "cluster", queues={QUEUE: PARTITIONS}, args=["--replication-factor", "3"],
                lease_ttl=LEASE_TTL)
    try:
        yield c
    finally:
        if isolated.is_cut:  # a failure during the cut: let n3 leave normally rather than wait out its stops
            try:
                isolated.heal()
            except (RuntimeError, TimeoutError):
                pass
        c.stop()


def records(cluster: Cluster) -> dict[int, dict[str, Any]]:
    return {int(key.rpartition("/")[2]): value for key, value in cluster.keys("partitions/").items()
            if key.rpartition("/")[0] == QUEUE and "leader" in value}


def wait_records(cluster: Cluster, what: str, check: Any, timeout: float) -> dict[int, dict[str, Any]]:
    def ok() -> dict[int, dict[str, Any]] | None:
        found = records(cluster)
        return found if len(found) == PARTITIONS and all(check(r) for r in found.values()) else None
    return wait_until(ok, timeout, what)


def wait_stable(cluster: Cluster, still: float, timeout: float = 30) -> dict[int, dict[str, Any]]:
    """Wait until every partition has a record and none has changed for ``still`` seconds; returns them."""
    last: dict[int, dict[str, Any]] = {}
    since = time.monotonic()

    def stable() -> dict[int, dict[str, Any]] | None:
        nonlocal last, since
        found = records(cluster)
        if found != last or len(found) < PARTITIONS:
            last, since = found, time.monotonic()
            return None
        return found if time.monotonic() - since >= still else None

    return wait_until(stable, timeout, f"the records of {QUEUE} unchanged for {still} s", interval=0.05)


def log_lines(path: Path, pattern: str) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if re.search(pattern, line)]


#: ERROR lines the partition causes by design.
EXPECTED_ERRORS = r"lease of node n3 lost: no longer writing"


def suspicious(cluster: Cluster) -> dict[str, list[str]]:
    """ERROR lines (but the expected ones) and tracebacks (but those of DEBUG lines: amqtt logs one at debug level
    whenever a connection it closes was reset) in each node's log, with the line before each traceback."""
    out = {}
    for name, node in cluster.nodes.items():
        lines = node.log.splitlines()
        found = [line for line in lines if re.search(r" (ERROR|CRITICAL) ", line)
                 and not re.search(EXPECTED_ERRORS, line)]
        found += [f"{lines[i - 1]} / {line}" for i, line in enumerate(lines)
                  if line.startswith("Traceback") and i and " DEBUG " not in lines[i - 1]]
        if found:
            out[name] = found
    return out


def gaps(times: Sequence[float], start: float, end: float) -> float:
    """The longest interval without a time in [start, end]."""
    inside = [start, *(t for t in times if start < t < end), end]
    return max(b - a for a, b in itertools.pairwise(inside))


@pytest.mark.timeout(180)
def test_a_partitioned_leader_acknowledges_nothing_and_rejoins_truncated(cluster: Cluster,
                                                                          isolated: IsolatedHost,
                                                                          tmp_path: Path) -> None:
    host_ip, ns_ip = isolated.host_ip, isolated.ns_ip
    # n3 first: it creates every partition's record and leads all four (see the module docstring).
    n3 = cluster.add("n3", host=ns_ip, prefix=isolated.command([]))
    assert isolated.contains(n3.pid)
    wait_records(cluster, "n3 leading every partition", lambda r: r["leader"] == "n3", 30)
    n1 = cluster.add("n1", host=host_ip)
    cluster.add("n2", host=host_ip)
    wait_records(cluster, "every partition in sync on n1, n2, n3",
                 lambda r: set(r["isr"]) == NODES and set(r["replicas"]) == NODES, 60)
    wait_stable(cluster, STILL)

    inside = Publisher("ns", ns_ip, n3.port, tmp_path, isolated=isolated)  # n3's side of the cut
    outside = Publisher("n1", host_ip, n1.port, tmp_path)
    publishers = [inside, outside]
    try:
        inside.wait_acks(100)
        outside.wait_acks(100)
        before = wait_stable(cluster, 1.0)  # (publishing may not move a leader either)
        led_by_n3 = sorted(p for p, r in before.items() if r["leader"] == "n3")
        assert led_by_n3, f"n3 leads no partition: {before}"
        assert all(set(r["isr"]) == NODES for r in before.values()), before

        # -- the cut -------------------------------------------------------------------------------------
        cut_begin = time.monotonic()
        isolated.cut()
        cut_done = time.monotonic()

        failed_over: list[float] = []

        def new_leaders() -> dict[int, dict[str, Any]] | None:
            found = records(cluster)
            if not failed_over and all(found[p]["leader"] != "n3" and found[p]["epoch"] > before[p]["epoch"]
                                       for p in led_by_n3):
                failed_over.append(time.monotonic())
            # n3's partitions failed over (a new leader, a higher epoch), and n3 left every in-sync set
            return found if all(r["leader"] != "n3" and "n3" not in r["isr"] and
                                (r["epoch"] > before[p]["epoch"] or p not in led_by_n3)
                                for p, r in found.items()) else None

        during = wait_until(new_leaders, CUT_SECONDS - 1, "n3's partitions led elsewhere at higher epochs, n3 out "
                                                          "of every in-sync set")
        elected = time.monotonic()
        resumed = outside.wait_acks(1, after=cut_done, timeout=CUT_SECONDS - (elected - cut_begin) - 0.5)
        wait_until(lambda: cluster.live() == {"n1", "n2"}, LEASE_TTL + 2, "n3's lease to expire")
        lease_gone = time.monotonic()
        time.sleep(max(cut_begin + CUT_SECONDS - time.monotonic(), 0))  # a deliberate wait: the cut lasts
        heal_begin = time.monotonic()
        end_records = records(cluster)
        n3_log_at_heal = len(n3.log)
        isolated.heal()
        healed = time.monotonic()
        assert all(r["leader"] != "n3" for r in end_records.values()), end_records

        # -- what was acknowledged during the cut ----------------------------------------------------------
        time.sleep(0.2)  # a deliberate wait: lines printed before the heal reach the readers
        inside_late = [(payload, sent - cut_begin, at - cut_begin) for payload, sent, at in inside.acked()
                       if at > cut_begin and at <= heal_begin]
        outside_during = [at for _, _, at in outside.acked() if cut_done < at <= heal_begin]
        sent_inside_during = [mid for mid, (at, _) in inside.sent.items() if cut_done < at <= heal_begin]
        # No grace needed here: a publish sent once the link was down never reached a follower, so it cannot have
        # been committed.
        assert not [entry for entry in inside_late if entry[1] > cut_done - cut_begin], \
            f"n3 acknowledged publishes sent after the cut: {inside_late}"
        assert not [entry for entry in inside_late if entry[2] > cut_done - cut_begin + GRACE], \
            f"n3 acknowledged publishes more than {GRACE} s into the cut: {inside_late}"
        assert len(sent_inside_during) > 100, "the client on n3's side did not keep publishing"
        assert len(outside_during) > 100, f"only {len(outside_during)} PUBACKs on the majority side during the cut"
        assert max(outside_during) > heal_begin - 1.0, "the majority side stopped acknowledging before the heal"

        # -- the heal --------------------------------------------------------------------------------------
        # n3 rejoins as a follower: every in-sync set is all three again, and whatever n3 leads afterwards (a
        # rebalance may hand its preferred partitions back) it leads at an epoch it was given after the majority's
        # (its own from before the cut is gone).
        rejoined = wait_records(cluster, "n3 back in every in-sync set", lambda r: set(r["isr"]) == NODES, 60)
        rejoined_at = time.monotonic()
        assert all(r["epoch"] > during[p]["epoch"] for p, r in rejoined.items() if r["leader"] == "n3"), \
            (during, rejoined)
        wait_until(lambda: cluster.live() == NODES, 10, "n3 registered again")
        # n3's client is acknowledged again (forwards held during the cut, publishes sent again after reconnecting)
        inside_again = inside.wait_acks(20, after=healed, timeout=30)
        for publisher in publishers:
            publisher.stop()
        acked = {name: publisher.acked() for name, publisher in (("ns", inside), ("n1", outside))}
    finally:
        for publisher in publishers:
            publisher.stop()

    expected = [payload for entries in acked.values() for payload, _, _ in entries]
    drain = Drain(n1.port, QUEUE, host=host_ip)
    try:
        drain.wait_for(expected, timeout=60)
    finally:
        got = drain.stop()
    assert set(expected) <= set(got)

    # n3 stored what its client published during the cut to the partitions it led, and no follower got any of it:
    # after the heal it must have stopped leading each of them and cut that tail off.
    after_heal = n3.log[n3_log_at_heal:].splitlines()
    cuts = [line for line in after_heal if "log cut at offset" in line]
    for p in led_by_n3:
        assert [line for line in after_heal if f"partition {QUEUE}/{p} no longer led here" in line], \
            f"n3 did not stop leading {QUEUE}/{p} after the heal"
        assert [line for line in cuts if f"partition {QUEUE}/{p}: log cut" in line], \
            f"n3 did not truncate {QUEUE}/{p}, which it led during the cut: {cuts}"
    disconnects = {publisher.name: [(kind, round(at - cut_begin, 2), reason) for kind, at, reason in
                                    publisher.events if at > cut_begin] for publisher in publishers}
    n1_acks = outside.ack_times()
    print(f"\nleaders before the cut: { {p: (r['leader'], r['epoch']) for p, r in sorted(before.items())} }")
    print(f"cut took {cut_done - cut_begin:.3f} s; n3's partitions led elsewhere {failed_over[0] - cut_begin:.2f} s "
          f"after it began, n3 out of every in-sync set after {elected - cut_begin:.2f} s: "
          f"{ {p: (r['leader'], r['epoch'], r['isr']) for p, r in sorted(during.items())} }")
    print(f"majority side: first PUBACK of a publish sent after the cut {resumed - cut_begin:.2f} s after it "
          f"began; longest PUBACK gap during the cut {gaps(n1_acks, cut_begin, heal_begin):.2f} s; "
          f"{len(outside_during)} PUBACKs during the cut")
    per_partition = {}
    for payload, sent, at in acked["n1"]:
        p = PARTITION_OF_KEY[int(payload.rpartition(b":")[2]) % 8]
        if sent > cut_done and p not in per_partition:
            per_partition[p] = round(at - cut_begin, 2)
    print(f"majority side, per partition: first PUBACK of a publish sent after the cut, s after it began: "
          f"{dict(sorted(per_partition.items()))}")
    print(f"n3's lease gone from etcd {lease_gone - cut_begin:.2f} s into the cut; healed after "
          f"{heal_begin - cut_begin:.2f} s (heal took {healed - heal_begin:.3f} s)")
    print(f"n3's side: {len(sent_inside_during)} publishes sent during the cut, PUBACKs after it began at "
          f"{[round(at, 3) for _, _, at in inside_late]} s (sent at {[round(s, 3) for _, s, _ in inside_late]} s); "
          f"PUBACKed again {inside_again - healed:.2f} s after the heal")
    print(f"connection events after the cut began (s since): {disconnects}")
    print(f"n3 back in every in-sync set {rejoined_at - healed:.2f} s after the heal: "
          f"{ {p: (r['leader'], r['epoch'], r['isr']) for p, r in sorted(rejoined.items())} }")
    print(f"acknowledged: {len(acked['ns'])} on n3's side, {len(acked['n1'])} on n1's; consumed {len(set(got))} "
          f"distinct of {len(got)}")
    print(f"n3's log cuts: {cuts or 'none'}")
    print(f"logs under {tmp_path}; unexpected ERROR lines and tracebacks: {suspicious(cluster) or 'none'}")
