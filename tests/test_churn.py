"""Cluster churn: the seeded scenario of ``tests/churn.py`` (short in the suite, long as a soak), and minimal
reproductions of what it found, each a regression test.

- ``test_churn_*``: nodes SIGKILLed, SIGTERMed, joined and left, etcd SIGKILLed, under load, with moving publishers
  and persistent-session consumers that ack everything: every PUBACKed message must be consumed, nothing
  dead-lettered, nothing unpublished delivered. The seed comes from ``SHOALMQ_CHURN_SEED`` (default 7). The
  suite version takes ~45 s; the soak (``make soak``, ``-m soak`` or ``SHOALMQ_SOAK=1``; ``SHOALMQ_SOAK_DURATION``
  seconds of publishing, default 600) runs the issue's scenario at length.
- the other tests: one fault each, a few messages, deterministic. Each failed on c761da6 for the root cause its
  docstring names; one still open is marked ``xfail(strict=False)`` (drop the marker once its fix lands).
"""

from __future__ import annotations

import asyncio
import json
import os
import queue as queue_module
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.churn import ChurnCluster, ChurnConfig, run_churn
from tests.cluster_support import CLUSTER
from tests.support import EtcdProcess, MqttClient, free_port, wait_until

SEED = int(os.environ.get("SHOALMQ_CHURN_SEED", "7"))
SOAK_DURATION = float(os.environ.get("SHOALMQ_SOAK_DURATION", "600"))


def _check(result: Any) -> None:
    report = result.report()
    assert not result.errors, report
    assert not result.lost, f"{len(result.lost)} PUBACKed message(s) never consumed\n{report}"
    assert not result.dead_lettered, f"{len(result.dead_lettered)} message(s) dead-lettered\n{report}"
    assert not result.unpublished, f"{len(result.unpublished)} unpublished message(s) delivered\n{report}"


@pytest.mark.slow
@pytest.mark.timeout(115)
def test_churn_every_acknowledged_message_is_consumed_and_none_dead_lettered(tmp_path: Path) -> None:
    """~45 s: 3 nodes, 30 s of publishing at 300 msgs/s, a fault every 4 s (SIGKILL, SIGSTOP past the lease, SIGTERM,
    etcd SIGKILL, join and leave, in turn)."""
    cfg = ChurnConfig(seed=SEED, duration=30, rate=300, nodes=3, lease_ttl=3, quiet=5, drain_timeout=20,
                      kill_restart_after=6, join_stop_after=6, move_every=8,
                      faults=("kill", "pause", "term", "etcd", "join"))
    result = run_churn(cfg, tmp_path / "churn")
    print(result.report())
    _check(result)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_churn_replicated_every_acknowledged_message_is_consumed(tmp_path: Path) -> None:
    """~45 s: the same scenario on a queue with replication factor 3, and a node SIGKILLed with its data directory
    deleted among the faults (back on an empty disk): every PUBACKed message is consumed, none dead-lettered."""
    cfg = ChurnConfig(seed=SEED, duration=30, rate=300, nodes=3, lease_ttl=3, quiet=5, drain_timeout=30,
                      kill_restart_after=6, join_stop_after=6, move_every=8,
                      faults=("wipe", "kill", "pause", "term", "etcd", "join"),
                      queue_settings={"replication_factor": 3})
    result = run_churn(cfg, tmp_path / "churn")
    print(result.report())
    _check(result)


def _soak_selected(request: pytest.FixtureRequest) -> bool:
    return "soak" in (request.config.getoption("markexpr") or "") or os.environ.get("SHOALMQ_SOAK") == "1"


@pytest.mark.soak
@pytest.mark.timeout(SOAK_DURATION + 900)
def test_churn_soak(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The issue's scenario at full length: default settings (lease TTL 5 s), 500 msgs/s, 3 nodes."""
    if not _soak_selected(request):
        pytest.skip("soak: run with `make soak`, `-m soak` or SHOALMQ_SOAK=1")
    cfg = ChurnConfig(seed=SEED, duration=SOAK_DURATION, rate=500, nodes=3, lease_ttl=5, quiet=10,
                      drain_timeout=300)
    result = run_churn(cfg, tmp_path / "soak")
    print(result.report())
    _check(result)


# -- minimal reproductions -----------------------------------------------------------------------------------------

def key_for(partition: int, partitions: int, prefix: str = "k") -> str:
    """A key whose messages go to ``partition``."""
    from shoalmq._native import partition_of

    for i in range(100_000):
        key = f"{prefix}{i}"
        if partition_of(key.encode(), partitions) == partition:
            return key
    raise AssertionError(f"no key for partition {partition}")


def publish_all(port: int, topic_of: Any, payloads: list[bytes]) -> None:
    """Publish (QoS 1), up to 100 in flight, and wait until every one is PUBACKed."""
    client = MqttClient(port, timeout=30).connect()
    try:
        infos = [client.client.publish(topic_of(p), p, qos=1) for p in payloads]
        deadline = time.monotonic() + 30
        for info in infos:
            info.wait_for_publish(max(deadline - time.monotonic(), 0.1))
            assert info.is_published(), "a publish was not acknowledged within 30 s"
    finally:
        client.disconnect()


def consume(client: MqttClient, wanted: set[bytes], timeout: float) -> set[bytes]:
    """Receive and ack until every payload in ``wanted`` arrived or ``timeout`` passed; returns what arrived."""
    got: set[bytes] = set()
    deadline = time.monotonic() + timeout
    while not wanted <= got and time.monotonic() < deadline:
        try:
            message = client.messages.get(timeout=0.1)
        except queue_module.Empty:
            continue
        client.ack(message)
        got.add(message.payload)
    return got


@pytest.fixture
def two_nodes(etcd: EtcdProcess, tmp_path: Path) -> Iterator[ChurnCluster]:
    """n1 and n2 (lease TTL 3 s) on one etcd, queue ``jobs`` with 2 partitions; nodes keep their gRPC port."""
    nodes = ChurnCluster(etcd, tmp_path / "cluster", queues={"jobs": 2}, lease_ttl=3)
    try:
        for node in ("n1", "n2"):
            nodes.start_node(node, time.monotonic() + 30)
        nodes.wait_settled("jobs", 2)
        yield nodes
    finally:
        nodes.stop()


@pytest.mark.timeout(90)
def test_messages_on_a_node_restarted_after_sigkill_all_reach_a_consumer_on_another_node(
        two_nodes: ChurnCluster) -> None:
    """Found at c761da6 (fixed by 550cbe4): a restarting node serves route streams before its coordinator starts,
    so it delivered partitions it did not own (``Queue.owned`` defaults to every partition) at epoch 0; the
    consumer node pruned that proxy without telling the owner, and the owner ignored acks at epoch 0: those
    deliveries held the route stream's window for good (172 of 300 stranded).

    300 messages wait on n1 (no consumer); n1 is SIGKILLed; a consumer subscribes on n2 (whose route stream
    to n1 retries while n1's registration lives); n1 restarts with the same data and gRPC address. Every message
    must reach the consumer."""
    owners = two_nodes.owners("jobs")
    part = next(p for p, owner in owners.items() if owner == "n1")
    key = key_for(part, 2)
    sent = [f"{key}:{i}".encode() for i in range(300)]
    publish_all(two_nodes.nodes["n1"].port, lambda p: f"$queue/jobs/{key}", sent)
    two_nodes.nodes["n1"].kill()
    consumer = MqttClient(two_nodes.nodes["n2"].port, client_id="c1", clean_session=False, manual_ack=True).connect()
    try:
        consumer.subscribe("$queue/jobs")
        two_nodes.start_node("n1", time.monotonic() + 30)  # waits for its old registration to expire (~3 s)
        got = consume(consumer, set(sent), timeout=30)
    finally:
        consumer.disconnect()
    missing = set(sent) - got
    assert not missing, f"{len(missing)} of {len(sent)} messages never delivered (stranded on n1)"


@pytest.mark.timeout(90)
def test_failed_handoffs_do_not_count_as_deliveries(two_nodes: ChurnCluster, etcd: EtcdProcess) -> None:
    """Found at c761da6 (fixed by 550cbe4): ``Coordinator._move`` took the messages it handed over with
    ``PartitionLog.take``, which counts a delivery, and a failed handoff nacked them with the count kept, retried
    at every reconcile with no backoff: a few failed attempts dead-lettered messages never delivered (50 of 50).

    A node n3 appears in the membership but its gRPC port is closed (a node that just died, or a restarted one
    still in gRPC reconnect backoff): every handoff to it fails, and is retried, for 8 s. Then it goes away and a
    consumer takes everything: no message may be dead-lettered, every one must be consumed."""
    keys = [key_for(p, 2) for p in range(2)]
    sent = [f"{keys[i % 2]}:{i}".encode() for i in range(100)]
    publish_all(two_nodes.nodes["n1"].port, lambda p: "$queue/jobs/" + p.decode().split(":")[0], sent)
    client = etcd.client()
    lease = client.lease(ttl=30)
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    info = {"node_id": "n3", "mqtt": f"127.0.0.1:{free_port()}", "grpc": f"127.0.0.1:{dead_port}", "version": "0",
            "started": int(time.time())}
    client.put(f"/{CLUSTER}/nodes/n3", json.dumps(info), lease=lease)
    try:
        wait_until(lambda: any("to n3" in node.log for node in two_nodes.nodes.values()), 20,
                   "a handoff to n3 to be attempted")
        time.sleep(8)  # the fault: n3 unreachable for 8 s (a fixed fault window, not a readiness wait)
    finally:
        lease.revoke()
    two_nodes.wait_settled("jobs", 2, nodes=["n1", "n2"])
    consumer = MqttClient(two_nodes.nodes["n1"].port, manual_ack=True).connect()
    dlq = MqttClient(two_nodes.nodes["n2"].port, manual_ack=True).connect()
    try:
        consumer.subscribe("$queue/jobs")
        dlq.subscribe("$queue/jobs.dlq")
        got = consume(consumer, set(sent), timeout=20)
        dead = consume(dlq, set(sent) - got, timeout=3)
    finally:
        consumer.disconnect()
        dlq.disconnect()
    assert not dead, f"{len(dead)} message(s) dead-lettered although none was ever delivered"
    assert set(sent) <= got


@pytest.mark.timeout(90)
def test_acks_sent_while_the_owner_had_lost_its_lease_are_not_lost(two_nodes: ChurnCluster,
                                                                   etcd: EtcdProcess) -> None:
    """Found at c761da6 (fixed by 550cbe4): ``Coordinator._lease_lost`` cleared ``mine`` without taking deliveries
    back and ``RemoteConsumer.settle`` dropped acks whose epoch was not in ``mine``: the acks were lost and their
    deliveries held the route stream's window (50 of 178 never delivered).

    A consumer on n2 holds 128 unacked messages of a partition n1 owns (the route stream's whole credit) and 50
    more wait on n1. etcd is SIGKILLed until n1 gives its lease up; the consumer acks everything meanwhile; etcd
    comes back (n1 keeps its lease, owners and epochs). The 50 must then be delivered."""
    owners = two_nodes.owners("jobs")
    part = next(p for p, owner in owners.items() if owner == "n1")
    key = key_for(part, 2)
    sent = [f"{key}:{i}".encode() for i in range(178)]
    consumer = MqttClient(two_nodes.nodes["n2"].port, manual_ack=True, timeout=30).connect()
    try:
        consumer.subscribe("$queue/jobs")
        publish_all(two_nodes.nodes["n1"].port, lambda p: f"$queue/jobs/{key}", sent)
        held = consumer.expect(128, timeout=20)
        n1 = two_nodes.nodes["n1"]
        mark = len(n1.log)
        etcd.kill()
        try:
            wait_until(lambda: "lease lost" in n1.log[mark:], 30, "n1 to give its lease up")
            for message in held:
                consumer.ack(message)
            time.sleep(0.5)  # let the acks reach n1 while its lease is lost (a deliberate wait)
        finally:
            etcd.start()
        wait_until(lambda: "still alive after all" in n1.log[mark:], 30, "n1 to take its lease up again")
        got = {m.payload for m in held} | consume(consumer, set(sent), timeout=20)
    finally:
        consumer.disconnect()
    missing = set(sent) - got
    assert not missing, f"{len(missing)} message(s) never delivered after the etcd outage"


@pytest.mark.timeout(90)
def test_a_node_sigtermed_during_a_short_etcd_outage_hands_its_messages_over(two_nodes: ChurnCluster,
                                                                             etcd: EtcdProcess) -> None:
    """n2 holds 100 messages (no consumer); etcd is SIGKILLed, n2 is SIGTERMed, etcd is back 3 s later. n2 never
    comes back: a consumer on n1 must still get every message (a graceful stop hands everything over)."""
    owners = two_nodes.owners("jobs")
    part = next(p for p, owner in owners.items() if owner == "n2")
    key = key_for(part, 2)
    sent = [f"{key}:{i}".encode() for i in range(100)]
    publish_all(two_nodes.nodes["n2"].port, lambda p: f"$queue/jobs/{key}", sent)
    etcd.kill()
    killed = time.monotonic()
    n2 = two_nodes.nodes["n2"]
    assert n2.proc is not None
    n2.proc.send_signal(signal.SIGTERM)
    time.sleep(max(killed + 3 - time.monotonic(), 0))  # the outage lasts 3 s (the fault's length)
    etcd.start()
    n2.stop(timeout=60)
    two_nodes.wait_settled("jobs", 2, nodes=["n1"])
    consumer = MqttClient(two_nodes.nodes["n1"].port, manual_ack=True).connect()
    try:
        consumer.subscribe("$queue/jobs")
        got = consume(consumer, set(sent), timeout=20)
    finally:
        consumer.disconnect()
    missing = set(sent) - got
    assert not missing, f"{len(missing)} of {len(sent)} messages left on the stopped node's disk"


@pytest.mark.timeout(60)
def test_a_new_channel_reaches_a_restarted_peer_at_once() -> None:
    """Found at c761da6 (fixed by 550cbe4: a subchannel pool per channel): every channel shared grpc's global
    subchannel pool, so while one channel to a peer was in reconnect backoff a new one to the restarted peer
    failed at once ('failed to connect to all addresses ... Connection refused') for seconds.

    A channel kept open to a dead peer (as the route and forward clients are) goes into reconnect backoff; once
    the peer is back on its address, a handoff's new EnqueueClient must get through at once."""
    import grpc

    from shoalmq.cluster import transport
    from shoalmq.cluster.transport import EnqueueClient, start_server

    def open_channel(target: str) -> Any:
        """A channel as the node makes them (``transport.open_channel`` where there is one)."""
        factory = getattr(transport, "open_channel", None)
        if factory is not None:
            return factory(target)
        return grpc.aio.insecure_channel(target, options=transport.GRPC_OPTIONS)

    class Store:
        def enqueue_remote(self, batches: Any) -> asyncio.Future[None]:
            future = asyncio.get_running_loop().create_future()
            future.set_result(None)
            return future

        accept_transfer = enqueue_remote

    async def scenario() -> float | None:
        port = free_port()
        target = f"127.0.0.1:{port}"
        server, _ = await start_server(Store(), target)
        await server.stop(None)
        lingering = open_channel(target)
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:  # the peer is down: the lingering channel retries (backoff grows)
            try:
                await asyncio.wait_for(lingering.channel_ready(), 0.2)
            except (TimeoutError, grpc.aio.AioRpcError):
                pass
        server, _ = await start_server(Store(), target)
        try:
            started = time.monotonic()
            while time.monotonic() - started < 5:
                client = EnqueueClient(target)
                try:
                    await asyncio.wait_for(client.enqueue_records("q", 0, 1, [b"\x00\x00x"]), 2)
                    return time.monotonic() - started
                except Exception:  # noqa: BLE001 - any failure to get through counts as unreachable
                    await asyncio.sleep(0.05)
                finally:
                    await client.close()
            return None
        finally:
            await lingering.close()
            await server.stop(None)

    took = asyncio.run(scenario())
    assert took is not None and took < 0.5, f"the restarted peer was unreachable for {took or '>5'} s"


@pytest.mark.timeout(30)
def test_dispatch_to_consumers_with_different_windows_counts_no_phantom_delivery() -> None:
    """Found at c761da6 (fixed by 550cbe4): ``QueueManager._dispatch_to`` gave each message to the consumer with the
    fewest in flight, not one with room: with windows of different sizes (route streams' credits) it picked a
    full one, nacked the message after ``take`` had counted a delivery, and dead-lettered it soon (256 of 384).

    Two route streams with credits 128 and 256 (two consumer nodes, one with two consumers) take from one owner;
    with max_deliveries 1, a message first delivered must not be dead-lettered or marked DUP."""
    from shoalmq.queue.manager import QueueManager
    from shoalmq.queue.storage import MemoryBackend, Store

    try:
        from shoalmq.queue.config import QueueConfig
    except ImportError:
        from shoalmq.queue.manager import QueueConfig  # type: ignore[attr-defined,no-redef]

    class Stream:
        remote = True

        def __init__(self, window: int) -> None:
            self.window = window
            self.got: list[Any] = []

        def deliver(self, deliveries: list[Any]) -> None:
            self.got += deliveries

        def revoke(self, deliveries: list[Any]) -> None:
            pass

    async def scenario() -> tuple[list[int], int]:
        manager = QueueManager(Store(MemoryBackend()), {"jobs": QueueConfig(partitions=1, max_deliveries=1)})
        for i in range(600):
            manager.publish("$queue/jobs", f"m{i}".encode())
        await manager.store.flush()
        small, large = Stream(128), Stream(256)
        manager.subscribe(small, "jobs")
        manager.subscribe(large, "jobs")
        for _ in range(50):
            await asyncio.sleep(0)
        counts = [d.message.deliveries for d in small.got + large.got]
        return counts, manager.queue("jobs").dead_lettered + manager.queue("jobs.dlq").depth

    counts, dead = asyncio.run(scenario())
    assert len(counts) == 384, f"{len(counts)} delivered, want 384 (both windows full)"
    assert dead == 0, f"{dead} message(s) dead-lettered on their first delivery"
    assert max(counts) == 1, f"first deliveries counted up to {max(counts)} times"
