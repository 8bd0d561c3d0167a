"""Partition logs: the same test bodies run against the LMDB backend and the in-memory one."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from shoalmq.errors import PayloadTooLarge, QueueFull, StorageError, StorageFull
from shoalmq.queue.storage import Limits, LmdbBackend, MemoryBackend, Store, keys
from shoalmq.queue.storage.log import RECORD_OVERHEAD, Truncated

OpenStore = Callable[..., Store]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


@pytest.fixture(params=["lmdb", "memory"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> OpenStore:
    """Open a store; calling it again after ``close()`` reopens the same data, as a restart would."""
    memory = MemoryBackend()

    def open_(**options: Any) -> Store:
        if request.param == "memory":
            return Store(memory, **options)
        return Store(LmdbBackend(tmp_path / "log", map_size=options.pop("map_size", 1 << 26),
                                 max_map_size=options.pop("max_map_size", None)), **options)

    return open_


def payloads(n: int, prefix: str = "m") -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(n)]


# -- keys and values ------------------------------------------------------------------------------------------

def test_segment_and_state_round_trip() -> None:
    data = [b"", b"a", b"\x00" * 70000, b"xyz"]
    assert keys.unpack_segment(keys.pack_segment(data)) == data
    state = bytearray([0, 3, keys.ACKED])
    enqueued_at, back = keys.unpack_state(keys.pack_state(1234567890123, state))
    assert enqueued_at == 1234567890123 and back == bytearray([0, 3, 255])
    with pytest.raises(ValueError, match="state record of 2 entries, its header says 3"):
        keys.unpack_state(keys.pack_state(1, state)[:-1])
    assert keys.parse_partition_key(keys.partition_key("orders.eu", 7)) == ("orders.eu", 7)


def test_segment_keys_sort_by_partition_then_offset() -> None:
    pairs = [(2, 0), (1, 1 << 40), (1, 5), (1, 300), (2, 1)]
    assert sorted(pairs) == [keys.parse_segment_key(k) for k in sorted(keys.segment_key(*p) for p in pairs)]


def test_corrupt_segment_is_detected() -> None:
    value = keys.pack_segment([b"abc", b"de"])
    with pytest.raises(ValueError, match="corrupt segment"):
        keys.unpack_segment(value[:-1])
    for bad in (value[:-1], value + b"x", value[:3], b"\xff\xff\xff\xff"):
        with pytest.raises(ValueError, match="corrupt segment"):
            keys.segment_lengths(memoryview(bad))


def test_segment_lengths_locate_each_payload_without_unpacking() -> None:
    data = [b"", b"a", b"\x00" * 70000, b"xyz"]
    value = keys.pack_segment(data)
    for view in (value, memoryview(value)):
        lengths = keys.segment_lengths(view)
        assert lengths == (0, 1, 70000, 3)
        for i, payload in enumerate(data):
            start = keys.segment_payload_start(lengths, i)
            assert bytes(view[start:start + lengths[i]]) == payload


# -- enqueue, take, ack ----------------------------------------------------------------------------------------

def test_enqueue_resolves_after_commit_and_take_returns_in_order(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store()
        part = store.partition("orders", 0)
        futures = [part.enqueue(p) for p in payloads(10)]
        assert part.last_offset == 9 and part.depth == 10
        assert len({id(f) for f in futures}) == 1, "one completion shared by a flush"
        assert not futures[0].done()
        assert part.take(5) == [], "nothing is readable before it is durable"
        await futures[0]
        taken = part.take(4)
        assert [m.offset for m in taken] == [0, 1, 2, 3]
        assert [m.payload for m in taken] == payloads(4)
        assert all(m.deliveries == 1 for m in taken)
        assert (part.depth, part.inflight, part.ready) == (10, 4, 6)
        assert part.ack([0, 1, 99]) == 2
        assert part.ack([0]) == 0, "a second ack of the same message changes nothing"
        assert (part.depth, part.inflight, part.ready) == (8, 2, 6)
        await store.close()

    run(body())


def test_one_commit_carries_every_partition(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(batch_size=3)
        parts = [store.partition("q", i) for i in range(4)]
        await store.flush()
        before = store.commits
        flush = None
        for part in parts:
            for p in payloads(7):
                flush = part.enqueue(p)
        await flush
        assert store.commits == before + 1
        for part in parts:
            assert [m.payload for m in part.take(100)] == payloads(7)
            # 7 messages in segments of at most batch_size=3
            assert [s.count for s in part._segments.values()] == [3, 3, 1]
        await store.close()

    run(body())


def test_nack_redelivers_first_with_delivery_count(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store()
        part = store.partition("q", 0)
        for p in payloads(5):
            part.enqueue(p)
        await store.flush()
        first = part.take(3)
        assert part.nack([2, 0]) == 2
        assert part.nack([0]) == 0
        again = part.take(3)
        assert [(m.offset, m.deliveries) for m in again] == [(0, 2), (2, 2), (3, 1)]
        part.nack([m.offset for m in again] + [first[1].offset])
        assert [(m.offset, m.deliveries) for m in part.take(10)] == [(0, 3), (1, 2), (2, 3), (3, 2), (4, 1)]
        await store.close()

    run(body())


def test_recovery_restores_unacked_in_order_with_delivery_counts(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(batch_size=4)
        part = store.partition("q", 3)
        other = store.partition("r", 0)
        for p in payloads(10):
            part.enqueue(p)
        other.enqueue(b"other")
        await store.flush()
        taken = part.take(6)
        part.ack([1, 4])
        part.nack([5])
        assert [m.offset for m in taken] == [0, 1, 2, 3, 4, 5]
        await store.close()

        store = open_store(batch_size=4)
        assert store.known_partitions() == [("q", 3), ("r", 0)]
        part = store.partition("q", 3)
        assert part.depth == 8 and part.inflight == 0 and part.next_offset == 10
        got = part.take(100)
        assert [m.offset for m in got] == [0, 2, 3, 5, 6, 7, 8, 9]
        assert [m.deliveries for m in got] == [2, 2, 2, 2, 1, 1, 1, 1]
        assert [m.payload for m in got] == [b"m0", b"m2", b"m3", b"m5", b"m6", b"m7", b"m8", b"m9"]
        assert [m.payload for m in store.partition("r", 0).take(5)] == [b"other"]
        await store.close()

    run(body())


def test_deliveries_and_acks_ride_with_the_next_commit(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(flush_interval=0.05)
        part = store.partition("q", 0)
        for p in payloads(3):
            part.enqueue(p)
        await store.flush()
        commits = store.commits
        part.take(2)
        part.ack([0])
        for _ in range(3):
            await asyncio.sleep(0)
        assert store.commits == commits, "a delivery or an ack alone does not cost a sync at once"
        await part.enqueue(b"new")
        assert store.commits == commits + 1, "they rode with the append"
        part.ack([1])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while store.commits == commits + 1:
            assert loop.time() < deadline, "state changes never written without appends"
            await asyncio.sleep(0.01)
        await store.close()

        store = open_store()
        assert [(m.offset, m.deliveries) for m in store.partition("q", 0).take(10)] == [(2, 0 + 1), (3, 1)]
        await store.close()

    run(body())


def test_offsets_are_never_reused_after_everything_is_acked(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store()
        part = store.partition("q", 0)
        for p in payloads(3):
            part.enqueue(p)
        await store.flush()
        part.ack(m.offset for m in part.take(3))
        await store.flush()
        assert part.depth == 0 and not part._segments, "fully acked segments are deleted"
        await store.close()

        store = open_store()
        part = store.partition("q", 0)
        assert part.depth == 0
        part.enqueue(b"next")
        assert part.last_offset == 3
        await store.close()

    run(body())


def test_acked_segments_are_deleted_from_the_backend(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(batch_size=2)
        part = store.partition("q", 0)
        for p in payloads(4):
            part.enqueue(p)
        await store.flush()
        part.ack([m.offset for m in part.take(3)])
        await store.flush()
        remaining = [keys.parse_segment_key(k) for k, _ in store.backend.scan(keys.SEGMENTS)]
        assert remaining == [(part.pid, 2)]
        await store.close()

    run(body())


def test_ring_spills_to_disk_and_refills_in_order(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(ring_capacity=8, batch_size=5)
        part = store.partition("q", 0)
        for p in payloads(50):
            part.enqueue(p)
        await store.flush()
        assert len(part.ring) <= 8
        got = []
        while batch := part.take(3):
            got += [(m.offset, m.deliveries) for m in batch]
            part.ack(m.offset for m in batch[::2])
            part.nack(m.offset for m in batch[1::2])
            assert len(got) < 200
        assert [offset for offset, deliveries in got if deliveries == 1] == list(range(50))
        assert sorted(offset for offset, _ in got) == sorted(list(range(50)) + [o for o, d in got if d == 2])
        assert part.depth == 0
        await store.close()

    run(body())


# -- memory: byte budgets of the rings ---------------------------------------------------------------------------

def cost(payload: bytes) -> int:
    """What a message in a ring counts for against the byte budgets."""
    return len(payload) + RECORD_OVERHEAD


def charged(store: Store) -> int:
    """What the store's rings hold, counted against its memory budget (checked against the rings themselves)."""
    parts = list(store._partitions.values())
    assert store.pool.cost == sum(p.ring_cost for p in parts) == sum(
        p.ring.nbytes + RECORD_OVERHEAD * len(p.ring) for p in parts)
    return store.pool.cost


def test_messages_beyond_the_ring_bytes_wait_on_disk_and_come_back_in_order(open_store: OpenStore) -> None:
    async def body() -> None:
        data = [bytes([i]) * 1000 for i in range(60)]
        budget = 10 * cost(data[0])
        store = open_store(ring_bytes=budget, batch_size=25)  # segments of 25: refills start mid-segment
        part = store.partition("q", 0)
        for payload in data:
            part.enqueue(payload)
        await store.flush()
        assert len(part.ring) == 10 and part.ring_cost == budget == charged(store)
        assert part.ready == 60, "ready counts the messages on disk"
        got = []
        while batch := part.take(3):
            got += batch
            assert len(part.ring) <= 10 and part.ring_cost <= budget and charged(store) <= budget
            part.ack(m.offset for m in batch)
            assert len(got) <= 60
        assert [m.offset for m in got] == list(range(60))
        assert [m.payload for m in got] == data
        assert part.ready == 0 and part.depth == 0 and charged(store) == 0
        # New messages go straight to the ring again once nothing waits on disk.
        part.enqueue(b"fresh")
        await store.flush()
        assert len(part.ring) == 1 and [m.payload for m in part.take(5)] == [b"fresh"]
        await store.close()

    run(body())


def test_refill_respects_the_budget_and_reloads_as_the_ring_drains(open_store: OpenStore) -> None:
    async def body() -> None:
        data = [f"{i:04d}".encode() * 250 for i in range(40)]  # 1000 bytes each
        store = open_store(ring_bytes=8 * cost(data[0]), batch_size=500)
        part = store.partition("q", 0)
        for payload in data:
            part.enqueue(payload)
        await store.flush()
        assert [len(part.ring), part._loaded_upto] == [8, 8]
        first = part.take(8)  # what the ring holds: no disk read needed
        assert [m.offset for m in first] == list(range(8)) and len(part.ring) == 0
        again = part.take(1)  # reads the next messages back: the one taken, and more within the budget
        assert [m.offset for m in again] == [8] and len(part.ring) == 7 and part._loaded_upto == 16
        part.nack([0, 1])  # handed back: delivered first, they do not enter the ring
        rest = []
        while batch := part.take(5):
            rest += [m.offset for m in batch]
            part.ack(m.offset for m in batch)
        assert rest == [0, 1] + list(range(9, 40))
        await store.close()

    run(body())


def test_the_node_budget_is_shared_by_every_partition_and_nothing_is_stranded(open_store: OpenStore) -> None:
    async def body() -> None:
        data = {i: [f"p{i}-{n}".encode().ljust(2000, b".") for n in range(30)] for i in range(4)}
        one = cost(data[0][0])
        # Each partition's own budget would hold 25 messages; the node's holds 40 in all.
        store = open_store(ring_bytes=25 * one, memory_budget=40 * one, batch_size=7)
        parts = [store.partition("q", i) for i in range(4)]
        for i, part in enumerate(parts):
            for payload in data[i]:
                part.enqueue(payload)
        await store.flush()
        # The commit fills the rings in turn (in no particular order) until the node's budget is spent.
        by_ring = sorted(range(4), key=lambda i: -len(parts[i].ring))
        assert [len(parts[i].ring) for i in by_ring] == [25, 15, 0, 0]
        full, _partial, empty, other = by_ring
        assert charged(store) == 40 * one
        assert [p.ready for p in parts] == [30] * 4, "messages on disk are ready all the same"
        # A partition whose ring got nothing still delivers: take reads back what it hands out.
        got: dict[int, list] = {i: [] for i in range(4)}
        got[empty] += parts[empty].take(4)
        assert [m.payload for m in got[empty]] == data[empty][:4] and len(parts[empty].ring) == 0
        assert charged(store) == 40 * one, "the budget was full: nothing more was loaded"
        # Draining a partition frees budget; the next take of another partition loads into its ring.
        while batch := parts[full].take(10):
            got[full] += batch
            parts[full].ack(m.offset for m in batch)
        assert charged(store) == 15 * one
        got[other] += parts[other].take(1)  # loads its budget's worth, 25 (the one taken among them)
        assert len(parts[other].ring) == 24 and charged(store) == 39 * one
        # Everything comes out, each partition in order, the budget holding throughout.
        while any(p.ready for p in parts):
            for i, part in enumerate(parts):
                batch = part.take(3)
                got[i] += batch
                part.ack(m.offset for m in batch)
                assert charged(store) <= 40 * one
        for i in range(4):
            assert [m.payload for m in got[i]] == data[i], i
            assert [m.offset for m in got[i]] == list(range(30)), i
        for i, part in enumerate(parts):
            part.ack(m.offset for m in got[i])
        assert charged(store) == 0 and all(p.depth == 0 for p in parts)
        await store.close()

    run(body())


def test_a_message_larger_than_the_budgets_is_still_delivered(open_store: OpenStore) -> None:
    async def body() -> None:
        big = [bytes([i]) * 50_000 for i in range(3)]
        store = open_store(ring_bytes=1000, memory_budget=200_000)
        part = store.partition("q", 0)
        for payload in big:
            part.enqueue(payload)
        await store.flush()
        assert len(part.ring) == 1, "an empty ring takes one message larger than the partition's budget"
        for i in range(3):
            [message] = part.take(1)  # the one in the ring; then one read back (into the emptied ring) each time
            assert message.payload == big[i]
            part.ack([message.offset])
            assert len(part.ring) <= 1
        await store.close()
        # Not even the node's budget holds one: nothing stays in memory, and take still reads each back.
        store = open_store(ring_bytes=1000, memory_budget=1000)
        part = store.partition("q", 1)
        for payload in big:
            part.enqueue(payload)
        await store.flush()
        assert len(part.ring) == 0 and part.ready == 3
        assert [m.payload for m in part.take(2)] == big[:2] and len(part.ring) == 0
        assert [m.payload for m in part.take(2)] == big[2:]
        assert charged(store) == 0
        await store.close()

    run(body())


def test_recovery_loads_within_the_budgets(open_store: OpenStore) -> None:
    async def body() -> None:
        data = [f"{i:03d}".encode() * 100 for i in range(50)]  # 300 bytes each
        one = cost(data[0])
        store = open_store(batch_size=9)
        parts = [store.partition("q", i) for i in range(3)]
        for part in parts:
            for payload in data:
                part.enqueue(payload)
        await store.flush()
        taken = parts[0].take(5)
        parts[0].ack(m.offset for m in taken[::2])  # 0, 2, 4 acked; 1, 3 back to ready after the restart
        await store.close()
        store = open_store(ring_bytes=20 * one, memory_budget=30 * one)
        parts = [store.partition("q", i) for i in range(3)]  # opened in turn: each loads what the budgets allow
        assert [len(p.ring) for p in parts] == [20, 10, 0] and charged(store) == 30 * one
        for i, part in enumerate(parts):
            got = []
            while batch := part.take(7):
                got += batch
                part.ack(m.offset for m in batch)
                assert charged(store) <= 30 * one
            expected = [1, 3] + list(range(5, 50)) if i == 0 else list(range(50))
            assert [m.offset for m in got] == expected, i
            assert [m.payload for m in got] == [data[o] for o in expected], i
        await store.close()

    run(body())


def test_freed_memory_is_given_back_once_the_rings_drained(open_store: OpenStore,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from shoalmq.queue.storage import log as storage_log

    monkeypatch.setattr(storage_log, "TRIM_AFTER_FREED", 50 * cost(b"x" * 1000))
    monkeypatch.setattr(storage_log, "TRIM_DELAY", 0.01)

    async def body() -> None:
        store = open_store()
        part = store.partition("q", 0)
        for _ in range(40):
            part.enqueue(b"x" * 1000)
        await store.flush()
        part.ack(m.offset for m in part.take(40))
        await store.flush()
        await asyncio.sleep(0.05)
        assert store.trims == 0, "40 messages drained: less than TRIM_AFTER_FREED"
        for _ in range(100):
            part.enqueue(b"x" * 1000)
        await store.flush()
        taken = part.take(60)
        part.ack(m.offset for m in taken)
        await store.flush()
        await asyncio.sleep(0.05)
        assert store.trims == 0, "more than a quarter of the peak is left"
        part.ack(m.offset for m in part.take(40))
        await store.flush()
        await asyncio.sleep(0.05)
        assert store.trims == 1 and store.pool.peak == 0
        await store.close()

    run(body())


# -- limits ---------------------------------------------------------------------------------------------------

def test_max_depth_rejects_until_acked(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store()
        part = store.partition("q", 0, Limits(max_depth=3))
        for p in payloads(3):
            part.enqueue(p)
        with pytest.raises(QueueFull, match="'q' partition 0 is full"):
            part.enqueue(b"x")
        assert part.depth == 3 and part.last_offset == 2
        await store.flush()
        part.ack([part.take(1)[0].offset])
        part.enqueue(b"fits")
        assert part.depth == 3
        await store.close()

    run(body())


def test_enqueue_many_appends_in_order_all_or_nothing(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store()
        part = store.partition("q", 0, Limits(max_depth=5, max_payload=4))
        flush = part.enqueue_many([b"a", b"b", b"c"])
        assert part.enqueue(b"d") is flush and part.last_offset == 3 and part.depth == 4
        with pytest.raises(QueueFull):
            part.enqueue_many([b"e", b"f"])  # one would fit: neither is stored
        with pytest.raises(PayloadTooLarge):
            part.enqueue_many([b"e", b"12345"])
        assert part.depth == 4 and part.last_offset == 3
        assert part.enqueue_many([]) is store._flush
        await flush
        assert [m.payload for m in part.take(10)] == [b"a", b"b", b"c", b"d"]
        await store.close()

    run(body())


def test_max_payload(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store()
        default = store.partition("q", 0)
        default.enqueue(b"x" * (256 * 1024))
        with pytest.raises(PayloadTooLarge, match="262145 bytes exceeds max_payload 262144"):
            default.enqueue(b"x" * (256 * 1024 + 1))
        small = store.partition("small", 0, Limits(max_payload=10))
        with pytest.raises(PayloadTooLarge):
            small.enqueue(b"01234567890")
        assert small.depth == 0
        await store.close()

    run(body())


def test_ttl_drops_expired_messages_before_delivery(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store()
        part = store.partition("q", 0, Limits(ttl=5))
        for p in payloads(3):
            part.enqueue(p)
        await store.flush()
        enqueued = part.take(1)[0].enqueued_at
        part.nack([0])
        assert part.take(10, now=enqueued + 4_000) != []
        part.nack([0, 1, 2])
        assert part.take(10, now=enqueued + 6_000) == []
        assert part.expired == 3 and part.depth == 0
        await store.close()
        store = open_store()
        assert store.partition("q", 0, Limits(ttl=5)).depth == 0, "expired messages are gone after a restart"
        await store.close()

    run(body())


# -- sync modes -------------------------------------------------------------------------------------------------

def test_async_mode_resolves_at_once_and_commits_within_the_interval(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(sync="async", flush_interval=0.005)
        part = store.partition("q", 0)
        future = part.enqueue(b"a")
        assert future.done()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while store.commits == 0 or part.take(1) == []:
            assert loop.time() < deadline, "async mode never committed"
            await asyncio.sleep(0.005)
        await store.close()
        store = open_store()
        assert [m.payload for m in store.partition("q", 0).take(5)] == [b"a"]
        await store.close()

    run(body())


def test_async_mode_commits_early_once_batch_size_is_pending(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(sync="async", flush_interval=60, batch_size=10)
        part = store.partition("q", 0)
        await store.flush()
        before = store.commits
        for p in payloads(25):
            part.enqueue(p)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while store.commits - before < 1:
            assert loop.time() < deadline, "no commit although batch_size messages were pending"
            await asyncio.sleep(0.001)
        assert len(part.take(100)) >= 10
        await store.close()

    run(body())


def test_bad_store_options() -> None:
    async def body() -> None:
        with pytest.raises(ValueError, match="sync must be"):
            Store(MemoryBackend(), sync="sometimes")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="batch_size"):
            Store(MemoryBackend(), batch_size=0)
        with pytest.raises(ValueError, match="ring_bytes and memory_budget must be at least 1 byte"):
            Store(MemoryBackend(), ring_bytes=0)
        with pytest.raises(ValueError, match="ring_bytes and memory_budget must be at least 1 byte"):
            Store(MemoryBackend(), memory_budget=0)

    run(body())


# -- LMDB: map growth and full disks -----------------------------------------------------------------------------

def test_lmdb_map_grows_when_full(tmp_path: Path) -> None:
    async def body() -> None:
        backend = LmdbBackend(tmp_path / "log", map_size=1 << 20)
        store = Store(backend)
        part = store.partition("q", 0)
        for _ in range(40):
            part.enqueue(b"x" * 100_000)
        await store.flush()
        assert backend.map_size >= 4 << 20
        assert part.depth == 40 and len(part.take(100)) == 40
        await store.close()

    run(body())


def test_lmdb_full_map_refuses_publishes_and_keeps_what_was_acknowledged(tmp_path: Path) -> None:
    async def body() -> None:
        store = Store(LmdbBackend(tmp_path / "log", map_size=1 << 20, max_map_size=1 << 20))
        part = store.partition("q", 0)
        part.enqueue(b"kept")
        await store.flush()
        flush = None
        for _ in range(30):
            flush = part.enqueue(b"x" * 100_000)
        with pytest.raises(StorageError, match="max_map_size"):
            await flush
        with pytest.raises(StorageError, match="max_map_size"):
            part.enqueue(b"refused while the log cannot write")
        assert part.depth == 1
        await store.close()

        store = Store(LmdbBackend(tmp_path / "log", map_size=1 << 20))
        part = store.partition("q", 0)
        assert [m.payload for m in part.take(10)] == [b"kept"]
        part.enqueue(b"after")
        assert part.last_offset > 30, "offsets given to refused messages are not reused"
        await store.close()

    run(body())


# -- crashes ------------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kill_after", [1, 150, 2_000, 20_000])
def test_sigkill_loses_nothing_that_resolved(tmp_path: Path, kill_after: int) -> None:
    """A writer killed with SIGKILL at some point: every message whose enqueue resolved is there, once, in order."""
    import os
    import signal
    import subprocess
    import sys

    from tests.support import wait_until

    partitions = 3
    path = tmp_path / "log"
    child = subprocess.Popen([sys.executable, str(ROOT / "tests" / "crash_writer.py"), str(path), str(partitions)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.stdout is not None
    buffer = b""
    try:
        def enough() -> bool:
            nonlocal buffer
            if child.poll() is not None:
                raise AssertionError(f"writer exited early: {child.stderr.read().decode()}")
            buffer += os.read(child.stdout.fileno(), 1 << 16)
            return buffer.count(b"\n") >= kill_after

        wait_until(enough, 60, f"{kill_after} resolved messages", interval=0)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    buffer += child.stdout.read()  # what the writer reported before it died
    lines = buffer.splitlines()
    resolved: dict[int, list[int]] = {p: [] for p in range(partitions)}
    for line in lines:
        p, o = map(int, line.split())
        resolved[p].append(o)

    async def check() -> None:
        store = Store(LmdbBackend(path, map_size=1 << 26))
        for p in range(partitions):
            part = store.partition("crash", p)
            messages = part.take(10_000_000)
            offsets = [m.offset for m in messages]
            assert offsets == sorted(set(offsets)), "exactly once, in offset order"
            assert all(m.payload == f"{p}:{m.offset}".encode() for m in messages), "nothing that was not published"
            missing = set(resolved[p]) - set(offsets)
            assert not missing, f"partition {p}: {len(missing)} resolved messages lost, e.g. {sorted(missing)[:5]}"
            assert part.depth == len(offsets)
            # Offsets continue above everything stored or resolved.
            part.enqueue(b"after")
            assert part.last_offset > max(offsets + resolved[p], default=-1)
        await store.close()

    run(check())
    assert sum(map(len, resolved.values())) >= kill_after


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 3 MiB tmpfs: a disk that really fills up."""
    import subprocess

    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); the max_map_size test covers the path")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_refuses_publishes_and_keeps_what_was_acknowledged(small_disk: Path) -> None:
    async def body() -> int:
        store = Store(LmdbBackend(small_disk / "log", map_size=64 << 20))
        part = store.partition("q", 0)
        stored = 0
        with pytest.raises(StorageError, match="disk full") as info:
            for _ in range(1000):
                flush = None
                for _ in range(10):
                    flush = part.enqueue(b"x" * 1000)
                await flush
                stored += 10
        # ENOSPC, or LMDB's EIO for a write the disk took only part of (the free space tells them apart).
        assert "No space left on device" in str(info.value) or "Input/output error" in str(info.value)
        with pytest.raises(StorageError, match="disk full"):
            part.enqueue(b"refused")
        assert part.depth == stored
        # Consuming still works while the disk is full.
        assert len(part.take(5)) == 5
        await store.close()
        return stored

    stored = run(body())
    assert stored > 100

    async def reopen() -> None:
        store = Store(LmdbBackend(small_disk / "log", map_size=64 << 20))
        part = store.partition("q", 0)
        assert part.depth == stored
        assert len(part.take(100_000)) == stored
        await store.close()

    run(reopen())


class FlakyBackend(MemoryBackend):
    """The in-memory backend with a switch that makes commits fail as a full disk would."""

    failing = False

    def commit(self, puts, deletes) -> None:  # type: ignore[override]
        if self.failing:
            raise StorageFull("disk full (simulated)")
        super().commit(puts, deletes)


def test_async_mode_keeps_acknowledged_messages_when_a_commit_fails() -> None:
    async def body() -> None:
        backend = FlakyBackend()
        store = Store(backend, sync="async", flush_interval=0.01)
        part = store.partition("q", 0)
        await store.flush()
        backend.failing = True
        assert part.enqueue(b"acked at once").done()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while store.failure is None:
            assert loop.time() < deadline, "the commit never failed"
            await asyncio.sleep(0.01)
        backend.failing = False
        while not (taken := part.take(5)):
            assert loop.time() < deadline, "the acknowledged message was dropped"
            await asyncio.sleep(0.01)
        assert [m.payload for m in taken] == [b"acked at once"] and store.failure is None
        await store.close()

    run(body())


def test_staged_writes_ride_the_next_commit_the_last_one_per_key_wins_and_a_failed_commit_keeps_them() -> None:
    async def body() -> None:
        backend = FlakyBackend()
        store = Store(backend)
        store.stage("sessions", b"a", b"1")
        store.stage("sessions", b"a", b"2")  # the last write of a key before a commit wins
        store.stage("retained", b"t", b"x")
        flush = store.pending_flush
        await flush
        assert backend.dbs["sessions"] == {b"a": b"2"} and backend.dbs["retained"] == {b"t": b"x"}
        backend.failing = True
        store.stage("sessions", b"a", None)  # a delete
        store.stage("sessions", b"b", b"3")
        failed = store.pending_flush
        with pytest.raises(StorageError):
            await failed
        store.stage("sessions", b"b", b"4")  # newer than the failed commit's write of the key: it wins
        backend.failing = False
        await store.flush()
        assert backend.dbs["sessions"] == {b"b": b"4"} and backend.dbs["retained"] == {b"t": b"x"}
        await store.close()

    run(body())


# -- replication's seam: append_at, advance_to, truncate, committed offset, epoch, read_messages ------------------

def uncommitted_count(part) -> int:
    """Messages pending or being committed, counted from the runs themselves."""
    count = len(part._pending) + sum(len(records) for _, records, _ in part._pending_runs)
    running = part.store._running
    if running is not None:
        for entry, runs, _ in running.appended:
            if entry is part:
                count += sum(len(b) for _, batches, _ in runs for b in batches)
    return count


def check_counts(part) -> None:
    """depth, ready and the committed offset agree with the segments, the runs and the in-flight set."""
    uncommitted = uncommitted_count(part)
    assert part.depth == sum(s.remaining for s in part._segments.values()) + uncommitted
    assert part.ready == part.depth - part.inflight - uncommitted
    assert part.committed_offset <= part.next_offset
    if not uncommitted:
        assert part.committed_offset == part.next_offset


def stored_segments(store: Store, part) -> dict[int, list[bytes]]:
    """The partition's segments as the backend holds them: first offset -> payloads (and a state for each)."""
    prefix = keys.pid_prefix(part.pid)
    first = keys.parse_segment_key
    segments = {first(k)[1]: keys.unpack_segment(v) for k, v in store.backend.scan(keys.SEGMENTS, prefix)}
    states = {first(k)[1]: keys.unpack_state(v)[1] for k, v in store.backend.scan(keys.STATES, prefix)}
    assert segments.keys() == states.keys()
    assert all(len(segments[first]) == len(states[first]) for first in segments)
    return segments


async def until_committing(store: Store) -> None:
    """Return while a commit is running: written to the backend, not yet applied (its flush not resolved)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not store._committing:
        assert loop.time() < deadline, "no commit started"
        await asyncio.sleep(0)


def test_append_at_contiguous_and_with_a_gap(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(batch_size=4)
        part = store.partition("q", 0)
        part.append_at(0, [b"a", b"b"])
        flush = part.append_at(5, [b"c"])  # a gap after pending appends: a separate run, a separate segment
        assert (part.next_offset, part.last_offset, part.depth, part.ready) == (6, 5, 3, 0)
        assert part.committed_offset == 0
        for below in (5, 3, 0):
            with pytest.raises(ValueError, match="below next_offset 6"):
                part.append_at(below, [b"x"])
        assert part.enqueue(b"d") is flush and part.last_offset == 6
        check_counts(part)
        await flush
        assert part.committed_offset == 7 and part.ready == 4
        assert len(part.ring) == 4, "messages after the gap entered the ring directly"
        assert sorted(stored_segments(store, part)) == [0, 5]
        # A gap with nothing pending: the committed offset moves past it at once.
        part.append_at(10, [b"e", b"f"])
        assert part.committed_offset == 10 and part.ready == 4
        check_counts(part)
        await store.flush()
        assert len(part.ring) == 6 and part.committed_offset == 12
        got = part.take(100)
        assert [(m.offset, m.payload, m.deliveries) for m in got] == [
            (0, b"a", 1), (1, b"b", 1), (5, b"c", 1), (6, b"d", 1), (10, b"e", 1), (11, b"f", 1)]
        part.ack([0, 10])
        check_counts(part)
        await store.close()

        store = open_store(batch_size=4)
        part = store.partition("q", 0)
        assert (part.next_offset, part.depth, part.committed_offset) == (12, 4, 12)
        assert [(m.offset, m.payload, m.deliveries) for m in part.take(100)] == [
            (1, b"b", 2), (5, b"c", 2), (6, b"d", 2), (11, b"f", 2)]
        part.enqueue(b"g")
        assert part.last_offset == 12
        await store.close()

    run(body())


def test_append_at_keeps_delivery_counts(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(batch_size=2)
        part = store.partition("q", 0)
        part.enqueue(b"new")
        part.append_at(1, [b"moved1", b"moved2", b"moved3"], deliveries=bytes([3, 0, 7]))
        part.enqueue(b"new2")
        part.append_at(5, [b"zero"], deliveries=b"\x00")
        with pytest.raises(ValueError, match="2 delivery counts for 1 records"):
            part.append_at(6, [b"x"], deliveries=b"\x01\x02")
        with pytest.raises(ValueError, match="a delivery count above 254"):
            part.append_at(6, [b"x"], deliveries=b"\xff")
        assert part.depth == 6 and part.next_offset == 6
        await store.flush()
        assert stored_segments(store, part) == {0: [b"new"], 1: [b"moved1", b"moved2"], 3: [b"moved3"],
                                                4: [b"new2", b"zero"]}
        assert part.read_messages(0, 10) == [(0, b"new", 0), (1, b"moved1", 3), (2, b"moved2", 0),
                                             (3, b"moved3", 7), (4, b"new2", 0), (5, b"zero", 0)]
        await store.close()

        store = open_store(batch_size=2)
        part = store.partition("q", 0)
        assert [(m.offset, m.deliveries) for m in part.take(10)] == [(0, 1), (1, 4), (2, 1), (3, 8), (4, 1), (5, 1)]
        await store.close()

    run(body())


def test_append_at_while_a_commit_runs(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(batch_size=4)
        part = store.partition("q", 0)
        await store.flush()
        first = part.enqueue_many(payloads(3))
        await until_committing(store)
        assert not first.done() and part.committed_offset == 0
        second = part.append_at(8, [b"x", b"y"], deliveries=b"\x02\x00")
        assert second is not first
        part.append_at(10, [b"z"])
        with pytest.raises(ValueError):
            part.append_at(9, [b"w"])
        check_counts(part)
        assert part.ready == 0
        await first
        assert part.committed_offset == 8, "the gap is no message: committed up to the pending run"
        check_counts(part)
        assert part.ready == 3
        await second
        assert part.committed_offset == 11 and part.ready == 6
        assert [(m.offset, m.deliveries) for m in part.take(100)] == [(0, 1), (1, 1), (2, 1), (8, 3), (9, 1),
                                                                      (10, 1)]
        await store.close()

        store = open_store(batch_size=4)
        part = store.partition("q", 0)
        assert part.next_offset == 11
        assert [(m.offset, m.payload, m.deliveries) for m in part.take(100)] == [
            (0, b"m0", 2), (1, b"m1", 2), (2, b"m2", 2), (8, b"x", 4), (9, b"y", 2), (10, b"z", 2)]
        await store.close()

    run(body())


def test_messages_after_a_gap_wait_on_disk_behind_older_ones(open_store: OpenStore) -> None:
    async def body() -> None:
        data = [bytes([i]) * 1000 for i in range(20)]
        store = open_store(ring_bytes=5 * cost(data[0]), batch_size=4)
        part = store.partition("q", 0)
        part.enqueue_many(data[:8])
        part.append_at(100, data[8:])
        await store.flush()
        assert len(part.ring) == 5 and part.ready == 20
        got = []
        while batch := part.take(3):
            got += batch
            part.ack(m.offset for m in batch)
        assert [m.offset for m in got] == list(range(8)) + list(range(100, 112))
        assert [m.payload for m in got] == data
        part.append_at(200, [b"after"])
        await store.flush()
        assert len(part.ring) == 1, "nothing waits on disk: straight into the ring, past the gap"
        await store.close()

    run(body())


def test_advance_to_raises_the_high_water_mark(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store()
        part = store.partition("q", 0)
        part.enqueue_many(payloads(3))
        await store.flush()
        part.advance_to(100)
        part.advance_to(50)  # lower: nothing
        assert part.next_offset == 100 and part.committed_offset == 100 and part.ready == 3
        await store.flush()
        await store.close()

        store = open_store()
        part = store.partition("q", 0)
        assert part.next_offset == 100 and part.depth == 3
        part.enqueue(b"pending")
        part.advance_to(200)  # with an append pending: committed only once it is
        assert part.last_offset == 100 and part.committed_offset == 100
        check_counts(part)
        waiter = part.wait_committed(150)
        await store.flush()
        assert waiter.done() and part.committed_offset == 200
        part.enqueue(b"after")
        assert part.last_offset == 200
        check_counts(part)
        await store.close()

        store = open_store()
        part = store.partition("q", 0)
        assert part.next_offset == 201
        assert [m.offset for m in part.take(10)] == [0, 1, 2, 100, 200]
        await store.close()

    run(body())


def test_truncate_whole_and_straddling_segments_then_append_at_the_point(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(batch_size=4)
        part = store.partition("q", 0)
        part.enqueue_many(payloads(10))  # segments 0-3, 4-7, 8-9
        await store.flush()
        taken = part.take(3)
        part.ack([taken[0].offset])
        part.nack([2])
        assert part.truncate(6) == 4
        assert (part.next_offset, part.depth, part.inflight, part.ready, part.committed_offset) == (6, 5, 1, 4, 6)
        check_counts(part)
        assert part.truncate(6) == 0 and part.truncate(99) == 0 and part.next_offset == 6
        await store.flush()
        assert stored_segments(store, part) == {0: payloads(4), 4: [b"m4", b"m5"]}
        part.append_at(6, [b"n6", b"n7"])
        await store.flush()
        got = part.take(10)
        assert [(m.offset, m.payload, m.deliveries) for m in got] == [
            (2, b"m2", 2), (3, b"m3", 1), (4, b"m4", 1), (5, b"m5", 1), (6, b"n6", 1), (7, b"n7", 1)]
        part.ack([3])
        await store.close()

        store = open_store(batch_size=4)
        part = store.partition("q", 0)
        assert (part.next_offset, part.depth) == (8, 6)
        assert [(m.offset, m.payload) for m in part.take(10)] == [
            (1, b"m1"), (2, b"m2"), (4, b"m4"), (5, b"m5"), (6, b"n6"), (7, b"n7")]
        await store.close()

    run(body())


def test_truncate_forgets_in_flight_and_requeued_messages(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(batch_size=3, ring_capacity=4)
        part = store.partition("q", 0)
        part.enqueue_many(payloads(12))
        await store.flush()
        taken = part.take(8)
        part.nack([1, 6])
        assert part.truncate(5) == 7  # 5, 6 (requeued), 7 (in flight), 8-11 (in the ring and on disk)
        assert part.ack([5, 7]) == 0, "a late ack of a truncated message counts for nothing"
        assert part.nack([7]) == 0
        assert (part.depth, part.inflight, part.ready) == (5, 4, 1)
        check_counts(part)
        assert [m.offset for m in part.take(10)] == [1]
        assert part.ack(m.offset for m in taken[:4]) == 4  # 0-3; 4 stays in flight
        await store.flush()
        assert part.depth == 1
        part.append_at(5, [b"again"])
        await store.close()

        store = open_store(batch_size=3)
        part = store.partition("q", 0)
        assert [(m.offset, m.payload) for m in part.take(10)] == [(4, b"m4"), (5, b"again")]
        await store.close()

    run(body())


def test_truncate_pending_appends(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(batch_size=4)
        part = store.partition("q", 0)
        part.enqueue_many(payloads(5))
        await store.flush()
        part.enqueue_many(payloads(5, "p"))  # 5-9, pending
        part.append_at(20, [b"far"], deliveries=b"\x04")
        assert part.truncate(7) == 4
        assert (part.next_offset, part.depth, part.committed_offset, part.ready) == (7, 7, 5, 5)
        check_counts(part)
        part.append_at(7, [b"x"])
        await store.flush()
        assert part.committed_offset == 8
        assert [m.payload for m in part.take(10)] == payloads(5) + [b"p0", b"p1", b"x"]
        # Everything pending: the committed offset is the truncation point at once.
        part.enqueue_many(payloads(3, "q"))
        assert part.truncate(8) == 3 and part.committed_offset == 8 and part.next_offset == 8
        check_counts(part)
        await store.close()

        store = open_store(batch_size=4)
        part = store.partition("q", 0)
        assert part.next_offset == 8 and part.depth == 8
        await store.close()

    run(body())


def test_truncate_while_a_commit_runs(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(batch_size=4)
        part = store.partition("q", 0)
        part.enqueue_many(payloads(2))
        await store.flush()
        flush = part.enqueue_many(payloads(8, "r"))  # 2-9 in segments 2-5, 6-9
        await until_committing(store)
        part.enqueue(b"pending")  # 10
        waiters = [part.wait_committed(o) for o in (4, 7, 10)]
        assert part.truncate(5) == 6
        assert part.next_offset == 5 and part.depth == 5
        check_counts(part)
        redo = part.append_at(5, [b"s5", b"s6"])
        await flush
        assert waiters[0].done() and waiters[0].exception() is None
        for waiter in waiters[1:]:
            with pytest.raises(Truncated):
                waiter.result()
        assert part.committed_offset == 5 and part.ready == 5
        check_counts(part)
        await redo
        assert stored_segments(store, part) == {0: payloads(2), 2: [b"r0", b"r1", b"r2"], 5: [b"s5", b"s6"]}
        assert [m.payload for m in part.take(10)] == payloads(2) + [b"r0", b"r1", b"r2", b"s5", b"s6"]
        await store.close()

        store = open_store(batch_size=4)
        part = store.partition("q", 0)
        assert part.next_offset == 7
        assert [m.payload for m in part.take(10)] == payloads(2) + [b"r0", b"r1", b"r2", b"s5", b"s6"]
        await store.close()

    run(body())


def test_truncate_everything_reuses_offsets(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store()
        part = store.partition("q", 0)
        part.enqueue_many(payloads(4))
        await store.flush()
        part.ack(m.offset for m in part.take(2))
        await store.flush()
        assert part.first_offset == 2
        assert part.truncate(0) == 2
        assert (part.depth, part.next_offset, part.first_offset, part.ready) == (0, 0, 0, 0)
        assert part.take(5) == []
        part.append_at(0, [b"again"])
        await store.close()

        store = open_store()
        part = store.partition("q", 0)
        assert part.next_offset == 1
        assert [(m.offset, m.payload) for m in part.take(5)] == [(0, b"again")]
        with pytest.raises(ValueError, match="negative"):
            part.truncate(-1)
        await store.close()

    run(body())


def test_committed_offset_and_wait_committed(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store()
        part = store.partition("q", 0)
        assert part.committed_offset == 0
        part.enqueue_many(payloads(3))
        waiters = {o: part.wait_committed(o) for o in (2, 0, 5, 10)}
        assert part.committed_offset == 0 and not any(w.done() for w in waiters.values())
        await store.flush()
        assert part.committed_offset == 3
        assert [o for o, w in waiters.items() if w.done()] == [2, 0]
        assert part.wait_committed(1).done()
        part.append_at(10, [b"x"])  # 5 lies in the gap: resolved at once, nothing uncommitted below it
        assert waiters[5].done() and not waiters[10].done() and part.committed_offset == 10
        await store.flush()
        assert waiters[10].done() and part.committed_offset == 11
        await store.close()

    run(body())


@pytest.mark.parametrize("sync", ["fsync", "async"])
def test_wait_committed_fails_with_the_commit(sync: str) -> None:
    async def body() -> None:
        backend = FlakyBackend()
        store = Store(backend, sync=sync, flush_interval=0.01)
        part = store.partition("q", 0)
        part.enqueue(b"kept")
        await store.flush()
        backend.failing = True
        part.enqueue_many([b"a", b"b"])
        waiter, later = part.wait_committed(2), part.wait_committed(3)
        with pytest.raises(StorageFull):
            await waiter
        assert not later.done()
        backend.failing = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while store.failure is not None:
            assert loop.time() < deadline, "the store never recovered"
            await asyncio.sleep(0.01)
        if sync == "fsync":  # refused: forgotten, their offsets unused
            assert part.depth == 1 and part.committed_offset == 3
        else:  # acknowledged already: kept and retried
            await part.wait_committed(2)
            assert part.depth == 3 and part.committed_offset == 3
        part.enqueue(b"next")
        await later
        check_counts(part)
        await store.close()

    run(body())


def test_wait_committed_fails_when_the_map_is_full(tmp_path: Path) -> None:
    async def body() -> None:
        store = Store(LmdbBackend(tmp_path / "log", map_size=1 << 20, max_map_size=1 << 20))
        part = store.partition("q", 0)
        part.enqueue(b"kept")
        await store.flush()
        for _ in range(30):
            part.enqueue(b"x" * 100_000)
        waiter = part.wait_committed(part.last_offset)
        with pytest.raises(StorageError, match="max_map_size"):
            await waiter
        assert part.committed_offset == part.next_offset == 31 and part.depth == 1
        await store.close()

    run(body())


def test_epoch_is_stored_with_the_partition(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store()
        part = store.partition("q", 0)
        other = store.partition("q", 1)
        assert part.epoch == 0
        part.set_epoch(3)
        part.set_epoch(3)
        with pytest.raises(ValueError, match="below the stored epoch 3"):
            part.set_epoch(2)
        part.enqueue(b"m")
        await store.close()

        store = open_store()
        part = store.partition("q", 0)
        assert part.epoch == 3 and store.partition("q", 1).epoch == 0 and other.epoch == 0
        part.set_epoch(7)  # alone: written by a commit of its own
        await store.flush()
        # A partition record of the older 12-byte form (no epoch) reads as epoch 0.
        old = struct.pack(">IQ", store.partition("q", 1).pid, 42)
        store.backend.commit([(keys.PARTITIONS, keys.partition_key("q", 1), old)], [])
        await store.close()

        store = open_store()
        assert store.partition("q", 0).epoch == 7
        assert [m.payload for m in store.partition("q", 0).take(5)] == [b"m"]
        old_form = store.partition("q", 1)
        assert old_form.epoch == 0 and old_form.next_offset == 42
        old_form.set_epoch(1)
        await store.flush()
        assert len(store.backend.get(keys.PARTITIONS, keys.partition_key("q", 1))) == 20
        await store.close()

    run(body())


def test_partition_value_round_trip() -> None:
    assert keys.unpack_partition(keys.pack_partition(7, 1 << 40, 1 << 33)) == (7, 1 << 40, 1 << 33, [])
    assert keys.unpack_partition(keys.pack_partition(7, 5)) == (7, 5, 0, [])
    assert keys.unpack_partition(struct.pack(">IQ", 9, 12)) == (9, 12, 0, [])
    value = keys.pack_segment([b"ab", b"", b"cde"])
    for view in (value, memoryview(value)):
        assert keys.unpack_segment(keys.truncate_segment(view, 2)) == [b"ab", b""]
        assert keys.truncate_segment(view, 3) == value
    with pytest.raises(ValueError):
        keys.truncate_segment(value, 4)


def test_read_messages_and_first_offset(open_store: OpenStore) -> None:
    async def body() -> None:
        store = open_store(batch_size=3)
        part = store.partition("q", 0)
        assert part.first_offset == 0 and part.read_messages(0, 10) == []
        part.enqueue_many(payloads(8))
        assert part.first_offset == 0 and part.read_messages(0, 10) == [], "only committed messages"
        await store.flush()
        part.take(4)
        part.ack([0, 1, 3])
        part.nack([2])
        state = (len(part.ring), part.inflight, part.ready, part.depth)
        assert part.first_offset == 2
        assert part.read_messages(0, 100) == [(2, b"m2", 1)] + [(o, f"m{o}".encode(), 0) for o in range(4, 8)]
        assert part.read_messages(5, 2) == [(5, b"m5", 0), (6, b"m6", 0)]
        assert part.read_messages(8, 5) == [] and part.read_messages(0, 0) == []
        assert (len(part.ring), part.inflight, part.ready, part.depth) == state, "nothing was taken"
        assert [m.offset for m in part.take(10)] == [2, 4, 5, 6, 7]
        part.truncate(5)  # a segment cut, not yet rewritten on disk
        assert part.read_messages(0, 100) == [(2, b"m2", 2), (4, b"m4", 1)]
        part.ack([2, 4])
        assert part.first_offset == 5 == part.next_offset
        await store.flush()
        part.advance_to(9)
        part.enqueue(b"x")
        assert part.first_offset == 9
        await store.close()

    run(body())


@pytest.mark.parametrize("seed", range(6))
def test_replication_verbs_against_a_model(open_store: OpenStore, seed: int) -> None:
    """Random appends, gaps, takes, acks, nacks, truncations and restarts (some while a commit runs), checked against
    a model of the log after every step and by draining it at the end."""
    run(model_run(open_store, seed))


@pytest.mark.parametrize("sync", ["fsync", "async"])
@pytest.mark.parametrize("seed", range(4))
def test_replication_verbs_against_a_model_with_failing_commits(sync: str, seed: int) -> None:
    """The same, on a backend whose commits fail now and then (a full disk): in fsync mode the messages of a failed
    commit are forgotten (their future fails), in async mode kept and retried."""
    backend = FlakyBackend()
    run(model_run(lambda **options: Store(backend, sync=sync, **options), seed, backend))


async def model_run(open_store: OpenStore, seed: int, flaky: FlakyBackend | None = None) -> None:
    import random

    rng = random.Random(seed)
    options = {"batch_size": 3, "ring_capacity": 8, "ring_bytes": 6 * cost(b"x" * 20), "flush_interval": 0.002}
    store = open_store(**options)
    part = store.partition("q", 0)
    # The model: offset -> [payload, delivery count]; which are in flight, handed back, committed.
    messages: dict[int, list] = {}
    inflight: set[int] = set()
    requeued: set[int] = set()
    committed: set[int] = set()
    # Futures of appends not known durable yet, with what they appended (fsync mode forgets them if they fail).
    appends: list[tuple[asyncio.Future, list[tuple[int, bytes]]]] = []
    # wait_committed futures not resolved yet, by offset.
    waiters: list[tuple[int, asyncio.Future]] = []
    next_offset = 0
    serial = 0

    def records(n: int) -> list[bytes]:
        nonlocal serial
        serial += n
        return [f"{serial - i}".encode().ljust(rng.choice((1, 20)), b".") for i in range(n)]

    def settle_appends() -> None:
        for future, appended in appends:
            if future.done() and future.exception() is not None and store.sync == "fsync":
                for offset, payload in appended:
                    if offset in messages and messages[offset][0] is payload:
                        del messages[offset]
        appends[:] = [(f, a) for f, a in appends if not f.done()]

    async def flush() -> None:
        nonlocal committed
        while True:
            try:
                await store.flush()
                break
            except StorageError:
                if flaky is not None and rng.random() < 0.5:
                    flaky.failing = False
        settle_appends()
        committed = set(messages)

    async def flush_and_check(step: int) -> None:
        await flush()
        assert part.committed_offset == next_offset, step
        expected_log = [(o, messages[o][0], min(messages[o][1], 254)) for o in sorted(messages)]
        assert part.read_messages(0, 1000) == expected_log, step
        assert part.first_offset == (min(messages) if messages else next_offset), step

    for step in range(250):
        action = rng.random()
        if flaky is not None and rng.random() < 0.04:
            flaky.failing = not flaky.failing
        try:
            if action < 0.15:
                batch = records(rng.randint(1, 5))
                appends.append((part.enqueue_many(batch), list(zip(range(next_offset, next_offset + 5), batch))))
                for payload in batch:
                    messages[next_offset] = [payload, 0]
                    next_offset += 1
            elif action < 0.3:
                offset = next_offset + rng.choice((0, 0, 1, 4))
                batch = records(rng.randint(1, 4))
                counts = bytes(rng.choice((0, 0, 2, 9)) for _ in batch) if rng.random() < 0.5 else None
                appends.append((part.append_at(offset, batch, counts), list(zip(range(offset, offset + 5), batch))))
                for i, payload in enumerate(batch):
                    messages[offset + i] = [payload, counts[i] if counts else 0]
                next_offset = offset + len(batch)
            elif action < 0.45:
                got = part.take(rng.randint(1, 6))
                expected = sorted(requeued) + sorted(o for o in committed if o not in requeued and o not in inflight)
                assert [m.offset for m in got] == expected[:len(got)], step
                assert got or not expected, step
                for m in got:
                    messages[m.offset][1] += 1
                    assert (m.payload, m.deliveries) == tuple(messages[m.offset]), step
                    inflight.add(m.offset)
                    requeued.discard(m.offset)
            elif action < 0.55 and inflight:
                chosen = rng.sample(sorted(inflight), rng.randint(1, len(inflight)))
                assert part.ack([*chosen, next_offset + 5]) == len(chosen)
                for o in chosen:
                    inflight.discard(o)
                    committed.discard(o)
                    del messages[o]
            elif action < 0.62 and inflight:
                chosen = rng.sample(sorted(inflight), rng.randint(1, len(inflight)))
                assert part.nack(chosen) == len(chosen)
                inflight.difference_update(chosen)
                requeued.update(chosen)
            elif action < 0.72:
                offset = rng.randint(max(next_offset - 8, 0), next_offset + 1)
                removed = part.truncate(offset)
                gone = [o for o in messages if o >= offset]
                assert removed == len(gone), step
                for o in gone:
                    del messages[o]
                    inflight.discard(o)
                    requeued.discard(o)
                    committed.discard(o)
                next_offset = min(next_offset, offset)
            elif action < 0.76:
                offset = next_offset + rng.randint(0, 3)
                part.advance_to(offset)
                next_offset = offset
            elif action < 0.86:
                if store._dirty_partitions:
                    await until_committing(store)  # what is pending now is being committed: the next steps overlap
                    settle_appends()
            elif action < 0.96 or flaky is not None and flaky.failing:
                await flush_and_check(step)
            else:
                await flush_and_check(step)  # (close gives up on a failing commit)
                await store.close()
                store = open_store(**options)
                part = store.partition("q", 0)
                for _, waiter in waiters:  # the old store's: never resolved if not yet
                    if waiter.done():
                        waiter.exception()
                waiters.clear()
                recovered = [(o, p) for o, p, _ in part.read_messages(0, 1000)]
                assert recovered == [(o, messages[o][0]) for o in sorted(messages)], step
                committed = set(messages)  # close flushed everything
                inflight.clear()
                requeued.clear()
        except StorageError:  # refused while the store cannot write: nothing stored
            assert store.failure is not None and action < 0.3, step
        state = (part.next_offset, part.depth, part.inflight)
        assert state == (next_offset, len(messages), len(inflight)), (step, action, state)
        check_counts(part)
        for offset, waiter in waiters:
            if not waiter.done():
                assert offset >= part.committed_offset, step
            elif waiter.exception() is None:
                assert offset < part.committed_offset, step
            else:
                assert isinstance(waiter.exception(), (Truncated, StorageError)), step
        waiters[:] = [(o, w) for o, w in waiters if not w.done()]
        if rng.random() < 0.1:
            offset = rng.randint(0, next_offset + 3)
            waiter = part.wait_committed(offset)
            assert waiter.done() == (offset < part.committed_offset), step
            if not waiter.done():
                waiters.append((offset, waiter))
    if flaky is not None:
        flaky.failing = False
    await flush()
    for _, waiter in waiters:
        if waiter.done():
            waiter.exception()  # retrieved
    drained = []
    while batch := part.take(4):
        drained += batch
        part.ack(m.offset for m in batch)
    assert sorted(m.offset for m in drained) == sorted(o for o in messages if o not in inflight)
    assert all(m.payload == messages[m.offset][0] for m in drained)
    await store.close()
