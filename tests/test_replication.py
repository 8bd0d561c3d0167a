"""Replicated partitions on real broker processes and a real etcd: a node and its disk die, a leader is frozen
past its lease, two of three nodes die, etcd restarts, a follower falls behind; every PUBACKed message must be
consumed (``tests/churn.py`` runs the same faults under load with its checker: ``test_churn_replicated``)."""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoalmq.cluster.assignment import HashPartitionAssigner
from tests.cluster_support import Cluster, Drain, LoadPublisher
from tests.support import EtcdProcess, MqttClient, wait_until

QUEUE = "orders"
PARTITIONS = 4
ARGS = ["--replication-factor", "3"]


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    process = EtcdProcess(tmp_path / "etcd")
    process.start(timeout=30)
    yield process
    process.stop()


@pytest.fixture
def cluster(etcd: EtcdProcess, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(etcd, tmp_path / "cluster", queues={QUEUE: PARTITIONS}, args=ARGS)
    yield c
    c.stop()


def records(cluster: Cluster) -> dict[int, dict[str, Any]]:
    return {int(key.rpartition("/")[2]): value for key, value in cluster.keys("partitions/").items()
            if key.rpartition("/")[0] == QUEUE and "leader" in value}


def wait_replicated(cluster: Cluster, nodes: set[str], timeout: float = 30) -> dict[int, dict[str, Any]]:
    """Every partition has a record whose in-sync set is exactly ``nodes``, led by the assigner's choice."""
    assigner = HashPartitionAssigner()

    def settled() -> dict[int, dict[str, Any]] | None:
        found = records(cluster)
        if len(found) == PARTITIONS and all(
                set(r["isr"]) == nodes and r["leader"] == assigner.replicas(QUEUE, p, sorted(nodes), 3)[0]
                for p, r in found.items()):
            return found
        return None
    return wait_until(settled, timeout, f"every partition of {QUEUE} in sync on {sorted(nodes)}")


def start_three(cluster: Cluster) -> dict[int, dict[str, Any]]:
    for node in ("n1", "n2", "n3"):
        cluster.add(node)
    # The first publish defines the queue (replication factor 3); its partitions get records.
    client = MqttClient(cluster.nodes["n1"].port).connect()
    client.publish(f"$queue/{QUEUE}/warmup", b"warmup")
    client.disconnect()
    return wait_replicated(cluster, {"n1", "n2", "n3"})


def busiest_leader(found: dict[int, dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for record in found.values():
        counts[record["leader"]] = counts.get(record["leader"], 0) + 1
    return max(sorted(counts), key=lambda n: counts[n])


def publish_keys(port: int, count: int, prefix: str) -> list[bytes]:
    client = MqttClient(port).connect()
    sent = []
    for i in range(count):
        payload = f"{prefix}:{i}".encode()
        client.publish(f"$queue/{QUEUE}/k{i % 8}", payload)
        sent.append(payload)
    client.disconnect()
    return sent


def consume_all(port: int, expected: list[bytes], timeout: float = 60) -> list[bytes]:
    drain = Drain(port, QUEUE)
    try:
        drain.wait_for(expected + [b"warmup"], timeout)
    finally:
        got = drain.stop()
    return got


@pytest.mark.timeout(150)
def test_a_node_and_its_disk_die_and_nothing_acknowledged_is_lost(cluster: Cluster) -> None:
    """SIGKILL the node leading most partitions and delete its data directory, with unconsumed messages on it;
    the others take over, every PUBACKed message is consumed, and the node, back on an empty disk, catches up
    and rejoins every in-sync set."""
    found = start_three(cluster)
    victim = busiest_leader(found)
    survivor = next(n for n in ("n1", "n2", "n3") if n != victim)
    sent = publish_keys(cluster.nodes[victim].port, 300, "before")
    process = cluster.nodes[victim]
    process.kill()
    shutil.rmtree(process.data_dir)
    # Publishing goes on through a survivor (failover: the leaders move to the in-sync followers).
    sent += publish_keys(cluster.nodes[survivor].port, 200, "during")
    after = records(cluster)
    assert all(r["leader"] != victim for r in after.values()), after
    cluster.add(victim)  # the same node id, an empty data directory
    wait_replicated(cluster, {"n1", "n2", "n3"}, timeout=60)
    sent += publish_keys(cluster.nodes[victim].port, 100, "after")
    got = consume_all(cluster.nodes[survivor].port, sent)
    assert set(sent) <= set(got)


@pytest.mark.timeout(120)
def test_publishing_resumes_within_seconds_when_a_leader_is_killed(cluster: Cluster) -> None:
    """A publisher on a surviving node keeps publishing while the busiest leader is SIGKILLed: the longest wait for
    a PUBACK (the publish gap) is the failover time, far below the lease TTL plus a claim."""
    found = start_three(cluster)
    victim = busiest_leader(found)
    survivor = next(n for n in ("n1", "n2", "n3") if n != victim)
    publisher = LoadPublisher(cluster.nodes[survivor].port, QUEUE, keys=8, timeout=30).start()
    publisher.wait_for(200)
    before = len(publisher.acked)
    killed_at = time.monotonic()
    cluster.nodes[victim].kill()
    wait_until(lambda: len(publisher.acked) > before + 200, 30, "publishes acknowledged after the kill")
    resumed = time.monotonic() - killed_at
    acked = publisher.stop()
    print(f"publish gap after SIGKILL of the leader of most partitions: longest PUBACK wait "
          f"{publisher.longest_wait:.2f} s; 200 more acknowledged {resumed:.2f} s after the kill")
    got = consume_all(cluster.nodes[survivor].port, acked)
    assert set(acked) <= set(got)


@pytest.mark.timeout(150)
def test_a_leader_frozen_past_its_lease_acknowledges_nothing_when_it_resumes(cluster: Cluster) -> None:
    """SIGSTOP the busiest leader for longer than its lease while a client connected to it publishes (the
    publishes wait in its socket); the others take over. On SIGCONT it finds itself deposed: nothing it appended
    after resuming is acknowledged unless it leads again, and every acknowledged message is consumed."""
    found = start_three(cluster)
    victim = busiest_leader(found)
    survivor = next(n for n in ("n1", "n2", "n3") if n != victim)
    frozen = MqttClient(cluster.nodes[victim].port, timeout=3).connect()
    acked = publish_keys(cluster.nodes[victim].port, 50, "before")
    process = cluster.nodes[victim]
    assert process.proc is not None
    process.proc.send_signal(signal.SIGSTOP)
    try:
        # Published into the frozen node's socket: no PUBACK can come while it is stopped.
        infos = [frozen.client.publish(f"$queue/{QUEUE}/k{i % 8}", f"frozen:{i}".encode(), qos=1)
                 for i in range(50)]
        wait_until(lambda: all(r["leader"] != victim for r in records(cluster).values()), 30,
                   "leadership moved off the frozen node")
        acked += publish_keys(cluster.nodes[survivor].port, 100, "meanwhile")
        time.sleep(cluster.lease_ttl + 1)  # a deliberate wait: past the frozen node's lease
    finally:
        process.proc.send_signal(signal.SIGCONT)
    # Whatever it says now, a PUBACK it sends for a frozen publish must be for a message that is kept.
    deadline = time.monotonic() + 10
    for info in infos:
        info.wait_for_publish(max(deadline - time.monotonic(), 0.01))
    frozen_acked = [f"frozen:{i}".encode() for i, info in enumerate(infos) if info.is_published()]
    frozen.client.disconnect()
    frozen.client.loop_stop()
    wait_replicated(cluster, {"n1", "n2", "n3"}, timeout=60)
    got = consume_all(cluster.nodes[survivor].port, acked + frozen_acked)
    assert set(acked + frozen_acked) <= set(got)
    print(f"{len(frozen_acked)} of 50 publishes to the frozen node acknowledged after it resumed")


@pytest.mark.timeout(150)
def test_two_of_three_nodes_die_publishes_are_held_then_resume(cluster: Cluster) -> None:
    """With min_insync 2, one node alone acknowledges nothing; a node coming back resumes publishing, and nothing
    acknowledged is lost."""
    start_three(cluster)
    acked = publish_keys(cluster.nodes["n1"].port, 100, "before")
    cluster.nodes["n2"].kill()
    cluster.nodes["n3"].kill()
    client = MqttClient(cluster.nodes["n1"].port, timeout=3).connect()
    held = client.client.publish(f"$queue/{QUEUE}/k1", b"held", qos=1)
    held.wait_for_publish(3)
    assert not held.is_published(), "a publish was acknowledged with one of three replicas alive"
    cluster.add("n2")
    held.wait_for_publish(30)
    assert held.is_published()
    client.disconnect()
    acked.append(b"held")
    acked += publish_keys(cluster.nodes["n1"].port, 50, "after")
    got = consume_all(cluster.nodes["n1"].port, acked)
    assert set(acked) <= set(got)


@pytest.mark.timeout(150)
def test_etcd_restart_under_load_keeps_leaders_and_epochs(cluster: Cluster, etcd: EtcdProcess) -> None:
    """etcd SIGKILLed and restarted while publishing goes on: replication does not need etcd to commit, no leader
    changes while it is down, and nothing acknowledged is lost."""
    found = start_three(cluster)
    publisher = LoadPublisher(cluster.nodes["n1"].port, QUEUE, keys=8, timeout=30).start()
    publisher.wait_for(100)
    etcd.kill()
    before = len(publisher.acked)
    wait_until(lambda: len(publisher.acked) > before + 200, 30, "publishes acknowledged while etcd is down")
    etcd.start(timeout=30)
    acked = publisher.stop()
    after = records(cluster)
    assert {p: (r["leader"], r["epoch"]) for p, r in after.items()} == \
        {p: (r["leader"], r["epoch"]) for p, r in found.items()}
    got = consume_all(cluster.nodes["n2"].port, acked)
    assert set(acked) <= set(got)


@pytest.mark.timeout(150)
def test_a_slow_follower_leaves_the_in_sync_set_and_rejoins(cluster: Cluster) -> None:
    """SIGSTOP a follower for a few seconds under load: its leaders drop it from the in-sync set (replica_lag_ms)
    and go on acknowledging with the other; after SIGCONT it catches up and is back in every in-sync set."""
    found = start_three(cluster)
    leaders = {r["leader"] for r in found.values()}
    slow = next((n for n in ("n3", "n2", "n1") if n not in leaders), "n3")
    publisher_node = next(n for n in ("n1", "n2", "n3") if n != slow)
    publisher = LoadPublisher(cluster.nodes[publisher_node].port, QUEUE, keys=8, timeout=30).start()
    publisher.wait_for(100)
    process = cluster.nodes[slow]
    assert process.proc is not None
    process.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: all(slow not in r["isr"] for r in records(cluster).values()), 30,
                   f"{slow} out of every in-sync set")
        before = len(publisher.acked)
        wait_until(lambda: len(publisher.acked) > before + 200, 30, "publishes acknowledged without the follower")
    finally:
        process.proc.send_signal(signal.SIGCONT)
    wait_replicated(cluster, {"n1", "n2", "n3"}, timeout=60)
    acked = publisher.stop()
    got = consume_all(cluster.nodes[publisher_node].port, acked)
    assert set(acked) <= set(got)
