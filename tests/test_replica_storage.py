"""What replicated partitions need of the partition log: a read limit (hidden messages), a follower's stored acks,
the epoch history, and the leader's durability hook. Unit tests: the LMDB backend and the in-memory one."""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from pathlib import Path

import pytest

from shoalmq.queue.storage import LmdbBackend, MemoryBackend, Store, keys
from shoalmq.queue.storage.log import NEVER, RECORD_OVERHEAD, PartitionLog
from tests.test_storage import OpenStore, open_store, run, until_committing  # noqa: F401 (their store fixture)



def payloads(n: int, prefix: str = "m", first: int = 0) -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(first, first + n)]


def cost(payload: bytes) -> int:
    return len(payload) + RECORD_OVERHEAD


def uncommitted(part: PartitionLog) -> int:
    return part.next_offset - part.committed_offset - part._skipped


def hidden(part: PartitionLog) -> int:
    """Committed messages not acked at or above the read limit, counted from the segment states."""
    return sum(1 for s in part._segments.values() for i, st in enumerate(s.state)
               if st != keys.ACKED and s.first + i >= part.visible_offset)


def check_counts(part: PartitionLog) -> None:
    """depth, ready and the hidden count agree with the segments, the pending runs and the in-flight set."""
    assert part.depth == sum(s.remaining for s in part._segments.values()) + uncommitted(part)
    assert part._hidden == hidden(part)
    assert part.ready == part.depth - part.inflight - uncommitted(part) - hidden(part)


def stored_offsets(store: Store, part: PartitionLog) -> list[int]:
    """The offsets of the messages not acked that the backend holds for the partition."""
    out = []
    for key, value in store.backend.scan(keys.STATES, keys.pid_prefix(part.pid)):
        first = keys.parse_segment_key(key)[1]
        out += [first + i for i, st in enumerate(keys.unpack_state(value)[1]) if st != keys.ACKED]
    return out


# -- the read limit ------------------------------------------------------------------------------------------

def test_hidden_messages_wait_until_visible_then_come_in_order_within_the_budgets(open_store: OpenStore) -> None:
    async def body() -> None:
        data = [bytes([65 + i % 26]) * 100 for i in range(40)]
        store = open_store(batch_size=5, ring_capacity=8, ring_bytes=6 * cost(data[0]))
        part = store.partition("q", 0)
        assert part.visible_offset == NEVER
        readable: list[list[PartitionLog]] = []
        store.on_readable = readable.append
        assert part.reset_reads(0) == []
        assert part.visible_offset == 0
        part.enqueue_many(data[:30])
        await store.flush()
        readable.clear()
        assert (part.depth, part.ready, len(part.ring), part.committed_offset) == (30, 0, 0, 30)
        assert part.take(10) == [], "hidden messages are not taken"
        check_counts(part)

        part.set_visible(12)  # (in the middle of the segment 10..14)
        assert part.visible_offset == 12 and part.ready == 12 and readable == [[part]]
        assert 0 < len(part.ring) <= 6 and part.ring_cost <= store.ring_bytes, "loaded within the budgets"
        check_counts(part)
        taken = part.take(100)
        assert [m.offset for m in taken] == list(range(12))
        assert [m.payload for m in taken] == data[:12]
        assert part.take(5) == [] and part.ready == 0
        part.set_visible(5)  # below: ignored
        part.set_visible(12)  # the same: ignored, no one told
        assert part.visible_offset == 12 and len(readable) == 1
        check_counts(part)

        part.set_visible(35)  # past the committed messages: the next commit's below 35 are ready, the rest hidden
        assert part.ready == 18 and len(readable) == 2
        assert len(part.ring) <= 6 and part.ring_cost <= store.ring_bytes
        part.enqueue_many(data[30:40])
        await store.flush()
        assert (part.ready, part.inflight, part.depth, part._hidden) == (23, 12, 40, 5)
        check_counts(part)
        got = []
        while batch := part.take(3):
            got += batch
            assert len(part.ring) <= 6 and part.ring_cost <= store.ring_bytes
        assert [m.offset for m in got] == list(range(12, 35))
        assert [m.payload for m in got] == data[12:35]
        part.set_visible(NEVER)
        assert [m.offset for m in part.take(100)] == list(range(35, 40))
        check_counts(part)
        await store.close()

    run(body())


def test_a_commit_straddling_the_limit_loads_only_what_is_below_it(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(batch_size=4)
        part = store.partition("q", 0)
        part.reset_reads(3)
        part.append_at(0, payloads(6), bytes([0, 2, 0, 0, 1, 0]))  # delivery counts: a run of its own
        await store.flush()
        assert (len(part.ring), part.ready, part._hidden) == (3, 3, 3)
        assert [(m.offset, m.deliveries) for m in part.take(10)] == [(0, 1), (1, 3), (2, 1)]
        part.append_at(8, [b"g"])  # after a gap
        await store.flush()
        assert part.ready == 0 and part._hidden == 4
        part.set_visible(100)
        assert [(m.offset, m.deliveries) for m in part.take(10)] == [(3, 1), (4, 2), (5, 1), (8, 1)]
        check_counts(part)
        await store.close()

    run(body())


def test_a_large_hidden_backlog_is_loaded_within_the_budgets_when_shown(open_store: OpenStore) -> None:
    async def body() -> None:
        data = [bytes([i]) * 1000 for i in range(50)]
        budget = 4 * cost(data[0])
        store = open_store(batch_size=7, ring_capacity=16, ring_bytes=budget, memory_budget=3 * budget)
        part = store.partition("q", 0)
        part.reset_reads(0)
        part.enqueue_many(data)
        await store.flush()
        assert len(part.ring) == 0 and part.ready == 0
        part.set_visible(50)
        assert len(part.ring) == 4 and part.ring_cost <= budget and part.ready == 50
        out = []
        while batch := part.take(5):
            out += batch
            part.ack(m.offset for m in batch)
            assert part.ring_cost <= budget
        assert [m.payload for m in out] == data
        await store.flush()
        assert part.depth == 0 and stored_offsets(store, part) == []
        await store.close()

    run(body())


def test_reset_reads_drops_what_is_in_flight_and_reads_it_again_from_disk(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(batch_size=4, ring_capacity=8)
        part = store.partition("q", 0)
        readable: list[list[PartitionLog]] = []
        store.on_readable = readable.append
        part.enqueue_many(payloads(10))
        await store.flush()
        readable.clear()
        first = part.take(4)  # 0..3, delivered once
        part.nack([1])
        assert [m.offset for m in part.take(1)] == [1]  # delivered twice
        part.nack([2])  # handed back: ready at the head
        assert (part.inflight, part.ready) == (3, 7)

        assert part.reset_reads(0) == [0, 1, 3], "the offsets that were in flight"
        assert (part.inflight, part.ready, len(part.ring), part.depth) == (0, 0, 0, 10)
        assert part.ack([0, 1, 3]) == 0 and part.nack([0]) == 0, "the dropped messages are forgotten"
        assert part.take(10) == [] and readable == []
        check_counts(part)

        part.set_visible(6)
        assert part.ready == 6 and readable == [[part]]
        assert [(m.offset, m.deliveries) for m in part.take(10)] == [(0, 2), (1, 3), (2, 2), (3, 2), (4, 1), (5, 1)]
        part.ack([0, 4])
        assert first[0].offset == 0 and part.ack([first[0].offset]) == 0

        # A leader that keeps its limit but starts over from disk, with a lower limit: 1..3 and 5 were in flight.
        assert part.reset_reads(3) == [1, 2, 3, 5]
        assert (part.ready, part._hidden, part.depth) == (2, 6, 8) and readable[-1] == [part]
        check_counts(part)
        assert [(m.offset, m.deliveries) for m in part.take(10)] == [(1, 4), (2, 3)]
        # Promoted: everything visible again, the delivery counts kept across a restart too.
        part.reset_reads(NEVER)
        assert part.ready == 8
        await store.close()

        store = open_store(batch_size=4, ring_capacity=8)
        part = store.partition("q", 0)
        assert [(m.offset, m.deliveries) for m in part.take(10)] == [
            (1, 5), (2, 4), (3, 3), (5, 2), (6, 1), (7, 1), (8, 1), (9, 1)]
        check_counts(part)
        await store.close()

    run(body())


def test_reset_reads_while_a_commit_runs(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(batch_size=3)
        part = store.partition("q", 0)
        part.enqueue_many(payloads(4))
        await store.flush()
        part.take(2)
        part.enqueue_many(payloads(4, first=4))
        await until_committing(store)
        assert part.reset_reads(5) == [0, 1]
        await store.flush()
        assert (part.ready, part._hidden) == (5, 3)
        check_counts(part)
        assert [m.offset for m in part.take(10)] == [0, 1, 2, 3, 4]
        await store.close()

    run(body())


# -- a follower: nothing read, its leader's acks applied --------------------------------------------------------

def test_a_follower_applies_its_leaders_acks(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(batch_size=5)
        part = store.partition("q", 0)
        readable: list[list[PartitionLog]] = []
        store.on_readable = readable.append
        part.reset_reads(0)
        part.append_at(0, payloads(10), bytes([1] * 10))
        await store.flush()
        part.append_at(10, payloads(3, first=10))  # pending
        assert (part.depth, part.ready, len(part.ring), part.committed_offset) == (13, 0, 0, 10)
        assert part.take(5) == []

        assert part.ack_stored([0, 2, 2, 11, 5, 12, 99, 1, 3, 4]) == [11, 12, 99]
        assert part.depth == 13 - 6
        assert part.ack_stored([0, 2, -1]) == [], "acked already, unknown: ignored"
        assert part.depth == 7
        check_counts(part)
        await store.flush()
        assert part.committed_offset == 13 and 0 not in part._segments, "the fully acked segment is gone"
        assert part.ack_stored([11, 12]) == [] and part.depth == 5
        assert readable == [] and part.ready == 0
        check_counts(part)
        await store.close()

        store = open_store(batch_size=5)
        part = store.partition("q", 0)
        assert stored_offsets(store, part) == [6, 7, 8, 9, 10]
        assert part.depth == 5 and store.backend.get(keys.SEGMENTS, keys.segment_key(part.pid, 0)) is None
        part.reset_reads(0)
        part.set_visible(8)
        assert part.ack_stored([6, 8]) == [] and part.depth == 4, "a visible message is this log's to ack"
        assert [(m.offset, m.deliveries) for m in part.take(10)] == [(6, 2), (7, 2)]
        check_counts(part)
        await store.close()

    run(body())


def test_ack_stored_of_offsets_being_committed_and_truncated(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(batch_size=4)
        part = store.partition("q", 0)
        part.reset_reads(0)
        part.enqueue_many(payloads(6))
        await until_committing(store)
        assert part.ack_stored([1, 4]) == [1, 4], "being committed: not in a segment yet"
        await store.flush()
        assert part.ack_stored([1, 4]) == [] and part.depth == 4
        part.truncate(3)  # 3 goes, 4 was acked, 5 goes
        assert part.depth == 2 and part._hidden == 2
        assert part.ack_stored([3, 4, 5]) == [3, 4, 5], "at or above the committed offset"
        assert part.depth == 2
        check_counts(part)
        part.ack_stored([0, 2])
        await store.flush()
        assert stored_offsets(store, part) == []
        await store.close()

    run(body())


# -- the epoch history -----------------------------------------------------------------------------------------

def test_begin_epoch_and_set_epochs_are_validated(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store()
        part = store.partition("q", 0)
        assert part.epochs == [] and part.epoch_end(5) == (0, 0)
        part.begin_epoch(1)
        assert part.epochs == [(1, 0)] and part.epoch == 1
        part.enqueue_many(payloads(5))
        for bad in ((1, None), (0, None), (2, -1)):
            with pytest.raises(ValueError, match="cannot begin epoch"):
                part.begin_epoch(*bad)
        part.begin_epoch(3)
        with pytest.raises(ValueError, match="cannot begin epoch"):
            part.begin_epoch(4, 4)  # below the last start
        part.begin_epoch(5, 5)  # the same start: epoch 3 holds nothing
        assert part.epochs == [(1, 0), (3, 5), (5, 5)] and part.epoch == 5
        part.set_epoch(9)
        part.begin_epoch(6)
        assert part.epoch == 9, "never lowered"
        returned = part.epochs
        returned.append((99, 99))
        assert part.epochs == [(1, 0), (3, 5), (5, 5), (6, 5)], "a copy"

        for bad in ([(1, 0), (1, 5)], [(2, 5), (3, 4)], [(3, 0), (2, 1)], [(-1, 0)], [(0, -2)]):
            with pytest.raises(ValueError):
                part.set_epochs(bad)
        assert part.epochs == [(1, 0), (3, 5), (5, 5), (6, 5)]
        part.set_epochs([(2, 0), (4, 2), (7, 2)])
        assert part.epochs == [(2, 0), (4, 2), (7, 2)] and part.epoch == 9
        part.set_epochs([])
        assert part.epochs == []
        await store.close()

    run(body())


def test_epoch_end() -> None:
    async def body() -> None:
        store = Store(MemoryBackend())
        part = store.partition("q", 0)
        part.advance_to(25)
        assert part.epoch_end(0) == (0, 25) and part.epoch_end(7) == (0, 25), "no history"
        part.set_epochs([(2, 3), (4, 10), (7, 20)])
        assert part.epoch_end(0) == part.epoch_end(1) == (0, 3), "below the first entry"
        assert part.epoch_end(2) == part.epoch_end(3) == (2, 10)
        assert part.epoch_end(4) == part.epoch_end(6) == (4, 20)
        assert part.epoch_end(7) == part.epoch_end(100) == (7, 25), "the last entry ends at next_offset"
        part.set_epochs([(2, 3), (4, 10), (5, 10), (7, 20)])
        assert part.epoch_end(4) == (4, 10) and part.epoch_end(5) == (5, 20)
        await store.close()

    run(body())


def test_truncate_drops_the_epochs_starting_at_or_above_it(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store()
        part = store.partition("q", 0)
        part.set_epochs([(2, 0), (4, 10), (7, 20)])
        part.append_at(0, payloads(25))
        await store.flush()
        part.truncate(21)
        assert part.epochs == [(2, 0), (4, 10), (7, 20)]
        part.truncate(20)
        assert part.epochs == [(2, 0), (4, 10)]
        part.truncate(15)
        assert part.epochs == [(2, 0), (4, 10)]
        part.begin_epoch(9)  # at next_offset 15
        assert part.epochs == [(2, 0), (4, 10), (9, 15)]
        assert part.truncate(15) == 0 and part.epochs == [(2, 0), (4, 10)], "at next_offset: only the epochs"
        part.truncate(10)
        assert part.epochs == [(2, 0)] and part.next_offset == 10
        await store.close()

        store = open_store()
        part = store.partition("q", 0)
        assert part.epochs == [(2, 0)] and part.next_offset == 10
        await store.close()

    run(body())


def test_the_epoch_history_survives_a_reopen(tmp_path: Path) -> None:
    async def body() -> None:
        def open_() -> Store:
            return Store(LmdbBackend(tmp_path / "log", map_size=1 << 24))

        store = open_()
        part = store.partition("q", 0)
        store.partition("q", 1)
        part.begin_epoch(3)
        part.enqueue_many(payloads(4))
        part.begin_epoch(5)
        await store.close()

        store = open_()
        part = store.partition("q", 0)
        assert (part.epochs, part.epoch, part.next_offset) == ([(3, 0), (5, 4)], 5, 4)
        assert store.partition("q", 1).epochs == []
        value = store.backend.get(keys.PARTITIONS, keys.partition_key("q", 0))
        assert len(value) == 20 + 2 * 16
        assert keys.unpack_partition(value) == (part.pid, 4, 5, [(3, 0), (5, 4)])
        part.set_epochs([(3, 0), (6, 2)])  # alone: a commit of its own writes it
        await store.flush()
        assert keys.unpack_partition(store.backend.get(keys.PARTITIONS, keys.partition_key("q", 0)))[3] == [
            (3, 0), (6, 2)]
        part.truncate(2)  # written with the truncation
        await store.flush()
        assert [m.payload for m in part.take(10)] == payloads(2)
        await store.close()

        store = open_()
        part = store.partition("q", 0)
        assert (part.epochs, part.epoch, part.next_offset) == ([(3, 0)], 5, 2)
        assert [m.payload for m in part.take(10)] == payloads(2)
        part.enqueue(b"x")  # any rewrite of the record keeps the history
        await store.close()

        store = open_()
        assert store.partition("q", 0).epochs == [(3, 0)]
        await store.close()

    run(body())


def test_older_partition_values_still_read(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store()
        store.partition("q", 0)
        store.partition("q", 1)
        await store.flush()
        pid0, pid1 = store.partition("q", 0).pid, store.partition("q", 1).pid
        store.backend.commit([(keys.PARTITIONS, keys.partition_key("q", 0), struct.pack(">IQ", pid0, 42)),
                              (keys.PARTITIONS, keys.partition_key("q", 1), struct.pack(">IQQ", pid1, 7, 3))], [])
        await store.close()

        store = open_store()
        old, older = store.partition("q", 1), store.partition("q", 0)
        assert (older.next_offset, older.epoch, older.epochs) == (42, 0, [])
        assert (old.next_offset, old.epoch, old.epochs) == (7, 3, [])
        assert old.epoch_end(3) == (0, 7)
        old.begin_epoch(4)
        await store.close()

        store = open_store()
        assert store.partition("q", 1).epochs == [(4, 7)]
        await store.close()

    run(body())


def test_partition_values_with_a_history_round_trip() -> None:
    assert keys.unpack_partition(keys.pack_partition(7, 1 << 40, 1 << 33)) == (7, 1 << 40, 1 << 33, [])
    assert keys.unpack_partition(keys.pack_partition(7, 5)) == (7, 5, 0, [])
    assert keys.unpack_partition(struct.pack(">IQ", 9, 12)) == (9, 12, 0, [])
    history = [(1, 0), (3, 1 << 40), (1 << 60, 1 << 41)]
    value = keys.pack_partition(2, 1 << 42, 1 << 60, history)
    assert len(value) == 20 + 3 * 16 and value[:20] == keys.pack_partition(2, 1 << 42, 1 << 60)
    assert keys.unpack_partition(value) == (2, 1 << 42, 1 << 60, history)
    for bad in (value[:-1], value[:19], value + b"\x00", b""):
        with pytest.raises(ValueError, match="corrupt partition record"):
            keys.unpack_partition(bad)


# -- the leader's durability hook ------------------------------------------------------------------------------

def test_on_durable_gets_each_commits_appends_to_replicated_partitions(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(batch_size=3)
        leader, other = store.partition("q", 0), store.partition("q", 1)
        await store.flush()
        calls: list[list[tuple[PartitionLog, list]]] = []

        def durable(items: list[tuple[PartitionLog, list]]) -> None:
            for part, _ in items:
                # After _on_committed: committed and readable already.
                assert part.committed_offset == part.next_offset and part.ready == part.depth - part.inflight
            calls.append(items)

        store.on_durable = durable
        other.enqueue_many(payloads(2))
        await store.flush()
        assert calls == [], "no replicated partition"
        leader.replicated = True
        leader.enqueue_many(payloads(5))
        leader.append_at(10, [b"x", b"y"], b"\x02\x00")
        other.enqueue(b"o")
        await store.flush()
        assert len(calls) == 1
        [(part, runs)] = calls[0]
        assert part is leader
        assert runs == [(0, [payloads(3), payloads(2, first=3)], None), (10, [[b"x", b"y"]], [b"\x02\x00"])]
        leader.take(3)
        leader.ack([0])
        await store.flush()
        assert len(calls) == 1, "a commit of state changes only"
        leader.enqueue(b"z")
        await store.flush()
        assert calls[1] == [(leader, [(12, [[b"z"]], None)])]
        store.on_durable = None
        leader.enqueue(b"w")
        await store.flush()
        assert len(calls) == 2
        await store.close()

    run(body())


def test_on_durable_after_a_truncation_in_the_running_commit(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(batch_size=4)
        part = store.partition("q", 0)
        part.replicated = True
        calls: list[list] = []
        store.on_durable = calls.append
        part.enqueue_many(payloads(6))
        await until_committing(store)
        part.truncate(2)
        await store.flush()
        assert calls == [[(part, [(0, [payloads(2)], None)])]]
        part.enqueue(b"a")
        await until_committing(store)
        part.truncate(0)
        await store.flush()
        assert len(calls) == 1, "nothing left of the commit's appends"
        await store.close()

    run(body())


def test_a_failing_on_durable_does_not_stop_the_commit(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        store = Store(MemoryBackend())
        part = store.partition("q", 0)
        part.replicated = True

        def broken(items: list) -> None:
            raise RuntimeError("replication bug")

        store.on_durable = broken
        flush = part.enqueue(b"a")
        with caplog.at_level(logging.ERROR):
            await flush
            await store.flush()
        assert "on_durable failed" in caplog.text
        assert [m.payload for m in part.take(5)] == [b"a"]
        part.enqueue(b"b")
        await store.flush()
        await store.close()

    run(body())


def test_a_leader_shows_what_its_followers_have(open_store: OpenStore) -> None:
    """The intended use: the leader's limit follows what the followers stored (here: at once, on_durable)."""
    async def body() -> None:
        store = open_store(batch_size=4, ring_capacity=8)
        part = store.partition("q", 0)
        part.replicated = True
        part.reset_reads(0)
        readable: list[list[PartitionLog]] = []
        store.on_readable = readable.append
        replicated: list[int] = []

        def durable(items: list[tuple[PartitionLog, list]]) -> None:
            for p, runs in items:
                first, batches, _ = runs[-1]
                replicated.append(first + sum(map(len, batches)))

        store.on_durable = durable
        part.enqueue_many(payloads(10))
        await store.flush()
        assert part.ready == 0 and replicated == [10]
        part.set_visible(replicated[-1])
        assert part.ready == 10 and readable[-1] == [part]
        assert [m.offset for m in part.take(20)] == list(range(10))
        await store.close()

    run(body())


# -- the defaults: nothing changes ----------------------------------------------------------------------------

def test_with_the_defaults_the_hot_path_is_as_before(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(batch_size=4, ring_capacity=16)
        part = store.partition("q", 0)
        assert (part.visible_offset, part.replicated, store.on_durable, part.epochs) == (NEVER, False, None, [])
        part.enqueue_many(payloads(10))
        part.enqueue(b"m10")
        await store.flush()
        assert len(part.ring) == 11 and part.ready == 11 and part._hidden == 0, "committed: in the ring at once"
        taken = part.take(4)
        assert [m.offset for m in taken] == [0, 1, 2, 3]
        part.ack([0, 1])
        part.nack([2])
        assert [m.offset for m in part.take(3)] == [2, 4, 5]
        part.set_visible(3)  # below the default limit: ignored
        assert part.visible_offset == NEVER and part.ready == 5
        assert part.ack_stored([6, 7]) == [], "visible: not a follower's to ack"
        assert part.depth == 9 and part._hidden == 0
        check_counts(part)
        await store.flush()
        assert len(store.backend.get(keys.PARTITIONS, keys.partition_key("q", 0))) == 20
        await store.close()

    run(body())


# -- against a model -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(8))
def test_reads_with_a_limit_against_a_model(open_store: OpenStore, seed: int) -> None:
    """Random appends, gaps, takes, acks, nacks, stored acks, read limits, read resets, truncations and restarts
    (some while a commit runs), checked against a model after every step and by draining the log at the end."""
    run(model_run(open_store, seed))


async def model_run(open_store: OpenStore, seed: int) -> None:
    rng = random.Random(seed)
    options = {"batch_size": 3, "ring_capacity": 8, "ring_bytes": 5 * cost(b"x" * 20), "flush_interval": 0.002}
    store = open_store(**options)
    part = store.partition("q", 0)
    # offset -> [payload, delivery count]; which are in flight and handed back; the read limit.
    messages: dict[int, list] = {}
    inflight: set[int] = set()
    requeued: set[int] = set()
    visible = NEVER
    next_offset = 0
    serial = 0

    def records(n: int) -> list[bytes]:
        nonlocal serial
        serial += n
        return [f"{serial - i}".encode().ljust(rng.choice((1, 20)), b".") for i in range(n)]

    def committed() -> list[int]:
        return sorted(o for o in messages if o < part.committed_offset)

    def pick_limit() -> int:
        return NEVER if rng.random() < 0.2 else rng.randint(0, next_offset + 2)

    for step in range(300):
        action = rng.random()
        if action < 0.14:
            batch = records(rng.randint(1, 5))
            part.enqueue_many(batch)
            for payload in batch:
                messages[next_offset] = [payload, 0]
                next_offset += 1
        elif action < 0.22:
            offset = next_offset + rng.choice((0, 1, 3))
            batch = records(rng.randint(1, 4))
            counts = bytes(rng.choice((0, 2, 5)) for _ in batch) if rng.random() < 0.5 else None
            part.append_at(offset, batch, counts)
            for i, payload in enumerate(batch):
                messages[offset + i] = [payload, counts[i] if counts else 0]
            next_offset = offset + len(batch)
        elif action < 0.36:
            got = part.take(rng.randint(1, 6))
            expected = sorted(requeued) + [o for o in committed()
                                           if o < visible and o not in requeued and o not in inflight]
            assert [m.offset for m in got] == expected[:len(got)], step
            assert got or not expected, step
            for m in got:
                messages[m.offset][1] += 1
                assert (m.payload, m.deliveries) == tuple(messages[m.offset]), step
                inflight.add(m.offset)
                requeued.discard(m.offset)
        elif action < 0.44 and inflight:
            chosen = rng.sample(sorted(inflight), rng.randint(1, len(inflight)))
            assert part.ack(chosen) == len(chosen), step
            for o in chosen:
                inflight.discard(o)
                del messages[o]
        elif action < 0.49 and inflight:
            chosen = rng.sample(sorted(inflight), rng.randint(1, len(inflight)))
            assert part.nack(chosen) == len(chosen), step
            inflight.difference_update(chosen)
            requeued.update(chosen)
        elif action < 0.57:
            offsets = [rng.randint(0, next_offset + 2) for _ in range(rng.randint(1, 5))]
            limit, end = visible, part.committed_offset
            later = part.ack_stored(offsets)
            assert later == [o for o in offsets if o >= end], step
            for o in offsets:
                if limit <= o < end and o in messages:
                    del messages[o]
        elif action < 0.65:
            limit = pick_limit()
            part.set_visible(limit)
            visible = max(visible, limit)
        elif action < 0.70:
            limit = pick_limit()
            assert part.reset_reads(limit) == sorted(inflight), step
            inflight.clear()
            requeued.clear()
            visible = limit
        elif action < 0.76:
            offset = rng.randint(max(next_offset - 8, 0), next_offset + 1)
            removed = part.truncate(offset)
            gone = [o for o in messages if o >= offset]
            assert removed == len(gone), step
            for o in gone:
                del messages[o]
                inflight.discard(o)
                requeued.discard(o)
            next_offset = min(next_offset, offset)
        elif action < 0.86:
            if store._dirty_partitions:
                await until_committing(store)
        elif action < 0.97:
            await store.flush()
            assert part.committed_offset == next_offset, step
            assert part.read_messages(0, 1000) == [(o, messages[o][0], min(messages[o][1], 254))
                                                   for o in sorted(messages)], step
        else:
            await store.close()
            store = open_store(**options)
            part = store.partition("q", 0)
            inflight.clear()
            requeued.clear()
            visible = NEVER  # a reopened partition reads everything until told otherwise
            assert [(o, p) for o, p, _ in part.read_messages(0, 1000)] == [
                (o, messages[o][0]) for o in sorted(messages)], step
        assert (part.next_offset, part.depth, part.inflight, part.visible_offset) == (
            next_offset, len(messages), len(inflight), visible), step
        shown = [o for o in committed() if o < visible]
        assert part._hidden == len(committed()) - len(shown), step
        assert part.ready == len(shown) - len(inflight), step
        assert not any(visible <= o < part._loaded_upto for o in committed()), (step, "loaded past the limit")
        assert len(part.ring) <= 8, step
        check_counts(part)
    await store.flush()
    part.set_visible(NEVER)
    drained = []
    while batch := part.take(4):
        drained += batch
        part.ack(m.offset for m in batch)
    assert [m.offset for m in drained] == sorted(requeued) + sorted(
        o for o in messages if o not in inflight and o not in requeued)
    assert all(m.payload == messages[m.offset][0] for m in drained)
    await store.close()


def test_reset_reads_during_the_commit_that_deletes_a_fully_acked_segment(open_store: OpenStore) -> None:
    """A leader promoted (or demoted) while a commit deletes a segment whose messages are all acked: the segment is
    still listed until the commit ends, and reading it again from disk must skip it, not fail."""
    async def body() -> None:
        store = open_store()
        part = store.partition("q", 0)
        await part.enqueue_many([b"a0", b"a1"])
        await part.enqueue_many([b"b0", b"b1"])
        taken = part.take(2)
        assert [m.payload for m in taken] == [b"a0", b"a1"]
        part.ack([m.offset for m in taken])
        flush = asyncio.ensure_future(store.flush())  # deletes the first segment
        for _ in range(1000):
            await asyncio.sleep(0)
            if store._running is not None and part.first_offset >= 2:
                break
        assert store._running is not None
        part.reset_reads(NEVER)
        await flush
        part.reset_reads(NEVER)
        assert [m.payload for m in part.take(10)] == [b"b0", b"b1"]
        await store.close()
    run(body())
