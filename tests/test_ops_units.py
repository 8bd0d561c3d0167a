"""Unit tests of what operations build on: the counters, purge, redrive and delete in the queue manager on the
in-memory store, the store's ``drop_queue``, the histogram, the log's repeat limiter and progress lines, and the data
directory's lock."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from shoalmq.datadir import DataDir
from shoalmq.errors import StartupError
from shoalmq.logs import Progress, RepeatLimiter
from shoalmq.queue.config import QueueConfig
from shoalmq.queue.manager import QueueError, QueueInUse, UnknownQueue
from shoalmq.queue.storage import MemoryBackend, Store
from shoalmq.stats import Histogram
from tests.fakes import FakeConsumer, RemoteFakeConsumer, manager_on, settle


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_counts_of_a_queue_follow_publishes_deliveries_acks_and_redeliveries() -> None:
    async def scenario() -> None:
        manager = manager_on(MemoryBackend(), queues={"q": QueueConfig(partitions=2)})
        for i in range(10):
            await manager.publish(f"$queue/q/k{i}", b"m")
        queue = manager.queue("q")
        assert sum(p.published for p in queue.partitions) == 10
        first = FakeConsumer("first", window=4)
        manager.subscribe(first, "q")
        await settle(lambda: len(first.received) == 4)
        manager.ack(first.received[:3])
        await settle(lambda: len(first.received) == 7)
        assert (queue.delivered, queue.acked, queue.redelivered) == (7, 3, 0)
        manager.consumer_gone(first)  # 4 held: back, counted as attempts
        second = FakeConsumer("second", window=32)
        manager.subscribe(second, "q")
        await settle(lambda: len(second.received) == 7)
        manager.ack(second.received)
        assert (queue.delivered, queue.acked, queue.redelivered) == (14, 10, 4)
        manager.consumer_gone(second)
        # Another node's route stream: its node counts what its consumers get and ack; this node does not.
        for i in range(3):
            await manager.publish("$queue/q", b"r")
        stream = RemoteFakeConsumer("stream")
        manager.subscribe(stream, "q")
        await settle(lambda: len(stream.received) == 3)
        manager.ack(stream.received)
        assert (queue.delivered, queue.acked) == (14, 10)
        assert queue.depth == 0

    run(scenario())


def test_purge_removes_ready_messages_and_leaves_those_in_flight() -> None:
    async def scenario() -> None:
        backend = MemoryBackend()
        manager = manager_on(backend, queues={"q": QueueConfig(partitions=3)})
        for i in range(5000):
            manager.publish(f"$queue/q/k{i % 7}", b"m")
        await manager.flush()
        holder = FakeConsumer("holder", window=10)
        manager.subscribe(holder, "q")
        await settle(lambda: len(holder.received) == 10)
        assert await manager.purge("q") == 4990
        queue = manager.queue("q")
        assert (queue.depth, queue.purged, sum(p.inflight for p in queue.partitions)) == (10, 4990, 10)
        assert await manager.purge("q") == 0
        with pytest.raises(UnknownQueue):
            await manager.purge("nope")
        # The purge is durable: a store reopened on the same backend holds only the 10 in flight.
        reopened = manager_on(backend, queues={"q": QueueConfig(partitions=3)})
        assert reopened.queue("q").depth == 10

    run(scenario())


def test_redrive_moves_dead_letters_back_on_their_topic_in_order() -> None:
    async def scenario() -> None:
        manager = manager_on(MemoryBackend(), queues={"q": QueueConfig(partitions=2, max_deliveries=1)})
        for i in range(6):
            await manager.publish(f"$queue/q/k{i % 2}", f"{i}".encode())
        flaky = FakeConsumer("flaky", window=32)
        manager.subscribe(flaky, "q")
        await settle(lambda: len(flaky.received) == 6)
        manager.consumer_gone(flaky)
        await settle(lambda: "q.dlq" in {q.name for q in manager.queues()} and manager.queue("q.dlq").depth == 6)
        with pytest.raises(QueueError, match="not a dead-letter queue"):
            await manager.redrive("q")
        assert await manager.redrive("q.dlq", limit=2) == 2
        assert await manager.redrive("q.dlq") == 4
        assert manager.queue("q.dlq").depth == 0 and manager.queue("q.dlq").redriven == 6
        fixed = FakeConsumer("fixed", window=32)
        manager.subscribe(fixed, "q")
        await settle(lambda: len(fixed.received) == 6)
        by_key: dict[str, list[bytes]] = {}
        for d in fixed.received:
            by_key.setdefault(d.topic, []).append(d.payload)
        assert by_key == {"$queue/q/k0": [b"0", b"2", b"4"], "$queue/q/k1": [b"1", b"3", b"5"]}
        assert all(d.message.deliveries == 1 for d in fixed.received)  # a new message: its count starts over

    run(scenario())


def test_delete_refuses_a_queue_with_consumers_then_forgets_it_for_good() -> None:
    async def scenario() -> None:
        backend = MemoryBackend()
        manager = manager_on(backend)
        for _ in range(3):
            await manager.publish("$queue/temp", b"t")
        await manager.publish("$queue/kept", b"k")
        consumer = FakeConsumer("c")
        manager.subscribe(consumer, "temp")
        await settle(lambda: len(consumer.received) == 3)
        with pytest.raises(QueueInUse, match="1 consumer"):
            await manager.delete("temp")
        manager.consumer_gone(consumer)
        assert await manager.delete("temp") == 3
        assert {q.name for q in manager.queues()} == {"kept"}
        with pytest.raises(UnknownQueue):
            await manager.delete("temp")
        reopened = Store(backend)
        assert reopened.queue_names() == ["kept"] and ("temp", 0) not in reopened.known_partitions()
        # A later publish creates it afresh, empty.
        again = manager_on(backend)
        await again.publish("$queue/temp", b"new")
        assert again.queue("temp").depth == 1

    run(scenario())


def test_a_refused_publish_creates_no_queue_and_a_dlq_needs_its_queue() -> None:
    async def scenario() -> None:
        manager = manager_on(MemoryBackend(), defaults=QueueConfig(max_payload=10))
        with pytest.raises(QueueError):
            manager.publish("$queue/big", b"x" * 11)
        assert manager.queues() == []
        assert manager.creation_refused("nothing.dlq") is not None
        await manager.publish("$queue/real", b"x")
        assert manager.creation_refused("real.dlq") is None

    run(scenario())


def test_histogram_buckets_are_cumulative_with_inf_last() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 2.0, 3.0):
        histogram.observe(value)
    assert histogram.buckets() == [("0.1", 2), ("1.0", 3), ("+Inf", 5)]
    assert histogram.count == 5 and histogram.sum == pytest.approx(5.65)


def test_repeat_limiter_logs_once_per_key_and_interval_with_a_count(caplog: pytest.LogCaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("shoalmq.logs.time.monotonic", lambda: now[0])
    limiter = RepeatLimiter(logging.getLogger("test.repeat"), interval=60)
    with caplog.at_level(logging.WARNING, logger="test.repeat"):
        assert limiter.log(("c1", "1.2.3.4"), "refused %s", "c1")
        for _ in range(4):
            assert not limiter.log(("c1", "1.2.3.4"), "refused %s", "c1")
        assert limiter.log(("c2", "1.2.3.4"), "refused %s", "c2")  # another client: its own line
        now[0] += 61
        assert limiter.log(("c1", "1.2.3.4"), "refused %s", "c1")
    assert [r.getMessage() for r in caplog.records] == [
        "refused c1", "refused c2", "refused c1 (and 4 more like it in the last 61 s)"]


def test_progress_logs_nothing_for_a_short_task_then_at_most_once_per_interval(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("shoalmq.logs.time.monotonic", lambda: now[0])
    log = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        progress = Progress(log, "recovering", 1000, "partitions", interval=3.0)
        progress.step(10)
        now[0] += 2.9
        progress.step(20)
        assert caplog.messages == [] and not progress.logged
        now[0] += 0.2
        progress.step(500, ", 7 messages")
        now[0] += 1.0
        progress.step(600)
    assert caplog.messages == ["recovering: 500 of 1,000 partitions (50%) after 3.1 s, 7 messages"]
    assert progress.logged


def test_a_data_dir_is_locked_once_and_its_lock_file_goes_with_a_clean_close(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "data"
    first = DataDir.open(path)
    with pytest.raises(StartupError, match="is in use by process"):
        DataDir.open(path)
    # A broker that opened the file just before the holder removed it, and locks it after: it must not take a lock
    # on a file that is no longer the directory's (a third broker would lock the new one: two holders).
    real_lock = DataDir._lock
    calls = []

    def lock_as_the_holder_leaves(cls: type, where: Path) -> int:
        fd = real_lock(where) if calls else os.open(where / "LOCK", os.O_RDWR)
        if not calls:
            first.close()
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (the old, now nameless, file)
        calls.append(fd)
        return fd

    monkeypatch.setattr(DataDir, "_lock", classmethod(lock_as_the_holder_leaves))
    second = DataDir.open(path)
    assert len(calls) == 2  # it noticed and locked the file at the path
    assert os.fstat(second._lock_fd).st_ino == os.stat(path / "LOCK").st_ino
    monkeypatch.setattr(DataDir, "_lock", real_lock)
    with pytest.raises(StartupError, match="is in use"):
        DataDir.open(path)
    second.close()
    assert not (path / "LOCK").exists()
    DataDir.open(path).close()


def test_drop_cuts_a_queue_with_messages_in_flight_and_its_consumer_gets_it_again_if_it_comes_back() -> None:
    """What a node does when the cluster deleted a queue: everything goes at once, acks of what was in flight count
    for nothing, and a consumer still subscribed here is given the queue if it is created anew."""
    async def scenario() -> None:
        backend = MemoryBackend()
        manager = manager_on(backend, queues={"temp": QueueConfig(partitions=2)})
        for i in range(6):
            await manager.publish(f"$queue/temp/k{i}", b"t")
        consumer = FakeConsumer("c", window=4)
        manager.subscribe(consumer, "temp")
        await settle(lambda: len(consumer.received) == 4)
        assert sum(manager.drop("temp").values()) == 6  # 4 in flight, 2 ready
        await manager.store.flush()
        assert manager.queues() == [] and manager.subscriptions(consumer) == set()
        assert consumer.ack_all(manager) == 0  # (late acks: nothing of theirs any more)
        assert Store(backend).known_partitions() == []
        await manager.publish("$queue/temp/k1", b"new")  # created anew: the consumer is given it again
        await settle(lambda: len(consumer.received) == 5)
        assert consumer.received[-1].message.payload.endswith(b"new")
        assert manager.subscriptions(consumer) == {"temp"} and manager.queue("temp").depth == 1
        # A consumer that goes away while orphaned is forgotten.
        other = FakeConsumer("o")
        manager.subscribe(other, "temp")
        manager.drop("temp")
        manager.consumer_gone(other)
        manager.consumer_gone(consumer)
        await manager.publish("$queue/temp", b"later")
        assert manager.queue("temp").consumers == []

    run(scenario())


def test_a_queue_definition_is_replaced_with_its_partition_count_kept() -> None:
    """How a node records which incarnation of a cluster queue its copy is (``cluster_revision``)."""
    async def scenario() -> None:
        backend = MemoryBackend()
        store = Store(backend)
        store.define_queue("q", {"partitions": 4, "created": 1})
        with pytest.raises(ValueError, match="already defined"):
            store.define_queue("q", {"partitions": 4})
        with pytest.raises(ValueError, match="partitions kept"):
            store.define_queue("q", {"partitions": 8}, replace=True)
        store.define_queue("q", {"partitions": 4, "created": 1, "cluster_revision": 42}, replace=True)
        await store.flush()
        assert Store(backend).queue_definition("q") == {"partitions": 4, "created": 1, "cluster_revision": 42}

    run(scenario())
