"""The queue manager, on the in-memory store (the broker tests run it on LMDB with real MQTT clients)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Coroutine
from typing import Any

import pytest

from shoalmq.errors import ConfigError, PayloadTooLarge, QueueFull
from shoalmq.queue.config import QueueConfig, queue_configs_from_mapping
from shoalmq.queue.manager import BadQueueName, parse_queue_topic, queue_of_filter
from shoalmq.queue.record import split_record
from shoalmq.queue.storage import MemoryBackend
from tests.fakes import AckingConsumer, FakeConsumer, RemoteFakeConsumer, manager_on, settle


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


# -- topics ---------------------------------------------------------------------------------------------------------

def test_queue_topics_and_filters() -> None:
    assert parse_queue_topic("$queue/orders") == ("orders", "")
    assert parse_queue_topic("$queue/orders/eu/42") == ("orders", "eu/42")
    assert parse_queue_topic("$queue/orders.dlq") == ("orders.dlq", "")
    for bad in ("$queue/", "$queue//k", "$queue/bad name", "$queue/" + "x" * 129, "$queue/a+b", "orders"):
        with pytest.raises(BadQueueName):
            parse_queue_topic(bad)
    assert queue_of_filter("$queue/orders") == "orders"
    assert queue_of_filter("$queue/orders/#") == "orders"
    assert queue_of_filter("a/b/#") is None
    for bad in ("$queue/orders/+", "$queue/orders/eu", "$queue/#", "$queue/+"):
        with pytest.raises(BadQueueName):
            queue_of_filter(bad)


def test_queue_settings_from_the_config_file() -> None:
    configs = queue_configs_from_mapping({"orders": {"partitions": 4, "max_depth": 100, "ttl": 30},
                                          "jobs": None})
    assert configs["orders"] == QueueConfig(partitions=4, max_depth=100, ttl=30)
    assert configs["jobs"] == QueueConfig()
    for bad, message in [
        ({"bad name": {}}, "bad queue name"),
        ({"q": {"partitions": 0}}, "partitions must be a whole number from 1"),
        ({"q": {"partiton": 2}}, "unknown queue setting 'partiton'"),
        ({"q": {"ack_timeout": -1}}, "ack_timeout must be a positive number"),
        ({"q": {"max_deliveries": "5"}}, "max_deliveries must be a whole number"),
        ({"q": [1]}, "q: expected a mapping of queue settings"),
        ([1], "expected a mapping of queue names"),
    ]:
        with pytest.raises(ConfigError, match=message):
            queue_configs_from_mapping(bad)


# -- publish and consume ----------------------------------------------------------------------------------------

def test_publish_then_consume_with_topic_and_ack() -> None:
    async def body() -> None:
        manager = manager_on(MemoryBackend())
        consumer = FakeConsumer("c")
        manager.subscribe(consumer, "orders")
        await manager.publish("$queue/orders", b"plain")
        await manager.publish("$queue/orders/eu/42", b"keyed")
        await settle(lambda: len(consumer.received) == 2)
        got = sorted((d.topic, d.payload, d.dup) for d in consumer.received)
        assert got == [("$queue/orders", b"plain", False), ("$queue/orders/eu/42", b"keyed", False)]
        assert manager.queue("orders").depth == 2
        assert consumer.ack_all(manager) == 2
        assert manager.queue("orders").depth == 0
        manager.close()

    run(body())


def test_competing_consumers_share_messages_exactly_once_within_their_windows() -> None:
    async def body() -> None:
        manager = manager_on(MemoryBackend())
        consumers = [FakeConsumer(f"c{i}", window=5) for i in range(3)]
        for c in consumers:
            c.manager = manager
            manager.subscribe(c, "jobs")
        for i in range(300):
            manager.publish("$queue/jobs", str(i).encode())
        total = lambda: sum(len(c.received) for c in consumers)  # noqa: E731
        while total() < 300:
            await settle()
            for c in consumers:
                c.ack_all(manager)
        payloads = Counter(d.payload for c in consumers for d in c.received)
        assert len(payloads) == 300 and set(payloads.values()) == {1}
        assert all(c.received for c in consumers)
        assert all(c.max_held <= 5 for c in consumers)
        manager.close()

    run(body())


def test_new_messages_go_to_the_consumer_with_fewest_in_flight() -> None:
    async def body() -> None:
        manager = manager_on(MemoryBackend())
        busy, idle = FakeConsumer("busy", window=10), FakeConsumer("idle", window=10)
        manager.subscribe(busy, "q")
        for i in range(4):
            manager.publish("$queue/q", b"%d" % i)
        await settle(lambda: len(busy.received) == 4)
        manager.subscribe(idle, "q")
        for i in range(4):
            manager.publish("$queue/q", b"n%d" % i)
        await settle(lambda: len(idle.received) + len(busy.received) == 8)
        # idle had 0 in flight against busy's 4: it gets the new messages until they are even.
        assert len(idle.received) == 4 and len(busy.received) == 4
        manager.close()

    run(body())


def test_a_vanished_consumer_s_messages_are_redelivered_with_dup() -> None:
    async def body() -> None:
        manager = manager_on(MemoryBackend())
        first, second = FakeConsumer("first"), FakeConsumer("second", window=100)
        manager.subscribe(first, "q")
        for i in range(10):
            manager.publish("$queue/q", b"%d" % i)
        await settle(lambda: len(first.received) == 10)
        manager.subscribe(second, "q")
        assert manager.consumer_gone(first) == (10, 0)
        await settle(lambda: len(second.received) == 10)
        assert sorted(d.payload for d in second.received) == sorted(b"%d" % i for i in range(10))
        assert all(d.dup for d in second.received)
        assert first.ack_all(manager) == 0, "acks from a consumer that is gone count for nothing"
        manager.close()

    run(body())


def test_unsubscribe_requeues_and_stops_delivery() -> None:
    async def body() -> None:
        manager = manager_on(MemoryBackend())
        a, b = FakeConsumer("a"), FakeConsumer("b")
        manager.subscribe(a, "q")
        manager.publish("$queue/q", b"m")
        await settle(lambda: len(a.received) == 1)
        manager.unsubscribe(a, "q")
        manager.subscribe(b, "q")
        manager.publish("$queue/q", b"n")
        await settle(lambda: len(b.received) == 2)
        assert len(a.received) == 1
        assert {(d.payload, d.dup) for d in b.received} == {(b"m", True), (b"n", False)}
        manager.close()

    run(body())


def test_ack_timeout_hands_the_message_to_another_consumer() -> None:
    async def body() -> None:
        manager = manager_on(MemoryBackend(), defaults=QueueConfig(ack_timeout=0.1))
        slow = FakeConsumer("slow", window=1)
        manager.subscribe(slow, "q")
        manager.publish("$queue/q", b"m")
        await settle(lambda: len(slow.received) == 1)
        fast = FakeConsumer("fast")
        manager.subscribe(fast, "q")
        await settle(lambda: len(fast.received) >= 1)
        [redelivered] = fast.received
        assert redelivered.payload == b"m" and redelivered.dup
        assert [d.payload for d in slow.revoked] == [b"m"], "the consumer that timed out is told to forget it"
        assert len(slow.received) == 1, "handed to another consumer, not back to the one that timed out"
        manager.close()

    run(body())


def test_too_many_deliveries_move_the_message_to_the_dead_letter_queue() -> None:
    async def body() -> None:
        manager = manager_on(MemoryBackend(), defaults=QueueConfig(max_deliveries=2))
        manager.publish("$queue/q/k1", b"poison")
        for round_ in range(2):
            consumer = FakeConsumer(f"c{round_}")
            manager.subscribe(consumer, "q")
            await settle(lambda: len(consumer.received) == 1)
            manager.consumer_gone(consumer)
        late = FakeConsumer("late")
        manager.subscribe(late, "q")
        dlq_consumer = FakeConsumer("dlq")
        manager.subscribe(dlq_consumer, "q.dlq")
        await settle(lambda: len(dlq_consumer.received) == 1)
        [dead] = dlq_consumer.received
        assert (dead.topic, dead.payload, dead.dup) == ("$queue/q.dlq/k1", b"poison", False)
        await settle(lambda: manager.queue("q").depth == 0)
        assert late.received == [] and manager.queue("q").dead_lettered == 1
        manager.close()

    run(body())


def test_at_most_once_subscribers_remove_messages_as_they_are_sent() -> None:
    async def body() -> None:
        manager = manager_on(MemoryBackend())
        consumer = FakeConsumer("c")
        manager.subscribe(consumer, "q", at_most_once=True)
        for i in range(50):
            manager.publish("$queue/q", b"%d" % i)
        await settle(lambda: len(consumer.received) == 50)
        assert manager.queue("q").depth == 0 and manager.inflight(consumer) == 0
        manager.close()

    run(body())


def test_keys_pick_partitions_and_keep_their_order() -> None:
    async def body() -> None:
        manager = manager_on(MemoryBackend(), defaults=QueueConfig(partitions=4))
        for i in range(200):
            manager.publish(f"$queue/q/key{i % 5}", b"%d" % i)
        for i in range(200):
            manager.publish("$queue/q", b"u%d" % i)
        await manager.store.flush()
        queue = manager.queue("q")
        consumer = FakeConsumer("c", window=1000)
        manager.subscribe(consumer, "q")
        await settle(lambda: len(consumer.received) == 400)
        by_key: dict[str, list[int]] = {}
        for d in consumer.received:
            if d.topic != "$queue/q":
                by_key.setdefault(d.topic, []).append(int(d.payload))
        assert len(by_key) == 5 and all(v == sorted(v) for v in by_key.values())
        unkeyed_per_partition = Counter(d.partition.index for d in consumer.received if d.topic == "$queue/q")
        assert sorted(unkeyed_per_partition.values()) == [50, 50, 50, 50]
        assert len(queue.partitions) == 4
        manager.close()

    run(body())


def test_publish_many_puts_a_run_in_one_partition_and_the_next_run_in_the_next() -> None:
    async def body() -> None:
        manager = manager_on(MemoryBackend(), defaults=QueueConfig(partitions=3))
        for count in (5, 1, 7, 3):
            manager.publish_many("$queue/q", [b"u%d-%d" % (count, i) for i in range(count)])
            manager.publish_many("$queue/q/k", [b"k%d-%d" % (count, i) for i in range(count)])
        manager.publish("$queue/q", b"single")  # a publish is a run of one: it takes the next partition
        await manager.store.flush()
        queue = manager.queue("q")
        keyed = queue.partition_for("k")
        held = {p.index: [split_record(m.payload)[1] for m in p.take(100)] for p in queue.partitions}
        unkeyed = {i: [x for x in msgs if not x.startswith(b"k")] for i, msgs in held.items()}
        assert unkeyed == {0: [b"u5-%d" % i for i in range(5)] + [b"u3-%d" % i for i in range(3)],
                           1: [b"u1-0"] + [b"single"],
                           2: [b"u7-%d" % i for i in range(7)]}
        assert [x for x in held[keyed] if x.startswith(b"k")] == [
            b"k%d-%d" % (count, i) for count in (5, 1, 7, 3) for i in range(count)]
        manager.close()

    run(body())


def test_publish_many_stores_all_or_nothing() -> None:
    async def body() -> None:
        manager = manager_on(MemoryBackend(), queues={"q": QueueConfig(partitions=2, max_depth=2, max_payload=8)})
        queue = manager.queue("q")
        flush = manager.publish_many("$queue/q", [b"1", b"2"])  # partition 0
        with pytest.raises(QueueFull):  # partition 1 has room for two: none of the three is stored
            manager.publish_many("$queue/q", [b"3", b"4", b"5"])
        with pytest.raises(PayloadTooLarge):
            manager.publish_many("$queue/q/k", [b"6", b"123456789"])
        with pytest.raises(BadQueueName):
            manager.publish_many("$queue/bad name", [b"x"])
        assert queue.depth == 2
        await flush
        with pytest.raises(QueueFull):  # the turn goes on past a refused run: partition 0, full
            manager.publish_many("$queue/q", [b"7"])
        manager.publish_many("$queue/q", [b"8"])  # partition 1
        assert [p.depth for p in queue.partitions] == [2, 1]
        manager.close()

    run(body())


def test_dispatch_takes_from_the_ready_partitions_in_turn() -> None:
    async def body() -> None:
        manager = manager_on(MemoryBackend(), defaults=QueueConfig(partitions=16))
        queue = manager.queue("q")
        for i in range(40):
            queue.publish("", b"a%d" % i, partition=0)
            queue.publish("", b"b%d" % i, partition=9)
        await manager.store.flush()
        consumer = FakeConsumer("c", window=1)  # one message per dispatch: the partitions must alternate
        manager.subscribe(consumer, "q")
        for n in range(1, 81):
            await settle(lambda: len(consumer.received) == n)
            consumer.ack_all(manager)
        first = [d.partition.index for d in consumer.received[:20]]
        assert first == [0, 9] * 10 or first == [9, 0] * 10, first
        manager.close()

    run(body())


def test_checked_topics_are_remembered_only_while_short() -> None:
    async def body() -> None:
        manager = manager_on(MemoryBackend())
        manager.publish_many("$queue/q/short", [b"1"])
        manager.publish_many("$queue/q/" + "k" * 300, [b"2"])
        assert list(manager._topics) == ["$queue/q/short"]
        await manager.store.flush()
        manager.close()

    run(body())


def test_limits_refuse_publishes() -> None:
    async def body() -> None:
        manager = manager_on(MemoryBackend(), queues={"small": QueueConfig(partitions=1, max_depth=2,
                                                                            max_payload=8)})
        manager.publish("$queue/small", b"1")
        manager.publish("$queue/small", b"2")
        with pytest.raises(QueueFull):
            manager.publish("$queue/small", b"3")
        with pytest.raises(PayloadTooLarge):
            manager.publish("$queue/small", b"123456789")
        with pytest.raises(BadQueueName):
            manager.publish("$queue/bad name", b"x")
        manager.close()

    run(body())


def test_partition_count_is_fixed_once_a_queue_exists() -> None:
    async def body() -> None:
        backend = MemoryBackend()
        manager = manager_on(backend, queues={"q": QueueConfig(partitions=3)})
        manager.publish("$queue/auto", b"x")  # created on first use with the defaults (8)
        await manager.store.flush()
        manager.close()

        again = manager_on(backend)
        assert len(again.queue("q").partitions) == 3, "stored partition count kept when the config is silent"
        assert len(again.queue("auto").partitions) == 8
        again.close()
        with pytest.raises(ConfigError, match="'q' has 3 partitions in the data directory but 5"):
            manager_on(backend, queues={"q": QueueConfig(partitions=5)})

    run(body())


def test_a_full_disk_during_an_ack_timeout_stops_nothing() -> None:
    from tests.test_storage import FlakyBackend

    async def body() -> None:
        backend = FlakyBackend()
        manager = manager_on(backend, defaults=QueueConfig(ack_timeout=0.1, max_deliveries=1))
        slow = FakeConsumer("slow", window=1)
        manager.subscribe(slow, "q")
        manager.publish("$queue/q", b"m")
        await settle(lambda: len(slow.received) == 1)
        manager.consumer_gone(slow)  # not acked; its one delivery is used up
        backend.failing = True  # the dead-letter copy cannot be stored for now
        keeper = FakeConsumer("keeper")
        manager.subscribe(keeper, "q.dlq")
        await asyncio.sleep(0.3)  # several ack-timeout checks while the disk is full
        backend.failing = False
        await settle(lambda: len(keeper.received) == 1, timeout=5)
        assert keeper.received[0].payload == b"m"
        assert manager._ack_timer is not None and not manager._ack_timer.cancelled()
        manager.close()

    run(body())


# -- dispatch strategies and delivery counting ----------------------------------------------------------------


def test_ties_rotate_among_consumers_with_equally_few_in_flight() -> None:
    """Two consumers that ack at once, ten publishes one after another: each gets five (the first of equals
    does not always win)."""
    async def body() -> None:
        manager = manager_on(MemoryBackend())
        consumers = [AckingConsumer(f"c{i}") for i in range(2)]
        for c in consumers:
            c.manager = manager
            manager.subscribe(c, "orders")
        for i in range(10):
            manager.publish("$queue/orders", b"order %d" % i)
            await settle(lambda i=i: sum(len(c.received) for c in consumers) == i + 1)
            await settle(lambda: manager.queue("orders").depth == 0)
        assert [len(c.received) for c in consumers] == [5, 5]
        manager.close()

    run(body())


@pytest.mark.parametrize("strategy", ["least_inflight", "round_robin", "random"])
def test_dispatch_strategies_share_a_burst(strategy: str) -> None:
    async def body() -> None:
        manager = manager_on(MemoryBackend(), defaults=QueueConfig(dispatch=strategy, partitions=1))
        busy = FakeConsumer("busy", window=200)
        manager.subscribe(busy, "q")
        for i in range(6):
            manager.publish("$queue/q", b"early %d" % i)
        await settle(lambda: len(busy.received) == 6)
        idle = [FakeConsumer(f"idle{i}", window=200) for i in range(2)]
        for c in idle:
            manager.subscribe(c, "q")
        manager.publish_many("$queue/q", [b"m%d" % i for i in range(300)])
        everyone = [busy, *idle]
        await settle(lambda: sum(len(c.received) for c in everyone) == 306)
        counts = [len(c.received) for c in everyone]
        if strategy == "least_inflight":
            # busy held 6 unacked: the others catch up first, then all three share evenly.
            assert counts == [102, 102, 102]
        elif strategy == "round_robin":
            assert counts == [106, 100, 100]  # in turn, whatever each holds
        else:
            assert all(c >= 60 for c in counts[1:]) and sum(counts) == 306
        manager.close()

    run(body())


def test_an_unknown_dispatch_strategy_is_refused() -> None:
    with pytest.raises(ConfigError, match="dispatch must be one of"):
        QueueConfig(dispatch="fastest")


def test_the_broker_s_own_moves_are_not_delivery_attempts() -> None:
    """A message moved by three handoffs (take-backs) and two route streams that broke is not dead-lettered;
    one whose consumer dies holding it ``max_deliveries`` times is."""
    async def body() -> None:
        manager = manager_on(MemoryBackend(), defaults=QueueConfig(max_deliveries=2, partitions=1))
        manager.publish("$queue/q", b"healthy")
        for round_ in range(3):
            consumer = FakeConsumer(f"handoff{round_}")
            manager.subscribe(consumer, "q")
            await settle(lambda: len(consumer.received) == 1)
            assert manager.take_back("q", 0) == 1
            manager.consumer_gone(consumer)
        for round_ in range(2):
            stream = RemoteFakeConsumer(f"stream{round_}")
            manager.subscribe(stream, "q")
            await settle(lambda: len(stream.received) == 1)
            manager.consumer_gone(stream)
        survivor = FakeConsumer("survivor")
        manager.subscribe(survivor, "q")
        await settle(lambda: len(survivor.received) == 1)
        [delivery] = survivor.received
        assert delivery.payload == b"healthy" and delivery.dup, "it may have been seen: DUP"
        assert delivery.message.deliveries == 1, "only this delivery counts"
        assert survivor.ack_all(manager) == 1
        assert manager.queue("q").dead_lettered == 0
        manager.consumer_gone(survivor)

        manager.publish("$queue/q", b"poison")
        for round_ in range(2):
            dying = FakeConsumer(f"dying{round_}")
            manager.subscribe(dying, "q")
            await settle(lambda: len(dying.received) == 1)
            manager.consumer_gone(dying)
        await settle(lambda: manager.queue("q").dead_lettered == 1)
        assert manager.queue("q").depth == 0
        manager.close()

    run(body())


def test_a_consumer_of_two_queues_is_served_from_both_as_its_window_frees() -> None:
    """A window is shared by a consumer's queues: room freed by acking one queue's messages goes to either, in
    turn (it went only to the queue acked, so the other was stranded while the first had a backlog, and after)."""
    async def body() -> None:
        manager = manager_on(MemoryBackend())
        for name in ("a", "b"):
            manager.publish_many(f"$queue/{name}", [b"%s%d" % (name.encode(), i) for i in range(300)])
        consumer = FakeConsumer("c", window=16)
        consumer.manager = manager
        manager.subscribe(consumer, "a")
        manager.subscribe(consumer, "b")
        await settle(lambda: len(consumer.received) == 16)
        halfway = None
        for _ in range(200):  # 600 messages in windows of 16: 38 rounds
            if len(consumer.received) == 600:
                break
            consumer.ack_all(manager)
            await settle()
            if halfway is None and len(consumer.received) >= 300:
                halfway = Counter(d.queue.name for d in consumer.received)
        assert Counter(d.queue.name for d in consumer.received) == {"a": 300, "b": 300}
        assert halfway is not None and min(halfway.values()) >= 100, halfway
        manager.close()

    run(body())
