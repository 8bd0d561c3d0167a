"""Partition log throughput (run: make bench): durable enqueue, ack, recovery, memory per queued message.

Each benchmark runs its whole workload inside one measured round (pytest-benchmark's time is the time of that
workload) and records messages per second in ``extra_info``; ``bench/RESULTS.md`` has the figures.
Enqueues go through the per-message API (``PartitionLog.enqueue``), yielding to the event loop every 1,024
messages as a broker does between socket reads, and the round ends when the last flush has resolved.
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import pytest
import uvloop

from shoalmq.queue.storage import LmdbBackend, Store

SIZES = {"100B": 100, "1KiB": 1024, "64KiB": 64 * 1024}
# Enough messages for a steady state, without writing more than ~1 GB per round.
COUNTS = {"100B": 1_000_000, "1KiB": 300_000, "64KiB": 8_000}


async def _enqueue(store: Store, partitions: int, payload: bytes, count: int) -> None:
    parts = [store.partition("bench", p) for p in range(partitions)]
    await store.flush()
    flush = None
    for i in range(count):
        flush = parts[i % partitions].enqueue(payload)
        if i & 1023 == 1023:
            await asyncio.sleep(0)
    await flush
    await store.flush()


def _fresh_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="shoalmq-bench-", dir="/tmp"))


@pytest.mark.parametrize("sync", ["fsync", "async"])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("partitions", [1, 10])
def test_durable_enqueue(benchmark, partitions: int, size: str, sync: str) -> None:
    payload = b"x" * SIZES[size]
    count = COUNTS[size]
    dirs: list[Path] = []
    commits: list[int] = []

    def setup() -> tuple[tuple[Path], dict]:
        path = _fresh_dir()
        dirs.append(path)
        return (path,), {}

    def workload(path: Path) -> None:
        async def body() -> None:
            store = Store(LmdbBackend(path / "log", map_size=4 << 30), sync=sync)
            await _enqueue(store, partitions, payload, count)
            await store.close()
            commits.append(store.commits)

        uvloop.run(body())

    try:
        benchmark.pedantic(workload, setup=setup, rounds=3, iterations=1)
    finally:
        for path in dirs:
            shutil.rmtree(path, ignore_errors=True)
    best = benchmark.stats.stats.min
    benchmark.extra_info["msgs_per_s"] = round(count / best)
    benchmark.extra_info["MB_per_s"] = round(count * len(payload) / best / 1e6, 1)
    benchmark.extra_info["messages_per_commit"] = round(count / (sum(commits) / len(commits)))


@pytest.mark.parametrize("sync", ["fsync", "async"])
@pytest.mark.parametrize("window", [1_000, 10_000])
def test_durable_enqueue_with_a_window(benchmark, window: int, sync: str) -> None:
    """Like publishers with a window of unacknowledged messages: at most ``window`` enqueues unresolved."""
    count = 300_000
    dirs: list[Path] = []
    commits: list[int] = []

    def setup() -> tuple[tuple[Path], dict]:
        dirs.append(_fresh_dir())
        return (dirs[-1],), {}

    def workload(path: Path) -> None:
        async def body() -> None:
            store = Store(LmdbBackend(path / "log", map_size=4 << 30), sync=sync)
            part = store.partition("bench", 0)
            await store.flush()
            start = store.commits
            outstanding: list[tuple[int, asyncio.Future[None]]] = []  # (messages enqueued so far, flush)
            payload = b"x" * 100
            for i in range(count):
                flush = part.enqueue(payload)
                if not outstanding or outstanding[-1][1] is not flush:
                    outstanding.append((i, flush))
                if i - outstanding[0][0] >= window:
                    await outstanding.pop(0)[1]
                if i & 1023 == 1023:
                    await asyncio.sleep(0)  # a broker returns to the loop between socket reads
            await part.enqueue(payload)
            await store.close()
            commits.append(store.commits - start)

        uvloop.run(body())

    try:
        benchmark.pedantic(workload, setup=setup, rounds=3, iterations=1)
    finally:
        for path in dirs:
            shutil.rmtree(path, ignore_errors=True)
    benchmark.extra_info["msgs_per_s"] = round(count / benchmark.stats.stats.min)
    benchmark.extra_info["messages_per_commit"] = round(count / (sum(commits) / len(commits)))


def test_ack_throughput(benchmark) -> None:
    count = 500_000
    path = _fresh_dir()

    def setup() -> tuple[tuple, dict]:
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        shutil.rmtree(path, ignore_errors=True)

        async def fill() -> tuple[Store, list[int]]:
            store = Store(LmdbBackend(path / "log", map_size=4 << 30))
            await _enqueue(store, 1, b"x" * 100, count)
            part = store.partition("bench", 0)
            offsets = [m.offset for m in part.take(count)]
            return store, offsets

        store, offsets = loop.run_until_complete(fill())
        return (loop, store, offsets), {}

    def workload(loop: asyncio.AbstractEventLoop, store: Store, offsets: list[int]) -> None:
        async def body() -> None:
            part = store.partition("bench", 0)
            for i in range(0, len(offsets), 1000):
                part.ack(offsets[i:i + 1000])
                await asyncio.sleep(0)
            await store.flush()
            assert part.depth == 0
            await store.close()

        loop.run_until_complete(body())
        loop.close()

    try:
        benchmark.pedantic(workload, setup=setup, rounds=3, iterations=1)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    benchmark.extra_info["acks_per_s"] = round(count / benchmark.stats.stats.min)


def test_recovery_of_one_million_messages(benchmark) -> None:
    count = 1_000_000
    path = _fresh_dir()
    try:
        async def fill() -> None:
            store = Store(LmdbBackend(path / "log", map_size=4 << 30))
            await _enqueue(store, 1, b"x" * 100, count)
            await store.close()

        uvloop.run(fill())

        def recover() -> None:
            async def body() -> None:
                store = Store(LmdbBackend(path / "log", map_size=4 << 30))
                part = store.partition("bench", 0)
                assert part.depth == count and len(part.ring) == store.ring_capacity
                store.backend.close()

            uvloop.run(body())

        benchmark.pedantic(recover, rounds=5, iterations=1)
        benchmark.extra_info["messages"] = count
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_memory_per_queued_message(benchmark) -> None:
    """Live Python memory per queued (committed, not delivered) message, 1M distinct 100-byte payloads.

    tracemalloc counts what the process keeps alive: the ring's payload objects (16,384 of them) and the
    per-segment state of the messages that wait on disk. The ring's fixed-width C arrays are allocated once per
    partition (26 bytes a slot) and are not in this figure.
    """
    count = 1_000_000
    path = _fresh_dir()
    result: dict[str, float] = {}

    def measure() -> None:
        async def body() -> None:
            store = Store(LmdbBackend(path / "log", map_size=4 << 30))
            part = store.partition("bench", 0)
            await store.flush()
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            flush = None
            for i in range(count):
                flush = part.enqueue(b"%100d" % i)
                if i & 1023 == 1023:
                    await asyncio.sleep(0)
            await flush
            await store.flush()
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            result["bytes_per_message"] = (after - before) / count
            result["in_ring"] = len(part.ring)
            result["ring_bytes_per_held_message"] = (after - before) / len(part.ring)
            await store.close()

        uvloop.run(body())

    try:
        benchmark.pedantic(measure, rounds=1, iterations=1)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    benchmark.extra_info.update({k: round(v, 1) for k, v in result.items()})
