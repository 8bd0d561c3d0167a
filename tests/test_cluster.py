"""Clusters of real broker processes on a real etcd, driven by real MQTT clients."""

from __future__ import annotations

import json
import subprocess
import time

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster_support import Cluster, Drain, LoadPublisher, first_occurrences_in_order
from tests.support import BIN_DIR, BrokerProcess, EtcdProcess, MqttClient, free_port, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(etcd: EtcdProcess, tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(etcd, tmp_path / "cluster", queues={"orders": 6})
    try:
        yield nodes
    finally:
        nodes.stop()


def consume(client: MqttClient, count: int, timeout: float = 30) -> list[bytes]:
    """Receive and PUBACK ``count`` messages, one at a time (the consumer's window stays open)."""
    deadline = time.monotonic() + timeout
    got = []
    while len(got) < count:
        message = client.expect(1, timeout=max(deadline - time.monotonic(), 0.01))[0]
        client.ack(message)
        got.append(message.payload)
    return got


def test_three_nodes_spread_ownership_and_publish_on_a_reaches_a_consumer_on_c(
        cluster: Cluster, mqtt_client: Callable[..., MqttClient]) -> None:
    a, b, c = (cluster.add(n) for n in ("n1", "n2", "n3"))
    owners = cluster.wait_settled("orders", 6)
    assert set(owners.values()) == {"n1", "n2", "n3"}
    consumer = mqtt_client(c.port, manual_ack=True)
    consumer.subscribe("$queue/orders")
    publisher = mqtt_client(a.port)
    sent = [f"m{i}".encode() for i in range(300)]
    for i, payload in enumerate(sent):
        publisher.publish(f"$queue/orders/k{i % 17}", payload)
    got = consume(consumer, len(sent))
    assert sorted(got) == sorted(sent)
    assert consumer.no_message(0.5)


def test_a_queue_created_on_node_1_is_consumed_on_node_2(etcd: EtcdProcess, tmp_path: Path,
                                                          mqtt_client: Callable[..., MqttClient]) -> None:
    """Create a queue on node 1 (its first publish defines it), publish on node 1, consume on node 2."""
    nodes = Cluster(etcd, tmp_path / "cluster")
    try:
        one, two = nodes.add("n1"), nodes.add("n2")
        publisher = mqtt_client(one.port)
        publisher.publish("$queue/test_queue", b"Test Message")
        assert "test_queue" in nodes.keys("queues/")
        consumer = mqtt_client(two.port, manual_ack=True)
        consumer.subscribe("$queue/test_queue")
        message = consumer.expect(1)[0]
        assert message.payload == b"Test Message"
        consumer.ack(message)
        assert consumer.no_message(0.5)
    finally:
        nodes.stop()


def test_etcdctl_shows_three_nodes_and_an_owner_for_every_partition(cluster: Cluster, etcd: EtcdProcess) -> None:
    for node in ("n1", "n2", "n3"):
        cluster.add(node)
    owners = cluster.wait_settled("orders", 6)
    listing = etcd.etcdctl("get", "--prefix", "/shoalmq/")
    lines = listing.splitlines()
    entries = dict(zip(lines[::2], lines[1::2], strict=True))
    for node in ("n1", "n2", "n3"):
        assert f"/shoalmq/nodes/{node}" in entries, f"no key of {node} right after it owned partitions:\n{listing}"
        info = json.loads(entries[f"/shoalmq/nodes/{node}"])
        assert info["node_id"] == node and info["mqtt"] == f"127.0.0.1:{cluster.nodes[node].port}"
        assert info["grpc"].startswith("127.0.0.1:") and info["version"]
    assert json.loads(entries["/shoalmq/queues/orders"])["partitions"] == 6
    for index, owner in owners.items():
        record = json.loads(entries[f"/shoalmq/partitions/orders/{index}"])
        assert record["owner"] == owner and record["epoch"] > 0
    assert sorted(set(owners.values())) == ["n1", "n2", "n3"]


def test_cluster_status_prints_nodes_owners_and_depths(cluster: Cluster, etcd: EtcdProcess,
                                                       mqtt_client: Callable[..., MqttClient]) -> None:
    for node in ("n1", "n2", "n3"):
        cluster.add(node)
    owners = cluster.wait_settled("orders", 6)
    publisher = mqtt_client(cluster.nodes["n1"].port)
    for i in range(60):
        publisher.publish(f"$queue/orders/k{i}", b"x")

    def status() -> str | None:
        result = subprocess.run([str(BIN_DIR / "broker"), "cluster", "status", "--etcd", etcd.url],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout if "orders  6           6/6    60" in result.stdout else None

    text = wait_until(status, 20, "the depths to be reported")
    assert "cluster shoalmq: 3 node(s), 1 queue(s)" in text
    for node in ("n1", "n2", "n3"):
        port = cluster.nodes[node].port
        assert any(line.split()[:2] == [node, f"127.0.0.1:{port}"] and line.split()[5] == "2"
                   for line in text.splitlines()), text
    for index, owner in owners.items():
        assert any(line.split()[:2] == [f"orders/{index}", owner] for line in text.splitlines()), text
    as_json = subprocess.run([str(BIN_DIR / "broker"), "cluster", "status", "--etcd", etcd.url, "--json"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    assert sum(p["messages"] for p in json.loads(as_json)["partitions"].values()) == 60


def test_cluster_status_shows_the_messages_waiting_on_a_dead_node(cluster: Cluster, etcd: EtcdProcess,
                                                                  mqtt_client: Callable[..., MqttClient]) -> None:
    """A SIGKILLed node's messages (one replica: nobody else has them) stay visible until it is back."""
    from shoalmq._native import partition_of

    cluster.add("n1")
    cluster.add("n2")
    owners = cluster.wait_settled("orders", 6)
    keys = [f"k{i}" for i in range(200) if owners[partition_of(f"k{i}".encode(), 6)] == "n2"][:12]
    publisher = mqtt_client(cluster.nodes["n1"].port)
    for key in keys:
        publisher.publish(f"$queue/orders/{key}", b"x")

    def status(json_out: bool = True) -> Any:
        result = subprocess.run([str(BIN_DIR / "broker"), "cluster", "status", "--etcd", etcd.url,
                                 *(["--json"] if json_out else [])], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout) if json_out else result.stdout

    wait_until(lambda: sum(p["messages"] or 0 for p in status()["partitions"].values()) == 12, 20,
               "the 12 messages reported")
    assert status()["down"] == {}
    cluster.nodes["n2"].kill()
    down = wait_until(lambda: status()["down"].get("n2"), 20, "n2 shown as down")
    assert sum(sum(parts.values()) for parts in down["messages"].values()) == 12 and down["stopped"] is None
    text = status(json_out=False)
    assert "node n2 is not live (its last report: " in text and "holds 12 message(s) no live node has" in text
    assert any(line.split()[:1] == ["orders"] and line.split()[-1] == "12" for line in text.splitlines()), text
    cluster.add("n2")  # back: its messages go where they belong, and nothing waits on a dead node
    wait_until(lambda: status()["down"] == {}, 30, "n2 no longer down")


def test_cluster_status_of_a_cluster_etcd_does_not_know_is_an_error(etcd: EtcdProcess) -> None:
    result = subprocess.run([str(BIN_DIR / "broker"), "cluster", "status", "--etcd", etcd.url, "--cluster", "nope"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().endswith("has no cluster named 'nope' (no key under /nope/)"), result.stderr


def test_unreachable_etcd_is_a_clear_error(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run([str(BIN_DIR / "broker"), "cluster", "status", "--etcd", dead],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "etcd unreachable" in result.stderr and "Traceback" not in result.stderr
    node = BrokerProcess(tmp_path / "n1", ["--etcd", dead, "--node-id", "n1"])
    node.spawn()
    assert node.proc is not None
    assert node.proc.wait(30) == 1
    assert "cannot join cluster shoalmq through etcd" in node.log and "Traceback" not in node.log


def test_direct_mode_consumers_on_every_node_together_get_every_message(
        etcd: EtcdProcess, tmp_path: Path, mqtt_client: Callable[..., MqttClient]) -> None:
    nodes = Cluster(etcd, tmp_path / "cluster", queues={"jobs": 6}, args=["--routing", "direct"])
    try:
        started = [nodes.add(n) for n in ("n1", "n2", "n3")]
        nodes.wait_settled("jobs", 6)
        drains = [Drain(node.port, "jobs") for node in started]
        publisher = mqtt_client(started[0].port)
        sent = [f"j{i}".encode() for i in range(240)]
        for i, payload in enumerate(sent):
            publisher.publish(f"$queue/jobs/key{i}", payload)
        wait_until(lambda: sum(len(d.got) for d in drains) >= len(sent), 30, "every message")
        got = [d.stop() for d in drains]
        assert sorted(sum(got, [])) == sorted(sent)
        # Each node delivered only what its own partitions held, to its own consumer: every consumer got some.
        assert all(got)
    finally:
        nodes.stop()


def test_graceful_leave_and_join_under_load_lose_nothing_and_keep_key_order(cluster: Cluster) -> None:
    for node in ("n1", "n2", "n3"):
        cluster.add(node)
    cluster.wait_settled("orders", 6)
    publisher = LoadPublisher(cluster.nodes["n2"].port, "orders").start()
    drain = None
    try:
        publisher.wait_for(300)  # a backlog on every partition, n3's included
        assert cluster.nodes["n3"].stop() == 0  # SIGTERM: hands its partitions and messages over, then leaves
        cluster.wait_settled("orders", 6, nodes=["n1", "n2"])
        publisher.wait_for(len(publisher.acked) + 200)
        drain = Drain(cluster.nodes["n1"].port, "orders")  # consuming while the next move happens
        cluster.add("n4")  # a join: partitions move to it, with what they hold and what is in flight
        cluster.wait_settled("orders", 6, nodes=["n1", "n2", "n4"])
        publisher.wait_for(len(publisher.acked) + 200)
    finally:
        acked = publisher.stop()
    assert drain is not None
    drain.wait_for(acked)
    received = drain.stop()
    assert set(acked) <= set(received)
    assert first_occurrences_in_order(received)
    moved = [int(line.split(": ")[-1].split()[0]) for line in cluster.nodes["n3"].log.splitlines()
             if "handed over to" in line]
    assert moved and sum(moved) > 0, "n3 had a backlog to hand over"


def test_sigkill_of_a_node_under_load_then_restart_loses_nothing_acknowledged(cluster: Cluster) -> None:
    for node in ("n1", "n2", "n3"):
        cluster.add(node)
    cluster.wait_settled("orders", 6)
    publisher = LoadPublisher(cluster.nodes["n1"].port, "orders").start()
    try:
        publisher.wait_for(300)
        before = len(publisher.acked)
        cluster.nodes["n2"].kill()
        # n2's partitions move to n1 and n3 once its lease expires; publishing through n1 goes on.
        cluster.wait_settled("orders", 6, nodes=["n1", "n3"])
        publisher.wait_for(before + 200)
        stall = publisher.longest_wait
        cluster.add("n2")  # back, with what its disk held: the survivors hand its partitions back
        cluster.wait_settled("orders", 6)
        publisher.wait_for(len(publisher.acked) + 200)
    finally:
        acked = publisher.stop()
    drain = Drain(cluster.nodes["n3"].port, "orders")
    drain.wait_for(acked)
    received = drain.stop()
    assert set(acked) <= set(received)
    # The takeover (measured in bench/) is bounded by the lease TTL; this only checks it happened at all.
    assert stall < cluster.lease_ttl * 4 + 5, f"publishing stalled {stall:.1f} s"


def test_an_etcd_restart_under_a_running_cluster_changes_no_owner(cluster: Cluster, etcd: EtcdProcess) -> None:
    for node in ("n1", "n2", "n3"):
        cluster.add(node)
    cluster.wait_settled("orders", 6)
    before = cluster.keys("partitions/")
    publisher = LoadPublisher(cluster.nodes["n1"].port, "orders").start()
    try:
        publisher.wait_for(100)
        etcd.stop()
        etcd.start()
        count = len(publisher.acked)
        publisher.wait_for(count + 200)
        # Leases survive a restart: every partition keeps its owner and epoch (no second writer, no churn).
        assert cluster.wait_settled("orders", 6)
        assert cluster.keys("partitions/") == before
    finally:
        acked = publisher.stop()
    drain = Drain(cluster.nodes["n2"].port, "orders")
    drain.wait_for(acked)
    assert set(acked) <= set(drain.stop())


def test_nodes_cut_off_from_etcd_stop_writing_and_resume_when_it_returns(cluster: Cluster, etcd: EtcdProcess,
                                                                        mqtt_client: Callable[..., MqttClient]
                                                                        ) -> None:
    for node in ("n1", "n2"):
        cluster.add(node)
    cluster.wait_settled("orders", 6)
    publisher = mqtt_client(cluster.nodes["n1"].port, timeout=60)
    publisher.publish("$queue/orders/a", b"before")
    etcd.stop()
    for node in cluster.nodes.values():
        wait_until(lambda node=node: "no longer writing the partitions owned on it" in node.log, 20, "the lease to be given up")
    # No node may write now: a publish is held, not acknowledged, until etcd is back and owners are settled.
    info = publisher.client.publish("$queue/orders/a", b"during", qos=1)
    assert not info.is_published()
    etcd.start()
    info.wait_for_publish(60)
    assert info.is_published()
    cluster.wait_settled("orders", 6)
    consumer = mqtt_client(cluster.nodes["n2"].port, manual_ack=True)
    consumer.subscribe("$queue/orders")
    got = consume(consumer, 2)
    assert got == [b"before", b"during"]


def test_a_joining_node_takes_a_cluster_queue_settings_but_not_another_partition_count(
        cluster: Cluster, tmp_path: Path) -> None:
    cluster.add("n1")
    cluster.wait_settled("orders", 6)
    config = tmp_path / "other.yaml"
    config.write_text("queues:\n  orders: {partitions: 4}\n  jobs: {partitions: 3, max_deliveries: 9}\n")
    node = BrokerProcess(tmp_path / "n2", ["--etcd", cluster.etcd.url, "--node-id", "n2", "--config", str(config),
                                          "--replication-factor", "1"])
    node.spawn()
    assert node.proc is not None
    assert node.proc.wait(30) == 2
    assert "queue 'orders' has 6 partitions in cluster shoalmq but 4 on this node" in node.log
    assert "Traceback" not in node.log
    assert set(cluster.live()) == {"n1"}  # it left no registration behind
    config.write_text("queues:\n  orders: {partitions: 6, max_deliveries: 9}\n")
    node = BrokerProcess(tmp_path / "n3", ["--etcd", cluster.etcd.url, "--node-id", "n3", "--config", str(config),
                                          "--replication-factor", "1"])
    try:
        node.start(timeout=30)
        assert "queue orders: using the cluster's settings, not this node's (max_deliveries=20)" in node.log
    finally:
        node.stop()
