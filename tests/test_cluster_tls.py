"""Mutual TLS between the nodes of a real cluster: it works end to end, a gRPC client without a certificate of the
cluster's CA is refused at the handshake, a node whose certificate names another node cannot pose as it, and a
node reachable beyond loopback refuses to join without TLS."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from shoalmq.cluster.assignment import HashPartitionAssigner
from shoalmq.proto import broker_pb2, broker_pb2_grpc
from tests.cluster_support import Cluster
from tests.support import BIN_DIR, EtcdProcess, MqttClient, free_port, wait_until
from tests.test_cluster import consume
from tests.tls_support import Authority

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(etcd: EtcdProcess, tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(etcd, tmp_path / "cluster", queues={"orders": 6}, args=["--replication-factor", "3"], tls=True)
    try:
        yield nodes
    finally:
        nodes.stop()


def round_trip(publisher: MqttClient, consumer: MqttClient, payloads: list[bytes]) -> None:
    """Publish ``payloads`` to keys of ``$queue/orders`` and check ``consumer`` (subscribed) gets each once."""
    for i, payload in enumerate(payloads):
        publisher.publish(f"$queue/orders/k{i % 13}", payload)
    assert sorted(consume(consumer, len(payloads))) == sorted(payloads)


def grpc_address(node) -> str:
    return node.args[node.args.index("--grpc-listen") + 1]


async def replicate_as(target: str, credentials: grpc.ChannelCredentials | None, claimed: str) -> str:
    """Open ``Replicate`` to ``target`` claiming to be node ``claimed``: how the call ended."""
    channel = (grpc.aio.secure_channel(target, credentials) if credentials is not None
               else grpc.aio.insecure_channel(target))
    try:
        call = broker_pb2_grpc.BrokerStub(channel).Replicate(iter([broker_pb2.ReplicaRequest(node=claimed)]))
        try:
            async for _ in call:
                pass
            return "ended"
        except grpc.aio.AioRpcError as exc:
            return f"failed: {exc.code().name}"
    finally:
        await channel.close()


def test_a_cluster_with_mutual_tls_works_end_to_end_and_refuses_strangers(
        cluster: Cluster, mqtt_client: Callable[..., MqttClient], tmp_path: Path) -> None:
    a, b, c = (cluster.add(n) for n in ("n1", "n2", "n3"))
    cluster.wait_settled("orders", 6)
    # (and the placement moves done: a leadership that moves while the round trip runs redelivers what was in
    # flight, a duplicate the exact check below would count)
    assigner = HashPartitionAssigner()
    wait_until(lambda: len(cluster.owners("orders")) == 6 and all(
        set(r.get("isr", ())) == {"n1", "n2", "n3"}
        and r.get("leader") == assigner.replicas("orders", int(k.rpartition("/")[2]), ["n1", "n2", "n3"], 3)[0]
        for k, r in cluster.keys("partitions/").items()), 30,
        "every partition in sync on the three nodes, led where the assigner places it")
    consumer = mqtt_client(c.port, manual_ack=True)
    consumer.subscribe("$queue/orders")
    # Forwarded, replicated and routed, all over TLS.
    round_trip(mqtt_client(a.port), consumer, [f"m{i}".encode() for i in range(200)])

    target = grpc_address(a)
    assert asyncio.run(replicate_as(target, None, "n2")) == "failed: UNAVAILABLE", "no TLS at all"
    rogue = Authority(tmp_path / "rogue", "Rogue CA")
    pair = rogue.issue("n2")
    foreign = grpc.ssl_channel_credentials(root_certificates=cluster._authority.path.read_bytes(),
                                           private_key=pair.key.read_bytes(), certificate_chain=pair.cert.read_bytes())
    assert asyncio.run(replicate_as(target, foreign, "n2")) == "failed: UNAVAILABLE", "a certificate of another CA"
    intruder = cluster._authority.issue("intruder")
    signed = grpc.ssl_channel_credentials(root_certificates=cluster._authority.path.read_bytes(),
                                          private_key=intruder.key.read_bytes(),
                                          certificate_chain=intruder.cert.read_bytes())
    mark = len(a.log)
    assert asyncio.run(replicate_as(target, signed, "n2")) == "ended"
    wait_until(lambda: "it says it is node n2, its certificate names intruder" in a.log[mark:], 10,
               "the impostor to be refused")
    assert "Handshake failed" not in b.log and "Handshake failed" not in c.log


def test_a_node_reachable_beyond_loopback_refuses_to_join_without_tls(etcd: EtcdProcess, tmp_path: Path) -> None:
    done = subprocess.run([str(BIN_DIR / "broker"), "--listen", f"127.0.0.1:{free_port()}", "--data-dir",
                           str(tmp_path / "data"), "--etcd", etcd.url, "--node-id", "n1",
                           "--grpc-listen", f"0.0.0.0:{free_port()}", "--http-listen", "127.0.0.1:0"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "refusing to join the cluster with gRPC on 0.0.0.0" in done.stderr
    assert "--cluster-certfile" in done.stderr


def test_a_cluster_on_an_etcd_with_tls_and_authentication(tmp_path: Path,
                                                           mqtt_client: Callable[..., MqttClient]) -> None:
    """etcd serves https only, wants a client certificate, and has authentication on: the nodes' user may read
    and write ``/shoalmq/`` only. Two nodes form the cluster and serve a queue; ``broker cluster status`` reads
    it with the same flags; a wrong password is refused with one clear line."""
    authority = Authority(tmp_path / "etcd-pki", "etcd CA")
    server, client = authority.issue("localhost", server=True), authority.issue("shoalmq-client", anonymous=True)
    etcd = EtcdProcess(tmp_path / "etcd", tls=(authority.path, server.cert, server.key))
    etcd.start()
    try:
        etcd.enable_auth({"shoalmq": ("s3cret", "/shoalmq/")})
        password = tmp_path / "etcd-password"
        password.write_text("s3cret\n")
        access = ["--etcd-cafile", str(authority.path), "--etcd-certfile", str(client.cert),
                  "--etcd-keyfile", str(client.key), "--etcd-user", "shoalmq"]
        cluster = Cluster(etcd, tmp_path / "cluster", queues={"orders": 4},
                          args=[*access, "--etcd-password-file", str(password)])
        try:
            a, b = cluster.add("n1"), cluster.add("n2")
            status_command = [str(BIN_DIR / "broker"), "cluster", "status", "--etcd", etcd.url, *access,
                              "--etcd-password-file", str(password), "--json"]

            def owned() -> bool:
                done = subprocess.run(status_command, capture_output=True, text=True, timeout=30)
                assert done.returncode == 0, done.stderr
                status = json.loads(done.stdout)
                owners = {name: entry["owner"] for name, entry in status["partitions"].items()
                          if name.startswith("orders/")}
                return set(status["nodes"]) == {"n1", "n2"} and len(owners) == 4 and set(owners.values()) == {
                    "n1", "n2"}
            wait_until(owned, 30, "both nodes and the queue's partitions in etcd")
            consumer = mqtt_client(b.port, manual_ack=True)
            consumer.subscribe("$queue/orders")
            publisher = mqtt_client(a.port)
            round_trip(publisher, consumer, [f"m{i}".encode() for i in range(40)])
            etcd.stop()  # its tokens die with it: the nodes must authenticate again
            etcd.start()
            mark = len(a.log)
            wait_until(owned, 30, "the cluster in etcd after its restart")
            wait_until(lambda: "authenticating again as shoalmq" in a.log[mark:], 30, "n1 to renew its token")
            round_trip(publisher, consumer, [f"after-{i}".encode() for i in range(20)])
            assert "etcd refused" not in a.log and "etcd refused" not in b.log
        finally:
            cluster.stop()
        wrong = tmp_path / "wrong"
        wrong.write_text("nope\n")
        done = subprocess.run([*status_command[:-3], "--etcd-password-file", str(wrong)], capture_output=True,
                              text=True, timeout=30)
        assert done.returncode != 0
        assert "etcd refused user 'shoalmq'" in done.stderr, done.stderr
    finally:
        etcd.stop()
        etcd.remove_data()
