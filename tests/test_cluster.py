"""Clusters of real broker processes on a real etcd, driven by real MQTT clients."""

from __future__ import annotations

import time

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cluster_support import Cluster
from tests.support import EtcdProcess, MqttClient

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
