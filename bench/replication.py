"""Replicated queues (``replication_factor: 3``), in one run: ``python -m bench.replication``.

1. **Failover gap** (step ``failover``). Three nodes, a queue of 6 partitions. A publisher thread connected to a
   surviving node publishes QoS 1 without pause to keys of all the partitions in turn (``--window`` messages in
   flight, default 1) and records when each PUBACK arrives. The node that leads most partitions is SIGKILLed;
   reported per kill: the publish gap (the longest interval between consecutive PUBACKs from the last one before
   the kill to 3 s after publishing resumed on the dead node's partitions), and the time from the kill to the
   first PUBACK of a message sent after it to a partition the dead node led. The node is restarted on its data
   directory, and the next kill waits until every partition's in-sync set has all three nodes again and each
   partition is led by its preferred node. Target: median gap <= 1.5 s. At the end every PUBACKed message is
   consumed (lost: acknowledged but never delivered).
2. **Catch-up of an empty replica** (step ``catchup``). Three nodes, a queue of one partition; ``--messages``
   messages of ``--size`` bytes are published to its leader (no consumers) by the load tool's publisher loop (one
   raw-socket connection, ``--publish-window`` messages in flight). Then a follower is SIGKILLed, its data
   directory deleted once the leader dropped it from the in-sync set, and the node restarted empty: reported is
   the time from its restart until the partition's record lists it in the in-sync set again, as messages/s and
   MB/s of payload; then the node is restarted once more, and the messages it recovers from its disk are compared
   with the leader's depth.

Every broker runs with fsync durability, real etcd (Debian's), on this machine's loopback; every process started
is stopped when a step ends, whatever happens. ``--steps`` runs only some of them.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import random
import re
import shutil
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cluster import (  # noqa: E402
    interrupt_on_signals,
    log_errors,
    node_warnings,
    parse_steps,
    records,
    start_cluster,
    stop,
    wait_in_sync,
)
from bench.loadtool.mqtt import Connection  # noqa: E402
from bench.loadtool.workers import KEEP_ALIVE, Settings, _publish  # noqa: E402
from shoalmq._native import partition_of  # noqa: E402
from tests.cluster_support import Cluster, Drain  # noqa: E402
from tests.support import RawMqtt, publish_packet, wait_until  # noqa: E402

STEPS = ("failover", "catchup")
NODES = ["n1", "n2", "n3"]
QUEUE = "load"
#: Seconds of publishing watched after the first PUBACK for one of the dead node's partitions.
AFTER_RESUME = 3.0


# -- 1. the failover gap --------------------------------------------------------------------------------------

class TimedPublisher:
    """Publishes QoS 1 from a thread to ``topics`` in turn (``window`` in flight) and records, for every PUBACK,
    when it came, the partition of its message, the payload and when the message was sent."""

    def __init__(self, port: int, topics: list[tuple[str, int]], window: int, tag: str, timeout: float = 30) -> None:
        self.conn = RawMqtt(port, client_id=f"bench-{tag}", timeout=timeout)
        self.topics = topics
        self.window = window
        self.tag = tag
        self.timeout = timeout
        self.acks: list[tuple[float, int, bytes, float]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> TimedPublisher:
        self._thread.start()
        return self

    def _run(self) -> None:
        inflight: dict[int, tuple[int, bytes, float]] = {}
        seq = 0
        next_id = 1
        try:
            while True:
                while len(inflight) < self.window and not self._stop.is_set():
                    topic, partition = self.topics[seq % len(self.topics)]
                    payload = f"{self.tag}:{seq}".encode()
                    self.conn.send(publish_packet(topic, payload, qos=1, packet_id=next_id))
                    inflight[next_id] = (partition, payload, time.monotonic())
                    next_id = next_id % 65535 + 1
                    seq += 1
                if not inflight:
                    return
                frame = self.conn.read(self.timeout)
                if frame.type == 4:  # PUBACK
                    packet_id = struct.unpack_from("!H", frame.body)[0]
                    sent = inflight.pop(packet_id, None)
                    if sent is not None:
                        self.acks.append((time.monotonic(), *sent))
        except BaseException as exc:  # noqa: BLE001 (reported by stop())
            self.error = exc

    def stop(self) -> list[tuple[float, int, bytes, float]]:
        """Stop sending, wait for the PUBACKs of what is in flight, disconnect; raises what the thread hit."""
        self._stop.set()
        self._thread.join(self.timeout + 10)
        self.conn.close()
        if self.error is not None:
            raise RuntimeError(f"publisher {self.tag}: {self.error!r}") from self.error
        return self.acks


def keys_per_partition(partitions: int) -> list[tuple[str, int]]:
    """One key per partition: (topic, partition), in partition order."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < partitions:
        found.setdefault(partition_of(f"k{i}".encode(), partitions), f"k{i}")
        i += 1
    return [(f"$queue/{QUEUE}/{found[p]}", p) for p in range(partitions)]


def one_kill(cluster: Cluster, number: int, topics: list[tuple[str, int]], window: int,
             partitions: int) -> tuple[dict[str, Any], list[bytes]]:
    """Kill the busiest leader under a publisher on a survivor, measure, restart it and wait until all is back."""
    found = wait_in_sync(cluster, (QUEUE,), partitions, set(NODES), timeout=90)[QUEUE]
    led = collections.Counter(r["leader"] for r in found.values())
    busiest = sorted(n for n, c in led.items() if c == max(led.values()))
    victim = busiest[number % len(busiest)]  # (taking the tied ones in turn)
    survivor = next(n for n in NODES if n != victim)
    victim_partitions = {p for p, r in found.items() if r["leader"] == victim}
    publisher = TimedPublisher(cluster.nodes[survivor].port, topics, window, f"r{number}").start()
    try:
        wait_until(lambda: len(publisher.acks) >= 200 or publisher.error, 30, "200 PUBACKs before the kill")
        time.sleep(0.5)
        killed = time.monotonic()
        cluster.nodes[victim].kill()

        def resumed() -> float | None:
            if publisher.error is not None:
                return -1.0
            # (a message sent before the kill may have been committed, its PUBACK still on its way: not counted)
            hits = [at for at, partition, _, sent in publisher.acks[-5000:]
                    if sent >= killed and partition in victim_partitions]
            return hits[0] if hits else None
        first = wait_until(resumed, 60, f"a PUBACK for a partition of {victim} after the kill", 0.01)
        if first > 0:
            time.sleep(max(0.0, first + AFTER_RESUME - time.monotonic()))
    finally:
        acks = publisher.stop()
    times = [at for at, _, _, _ in acks]
    before = [t for t in times if t < killed]
    watched = ([before[-1]] if before else []) + [t for t in times if killed <= t <= first + AFTER_RESUME]
    gap = max((b - a for a, b in itertools.pairwise(watched)), default=float("nan"))
    restarted = time.monotonic()
    cluster.add(victim)
    ready = time.monotonic()
    wait_in_sync(cluster, (QUEUE,), partitions, set(NODES), timeout=90)
    back = time.monotonic()
    row = {"kill": number + 1, "victim": victim, "led": sorted(victim_partitions), "survivor": survivor,
           "gap_s": gap, "first_victim_puback_s": first - killed,
           "pubacks_per_s_before_kill": len([t for t in before if t > killed - 0.5]) / 0.5,
           "restart_ready_s": ready - restarted, "restart_to_in_sync_and_led_s": back - restarted, "acked": len(acks)}
    print(f"  kill {number + 1}: {victim} (led {len(victim_partitions)} of {partitions}), publisher on {survivor} "
          f"({row['pubacks_per_s_before_kill']:,.0f} PUBACKs/s before): gap {gap:.2f} s, first PUBACK of one sent "
          f"to its partitions {first - killed:.2f} s after the kill; restarted: ready {ready - restarted:.1f} s, "
          f"in sync and leading again {back - restarted:.1f} s; {len(acks)} PUBACKed", flush=True)
    return row, [payload for _, _, payload, _ in acks]


def failover(work: Path, kills: int, window: int, partitions: int = 6) -> dict[str, Any]:
    etcd, cluster = start_cluster(work, NODES, partitions, (QUEUE,), replication=3)
    rounds: list[dict[str, Any]] = []
    acked: list[bytes] = []
    try:
        topics = keys_per_partition(partitions)
        for number in range(kills):
            row, payloads = one_kill(cluster, number, topics, window, partitions)
            rounds.append(row)
            acked += payloads
        # Every PUBACKed message must be delivered.
        drain = Drain(cluster.nodes[NODES[0]].port, QUEUE)
        try:
            with contextlib.suppress(TimeoutError):
                drain.wait_for(acked, timeout=300)
        finally:
            got = drain.stop()
        counts = collections.Counter(got)
        lost = len(set(acked) - set(counts))
        duplicates = sum(c - 1 for c in counts.values() if c > 1)
        errors = log_errors(cluster)
        warnings = node_warnings(cluster)
    finally:
        stop(etcd, cluster)
    gaps = [r["gap_s"] for r in rounds]
    firsts = [r["first_victim_puback_s"] for r in rounds]
    return {"rounds": rounds, "gap_median_s": statistics.median(gaps), "gap_max_s": max(gaps),
            "first_median_s": statistics.median(firsts), "first_max_s": max(firsts), "acked": len(acked),
            "delivered": len(got), "lost": lost, "duplicates": duplicates, "log_errors": errors,
            "log_warnings": {n: dict(c) for n, c in warnings.items()}}


# -- 2. catch-up of an empty replica ---------------------------------------------------------------------------

def publish_fast(port: int, messages: int, size: int, window: int) -> dict[str, Any]:
    """The load tool's publisher loop (``bench.loadtool.workers``) in this process: one connection, QoS 1,
    ``window`` PUBLISHes in flight, unkeyed to ``$queue/<QUEUE>``; returns its result with the wall time."""
    settings = Settings(host="127.0.0.1", port=port, topic=f"$queue/{QUEUE}", sub_topic=f"$queue/{QUEUE}", qos=1,
                        size=size, window=window, client_prefix="catchup", drain_timeout=30, connect_timeout=10,
                        run_id=random.randrange(1, 2**32), per_publisher=(messages,), consumers=0)
    conn = Connection.open("127.0.0.1", port, "catchup-pub-0", KEEP_ALIVE, 10)
    started = time.monotonic()
    try:
        result = _publish(conn, 0, settings)
    finally:
        conn.disconnect()
    result["wall_s"] = time.monotonic() - started
    result.pop("acked_map", None)
    return result


def depth_reported(cluster: Cluster, node: str) -> int | None:
    """The depth of partition 0 of the queue in ``node``'s load report (owned or stored), None if absent."""
    report = cluster.keys("load/").get(node, {})
    for section in ("owned", "stored_not_owned"):
        depth = report.get(section, {}).get(QUEUE, {}).get("0")
        if depth is not None:
            return int(depth)
    return None


def recovered(log: str) -> tuple[int | None, float | None]:
    """The messages of the queue, and the recovery time in ms, that the last start in a broker.log reported."""
    last = log.rsplit("==== start", 1)[-1]
    depth = re.search(rf"queue {QUEUE}: \d+ partition\(s\), (\d+) message\(s\)", last)
    took = re.search(r"message\(s\) recovered in (\d+) ms", last)
    return (int(depth.group(1)) if depth else None), (float(took.group(1)) if took else None)


def catchup(work: Path, messages: int, size: int, window: int) -> dict[str, Any]:
    etcd, cluster = start_cluster(work, NODES, 1, (QUEUE,), replication=3)
    try:
        record = records(cluster, QUEUE)[0]
        leader = record["leader"]
        follower = max(n for n in NODES if n != leader)
        print(f"  leader {leader}, follower to wipe {follower}; publishing {messages:,} x {size} B ...", flush=True)
        published = publish_fast(cluster.nodes[leader].port, messages, size, window)
        if published["acked"] != messages or published["stalled"]:
            raise RuntimeError(f"publishing stopped: {published['acked']} of {messages} PUBACKed")
        publish_rate = messages / ((published["t_end"] - published["t_first"]) / 1e9)
        print(f"  published {messages:,} in {published['wall_s']:.1f} s ({publish_rate:,.0f} msgs/s, "
              f"{publish_rate * size / 1e6:.1f} MB/s of payload)", flush=True)
        wait_in_sync(cluster, (QUEUE,), 1, set(NODES), timeout=120)
        process = cluster.nodes[follower]
        process.kill()
        killed = time.monotonic()
        wait_until(lambda: follower not in records(cluster, QUEUE)[0]["isr"], 60,
                   f"{follower} out of the in-sync set", 0.02)
        dropped = time.monotonic() - killed
        data_bytes = sum(f.stat().st_size for f in process.data_dir.rglob("*") if f.is_file())
        shutil.rmtree(process.data_dir)
        restarted = time.monotonic()
        cluster.add(follower)
        ready = time.monotonic()
        wait_until(lambda: follower in records(cluster, QUEUE)[0]["isr"], 1800, f"{follower} back in the in-sync set",
                   0.02)
        in_sync = time.monotonic()
        # What the leader holds (its load report, rewritten within ~3 s), and what the new replica has on disk:
        # stopped and started again at --log-level info, it logs the messages it recovered.
        time.sleep(3.5)
        leader_depth = depth_reported(cluster, leader)
        cluster.nodes[follower].stop()  # (the process started empty; ``process`` is the one killed)
        replica_depth, recovery_ms = recovered(cluster.add(follower, args=["--log-level", "info"]).log)
        errors = log_errors(cluster)
        warnings = node_warnings(cluster)
    finally:
        stop(etcd, cluster)
    took = in_sync - restarted
    after_ready = in_sync - ready
    return {"messages": messages, "size": size, "publish_msgs_per_s": publish_rate,
            "publish_wall_s": published["wall_s"], "leader": leader, "follower": follower,
            "isr_dropped_after_kill_s": dropped, "follower_data_bytes": data_bytes,
            "restart_ready_s": ready - restarted, "restart_to_in_sync_s": took, "ready_to_in_sync_s": after_ready,
            "catchup_msgs_per_s": messages / took, "catchup_mb_per_s": messages * size / took / 1e6,
            "catchup_msgs_per_s_after_ready": messages / after_ready,
            "catchup_mb_per_s_after_ready": messages * size / after_ready / 1e6,
            "leader_depth": leader_depth, "replica_depth": replica_depth, "replica_recovery_ms": recovery_ms,
            "log_errors": errors, "log_warnings": {n: dict(c) for n, c in warnings.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.replication", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated steps to run, of {', '.join(STEPS)} (default: all)")
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs in the failover step")
    parser.add_argument("--window", type=int, default=1, help="PUBLISHes in flight in the failover step")
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages published before the catch-up")
    parser.add_argument("--size", type=int, default=100, help="payload bytes of the catch-up step's messages")
    parser.add_argument("--publish-window", type=int, default=4096,
                        help="PUBLISHes in flight while filling the partition for the catch-up")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the figures as JSON to PATH")
    args = parser.parse_args()
    interrupt_on_signals()
    steps = parse_steps(parser, args.steps, STEPS)
    if args.kills < 1 or not 1 <= args.window <= 65535 or args.messages < 1 or args.size < 20:
        parser.error("--kills and --messages at least 1, --window 1 to 65535, --size at least 20")
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="shoalmq-bench-repl-") as tmp:
        work = Path(tmp)
        if "failover" in steps:
            print(f"\n1. failover gap: 3 nodes, replication factor 3, 6 partitions, publisher window {args.window}, "
                  f"{args.kills} SIGKILLs of the busiest leader", flush=True)
            result = failover(work / "failover", args.kills, args.window)
            report["failover"] = result
            print(f"  publish gap: median {result['gap_median_s']:.2f} s, max {result['gap_max_s']:.2f} s "
                  f"(target: median <= 1.5 s); kill to the first PUBACK for the dead node's partitions: median "
                  f"{result['first_median_s']:.2f} s, max {result['first_max_s']:.2f} s")
            print(f"  PUBACKed {result['acked']:,}, delivered {result['delivered']:,}: lost {result['lost']}, "
                  f"duplicates {result['duplicates']}")
        if "catchup" in steps:
            print(f"\n2. catch-up of an empty replica: 3 nodes, replication factor 3, 1 partition, "
                  f"{args.messages:,} x {args.size} B", flush=True)
            result = catchup(work / "catchup", args.messages, args.size, args.publish_window)
            report["catchup"] = result
            print(f"  follower {result['follower']} out of the in-sync set {result['isr_dropped_after_kill_s']:.2f} s "
                  f"after its SIGKILL; its data directory held {result['follower_data_bytes'] / 1e6:,.0f} MB")
            print(f"  restart to in sync: {result['restart_to_in_sync_s']:.2f} s "
                  f"({result['catchup_msgs_per_s']:,.0f} msgs/s, {result['catchup_mb_per_s']:.1f} MB/s of payload); "
                  f"of which start-up (until it accepts MQTT, waiting for its killed self's lease to expire) "
                  f"{result['restart_ready_s']:.2f} s, from then "
                  f"{result['ready_to_in_sync_s']:.2f} s ({result['catchup_msgs_per_s_after_ready']:,.0f} msgs/s, "
                  f"{result['catchup_mb_per_s_after_ready']:.1f} MB/s)")
            print(f"  messages held afterwards: leader {result['leader']} {result['leader_depth']} (its load report), "
                  f"the new replica {result['follower']} {result['replica_depth']} (recovered from its disk in "
                  f"{result['replica_recovery_ms']} ms when restarted once more)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
