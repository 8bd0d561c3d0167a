"""The gRPC transport between nodes: one link per peer, carrying forwarded publishes and every other stream.

A unary gRPC call costs ~0.5 ms here whatever its size, and a message on a grpc.aio stream ~150 us of CPU at each
end (seven thread switches between gRPC's threads and the event loop), whatever it carries. So nothing between
nodes goes one call or one message per queue message:

- Each stream (``PeerStream``: forwards, route streams, handoffs, replication) is a *channel* on the node's one
  ``Link`` stream to that peer. What all channels to a peer send while the link is busy goes as one frame
  (``Outbox``): under load, at most one gRPC message per loop turn in each direction, however many streams there
  are, and a backlog costs one message, not one per item in it. The callee (``LinkServicer``) runs each channel's
  stream handler as if it had its own gRPC stream, and sends their answers the same way.
- ``EnqueueClient.enqueue_records`` adds records to the batch of the current event-loop turn; the batch goes out
  as one stream message, and the owner answers each batch, in order, once all of it is durable. One future per
  batch, none per message.

Channels are made in one place (``open_channel``), with the options in ``CHANNEL_OPTIONS``. The owner's side
(``EnqueueServicer``) hands each batch to a ``RemoteEnqueueHandler`` (the queue side of the node), which checks
ownership and epochs and returns the commit future the batch rides on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from shoalmq._native import segment
from shoalmq.cluster import stats
from shoalmq.errors import ConfigError, NotOwner, PeerUnavailable, ShoalError, StaleEpoch, os_error_text
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


@dataclass(frozen=True)
class NodeCredentials:
    """Mutual TLS between the nodes: each presents its certificate (common name: its node id), and accepts only
    peers whose certificates the cluster CA signed."""

    channel: grpc.ChannelCredentials
    server: grpc.ServerCredentials

    @classmethod
    def load(cls, certfile: Path, keyfile: Path, cafile: Path) -> NodeCredentials:
        """ConfigError if a file cannot be read."""
        try:
            cert, key, ca = certfile.read_bytes(), keyfile.read_bytes(), cafile.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cluster TLS: {os_error_text(exc)}") from None
        return cls(grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert),
                   grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True))


#: The node's credentials, once ``use_credentials`` set them (None: plain gRPC, loopback only).
_credentials: NodeCredentials | None = None


def use_credentials(credentials: NodeCredentials | None) -> None:
    """Make every channel this process opens, and every server it starts, use ``credentials``."""
    global _credentials
    _credentials = credentials


def open_channel(target: str) -> grpc.aio.Channel:
    """A channel to a peer node (the one place channels are made): mutual TLS once ``use_credentials`` set it;
    the peer's certificate must name the address ``target`` dials."""
    if _credentials is not None:
        return grpc.aio.secure_channel(target, _credentials.channel, options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


def peer_identity(context: Any) -> str | None:
    """The common name of the calling node's verified certificate (None over plain gRPC)."""
    if _credentials is None:
        return None
    names = context.auth_context().get("x509_common_name") or [b""]
    return names[0].decode(errors="replace")


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


#: The stream RPCs a link carries: request and response message classes, by method name.
STREAMS: dict[str, tuple[type[Any], type[Any]]] = {
    "EnqueueRemote": (broker_pb2.EnqueueBatch, broker_pb2.EnqueueAck),
    "TransferPartition": (broker_pb2.EnqueueBatch, broker_pb2.EnqueueAck),
    "RouteQueueMessage": (broker_pb2.RouteRequest, broker_pb2.RouteDeliveries),
    "Replicate": (broker_pb2.ReplicaRequest, broker_pb2.ReplicaData),
}

#: Bytes of parts one frame gathers at most (a part larger than that goes alone; the stream RPCs' own messages
#: stay under ``grpc.max_send_message_length``).
FRAME_BYTES = 16 << 20
#: Bytes of answers a callee queues on one link before the channels producing them wait for the stream (what
#: gRPC's flow control gave each stream before they shared one).
LINK_BUFFER = 8 << 20

_Part = tuple[int, str, bytes, bool, str]  # channel, method (first part only), body, end, error


class Outbox:
    """What one end of a link has to send: parts of any channel, gathered while the stream is busy and sent as
    one frame each time it can take one (so at most one frame per event-loop turn under load)."""

    def __init__(self) -> None:
        self.parts: collections.deque[_Part] = collections.deque()
        self.size = 0
        self.closed = False
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()

    @property
    def full(self) -> bool:
        return self.size > LINK_BUFFER

    def put(self, part: _Part) -> None:
        self.parts.append(part)
        self.size += len(part[2])
        if not self._wake.is_set():
            self._wake.set()
        if self.size > LINK_BUFFER:
            self._space.clear()

    async def room(self) -> None:
        await self._space.wait()

    def close(self) -> None:
        """No more parts: the frames end once those queued are sent."""
        self.closed = True
        self._wake.set()
        self._space.set()

    async def frames(self) -> AsyncIterator[broker_pb2.LinkFrame]:
        parts = self.parts
        while True:
            if not parts:
                if self.closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            frame = broker_pb2.LinkFrame()
            add = frame.parts.add
            size = 0
            count = 0
            while parts and (count == 0 or size + len(parts[0][2]) <= FRAME_BYTES):
                channel, method, body, end, error = parts.popleft()
                add(channel=channel, method=method, body=body, end=end, error=error)
                size += len(body)
                count += 1
            self.size -= size
            if self.size <= LINK_BUFFER:
                self._space.set()
            stats.sent("link_frame", count)
            yield frame


class _Attempt:
    """One gRPC ``Link`` call of a ``Link``: its outbox and the channels opened on it."""

    def __init__(self) -> None:
        self.outbox = Outbox()
        self.channels: dict[int, PeerStream] = {}
        self.over = False
        self.task: asyncio.Task[None] | None = None


class Link:
    """The caller's end of the link to one peer: every ``PeerStream`` to that peer is a channel on one gRPC
    ``Link`` stream. The stream is opened with the first channel and again, after it broke, with the next one; when
    it breaks, every channel on it breaks (each ``PeerStream`` then does what it would do for a broken stream of
    its own). Shared through ``link_to`` and closed when its last user releases it."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.loop = asyncio.get_running_loop()
        self._channel = open_channel(target)
        self._call = broker_pb2_grpc.BrokerStub(self._channel).Link
        self._ids = itertools.count(1)
        self._attempt: _Attempt | None = None
        self.users = 0
        self.closed = False

    def open(self, stream: PeerStream) -> tuple[_Attempt, int]:
        """A new channel for ``stream`` on the current stream (opening one if none runs)."""
        attempt = self._attempt
        if attempt is None or attempt.over:
            attempt = self._attempt = _Attempt()
            attempt.task = asyncio.ensure_future(self._run(attempt))
        channel = next(self._ids)
        attempt.channels[channel] = stream
        return attempt, channel

    async def _run(self, attempt: _Attempt) -> None:
        error: PeerGone | None = None
        try:
            async for frame in self._call(attempt.outbox.frames()):
                channels = attempt.channels
                for part in frame.parts:
                    stream = channels.get(part.channel)
                    if stream is None:
                        continue
                    if part.end:
                        del channels[part.channel]
                        stream._ended(PeerGone(f"stream to {self.target} failed: {part.error}" if part.error
                                               else f"stream to {self.target} ended"))
                        continue
                    try:
                        stream._response(part.body)
                    except Exception:  # a malformed response or a bug: that channel starts over, not the link
                        log.exception("%s stream to %s failed; starting a new one", stream.method, self.target)
                        del channels[part.channel]
                        attempt.outbox.put((part.channel, "", b"", True, ""))
                        stream._ended(PeerGone(f"stream to {self.target} failed"))
        except grpc.aio.AioRpcError as exc:
            stats.COUNTERS.stream_errors[self.target] += 1
            error = PeerGone(f"peer {self.target} unavailable: {exc.code().name}: {exc.details()}")
        except asyncio.CancelledError:
            error = PeerGone(f"link to {self.target} closed")
            raise
        except Exception:
            stats.COUNTERS.stream_errors[self.target] += 1
            log.exception("link to %s failed; starting a new one", self.target)
            error = PeerGone(f"link to {self.target} failed")
        else:
            error = PeerGone(f"link to {self.target} ended")
        finally:
            attempt.over = True
            attempt.outbox.close()
            channels, attempt.channels = attempt.channels, {}
            for stream in channels.values():
                stream._ended(error or PeerGone(f"link to {self.target} closed"))

    async def release(self) -> None:
        """One user fewer; the last one ends the stream (what is queued is sent first, for up to 2 s) and closes
        the channel."""
        self.users -= 1
        if self.users > 0:
            return
        self.closed = True
        if _LINKS.get(self.target) is self:
            del _LINKS[self.target]
        attempt = self._attempt
        if attempt is not None and attempt.task is not None:
            attempt.outbox.close()
            try:
                await asyncio.wait_for(asyncio.shield(attempt.task), 2)
            except (TimeoutError, asyncio.CancelledError):
                attempt.task.cancel()
                await asyncio.gather(attempt.task, return_exceptions=True)
        await self._channel.close()


_LINKS: dict[str, Link] = {}


def link_to(target: str) -> Link:
    """The link to ``target`` of this event loop (a new one if none is open), with one more user."""
    link = _LINKS.get(target)
    if link is None or link.closed or link.loop is not asyncio.get_running_loop():
        link = _LINKS[target] = Link(target)
    link.users += 1
    return link


class PeerStream:
    """One stream to a peer node, as a channel on the node's link to that peer (``Link``): the one place streams
    are opened, fed and reopened.

    ``send`` queues a request (opening the channel if none is open); each response goes to ``on_response``; when
    the stream ends, for any reason, ``on_lost`` runs with a ``PeerGone`` saying why, and the stream opens again
    after ``reconnect_delay`` seconds (None: at the next ``send``). Requests sent while it waits to open again are
    dropped, as are those queued on a link that broke. ``first`` gives the requests every opening starts with (a
    route stream's current credits).
    """

    def __init__(self, target: str, method: str, on_response: Callable[[Any], None],
                 on_lost: Callable[[PeerGone], None], *, reconnect_delay: float | None = None,
                 first: Callable[[], list[Any]] | None = None) -> None:
        self.target = target
        self.method = method
        self._parse = STREAMS[method][1].FromString
        self._link = link_to(target)
        self._on_response = on_response
        self._on_lost = on_lost
        self._reconnect_delay = reconnect_delay
        self._first = first
        self._attempt: _Attempt | None = None
        self._channel = 0
        self._named = False
        self._reopen: asyncio.TimerHandle | None = None
        self._ended_waiter: asyncio.Future[None] | None = None
        self._closed = False
        #: True while the channel is open (from its start: gRPC connects lazily).
        self.connected = False

    def start(self) -> None:
        if self._closed or self.connected or self._reopen is not None:
            return
        self._attempt, self._channel = self._link.open(self)
        self._named = False
        self.connected = True
        for request in self._first() if self._first is not None else ():
            self._put(request)

    def send(self, request: Any) -> None:
        self.start()
        if self.connected:
            self._put(request)

    def _put(self, request: Any) -> None:
        assert self._attempt is not None
        if self._named:
            self._attempt.outbox.put((self._channel, "", request.SerializeToString(), False, ""))
        else:
            self._named = True
            self._attempt.outbox.put((self._channel, self.method, request.SerializeToString(), False, ""))

    def _response(self, body: bytes) -> None:
        self._on_response(self._parse(body))

    def _ended(self, error: PeerGone) -> None:
        """The channel ended (the callee ended it, or the link broke)."""
        self.connected = False
        self._attempt = None
        waiter = self._ended_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._on_lost(error)
        if self._closed or self._reconnect_delay is None:
            return
        self._reopen = self._link.loop.call_later(self._reconnect_delay, self._open_again)

    def _open_again(self) -> None:
        self._reopen = None
        self.start()

    async def close(self) -> None:
        """End the stream (its requests queued so far are sent first, and the answers waited for, for up to 2 s),
        then give up this stream's share of the link."""
        if self._closed:
            return
        self._closed = True
        if self._reopen is not None:
            self._reopen.cancel()
            self._reopen = None
        attempt = self._attempt
        if self.connected and attempt is not None:
            if self._named:
                self._ended_waiter = self._link.loop.create_future()
                attempt.outbox.put((self._channel, "", b"", True, ""))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ended_waiter, 2)
            if self.connected:  # (never named, or no answer in time: the callee's end is gone with the link)
                attempt.channels.pop(self._channel, None)
                self._ended(PeerGone(f"stream to {self.target} closed"))
        await self._link.release()


class _ChannelContext:
    """What a stream handler sees of its call when it runs as a channel of a link."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    def peer(self) -> str:
        return self._context.peer()

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._context.auth_context()


class LinkServicer(broker_pb2_grpc.BrokerServicer):
    """Serves ``Link``: each channel a caller opens runs the stream RPC it names (this servicer's method of that
    name) on the channel's requests, and what the method yields goes back on the channel, all channels' answers of
    a loop turn in one frame. When the caller's side ends, every channel's requests end; when the link breaks,
    every channel's handler is cancelled, as gRPC cancels the handler of a broken stream."""

    async def Link(self, request_iterator: AsyncIterator[broker_pb2.LinkFrame],  # noqa: N802
                   context: grpc.aio.ServicerContext) -> AsyncIterator[broker_pb2.LinkFrame]:
        outbox = Outbox()
        channels: dict[int, tuple[asyncio.Queue[Any], Callable[[bytes], Any]]] = {}
        tasks: set[asyncio.Task[None]] = set()
        refused: dict[int, str] = {}  # channel -> why its requests were cut short
        reading = True
        channel_context = _ChannelContext(context)

        def finished(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            if not reading and not tasks:
                outbox.close()

        async def requests(queue: asyncio.Queue[Any]) -> AsyncIterator[Any]:
            while True:
                request = await queue.get()
                if request is None:
                    return
                yield request

        async def serve(channel: int, method: str, queue: asyncio.Queue[Any]) -> None:
            error = ""
            try:
                async for response in getattr(self, method)(requests(queue), channel_context):
                    if outbox.full:
                        await outbox.room()
                    outbox.put((channel, "", response.SerializeToString(), False, ""))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("%s channel of a link failed", method)
                error = f"{type(exc).__name__}: {exc}"
            channels.pop(channel, None)
            outbox.put((channel, "", b"", True, refused.pop(channel, error)))

        def receive(part: broker_pb2.LinkPart) -> None:
            entry = channels.get(part.channel)
            if entry is None:
                if not part.method:
                    return  # a channel already ended (or never opened): nothing to do
                if part.method not in STREAMS:
                    outbox.put((part.channel, "", b"", True, f"unknown stream {part.method!r}"))
                    return
                queue: asyncio.Queue[Any] = asyncio.Queue()
                entry = channels[part.channel] = (queue, STREAMS[part.method][0].FromString)
                task = asyncio.ensure_future(serve(part.channel, part.method, queue))
                tasks.add(task)
                task.add_done_callback(finished)
            queue, parse = entry
            if part.end:
                queue.put_nowait(None)
                return
            try:
                queue.put_nowait(parse(part.body))
            except Exception as exc:  # (protobuf's DecodeError) a malformed request: that channel ends
                channels.pop(part.channel, None)
                refused[part.channel] = f"malformed request: {exc}"
                queue.put_nowait(None)

        async def read() -> None:
            nonlocal reading
            try:
                async for frame in request_iterator:
                    for part in frame.parts:
                        receive(part)
            finally:
                reading = False
                for queue, _ in channels.values():
                    queue.put_nowait(None)
                if not tasks:
                    outbox.close()

        reader = asyncio.ensure_future(read())
        try:
            async for frame in outbox.frames():
                yield frame
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()


class EnqueueServicer(LinkServicer):
    """The owner's end of ``EnqueueRemote``."""

    def __init__(self, handler: RemoteEnqueueHandler) -> None:
        self.handler = handler

    async def EnqueueRemote(self, request_iterator: AsyncIterator[broker_pb2.EnqueueBatch],  # noqa: N802
                            context: grpc.aio.ServicerContext) -> AsyncIterator[broker_pb2.EnqueueAck]:
        """Answer every batch, in order, once it is durable (or with the reason it was refused)."""
        async for ack in answer_batches(request_iterator, self.handler.enqueue_remote):
            yield ack


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
        count = sum(map(len, groups.values()))
        stats.sent("enqueue", count)
        stats.COUNTERS.forwarded[self.target] += count
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
        port = (server.add_secure_port(listen, _credentials.server) if _credentials is not None
                else server.add_insecure_port(listen))
        error = None if port or listen.endswith(":0") else "address unavailable"
    except RuntimeError as exc:
        error = str(exc)
    if error is not None:
        await server.stop(None)
        raise ShoalError(f"cannot listen for gRPC on {listen}: {error}")
    await server.start()
    return server, port
