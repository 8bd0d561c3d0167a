"""Forwarding publishes to a partition's owner over gRPC (EnqueueRemote), against enqueueing locally.

Both in one process (client and server share its CPU), 100 B messages, fsync'd LMDB on the owner, 1,000 messages
per event-loop turn (the batch one socket read of a busy publisher would give).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest
import uvloop

from shoalmq.cluster.transport import EnqueueClient, RemoteMessage, start_server
from shoalmq.queue.manager import QueueConfig, QueueManager
from shoalmq.queue.storage import LmdbBackend, Store

COUNT = 100_000
PER_TURN = 1_000


@pytest.mark.parametrize("path", ["local", "forwarded"])
def test_enqueue_local_vs_forwarded(benchmark, path: str) -> None:
    dirs: list[Path] = []

    def workload() -> None:
        work = Path(tempfile.mkdtemp(prefix="shoalmq-bench-", dir="/tmp"))
        dirs.append(work)

        async def body() -> None:
            owner = QueueManager(Store(LmdbBackend(work / "log", map_size=2 << 30)),
                                 defaults=QueueConfig(partitions=8))
            server, port = await start_server(owner, "127.0.0.1:0")
            client = EnqueueClient(f"127.0.0.1:{port}") if path == "forwarded" else None
            queue = owner.queue("bench")
            last = None
            for n in range(COUNT):
                if client is not None:
                    last = client.enqueue(RemoteMessage("bench", n % 8, 0, "", b"x" * 100))
                else:
                    last = queue.publish("", b"x" * 100, n % 8)
                if n % PER_TURN == PER_TURN - 1:
                    await asyncio.sleep(0)
            await last
            assert queue.depth == COUNT
            if client is not None:
                await client.close()
            await server.stop(0)
            owner.close()
            await owner.store.close()

        uvloop.run(body())

    try:
        benchmark.pedantic(workload, rounds=3, iterations=1)
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    benchmark.extra_info["msgs_per_s"] = round(COUNT / benchmark.stats.stats.min)
