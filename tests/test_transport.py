"""The gRPC transport between nodes (EnqueueRemote), on real gRPC servers over loopback."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from shoalmq.cluster.transport import EnqueueClient, ForwardError, Status, start_server
from shoalmq.errors import NotOwner, StaleEpoch
from shoalmq.queue.config import QueueConfig
from shoalmq.queue.manager import QueueManager
from shoalmq.queue.record import encode_record
from shoalmq.queue.storage import LmdbBackend, MemoryBackend, Store

ROOT = Path(__file__).resolve().parent.parent


def send(client: EnqueueClient, queue: str, partition: int, epoch: int, key: str,
         payload: bytes) -> asyncio.Future[None]:
    """Forward one message (it joins the loop turn's batch and shares its future)."""
    return client.enqueue_records(queue, partition, epoch, [encode_record(key.encode(), payload)])


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


class TableOwnership:
    """Owns the partitions listed, at the epochs listed."""

    def __init__(self, owned: dict[tuple[str, int], int]) -> None:
        self.owned = owned

    def check(self, queue: str, partition: int, epoch: int) -> None:
        current = self.owned.get((queue, partition))
        if current is None:
            raise NotOwner(f"not the owner of {queue}/{partition}")
        if current != epoch:
            raise StaleEpoch(f"{queue}/{partition} is at epoch {current}, not {epoch}")


def test_forwarded_batches_are_stored_and_acknowledged_once_durable(tmp_path: Path) -> None:
    async def body() -> None:
        owner = QueueManager(Store(LmdbBackend(tmp_path / "owner")), defaults=QueueConfig(partitions=4))
        server, port = await start_server(owner, "127.0.0.1:0")
        client = EnqueueClient(f"127.0.0.1:{port}")
        futures = []
        for turn in range(20):
            batch_future = None
            for i in range(500):
                n = turn * 500 + i
                batch_future = send(client, "orders", n % 4, 0, f"k{n % 7}", b"%d" % n)
            futures.append(batch_future)
            await asyncio.sleep(0)
        assert len({id(f) for f in futures}) == 20, "one future per batch, not per message"
        await asyncio.gather(*futures)
        queue = owner.queue("orders")
        assert queue.depth == 10_000
        records = [m.payload for p in queue.partitions for m in p.take(10_000)]
        # A stored record is: key length u16 | key | payload.
        payloads = sorted(int(r[2 + int.from_bytes(r[:2], "big"):]) for r in records)
        assert payloads == list(range(10_000))
        assert {queue.topic_of(r) for r in records} == {f"$queue/orders/k{i}" for i in range(7)}
        await client.close()
        await server.stop(0)
        owner.close()
        await owner.store.close()

    run(body())


def test_a_node_that_does_not_own_the_partition_or_sees_a_stale_epoch_refuses(tmp_path: Path) -> None:
    async def body() -> None:
        owner = QueueManager(Store(MemoryBackend()))
        owner.ownership = TableOwnership({("q", 0): 7})
        server, port = await start_server(owner, "127.0.0.1:0")
        client = EnqueueClient(f"127.0.0.1:{port}")
        await send(client, "q", 0, 7, "", b"ok")
        for message, status in [(("q", 1, 7, "", b"x"), Status.NOT_OWNER),
                                (("q", 0, 6, "", b"x"), Status.STALE_EPOCH),
                                (("q", 0, 7, "", b"x" * (300 * 1024)), Status.REFUSED)]:
            with pytest.raises(ForwardError) as info:
                await send(client, *message)
            assert info.value.status == status, info.value
        await send(client, "q", 0, 7, "", b"still ok")  # the stream survives refusals
        assert owner.queue("q").depth == 2
        await client.close()
        await server.stop(0)

    run(body())


OWNER_SCRIPT = """
import asyncio, sys
from shoalmq.cluster.transport import start_server
from shoalmq.queue.manager import QueueManager
from shoalmq.queue.storage import LmdbBackend, Store

async def main():
    owner = QueueManager(Store(LmdbBackend(sys.argv[1])))
    server, port = await start_server(owner, "127.0.0.1:0")
    print(port, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.timeout(60)
def test_a_peer_that_dies_mid_transfer_fails_the_unanswered_batches(tmp_path: Path) -> None:
    script = tmp_path / "owner.py"
    script.write_text(OWNER_SCRIPT)
    peer = subprocess.Popen([sys.executable, str(script), str(tmp_path / "log")], stdout=subprocess.PIPE,
                            cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert peer.stdout is not None
    port = int(peer.stdout.readline())

    async def body() -> None:
        client = EnqueueClient(f"127.0.0.1:{port}")
        await send(client, "q", 0, 0, "", b"before")
        futures = []
        for _ in range(200):
            for _ in range(100):
                futures.append(send(client, "q", 0, 0, "", b"x" * 1000))
            await asyncio.sleep(0)
        peer.kill()
        results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30)
        failed = [r for r in results if isinstance(r, ForwardError)]
        assert failed, "some batches were still unanswered when the peer died"
        assert all(r is None or isinstance(r, ForwardError) for r in results)
        assert all(r.status is None for r in failed)
        await client.close()

    try:
        run(body())
    finally:
        peer.kill()
        peer.wait()


def test_a_taken_grpc_address_is_a_clear_error() -> None:
    async def body() -> None:
        owner = QueueManager(Store(MemoryBackend()))
        server, port = await start_server(owner, "127.0.0.1:0")
        from shoalmq.errors import ShoalError

        with pytest.raises(ShoalError, match=f"cannot listen for gRPC on 127.0.0.1:{port}"):
            await start_server(owner, f"127.0.0.1:{port}")
        await server.stop(0)

    run(body())


def test_generated_grpc_code_is_current(tmp_path: Path) -> None:
    """Regenerating the code from broker.proto must change nothing (see the comment in broker.proto)."""
    proto_dir = ROOT / "shoalmq" / "proto"
    result = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={tmp_path}",
                             f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(proto_dir / "broker.proto")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    grpc_file = tmp_path / "broker_pb2_grpc.py"
    grpc_file.write_text(grpc_file.read_text().replace("import broker_pb2 as broker__pb2",
                                                       "from . import broker_pb2 as broker__pb2"))
    for name in ("broker_pb2.py", "broker_pb2.pyi", "broker_pb2_grpc.py"):
        assert (tmp_path / name).read_text() == (proto_dir / name).read_text(), f"{name} is stale: regenerate it"
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_malformed_batch_is_refused_and_the_stream_goes_on() -> None:
    import grpc

    from shoalmq.proto import broker_pb2, broker_pb2_grpc

    async def body() -> None:
        owner = QueueManager(Store(MemoryBackend()))
        server, port = await start_server(owner, "127.0.0.1:0")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = broker_pb2_grpc.BrokerStub(channel)
            good = b"\x00\x00" + b"payload"  # no key
            from shoalmq._native import segment

            batches = [
                broker_pb2.EnqueueBatch(batch_id=1, partitions=[broker_pb2.PartitionRecords(
                    queue="q", partition=0, records=b"\x00\x00\x00\x05garbage")]),
                broker_pb2.EnqueueBatch(batch_id=2, partitions=[broker_pb2.PartitionRecords(
                    queue="q", partition=0, records=segment.pack([good]))]),
            ]

            async def requests():
                for batch in batches:
                    yield batch

            acks = [ack async for ack in stub.EnqueueRemote(requests())]
        assert [(a.batch_id, Status.Name(a.status)) for a in acks] == [(1, "REFUSED"), (2, "OK")]
        assert "malformed batch" in acks[0].detail
        assert owner.queue("q").depth == 1
        await server.stop(0)

    run(body())


def test_a_forwarded_batch_is_stored_whole_or_not_at_all() -> None:
    from shoalmq.cluster.transport import RemoteRecords
    from shoalmq.errors import PayloadTooLarge, QueueFull
    from shoalmq.queue.record import encode_record

    async def body() -> None:
        owner = QueueManager(Store(MemoryBackend()),
                             queues={"q": QueueConfig(partitions=2, max_depth=3, max_payload=10)})
        queue = owner.queue("q")
        ok = RemoteRecords("q", 0, 1, [encode_record(b"", b"a"), encode_record(b"k", b"b")])
        with pytest.raises(QueueFull):  # the second group's partition has room for 3
            owner.enqueue_remote([ok, RemoteRecords("q", 1, 1, [encode_record(b"", b"x")] * 4)])
        with pytest.raises(PayloadTooLarge):
            owner.enqueue_remote([ok, RemoteRecords("q", 1, 1, [encode_record(b"", b"x" * 11)])])
        assert queue.depth == 0
        await owner.enqueue_remote([ok, RemoteRecords("q", 1, 1, [encode_record(b"", b"x")] * 3)])
        assert [p.depth for p in queue.partitions] == [2, 3]
        owner.close()

    run(body())
