"""Partition logs: the same test bodies run against the LMDB backend and the in-memory one."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from shoalmq.errors import PayloadTooLarge, QueueFull, StorageError, StorageFull
from shoalmq.queue.storage import Limits, LmdbBackend, MemoryBackend, Store, keys
from shoalmq.queue.storage.log import RECORD_OVERHEAD

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
