"""The cluster's node-local logic with in-memory fakes: the queue manager's cluster hooks and proxy routing's
partitions. (The cluster itself is tested with real etcd and real broker processes in test_cluster.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from shoalmq.cluster.routing import RemotePartition, Router, RouteStream
from shoalmq.proto import broker_pb2
from shoalmq.queue.config import QueueConfig
from shoalmq.queue.manager import QueueManager
from shoalmq.queue.record import encode_record
from shoalmq.queue.storage import MemoryBackend, Store
from tests.fakes import FakeClient, FakeCluster, FakeConsumer, FakeMembership, clustered, settle

pytestmark = pytest.mark.timeout(30)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def test_publishes_to_partitions_owned_elsewhere_are_forwarded() -> None:
    async def body() -> None:
        cluster = FakeCluster({"orders": [0, 1]})
        cluster.definitions["orders"] = QueueConfig(partitions=4)
        manager = clustered(cluster)
        for i in range(40):
            await manager.publish(f"$queue/orders/k{i}", b"m%d" % i)
        queue = manager.queue("orders")
        local = sum(p.depth for p in queue.partitions)
        assert local + len(cluster.forwarded) == 40
        assert {p for _, p, _ in cluster.forwarded} == {2, 3}
        assert all(queue.partitions[p].depth == 0 for p in (2, 3))
        forwarded = {record for _, _, record in cluster.forwarded}
        expected = {encode_record(b"k%d" % i, b"m%d" % i) for i in range(40)}
        assert forwarded <= expected and len(forwarded) == len(cluster.forwarded)

    run(body())


def test_a_queue_new_to_the_cluster_waits_for_its_definition() -> None:
    async def body() -> None:
        cluster = FakeCluster({"fresh": [0, 1, 2, 3]})
        manager = clustered(cluster)
        consumer = FakeConsumer("c")
        manager.subscribe(consumer, "fresh")  # waits too
        first = manager.publish("$queue/fresh", b"one")
        second = manager.publish("$queue/fresh", b"two")
        await settle()
        assert not first.done() and not second.done() and list(cluster.defining) == ["fresh"]
        cluster.finish_definition("fresh")
        await asyncio.gather(first, second)
        await settle(lambda: len(consumer.received) == 2)
        assert sorted(d.payload for d in consumer.received) == [b"one", b"two"]

    run(body())


def test_dispatch_takes_only_from_owned_partitions_and_other_nodes_get_only_those() -> None:
    async def body() -> None:
        cluster = FakeCluster({"jobs": [0, 1, 2, 3]})
        cluster.definitions["jobs"] = QueueConfig(partitions=4)
        manager = clustered(cluster)
        for i in range(8):
            await manager.queue("jobs").publish("", b"%d" % i, partition=i % 4)
        cluster.owned["jobs"] = [0, 1]  # partitions 2 and 3 moved away
        manager.refresh_sources()
        local = FakeConsumer("local", window=100)
        manager.subscribe(local, "jobs")
        await settle(lambda: len(local.received) == 4)
        assert {d.partition.index for d in local.received} == {0, 1}

        class Proxy:  # another owner's partition, as proxy routing presents it
            pid, index, expired = -7, 2, 0

            def __init__(self) -> None:
                self.held = [RemoteMessageLike(100 + i) for i in range(3)]

            @property
            def ready(self) -> int:
                return len(self.held)

            def take(self, n: int) -> list[Any]:
                out, self.held = self.held[:n], self.held[n:]
                return out

            def nack(self, offsets: Any) -> int:
                return 0

            def ack(self, offsets: Any) -> int:
                return len(list(offsets))

        class RemoteMessageLike:
            def __init__(self, offset: int) -> None:
                self.offset, self.payload, self.deliveries, self.last_holder = offset, b"\x00\x00r", 1, None
                self.returned = False

        class Remote(FakeConsumer):
            remote = True

        proxy = Proxy()
        cluster.extra["jobs"] = [proxy]
        manager.refresh_sources()
        remote = Remote("remote", window=100)
        manager.subscribe(remote, "jobs")
        local.ack_all(manager)
        for i in range(4):
            await manager.queue("jobs").publish("", b"n%d" % i, partition=i % 2)
        await settle(lambda: len(local.received) + len(remote.received) == 4 + 4 + 3)
        # The proxy's messages went to the local consumer only; the remote one only got owned partitions.
        assert all(d.partition.index in (0, 1) for d in remote.received)
        assert sum(1 for d in local.received if d.partition is proxy) == 3

    run(body())


def test_remote_partition_holds_hands_back_and_acks_through_its_client() -> None:
    class Client:
        node = "n2"
        connected = True

        def __init__(self) -> None:
            self.settled: list[tuple[str, int, int, list[int], str]] = []

        def settle(self, queue: str, partition: int, epoch: int, offsets: list[int], how: str) -> None:
            self.settled.append((queue, partition, epoch, list(offsets), how))

        def taken(self, queue: str, count: int) -> None:
            pass

    client = Client()
    proxy = RemotePartition(client, "orders", 3, 42)  # type: ignore[arg-type]
    proxy.add([b"a", b"b", b"c", b"d"], [10, 11, 12, 13], bytes([1, 1, 2, 1]), bytes([0, 0, 0, 1]))
    assert (proxy.ready, proxy.depth) == (4, 4)
    taken = proxy.take(2)
    assert [m.offset for m in taken] == [10, 11] and proxy.ready == 2 and proxy.depth == 4
    assert not taken[0].returned
    # A local consumer went away holding 11: it goes back to the owner, which counts the attempt (it alone keeps
    # the count, and dead-letters), and may deliver it again here.
    assert proxy.nack([11]) == 1 and proxy.depth == 3
    assert client.settled.pop() == ("orders", 3, 42, [11], "nack")
    assert proxy.nack([12], counted=False) == 0  # not in flight: nothing to hand back
    again = proxy.take(1)
    assert [m.offset for m in again] == [12] and again[0].deliveries == 2
    assert proxy.ack([10, 12, 99]) == 2
    assert client.settled.pop() == ("orders", 3, 42, [10, 12], "ack")
    # Dropped (the partition moved): what is ready goes back uncounted, flagged as possibly seen.
    assert proxy.ready == 1
    proxy.drop(tell_owner=True)
    assert client.settled.pop() == ("orders", 3, 42, [13], "return") and proxy.depth == 0
    proxy.add([b"d"], [13], bytes([1]), bytes([1]))  # sent again by the owner: held once more
    message = proxy.take(1)[0]
    assert message.offset == 13 and message.returned


def test_deliveries_for_a_queue_without_consumers_here_go_straight_back() -> None:
    async def body() -> None:
        manager = clustered(FakeCluster())

        class View:
            node_id, nodes, owners = "n1", {}, {}

        router = Router(manager, View())  # type: ignore[arg-type]

        class Client:
            node = "n2"
            settled: list[Any] = []

            def settle(self, *args: Any, **kwargs: Any) -> None:
                self.settled.append((args, kwargs))

        client = Client()
        from shoalmq._native import segment
        message = broker_pb2.RouteDeliveries(queue="q", partition=1, epoch=5, records=segment.pack([b"\x00\x00x"]),
                                             offsets=[7], deliveries=bytes([1]))
        router.received(client, message)  # type: ignore[arg-type]
        assert client.settled == [(("q", 1, 5, [7], "return"), {})] and not router.proxies

    run(body())


def _direct_coordinator() -> tuple[QueueManager, Any]:
    """A queue manager on a real Coordinator (direct routing, no etcd), with the queue "q" of one partition."""
    from shoalmq.cluster.assignment import HashPartitionAssigner
    from shoalmq.cluster.coordinator import Coordinator

    manager = QueueManager(Store(MemoryBackend()), defaults=QueueConfig(partitions=1))
    coordinator = Coordinator(None, FakeMembership(), manager, HashPartitionAssigner(),  # type: ignore[arg-type]
                              routing="direct")
    manager.cluster = coordinator
    coordinator.view.definitions["q"] = QueueConfig(partitions=1)
    return manager, coordinator


def test_a_forward_refused_by_the_old_owner_is_stored_before_later_ones() -> None:
    """A batch sent to the old owner and refused after this node took the partition over goes first."""
    from shoalmq.cluster.view import Owner
    from shoalmq.cluster.transport import ForwardError, Status

    async def body() -> None:
        manager, coordinator = _direct_coordinator()
        view = coordinator.view
        view.owners[("q", 0)] = Owner("b", 5, 2)
        client = coordinator.forwarder._clients["b"] = FakeClient()  # type: ignore[assignment]
        first = manager.publish("$queue/q", b"m0")
        await settle(lambda: len(client.calls) == 1)
        view.mine[("q", 0)] = 9  # this node took the partition over meanwhile
        view.owners[("q", 0)] = Owner("a", 9, 1)
        second = manager.publish("$queue/q", b"m1")  # must not overtake m0
        await settle()
        client.calls[0][1].set_exception(ForwardError("not the owner", Status.NOT_OWNER))
        await asyncio.gather(first, second)
        part = manager.queue("q").partitions[0]
        assert [m.payload for m in part.take(10)] == [encode_record(b"", b"m0"), encode_record(b"", b"m1")]

    run(body())


def test_a_forward_on_its_way_to_an_owner_superseded_in_the_view_goes_to_the_new_owner_at_once() -> None:
    """An owner cut off from the cluster answers nothing until its stream breaks (seconds); once the view shows the
    partition at a newer epoch (a replicated partition's new leader), what was sent to the old one goes to the new
    one without waiting for that answer, and after it the publishes that waited."""
    from shoalmq.cluster.view import Owner

    async def body() -> None:
        manager, coordinator = _direct_coordinator()
        view = coordinator.view
        view.owners[("q", 0)] = Owner("b", 5, 0)
        old = coordinator.forwarder._clients["b"] = FakeClient()  # type: ignore[assignment]
        first = manager.publish("$queue/q", b"m0")
        await settle(lambda: len(old.calls) == 1)
        second = manager.publish("$queue/q", b"m1")  # waits behind m0
        await settle()
        assert len(old.calls) == 1
        new = coordinator.forwarder._clients["c"] = FakeClient()  # type: ignore[assignment]
        new.target = "c:1"
        coordinator.membership.nodes["c"] = {"grpc": "c:1"}
        view.owners[("q", 0)] = Owner("c", 6, 0)  # the old owner never answers
        coordinator.forwarder.owners_changed()
        await settle(lambda: len(new.calls) == 1)
        assert new.calls[0][0] == [encode_record(b"", b"m0")]
        new.calls[0][1].set_result(None)
        await settle(lambda: len(new.calls) == 2)  # m1 went after m0's answer, in order
        assert new.calls[1][0] == [encode_record(b"", b"m1")]
        new.calls[1][1].set_result(None)
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        old.calls[0][1].set_result(None)  # a late answer changes nothing
        await settle()

    run(body())


def test_a_route_stream_s_acks_count_while_the_partition_is_not_owned_for_a_moment() -> None:
    """After an etcd outage the owner's lease lapses and it owns nothing for a moment; acks that arrive then must
    still apply (the deliveries were made under the same epoch, and nobody took them back), or they would stay
    in flight on the stream for good. An ack for another epoch does not apply."""
    async def body() -> None:
        cluster = FakeCluster({"jobs": [0]})
        cluster.definitions["jobs"] = QueueConfig(partitions=1)
        manager = clustered(cluster, partitions=1)
        for i in range(3):
            await manager.queue("jobs").publish("", b"%d" % i, partition=0)

        class View:
            mine = {("jobs", 0): 7}

        stream = RouteStream(manager, View(), "n2")  # type: ignore[arg-type]
        stream.handle(broker_pb2.RouteRequest(queue="jobs", credit=10))
        sent = await asyncio.wait_for(stream.outgoing.get(), 5)
        assert sent is not None and list(sent.offsets) == [0, 1, 2] and sent.epoch == 7
        View.mine = {}  # the lease lapsed
        acks = broker_pb2.PartitionOffsets(partition=0, epoch=7, offsets=[0, 1])
        stale = broker_pb2.PartitionOffsets(partition=0, epoch=6, offsets=[2])
        stream.handle(broker_pb2.RouteRequest(queue="jobs", credit=-1, acks=[acks, stale]))
        part = manager.queue("jobs").partitions[0]
        assert part.depth == 1 and part.inflight == 1
        # The stream ends: what it held comes back at once, uncounted.
        stream.close()
        assert part.ready == 1
        assert part.take(1)[0].deliveries == 1
        manager.close()

    run(body())


def test_a_consumer_node_asks_each_owner_for_what_its_consumers_hold_and_take() -> None:
    """The credit is what the consumers hold of the owner's messages plus a prefetch sized by the rate they take
    them at (a slow consumer's node parks a few messages, not a window's worth, while consumers elsewhere wait)."""
    from shoalmq.cluster import routing

    async def body() -> None:
        manager = clustered(FakeCluster())

        class View:
            node_id, nodes, owners = "n1", {}, {}

        router = Router(manager, View())  # type: ignore[arg-type]
        router._credits["q"] = 128  # consumers of q here, windows of 128 together
        client = routing.RouteClient(router, "n2", "127.0.0.1:1")
        assert client.credit_for("q") == routing.PREFETCH_START, "before any rate is known"
        assert client.credit_for("other") == 0, "no consumer of it here"
        proxy = router.proxies[("n2", "q", 0)] = RemotePartition(client, "q", 0, 3)
        proxy.add([b"\x00\x00m"] * 40, list(range(40)), bytes([1] * 40))
        assert len(proxy.take(30)) == 30
        client.tick(1.0)  # 30 messages/s: a prefetch of 0.6, so the minimum
        assert client.credit_for("q") == 30 + routing.PREFETCH_MIN
        proxy.ack(range(30))
        assert client.credit_for("q") == routing.PREFETCH_MIN
        offset = 100
        for _ in range(10):  # a fast consumer: 2,000 messages per tick of 0.1 s, 20,000/s
            proxy.add([b"\x00\x00m"] * 2000, list(range(offset, offset + 2000)), bytes([1] * 2000))
            offset += 2000
            proxy.ack([m.offset for m in proxy.take(2000)])
            client.tick(0.1)
        # About 20 ms of its rate: 400 (the rate is smoothed: it is still rising).
        assert 300 < client.credit_for("q") <= 400, "a fast consumer's node covers the round trip"
        assert client.credit_for("q") <= routing.MAX_CREDIT
        await client.close()

    run(body())


def test_a_credit_sent_early_grows_to_what_consumers_that_ack_nothing_may_hold() -> None:
    """Consumers that hold messages without acking (their acks would carry credits) still get more, up to their
    windows: a credit sent while they held 81 (81 + 16) is raised by each tick as they hold more, not left below a
    quarter's change (seen: 97 of a 128-message window delivered, then nothing for 20 s)."""
    from shoalmq.cluster import routing

    async def body() -> None:
        manager = clustered(FakeCluster())

        class View:
            node_id, nodes, owners = "n1", {}, {}

        router = Router(manager, View())  # type: ignore[arg-type]
        router._credits["q"] = 128
        client = routing.RouteClient(router, "n2", "127.0.0.1:1")
        client.start()
        proxy = router.proxies[("n2", "q", 0)] = RemotePartition(client, "q", 0, 3)
        client._sent["q"] = 97  # (held 81 + the least prefetch)
        offset = 0
        for _ in range(4):  # the owner fills each credit; the consumers take all and ack nothing
            more = client._sent["q"] - offset
            proxy.add([b"\x00\x00m"] * more, list(range(offset, offset + more)), bytes([1] * more))
            offset += more
            proxy.take(more)
            client.tick(0.1)
        assert client._sent["q"] == offset + routing.PREFETCH_MIN >= 128 + routing.PREFETCH_MIN - 8
        await client.close()

    run(body())


def test_a_transferred_partition_keeps_its_offsets_delivery_counts_and_high_water_mark() -> None:
    """A handoff moves the same messages, not new ones: the new owner stores them at their offsets with their
    delivery counts, and continues its offsets after the old owner's; where its own log is already past them (it
    stored the partition before, under offsets of its own) it appends them after its own, in order."""
    from shoalmq.cluster.transport import RemoteRecords

    async def body() -> None:
        manager = clustered(FakeCluster({"q": [0]}), partitions=1)
        manager.cluster.definitions["q"] = QueueConfig(partitions=1)  # type: ignore[union-attr]
        records = [encode_record(b"k", b"m%d" % i) for i in range(4)]
        await manager.accept_transfer([RemoteRecords("q", 0, 7, records, [10, 11, 12, 15], bytes([2, 0, 1, 0]))])
        await manager.accept_transfer([RemoteRecords("q", 0, 7, [], (), b"", 40)])  # the transfer's last word
        part = manager.queue("q").partitions[0]
        assert part.next_offset == 40
        taken = part.take(10)
        assert [(m.offset, m.deliveries) for m in taken] == [(10, 3), (11, 1), (12, 2), (15, 1)]
        assert [m.payload for m in taken] == records
        part.ack([m.offset for m in taken])
        # Offsets this log is already past: stored after its own, in order, counts kept.
        await manager.accept_transfer([RemoteRecords("q", 0, 7, records[:2], [3, 4], bytes([1, 1]))])
        assert [(m.offset, m.deliveries) for m in part.take(10)] == [(40, 2), (41, 2)]
        part_before = (part.depth, part.next_offset)
        for bad in (RemoteRecords("q", 0, 7, records[:2], [9, 8], b""),  # not ascending
                    RemoteRecords("q", 0, 7, records[:1], [1 << 63], b""),  # past a signed 64-bit offset
                    RemoteRecords("q", 0, 7, [], (), b"", 1 << 63),
                    RemoteRecords("q", 0, 7, records[:1], [50], bytes([255]))):  # 255 means acked on disk
            with pytest.raises(Exception, match="malformed transfer"):
                manager.accept_transfer([RemoteRecords("q", 0, 7, records[:1], [60], b""), bad])
        assert (part.depth, part.next_offset) == part_before, "a refused batch stores nothing"
        manager.close()

    run(body())


def test_a_consumer_s_failure_handed_back_with_a_credit_of_zero_still_counts() -> None:
    """The consumer node's last consumer of a queue dies holding a message: its counted hand-back and the credit of
    0 that follows reach the owner in that order (the credit returns what is left, uncounted), so a poison message
    is still dead-lettered after max_deliveries."""
    async def body() -> None:
        cluster = FakeCluster({"jobs": [0]})
        cluster.definitions["jobs"] = QueueConfig(partitions=1, max_deliveries=1)
        cluster.definitions["jobs.dlq"] = QueueConfig(partitions=1, max_deliveries=0)
        manager = clustered(cluster, partitions=1)
        await manager.queue("jobs").publish("", b"poison", partition=0)

        class View:
            mine = {("jobs", 0): 7}

        stream = RouteStream(manager, View(), "n2")  # type: ignore[arg-type]
        stream.handle(broker_pb2.RouteRequest(queue="jobs", credit=10))
        sent = await asyncio.wait_for(stream.outgoing.get(), 5)
        assert sent is not None and list(sent.offsets) == [0]
        nack = broker_pb2.PartitionOffsets(partition=0, epoch=7, offsets=[0])
        stream.handle(broker_pb2.RouteRequest(queue="jobs", credit=0, nacks=[nack]))
        await settle(lambda: manager.queue("jobs").dead_lettered == 1)
        manager.close()

    run(body())
