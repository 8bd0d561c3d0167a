"""Operating a 3-node cluster: each node's /metrics adds up to the cluster's figures, the JSON API answers for every
node, and purge, redrive and drain work under load without losing an acknowledged message. Real etcd, real broker
processes, real MQTT clients, real HTTP."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cluster_support import Cluster, Drain, LoadPublisher
from tests.ops_support import get, http, metric, scrape, summed
from tests.support import BIN_DIR, EtcdProcess, MqttClient, wait_until

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
def cluster(etcd: EtcdProcess, tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(etcd, tmp_path / "cluster", queues={"orders": 6})
    try:
        yield nodes
    finally:
        nodes.stop()


def queue_sums(nodes: list, queue: str) -> dict[str, float]:
    samples = [scrape(n.http) for n in nodes]
    return {name: summed(samples, f"shoalmq_queue_messages_{name}", queue=queue) for name in ("ready", "unacked")} | {
        name: summed(samples, f"shoalmq_queue_messages_{name}_total", queue=queue)
        for name in ("published", "delivered", "acked", "redelivered")}


def test_each_node_reports_its_own_and_the_nodes_add_up_to_the_cluster(
        cluster: Cluster, mqtt_client: Callable[..., MqttClient]) -> None:
    nodes = [cluster.add(n) for n in ("n1", "n2", "n3")]
    owners = cluster.wait_settled("orders", 6)
    publisher = mqtt_client(nodes[0].port)
    for i in range(120):
        publisher.publish(f"$queue/orders/k{i % 12}", f"m{i}".encode())
    wait_until(lambda: queue_sums(nodes, "orders")["ready"] == 120, 20, "120 ready across the nodes")
    samples = [scrape(n.http) for n in nodes]
    # Each node reports only the partitions it owns, and says so.
    for node, node_samples in zip(("n1", "n2", "n3"), samples, strict=True):
        led = {int(dict(labels)["partition"]) for (name, labels), value in node_samples.items()
               if name == "shoalmq_partition_leader" and value == 1}
        assert led == {p for p, owner in owners.items() if owner == node}
        assert metric(node_samples, "shoalmq_cluster_nodes") == 3
        assert metric(node_samples, "shoalmq_lease_valid") == 1
        assert metric(node_samples, "shoalmq_partitions_led") == len(led)
    forwarded = sum(v for (name, _), v in samples[0].items() if name == "shoalmq_forwarded_messages_total")
    assert forwarded == sum(1 for i in range(120) if owners[_partition(f"k{i % 12}", 6)] != "n1")

    consumer = MqttClient(nodes[2].port, client_id="c", manual_ack=True).connect()
    consumer.subscribe("$queue/orders")
    got = consumer.expect(120, timeout=30)
    for message in got[:50]:
        consumer.ack(message)
    wait_until(lambda: queue_sums(nodes, "orders")["acked"] == 50, 20, "50 acks counted")
    consumer.client.disconnect()  # the other 70 go back
    wait_until(lambda: queue_sums(nodes, "orders")["ready"] == 70, 20, "70 ready again")
    sums = queue_sums(nodes, "orders")
    assert sums == {"ready": 70, "unacked": 0, "published": 120, "delivered": 120, "acked": 50, "redelivered": 0}


def _partition(key: str, partitions: int) -> int:
    from shoalmq._native import partition_of

    return partition_of(key.encode(), partitions)


def test_json_api_answers_for_every_node_and_notices_one_that_dies(
        cluster: Cluster, mqtt_client: Callable[..., MqttClient]) -> None:
    a, b, c = (cluster.add(n) for n in ("n1", "n2", "n3"))
    cluster.wait_settled("orders", 6)
    wait_until(lambda: all(http(f"{n.http}/readyz")[0] == 200 for n in (a, b, c)), 20, "every node ready")
    publisher = mqtt_client(a.port)
    for i in range(30):
        publisher.publish(f"$queue/orders/k{i}", b"x")
    consumer = mqtt_client(b.port, client_id="reader", manual_ack=True)
    consumer.subscribe("$queue/orders")
    consumer.expect(30)

    info = get(f"{c.http}/v1/cluster/info")
    assert (info["mode"], info["nodes"], info["queues"], info["partitions"]) == ("cluster", 3, 1, 6)
    members = get(f"{c.http}/v1/cluster/members")["members"]
    assert [(m["node"], m["reachable"], m["ready"], m["self"]) for m in members] == [
        ("n1", True, True, False), ("n2", True, True, False), ("n3", True, True, True)]
    assert sum(m["leads"] for m in members) == 6
    partitions = get(f"{c.http}/v1/cluster/partitions")["partitions"]
    assert [(p["queue"], p["partition"]) for p in partitions] == [("orders", i) for i in range(6)]
    assert all(p["leader"] in ("n1", "n2", "n3") and p["epoch"] for p in partitions)
    orders = get(f"{a.http}/v1/queues/orders")
    assert (orders["unacked"], orders["ready"]) == (30, 0)
    assert [(x["client_id"], x["node"], x["unacked"]) for x in orders["consumers"]] == [("reader", "n2", 30)]
    assert {p["node"] for p in orders["partitions"] if p["writes"]} == {"n1", "n2", "n3"}
    listed = get(f"{b.http}/v1/queues")
    assert [(q["name"], q["unacked"], q["consumers"]) for q in listed["queues"]] == [("orders", 30, 1)]

    c.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    c.proc.wait()  # type: ignore[union-attr]
    wait_until(lambda: [m["node"] for m in get(f"{a.http}/v1/cluster/members")["members"]] == ["n1", "n2"], 20,
               "the dead node gone from the members")
    wait_until(lambda: http(f"{a.http}/readyz")[0] == 200, 20, "the survivors own every partition again")


def test_purge_redrive_and_drain_under_load_lose_nothing_acknowledged(
        etcd: EtcdProcess, tmp_path: Path, mqtt_client: Callable[..., MqttClient]) -> None:
    nodes = Cluster(etcd, tmp_path / "cluster", queues={"orders": 6})
    (tmp_path / "cluster" / "cluster.yaml").write_text(
        "queues:\n  orders: {partitions: 6}\n  jobs: {partitions: 3, max_deliveries: 1}\n")
    try:
        a, b, c = (nodes.add(n) for n in ("n1", "n2", "n3"))
        nodes.wait_settled("orders", 6)

        # Purge with publishers running: every acknowledged publish is purged or delivered, never both.
        load = LoadPublisher(a.port, "orders").start()
        load.wait_for(200)
        status, body, _ = http(f"{b.http}/v1/queues/orders/purge", method="POST")
        assert status == 200 and set(body["nodes"]) == {"n1", "n2", "n3"} and body["failed"] == {}
        purged = body["purged"]
        load.wait_for(200 + purged + 100)
        acked = load.stop()
        drain = Drain(c.port, "orders")
        wait_until(lambda: len(drain.got) >= len(acked) - purged, 30, "the rest delivered")
        got = drain.stop()
        assert len(set(got)) == len(got) == len(acked) - purged and set(got) <= set(acked)

        # Redrive on a cluster: dead letters on any node go back to their queue.
        publisher = mqtt_client(a.port)
        for i in range(9):
            publisher.publish(f"$queue/jobs/k{i}", f"j{i}".encode())
        flaky = MqttClient(b.port, client_id="flaky", manual_ack=True).connect()
        flaky.subscribe("$queue/jobs")
        flaky.expect(9)
        flaky.client.disconnect()
        wait_until(lambda: http(f"{a.http}/v1/queues/jobs.dlq")[1].get("ready") == 9, 20, "9 dead letters")
        status, body, _ = http(f"{c.http}/v1/queues/jobs.dlq/redrive", method="POST")
        assert status == 200 and body["moved"] == 9
        fixed = mqtt_client(c.port, client_id="fixed")
        fixed.subscribe("$queue/jobs")
        assert sorted(m.payload for m in fixed.expect(9)) == sorted(f"j{i}".encode() for i in range(9))

        # Drain n2 under load with the CLI: its partitions move, nothing acknowledged is lost.
        load = LoadPublisher(a.port, "orders").start()
        consumer = Drain(c.port, "orders")
        load.wait_for(100)
        done = subprocess.run([str(BIN_DIR / "broker"), "cluster", "drain", "n2", "--etcd", etcd.url, "--cluster",
                               "shoalmq", "--wait", "30"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "node n2 is drained: it leads no partition"
        wait_until(lambda: len(owners := nodes.owners("orders")) == 6 and set(owners.values()) == {"n1", "n3"}, 30,
                   "n1 and n3 owning every partition")
        load.wait_for(len(load.acked) + 100)
        acked = load.stop()
        consumer.wait_for(acked)
        consumer.stop()
        members = {m["node"]: m for m in get(f"{a.http}/v1/cluster/members")["members"]}
        assert members["n2"]["draining"] and members["n2"]["leads"] == 0
        assert metric(scrape(b.http), "shoalmq_node_draining") == 1
        # And back: n2 takes partitions again.
        undo = subprocess.run([str(BIN_DIR / "broker"), "cluster", "drain", "n2", "--undo", "--http",
                               f"127.0.0.1:{a.http_port}"], capture_output=True, text=True, timeout=60)
        assert undo.returncode == 0, undo.stderr
        nodes.wait_settled("orders", 6, nodes=["n1", "n2", "n3"])
        assert "node n2 is draining" in a.log and "node n2 is no longer draining" in a.log
    finally:
        nodes.stop()


def test_deleting_a_queue_of_a_cluster_removes_it_everywhere_and_a_node_away_drops_it_when_back(
        etcd: EtcdProcess, tmp_path: Path, mqtt_client: Callable[..., MqttClient]) -> None:
    nodes = Cluster(etcd, tmp_path / "cluster")
    (tmp_path / "cluster" / "cluster.yaml").write_text(
        "queues:\n  orders: {partitions: 6}\n  jobs: {partitions: 3, replication_factor: 3}\n")
    try:
        a, b, c = (nodes.add(n) for n in ("n1", "n2", "n3"))
        owners = nodes.wait_settled("orders", 6)
        wait_until(lambda: len(nodes.owners("jobs")) == 3, 30, "the replicated queue led")
        publisher = mqtt_client(a.port)
        for i in range(60):
            publisher.publish(f"$queue/orders/k{i}", f"o{i}".encode())
        for i in range(30):
            publisher.publish(f"$queue/jobs/k{i}", f"j{i}".encode())
        on_n3 = sum(1 for i in range(60) if owners[_partition(f"k{i}", 6)] == "n3")
        assert 0 < on_n3 < 60

        # Refused while a consumer is subscribed anywhere, and says where.
        consumer = MqttClient(b.port, client_id="reader", manual_ack=True).connect()
        consumer.subscribe("$queue/jobs")
        consumer.expect(30)  # (never acked: they go back when it leaves)
        status, body, _ = http(f"{c.http}/v1/queues/jobs", method="DELETE")
        assert status == 409 and "reader on n2" in body["error"], body
        consumer.client.disconnect()
        consumer.client.loop_stop()
        wait_until(lambda: get(f"{c.http}/v1/queues/jobs")["ready"] == 30, 20, "the consumer gone, its messages back")

        # n3 dies holding messages of orders (one replica): the others delete the queue without it.
        c.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        c.proc.wait()  # type: ignore[union-attr]
        wait_until(lambda: nodes.live() == {"n1", "n2"}, 20, "n3's lease expired")
        done = subprocess.run([str(BIN_DIR / "broker"), "queues", "delete", "orders", "--http",
                               f"127.0.0.1:{a.http_port}"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"deleted queue orders with {60 - on_n3} message(s) on 2 node(s)"
        assert "orders" not in nodes.keys("queues/") and not any(
            key.startswith("orders/") for key in nodes.keys("partitions/"))
        assert "orders" in nodes.keys("deleted/") and nodes.keys("deleting/") == {}
        assert nodes.keys("dropped/") == {}
        status = subprocess.run([str(BIN_DIR / "broker"), "cluster", "status", "--etcd", etcd.url, "--json"],
                                capture_output=True, text=True, timeout=30, check=True)
        assert json.loads(status.stdout)["down"] == {}  # (n3's copy of a deleted queue waits for nobody)
        for node in (a, b):
            assert http(f"{node.http}/v1/queues/orders")[0] == 404
            assert "queue orders deleted in the cluster" in node.log
        assert get(f"{b.http}/v1/queues/jobs")["ready"] == 30  # the other queue untouched

        # The replicated one: each message counted once, not once per copy; its records go too.
        status, body, _ = http(f"{b.http}/v1/queues/jobs", method="DELETE")
        assert status == 200 and body["messages"] == 30 and set(body["nodes"]) == {"n1", "n2"}, body
        assert not any(key.startswith("jobs/") for key in nodes.keys("partitions/"))
        assert http(f"{b.http}/v1/queues/jobs", method="DELETE")[0] == 404  # and again: nothing to delete

        # A publish creates the queue anew, empty; n3 comes back only then, and drops its copy of the deleted
        # incarnation (its data directory says which one it is) instead of bringing its messages into the new one.
        publisher.publish("$queue/orders/k1", b"new")
        assert "orders" in nodes.keys("queues/")
        c = nodes.add("n3")
        assert f"queue orders was deleted in the cluster while this node was away: {on_n3} message(s)" in c.log
        reader = mqtt_client(c.port, client_id="new-reader")
        reader.subscribe("$queue/orders")
        assert [m.payload for m in reader.expect(1, timeout=20)] == [b"new"]
        assert reader.no_message(1.0)
        for node in (a, b, c):
            assert "Traceback" not in node.log and " ERROR " not in node.log, node.log[-3000:]
    finally:
        nodes.stop()


class RetryingPublisher:
    """Publishes ``<seq>`` to keys of a queue from a thread, one at a time, and records when each was
    acknowledged. A publish the broker refuses (it closes the connection: MQTT 3.1.1 has no negative ack) or does
    not acknowledge within 3 s is given up (it may or may not be stored) and the next goes on a new connection."""

    def __init__(self, ports: list[int], queue: str) -> None:
        self.ports, self.queue = ports, queue
        self.acked: list[tuple[bytes, float]] = []
        self.given_up = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seq, client = 0, None
        while not self._stop.is_set():
            try:
                if client is None:
                    client = MqttClient(self.ports[seq % len(self.ports)], timeout=3).connect()
                payload = str(seq).encode()
                client.publish(f"$queue/{self.queue}/k{seq % 16}", payload)
                self.acked.append((payload, time.monotonic()))
            except (TimeoutError, ConnectionError, OSError):
                self.given_up += 1
                if client is not None:
                    client.client.disconnect()
                    client.client.loop_stop()
                client = None
            seq += 1
        if client is not None:
            client.client.disconnect()
            client.client.loop_stop()

    def stop(self) -> list[tuple[bytes, float]]:
        self._stop.set()
        self._thread.join(30)
        return self.acked


def test_a_queue_deleted_under_load_loses_nothing_acknowledged_after_the_delete_and_keeps_nothing_from_before(
        etcd: EtcdProcess, tmp_path: Path) -> None:
    nodes = Cluster(etcd, tmp_path / "cluster", args=["--replication-factor", "3"])
    (tmp_path / "cluster" / "cluster.yaml").write_text("queues:\n  jobs: {partitions: 6}\n")
    try:
        a, b, c = (nodes.add(n) for n in ("n1", "n2", "n3"))
        wait_until(lambda: len(nodes.owners("jobs")) == 6, 30, "the queue led")
        load = RetryingPublisher([a.port, c.port], "jobs")
        wait_until(lambda: len(load.acked) >= 200, 30, "200 acknowledged publishes")
        started = time.monotonic()
        status, body, _ = http(f"{b.http}/v1/queues/jobs", method="DELETE")
        done = time.monotonic()
        assert status == 200 and body["unconfirmed"] == [], body
        wait_until(lambda: sum(1 for _, t in load.acked if t > done) >= 200, 30, "200 more after the delete")
        acked = load.stop()
        before = {p for p, t in acked if t < started}
        after = {p for p, t in acked if t > done}
        drain = Drain(b.port, "jobs")
        wait_until(lambda: after <= set(drain.got), 30, "every publish acknowledged after the delete delivered")
        # (then everything stored was delivered and acked: the drain has it all)
        wait_until(lambda: (q := get(f"{a.http}/v1/queues/jobs"))["ready"] == q["unacked"] == 0, 30,
                   "the queue empty on every node")
        got = drain.stop()
        assert len(got) == len(set(got)), "a message delivered twice"
        assert not set(got) & before, "a message acknowledged before the delete survived it"
        assert all(int(p) <= len(acked) + load.given_up for p in got)
        for node in (a, b, c):  # (amqtt logs a refused client's reset connection with a traceback at DEBUG)
            assert " ERROR " not in node.log and "never retrieved" not in node.log, node.log[-3000:]
    finally:
        nodes.stop()


def test_nodes_serving_https_answer_for_each_other_and_the_cli_finds_them_through_etcd(
        etcd: EtcdProcess, tmp_path: Path) -> None:
    import ssl
    import urllib.request

    nodes = Cluster(etcd, tmp_path / "cluster", queues={"orders": 4}, tls=True)
    try:
        nodes.node_credentials("ca")  # (makes the cluster's CA; the HTTP certificates come from it too)
        authority = nodes._authority

        def https(node: str) -> list[str]:
            pair = authority.issue(node, server=True)
            return ["--http-certfile", str(pair.cert), "--http-keyfile", str(pair.key)]

        a = nodes.add("n1", args=https("n1"))
        nodes.add("n2", args=https("n2"))
        nodes.wait_settled("orders", 4)
        registered = nodes.keys("nodes/")
        assert {n: info["http"].split("://")[0] for n, info in registered.items()} == {"n1": "https", "n2": "https"}
        context = ssl.create_default_context(cafile=str(authority.path))

        def members() -> list[dict]:
            url = f"https://127.0.0.1:{a.http_port}/v1/cluster/members"
            with urllib.request.urlopen(url, timeout=10, context=context) as response:
                return json.loads(response.read())["members"]

        # n1 asks n2 over HTTPS (verified with the cluster's CA) for its part.
        wait_until(lambda: [(m["node"], m["reachable"]) for m in members()] == [("n1", True), ("n2", True)], 20,
                   "both nodes answering over HTTPS")
        done = subprocess.run([str(BIN_DIR / "broker"), "cluster", "drain", "n2", "--etcd", etcd.url, "--cafile",
                               str(authority.path), "--wait", "30"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "node n2 is drained: it leads no partition"
    finally:
        nodes.stop()
