"""The gRPC transport between nodes: forwarding publishes to the owner of their partitions, in batches.

A unary gRPC call costs ~0.5 ms here whatever its size, so one message per call would cap forwarding at ~2,000
msgs/s. Instead each peer gets one long-lived bidirectional stream (``PeerStream``, which route streams use too):
``EnqueueClient.enqueue_records`` adds records to the batch of the current event-loop turn, the batch goes out as
one stream message, and the owner answers each batch, in order, once all of it is durable. One future per batch,
none per message. Channels are made in one place (``open_channel``), with the options in ``CHANNEL_OPTIONS``.

The owner's side (``EnqueueServicer``) hands each batch to a ``RemoteEnqueueHandler`` (the queue side of the node),
which checks ownership and epochs and returns the commit future the batch rides on.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from shoalmq._native import segment
from shoalmq.cluster import stats
from shoalmq.errors import NotOwner, PeerUnavailable, ShoalError, StaleEpoch
from shoalmq.proto import broker_pb2, broker_pb2_grpc

log = logging.getLogger(__name__)

#: Channel and server options, each with its reason.
GRPC_OPTIONS = [
    # Batches of large payloads (64 KiB x 500) must fit in one stream message.
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    # Notice a dead peer on an idle stream within seconds, not at the next write.
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

Status = broker_pb2.EnqueueAck.Status

#: Seconds an ``EnqueueClient`` whose stream broke reports itself unavailable.
LOST_PAUSE = 0.1

#: Options of the channels to peers only (a server ignores them), each with its reason.
CHANNEL_OPTIONS = [
    *GRPC_OPTIONS,
    # A peer that restarts comes back on the same address within seconds. gRPC's default backoff (1 s growing to
    # 120 s) kept channels failing with "connection refused" for ~10 s after the peer listened again, and a
    # channel shares its connection attempts (and their backoff) with every channel to the same target through
    # the process-wide subchannel pool: a fresh channel did not help. Retry fast, at most a second apart, and
    # keep each channel's connection its own.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.use_local_subchannel_pool", 1),
]


def open_channel(target: str) -> grpc.aio.Channel:
    """A channel to a peer node (the one place channels are made: TLS, when it comes, is a change here)."""
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


async def peer_ready(target: str, timeout: float) -> bool:
    """Whether a peer's gRPC server accepts a connection within ``timeout`` seconds."""
    channel = open_channel(target)
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout)
        return True
    except (TimeoutError, grpc.aio.AioRpcError):
        return False
    finally:
        await channel.close()




class ForwardError(ShoalError):
    """A forwarded batch was not stored by the owner; ``status`` says why (NOT_OWNER, STALE_EPOCH, REFUSED), or
    the peer is unreachable or died mid-transfer (``status`` None; then it is also a ``PeerUnavailable``).
    Retriable unless the owner refused the messages themselves (REFUSED)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retriable = status != Status.REFUSED


class PeerGone(ForwardError, PeerUnavailable):
    """The peer is unreachable, or its stream ended before it answered."""


@dataclass(frozen=True)
class RemoteRecords:
    """The messages of one batch for one partition: each record is key length u16 | key | payload. A transfer also
    gives their offsets in the sender's log, their delivery counts, and the sender's high-water mark (see
    ``PartitionRecords``)."""

    queue: str
    partition: int
    epoch: int
    records: list[bytes]
    offsets: Sequence[int] = ()
    deliveries: bytes = b""
    next_offset: int = 0


class RemoteEnqueueHandler(Protocol):
    """The owner's queue side, as the transport sees it."""

    def enqueue_remote(self, batches: Sequence[RemoteRecords]) -> asyncio.Future[None]:
        """Store the records; the future resolves once all are durable. Raises NotOwner, StaleEpoch, or a
        ShoalError (queue full, too large, disk full) without storing any record after the refused one."""


class EnqueueServicer(broker_pb2_grpc.BrokerServicer):
    """The owner's end of ``EnqueueRemote``."""

    def __init__(self, handler: RemoteEnqueueHandler) -> None:
        self.handler = handler

    async def EnqueueRemote(self, request_iterator: AsyncIterator[broker_pb2.EnqueueBatch],  # noqa: N802
                            context: grpc.aio.ServicerContext) -> AsyncIterator[broker_pb2.EnqueueAck]:
        """Answer every batch, in order, once it is durable (or with the reason it was refused)."""
        async for ack in answer_batches(request_iterator, self.handler.enqueue_remote):
            yield ack


def status_of(error: ShoalError) -> int:
    """How a refused batch is answered: NOT_OWNER and STALE_EPOCH are retried elsewhere, REFUSED is not."""
    if isinstance(error, NotOwner):
        return Status.NOT_OWNER
    if isinstance(error, StaleEpoch):
        return Status.STALE_EPOCH
    return Status.REFUSED


async def answer_batches(request_iterator: AsyncIterator[broker_pb2.EnqueueBatch],
                         store: Callable[[Sequence[RemoteRecords]], asyncio.Future[None]],
                         ) -> AsyncIterator[broker_pb2.EnqueueAck]:
    """Hand each batch of a stream to ``store`` and answer it, in order, once its future resolves (or with the
    reason it was refused)."""
    pending: collections.deque[tuple[int, asyncio.Future[None] | None, int, str]] = collections.deque()
    more = asyncio.Event()
    done_reading = False

    async def read() -> None:
        nonlocal done_reading
        try:
            async for batch in request_iterator:
                try:
                    parts = [RemoteRecords(p.queue, p.partition, p.epoch, segment.unpack(p.records), p.offsets,
                                           p.deliveries, p.next_offset)
                             for p in batch.partitions]
                except ValueError as exc:
                    pending.append((batch.batch_id, None, Status.REFUSED, f"malformed batch: {exc}"))
                    more.set()
                    continue
                try:
                    pending.append((batch.batch_id, store(parts), Status.OK, ""))
                except ShoalError as exc:
                    pending.append((batch.batch_id, None, status_of(exc), str(exc)))
                except Exception as exc:  # a batch nobody checked for: refuse it, keep the stream (and log the bug)
                    log.exception("batch %d refused", batch.batch_id)
                    pending.append((batch.batch_id, None, Status.REFUSED, f"refused: {exc!r}"))
                more.set()
        finally:
            done_reading = True
            more.set()

    reader = asyncio.ensure_future(read())
    try:
        while True:
            while pending:
                batch_id, future, status, detail = pending.popleft()
                if future is not None:
                    try:
                        await future
                    except ShoalError as exc:  # (NotOwner: a replicated leader deposed before it committed)
                        status, detail = status_of(exc), str(exc)
                stats.sent("enqueue_ack", 1)
                yield broker_pb2.EnqueueAck(batch_id=batch_id, status=status, detail=detail)
            if done_reading:
                return
            more.clear()
            await more.wait()
    finally:
        reader.cancel()


class PeerStream:
    """One bidirectional stream to a peer node: the one place streams are opened, fed and reopened.

    ``send`` queues a request (opening the stream if none runs); each response goes to ``on_response``; when the
    stream ends, for any reason, ``on_lost`` runs with a ``PeerGone`` saying why, and the stream opens again after
    ``reconnect_delay`` seconds (None: at the next ``send``). Each attempt reads a request queue of its own: the
    request generator of a broken stream may still be waiting on the old one, and would swallow what is meant for
    the new stream; requests queued for a stream that broke are dropped with it. ``first`` gives the requests every
    attempt starts with (a route stream's current credits).
    """

    def __init__(self, target: str, method: str, on_response: Callable[[Any], None],
                 on_lost: Callable[[PeerGone], None], *, reconnect_delay: float | None = None,
                 first: Callable[[], list[Any]] | None = None) -> None:
        self.target = target
        self._channel = open_channel(target)
        self._call = getattr(broker_pb2_grpc.BrokerStub(self._channel), method)
        self._on_response = on_response
        self._on_lost = on_lost
        self._reconnect_delay = reconnect_delay
        self._first = first
        self._outgoing: asyncio.Queue[Any] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: True while an attempt runs (from its start: gRPC connects lazily).
        self.connected = False

    def start(self) -> None:
        if not self._closed and (self._task is None or self._task.done()):
            self._outgoing = asyncio.Queue()
            self._task = asyncio.ensure_future(self._run())

    def send(self, request: Any) -> None:
        self.start()
        self._outgoing.put_nowait(request)

    async def _requests(self, outgoing: asyncio.Queue[Any]) -> AsyncIterator[Any]:
        for request in self._first() if self._first is not None else ():
            yield request
        while True:
            request = await outgoing.get()
            if request is None:
                return
            yield request

    async def _run(self) -> None:
        while True:
            error: PeerGone
            self.connected = True
            try:
                async for response in self._call(self._requests(self._outgoing)):
                    self._on_response(response)
            except grpc.aio.AioRpcError as exc:
                error = PeerGone(f"peer {self.target} unavailable: {exc.code().name}: {exc.details()}")
            except asyncio.CancelledError:
                self._lost(PeerGone(f"stream to {self.target} closed"))
                raise
            except Exception:  # a malformed response or a bug: start over with a new stream
                log.exception("stream to %s failed; starting a new one", self.target)
                error = PeerGone(f"stream to {self.target} failed")
            else:
                error = PeerGone(f"stream to {self.target} ended")
            self._lost(error)
            if self._closed or self._reconnect_delay is None:
                return
            await asyncio.sleep(self._reconnect_delay)
            if self._closed:
                return
            self._outgoing = asyncio.Queue()

    def _lost(self, error: PeerGone) -> None:
        self.connected = False
        outgoing = self._outgoing
        while not outgoing.empty():
            outgoing.get_nowait()
        # End the broken attempt's request generator: gRPC's task that consumes it would otherwise wait on this
        # queue for good (and be destroyed pending, with an error in the log).
        outgoing.put_nowait(None)
        self._on_lost(error)

    async def close(self) -> None:
        """End the stream (its requests queued so far are sent first, for up to 2 s), then the channel."""
        self._closed = True
        self._outgoing.put_nowait(None)
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 2)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        await self._channel.close()


class EnqueueClient:
    """The sending end: one stream to one peer, batching every ``enqueue_records`` of a loop turn into one
    message; the owner answers each, in order, once it is durable."""

    def __init__(self, target: str, transfer: bool = False) -> None:
        self.target = target
        #: Send with ``TransferPartition`` (a handoff to a partition's next owner) instead of ``EnqueueRemote``.
        self.transfer = transfer
        self._stream = PeerStream(target, "TransferPartition" if transfer else "EnqueueRemote", self._answered,
                                  self._fail_all)
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._batch: dict[tuple[str, int, int], list[bytes]] = {}
        self._batch_future: asyncio.Future[None] | None = None
        self._ids = itertools.count(1)
        self._loop = asyncio.get_running_loop()
        self._down_until = 0.0

    @property
    def available(self) -> bool:
        """False for a moment after the stream broke (``LOST_PAUSE``): senders wait instead of trying again at
        once, which against a peer that refuses connections fails at once, every loop turn."""
        return self._loop.time() >= self._down_until

    @property
    def open_batch(self) -> asyncio.Future[None] | None:
        """The future of the batch still being gathered in this loop turn (None once it is sent)."""
        return self._batch_future

    def enqueue_records(self, queue: str, partition: int, epoch: int, records: list[bytes]) -> asyncio.Future[None]:
        """Forward records in the stored form (key length u16 | key | payload); they join this loop turn's batch
        and share its future."""
        if self._batch_future is None:
            self._batch_future = self._loop.create_future()
            self._loop.call_soon(self._send_batch)
        target = (queue, partition, epoch)
        existing = self._batch.get(target)
        if existing is None:
            self._batch[target] = list(records)
        else:
            existing.extend(records)
        return self._batch_future

    def transfer_chunk(self, queue: str, partition: int, epoch: int, records: list[bytes], offsets: list[int],
                 deliveries: bytes, next_offset: int) -> asyncio.Future[None]:
        """Send one chunk of a partition handed over (``TransferPartition``), offsets and counts kept, as a batch
        of its own; the future resolves once the receiver has it on disk."""
        future = self._loop.create_future()
        batch_id = next(self._ids)
        self._waiting[batch_id] = future
        stats.sent("transfer", len(records))
        self._stream.send(broker_pb2.EnqueueBatch(batch_id=batch_id, partitions=[broker_pb2.PartitionRecords(
            queue=queue, partition=partition, epoch=epoch, records=segment.pack(records), offsets=offsets,
            deliveries=deliveries, next_offset=next_offset)]))
        return future

    def _send_batch(self) -> None:
        batch_id = next(self._ids)
        future, self._batch_future = self._batch_future, None
        groups, self._batch = self._batch, {}
        assert future is not None
        self._waiting[batch_id] = future
        partitions = [broker_pb2.PartitionRecords(queue=q, partition=p, epoch=e, records=segment.pack(records))
                      for (q, p, e), records in groups.items()]
        stats.sent("enqueue", sum(map(len, groups.values())))
        self._stream.send(broker_pb2.EnqueueBatch(batch_id=batch_id, partitions=partitions))

    def _answered(self, ack: broker_pb2.EnqueueAck) -> None:
        future = self._waiting.pop(ack.batch_id, None)
        if future is None or future.done():
            return
        if ack.status == Status.OK:
            future.set_result(None)
        else:
            future.set_exception(ForwardError(f"{self.target} refused a batch: {Status.Name(ack.status)}: "
                                              f"{ack.detail}", ack.status))

    def _fail_all(self, error: PeerGone) -> None:
        """The stream broke: every batch not yet answered fails (the caller retries; the owner may have stored
        some of them, so a retry can duplicate: at least once)."""
        self._down_until = self._loop.time() + LOST_PAUSE
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: callers that dropped the future must not log it

    async def close(self) -> None:
        await self._stream.close()


async def start_server(handler: RemoteEnqueueHandler, listen: str,
                       servicer: broker_pb2_grpc.BrokerServicer | None = None) -> tuple[grpc.aio.Server, int]:
    """Serve the node's end of the transport on ``listen`` (``host:port``; port 0 picks one). Returns the server
    and the port bound; ShoalError if the address cannot be bound. ``servicer`` (default: an
    ``EnqueueServicer`` of ``handler``) serves every call."""
    # SO_REUSEPORT off: a second node on the same address must fail, not share the port.
    server = grpc.aio.server(options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0),
                                      # Accept the clients' keepalive pings (every 2 s, even on idle streams).
                                      ("grpc.http2.min_ping_interval_without_data_ms", 1000)])
    broker_pb2_grpc.add_BrokerServicer_to_server(servicer or EnqueueServicer(handler), server)
    try:
        port = server.add_insecure_port(listen)
        error = None if port or listen.endswith(":0") else "address unavailable"
    except RuntimeError as exc:
        error = str(exc)
    if error is not None:
        await server.stop(None)
        raise ShoalError(f"cannot listen for gRPC on {listen}: {error}")
    await server.start()
    return server, port
