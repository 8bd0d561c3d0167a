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

from shoalmq.cluster.transport import EnqueueClient, start_server
from shoalmq.queue.config import QueueConfig
from shoalmq.queue.manager import QueueManager
from shoalmq.queue.record import encode_record
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
            record = encode_record(b"", b"x" * 100)
            for n in range(COUNT):
                if client is not None:
                    last = client.enqueue_records("bench", n % 8, 0, [record])
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


def test_one_small_message_each_way_on_a_stream(benchmark) -> None:
    """What one gRPC stream message costs: 2,000 request/answer pairs on one bidirectional stream, one at a time,
    both ends in this process. Whatever a message carries, this is paid per message, which is why every path
    between nodes sends batches."""
    import grpc

    from shoalmq.cluster.transport import GRPC_OPTIONS
    from shoalmq.proto import broker_pb2, broker_pb2_grpc

    pairs = 2_000

    class Echo(broker_pb2_grpc.BrokerServicer):
        async def EnqueueRemote(self, request_iterator, context):  # noqa: N802
            async for batch in request_iterator:
                yield broker_pb2.EnqueueAck(batch_id=batch.batch_id)

    def workload() -> None:
        async def body() -> None:
            server = grpc.aio.server(options=GRPC_OPTIONS)
            broker_pb2_grpc.add_BrokerServicer_to_server(Echo(), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
            outgoing: asyncio.Queue = asyncio.Queue()

            async def requests():
                while (item := await outgoing.get()) is not None:
                    yield item

            call = broker_pb2_grpc.BrokerStub(channel).EnqueueRemote(requests())
            outgoing.put_nowait(broker_pb2.EnqueueBatch(batch_id=0))
            answered = 0
            async for _ack in call:
                answered += 1
                if answered == pairs:
                    break
                outgoing.put_nowait(broker_pb2.EnqueueBatch(batch_id=answered))
            outgoing.put_nowait(None)
            call.cancel()
            await channel.close()
            await server.stop(None)

        uvloop.run(body())

    benchmark.pedantic(workload, rounds=3, iterations=1)
    benchmark.extra_info["us_per_message"] = round(benchmark.stats.stats.min / (2 * pairs) * 1e6, 1)
