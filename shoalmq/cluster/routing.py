"""Proxy routing: consumers on any node receive messages from every partition, wherever it is owned.

``RouteQueueMessage`` is one bidirectional stream from a node that holds consumers (the *consumer node*) to each
peer (an *owner* of some partitions):

- The consumer node sends, per queue, a **credit**: how many unacknowledged deliveries it can hold (its local
  consumers' windows together). Credit 0 means "no consumers here any more": the owner takes everything back.
- The owner treats the stream as one competing consumer of each queue (``RemoteConsumer``, window = credit) that
  draws only from the partitions the owner itself owns, and pushes what dispatch gives it as batches
  (``RouteDeliveries``: one per partition, records packed in one bytes field).
- The consumer node keeps what arrives in a ``RemotePartition`` per (owner, queue, partition, epoch); its queue
  manager dispatches from those exactly as from local partitions, to its local consumers. Their acks go back over
  the stream, batched per loop turn, and the owner deletes the messages; a message a local consumer handed back
  goes to another local consumer.
- When the stream ends (either node dies or stops), the owner hands everything the stream held back to its
  partitions, and the consumer node forgets what it held from that owner: those messages are delivered again
  (at least once). A partition that changes owner (new epoch) is dropped from the consumer node the same way; acks
  for the old epoch are ignored by the owner.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from shoalmq._native import segment
from shoalmq.cluster import stats
from shoalmq.cluster.transport import PeerStream
from shoalmq.proto import broker_pb2

if TYPE_CHECKING:
    from shoalmq.cluster.view import ClusterView
    from shoalmq.queue.manager import Delivery, QueueManager

log = logging.getLogger(__name__)

#: Most deliveries a consumer node asks one owner for, per queue, whatever its consumers hold and take.
MAX_CREDIT = 4096
# The credit a consumer node gives an owner, per queue, is what its consumers hold of that owner's messages plus a
# prefetch: what they take from it in PREFETCH_SECONDS, at the rate measured over the last ticks, and at least
# PREFETCH_MIN. What is prefetched waits here for this node's consumers while consumers elsewhere may be idle,
# and a key's later messages are delivered there meanwhile: a fixed credit of 128 per owner held up to 128
# messages at a node whose consumers were slow and reordered a key's first deliveries by up to 14.5 s in the
# churn test with no fault (4,903 of 20,000 out of order); a credit of 16 gave 0.1 s (736), but caps a fast
# consumer's stream at ~16 messages per round trip. Sized by rate, a slow consumer's node prefetches a few
# messages and a fast one's enough to cover the round trip.
PREFETCH_SECONDS = 0.02
PREFETCH_MIN = 16
#: Prefetch before a rate is measured (a new consumer must not start at the minimum).
PREFETCH_START = 128
#: Seconds between rate measurements (and credit updates that no ack carried).
RATE_TICK = 0.1
#: Seconds between attempts to open a route stream to a live peer that refused or broke one.
RECONNECT_DELAY = 0.2

_pids = itertools.count(-1, -1)  # proxies get negative ids; partition logs have positive ones


# -- the owner's side --------------------------------------------------------------------------------------------


class RemoteConsumer:
    """One route stream seen by the owner's queue manager as a consumer of one queue."""

    #: Dispatch gives a remote consumer only messages of partitions this node owns.
    remote = True

    def __init__(self, stream: RouteStream, queue: str) -> None:
        self.stream = stream
        self.queue = queue
        self.window = 0
        #: (partition, offset) -> the delivery and the epoch it was made under.
        self.inflight: dict[tuple[int, int], tuple[Delivery, int]] = {}

    @property
    def name(self) -> str:
        return f"the route stream from {self.stream.peer}"

    def deliver(self, deliveries: list[Delivery]) -> None:
        by_partition: dict[int, list[Delivery]] = {}
        for d in deliveries:
            by_partition.setdefault(d.partition.index, []).append(d)
        inflight = self.inflight
        for index, batch in by_partition.items():
            epoch = self.stream.view.mine.get((self.queue, index), 0)
            for d in batch:
                inflight[(index, d.message.offset)] = (d, epoch)
            returned = [d.message.returned for d in batch]
            stats.sent("route_deliveries", len(batch))
            stats.COUNTERS.routed[self.stream.peer] += len(batch)
            self.stream.send(broker_pb2.RouteDeliveries(
                queue=self.queue, partition=index, epoch=epoch,
                records=segment.pack([d.message.payload for d in batch]),
                offsets=[d.message.offset for d in batch],
                deliveries=bytes(min(d.message.deliveries, 255) for d in batch),
                returned=bytes(returned) if any(returned) else b""))

    def revoke(self, deliveries: list[Delivery]) -> None:
        for d in deliveries:
            self.inflight.pop((d.partition.index, d.message.offset), None)

    def settle(self, offsets: Any, how: str) -> None:
        """The consumer node acked these deliveries (``how`` "ack"), or handed them back after a consumer
        ended holding them ("nack": counted) or without giving them to one ("return": not counted).

        One applies if this stream still holds the delivery under the epoch named: one taken back meanwhile (a
        handoff) is the new owner's to deliver again, whatever this node's ownership is now. (An ack is not
        refused because the partition is not owned here at this moment: after an etcd outage the node owns it
        again at the same epoch, and a dropped ack would leave the delivery in flight for good.)"""
        inflight = self.inflight
        done = []
        for entry in offsets:
            partition, epoch = entry.partition, entry.epoch
            for offset in entry.offsets:
                held = inflight.get((partition, offset))
                if held is not None and held[1] == epoch:
                    del inflight[(partition, offset)]
                    done.append(held[0])
        if not done:
            return
        manager = self.stream.manager
        if how == "ack":
            manager.ack(done)
        else:
            manager.hand_back(done, counted=how == "nack")


class RouteStream:
    """The owner's end of one ``RouteQueueMessage`` stream."""

    def __init__(self, manager: QueueManager, view: ClusterView, peer: str = "a peer") -> None:
        self.manager = manager
        self.view = view
        self.peer = peer
        self.consumers: dict[str, RemoteConsumer] = {}
        self.outgoing: asyncio.Queue[broker_pb2.RouteDeliveries | None] = asyncio.Queue()

    def send(self, message: broker_pb2.RouteDeliveries) -> None:
        self.outgoing.put_nowait(message)

    def handle(self, request: broker_pb2.RouteRequest) -> None:
        name = request.queue
        consumer = self.consumers.get(name)
        # Acks and hand-backs first: a credit of 0 in the same request returns what is left, uncounted, and a
        # consumer's failure handed back with it must still count.
        if consumer is not None:
            if request.acks:
                consumer.settle(request.acks, "ack")
            if request.nacks:
                consumer.settle(request.nacks, "nack")
            if request.returns:
                consumer.settle(request.returns, "return")
        if request.credit >= 0:
            if request.credit == 0:
                if consumer is not None:
                    del self.consumers[name]
                    consumer.inflight.clear()
                    self.manager.unsubscribe(consumer, name)
            else:
                if consumer is None:
                    consumer = self.consumers[name] = RemoteConsumer(self, name)
                consumer.window = min(request.credit, MAX_CREDIT)
                self.manager.subscribe(consumer, name)

    def close(self) -> None:
        for consumer in self.consumers.values():
            self.manager.consumer_gone(consumer)
        self.consumers.clear()
        self.outgoing.put_nowait(None)


async def serve_route_stream(manager: QueueManager, view: ClusterView,
                             requests: AsyncIterator[broker_pb2.RouteRequest], peer: str = "a peer",
                             ) -> AsyncIterator[Any]:
    stream = RouteStream(manager, view, peer)

    async def read() -> None:
        try:
            async for request in requests:
                stream.handle(request)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        except Exception:  # a bug or a bad request: end this stream (the peer reconnects), not the node
            log.exception("route stream request failed; closing the stream")
        finally:
            stream.close()

    reader = asyncio.ensure_future(read())
    try:
        while True:
            message = await stream.outgoing.get()
            if message is None:
                return
            yield message
    finally:
        reader.cancel()
        stream.close()


# -- the consumer node's side -----------------------------------------------------------------------------------


class RemoteMessage:
    """A message held from another node's partition (what ``Delivery`` needs of a stored ``Message``)."""

    __slots__ = ("deliveries", "last_holder", "offset", "payload", "returned")

    def __init__(self, offset: int, payload: bytes, deliveries: int, returned: bool) -> None:
        self.offset = offset
        self.payload = payload
        self.deliveries = deliveries
        self.returned = returned
        self.last_holder: object = None


class RemotePartition:
    """Messages pushed by the owner of one partition, held for this node's consumers (a dispatch source)."""

    #: (The owner replicates its acks, not this node: see ``PartitionLog.replicated``.)
    replicated = False

    def __init__(self, client: RouteClient, queue: str, index: int, epoch: int) -> None:
        self.client = client
        self.queue = queue
        self.index = index
        self.epoch = epoch
        self.pid = next(_pids)
        self.expired = 0
        self._ready: collections.deque[RemoteMessage] = collections.deque()
        self._inflight: dict[int, RemoteMessage] = {}
        self._held: set[int] = set()  # offsets ready or in flight here

    @property
    def ready(self) -> int:
        return len(self._ready)

    @property
    def depth(self) -> int:
        return len(self._ready) + len(self._inflight)

    def add(self, records: list[bytes], offsets: Any, deliveries: bytes, returned: bytes = b"") -> None:
        ready = self._ready
        held = self._held
        flags = returned or bytes(len(records))
        for record, offset, count, back in zip(records, offsets, deliveries, flags, strict=True):
            if offset in held:
                continue  # sent again by the owner (it took it back meanwhile): keep one copy
            held.add(offset)
            ready.append(RemoteMessage(offset, record, count, bool(back)))

    def take(self, max_count: int) -> list[RemoteMessage]:
        out = []
        ready = self._ready
        while ready and len(out) < max_count:
            message = ready.popleft()
            self._inflight[message.offset] = message
            out.append(message)
        if out:
            self.client.taken(self.queue, len(out))
        return out

    @property
    def held(self) -> int:
        """Messages this node's consumers hold from here (delivered, not yet acked)."""
        return len(self._inflight)

    def ack(self, offsets: Any) -> int:
        done = [o for o in offsets if self._inflight.pop(o, None) is not None]
        self._held.difference_update(done)
        if done:
            self.client.settle(self.queue, self.index, self.epoch, done, "ack")
        return len(done)

    def nack(self, offsets: Any, counted: bool = True) -> int:
        """Local consumers handed these back: they go back to the owner, which counts the attempt (``counted``),
        dead-letters what was delivered too often and delivers the rest again. The owner alone keeps the count."""
        back = [o for o in offsets if self._inflight.pop(o, None) is not None]
        self._held.difference_update(back)
        if back:
            self.client.settle(self.queue, self.index, self.epoch, back, "nack" if counted else "return")
        return len(back)

    def drop(self, tell_owner: bool) -> None:
        """Stop dispatching from this proxy. The ready messages go back to the owner uncounted (``tell_owner``;
        not when the stream is gone: the owner took them back when it ended). Those in flight here stay, so that
        their consumers' acks still reach the owner, which applies them if it still holds the deliveries."""
        if tell_owner and self._ready:
            self.client.settle(self.queue, self.index, self.epoch, [m.offset for m in self._ready], "return")
        for message in self._ready:
            self._held.discard(message.offset)
        self._ready.clear()


class RouteClient:
    """The consumer node's end of the route stream to one peer (reopened after ``RECONNECT_DELAY`` when it
    breaks, starting from the current credits)."""

    def __init__(self, router: Router, node: str, target: str) -> None:
        self.router = router
        self.node = node
        self.target = target
        self._stream = PeerStream(target, "RouteQueueMessage", self._received, self._lost,
                                  reconnect_delay=RECONNECT_DELAY, first=self._credits)
        self._settles: dict[tuple[str, str], dict[tuple[int, int], list[int]]] = {}
        self._settle_scheduled = False
        #: Per queue: messages this node's consumers took from this owner since the last tick, their rate
        #: (messages/s, smoothed), and the credit last sent.
        self._taken: dict[str, int] = {}
        self._rate: dict[str, float] = {}
        self._sent: dict[str, int] = {}

    @property
    def connected(self) -> bool:
        return self._stream.connected

    def start(self) -> None:
        self._stream.start()

    def _credits(self) -> list[broker_pb2.RouteRequest]:
        self._sent = {queue: self.credit_for(queue) for queue in self.router.credits()}
        return [broker_pb2.RouteRequest(queue=queue, credit=credit) for queue, credit in self._sent.items()]

    def credit_for(self, queue: str) -> int:
        """What this owner may have in flight here for ``queue``: what the consumers hold of it, plus the
        prefetch (0: no consumer of it here)."""
        if queue not in self.router.credits():
            return 0
        held = sum(p.held for p in self.router.proxies_of(self, queue))
        rate = self._rate.get(queue)
        prefetch = PREFETCH_START if rate is None else max(PREFETCH_MIN, int(rate * PREFETCH_SECONDS))
        return min(held + prefetch, MAX_CREDIT)

    def taken(self, queue: str, count: int) -> None:
        self._taken[queue] = self._taken.get(queue, 0) + count

    def tick(self, seconds: float) -> None:
        """Measure the rates, and send credits that changed by more than a quarter, or grew by half the least
        prefetch (acks carry the others). Without the second rule a credit could stay below what the consumers
        here may hold while they ack nothing: 97 of a 128-message window delivered, then none, as the credit sent
        early (held then + prefetch) was never raised by less than a quarter."""
        for queue in self.router.credits():
            rate = self._taken.pop(queue, 0) / seconds
            previous = self._rate.get(queue)
            self._rate[queue] = rate if previous is None else 0.7 * previous + 0.3 * rate
            credit = self.credit_for(queue)
            sent = self._sent.get(queue, 0)
            if self.connected and (abs(credit - sent) * 4 > sent or credit >= sent + PREFETCH_MIN // 2):
                self.credit(queue, credit)

    def _received(self, message: broker_pb2.RouteDeliveries) -> None:
        self.router.received(self, message)

    def _lost(self, error: Exception) -> None:
        log.debug("route stream to %s broke: %s", self.node, error)
        self.router.stream_lost(self)

    def credit(self, queue: str, credit: int) -> None:
        if self._settle_scheduled:
            self._send_settles()  # the acks and hand-backs of this turn go before the credit (0: all back, uncounted)
        self._sent[queue] = credit
        if not credit:
            self._rate.pop(queue, None)
            self._taken.pop(queue, None)
        self._stream.send(broker_pb2.RouteRequest(queue=queue, credit=credit))

    def settle(self, queue: str, partition: int, epoch: int, offsets: list[int], how: str) -> None:
        """Acks (``how`` "ack") and hand-backs ("nack", "return": see ``RouteRequest``) are sent once per loop
        turn, per queue."""
        if not self.connected:
            return  # the stream is gone: the owner took back everything it held for it
        entry = self._settles.setdefault((queue, how), {})
        entry.setdefault((partition, epoch), []).extend(offsets)
        if not self._settle_scheduled:
            self._settle_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_settles)

    def _send_settles(self) -> None:
        self._settle_scheduled = False
        settles, self._settles = self._settles, {}
        for (queue, how), parts in settles.items():
            entries = [broker_pb2.PartitionOffsets(partition=p, epoch=e, offsets=o) for (p, e), o in parts.items()]
            credit = self.credit_for(queue)
            if credit:  # (0 is for consumers_changed to say: it hands everything back)
                self._sent[queue] = credit
            request = broker_pb2.RouteRequest(queue=queue, credit=credit or -1)
            {"ack": request.acks, "nack": request.nacks, "return": request.returns}[how].extend(entries)
            stats.sent(f"route_{how}s", sum(len(o) for o in parts.values()))
            self._stream.send(request)

    async def close(self) -> None:
        await self._stream.close()


class Router:
    """The consumer node's side of proxy routing: route streams to every peer, and the proxies they fill."""

    def __init__(self, manager: QueueManager, view: ClusterView) -> None:
        self.manager = manager
        self.view = view
        self.clients: dict[str, RouteClient] = {}
        #: (owner node, queue, partition) -> proxy (its epoch is the owner's).
        self.proxies: dict[tuple[str, str, int], RemotePartition] = {}
        #: Queues with consumers on this node -> their windows together.
        self._credits: dict[str, int] = {}
        self._ticker: asyncio.TimerHandle | None = None

    def credits(self) -> dict[str, int]:
        """Queues with consumers on this node -> their windows together."""
        return self._credits

    def proxies_of(self, client: RouteClient, queue: str) -> list[RemotePartition]:
        return [p for (node, q, _), p in self.proxies.items() if node == client.node and q == queue]

    def consumers_changed(self, queue: str, window_total: int) -> None:
        """This node's consumers of ``queue`` now have this much window together (0: none left)."""
        had = queue in self._credits
        if window_total:
            self._credits[queue] = window_total
        else:
            self._credits.pop(queue, None)
        if had == bool(window_total):
            return  # still consumed here (the credit follows what the consumers take), or still not
        if not window_total:
            self._drop(lambda key: key[1] == queue)
        self.sync_peers()
        for client in self.clients.values():
            if client.connected:
                client.credit(queue, client.credit_for(queue))
        if self._credits and self._ticker is None:
            self._ticker = asyncio.get_running_loop().call_later(RATE_TICK, self._tick)

    def _tick(self) -> None:
        self._ticker = None
        for client in list(self.clients.values()):
            client.tick(RATE_TICK)
        if self._credits:
            self._ticker = asyncio.get_running_loop().call_later(RATE_TICK, self._tick)

    def sync_peers(self) -> None:
        """Open a route stream to every live peer while this node has consumers; close the others."""
        wanted = {} if not self._credits else {
            node: info.get("grpc") for node, info in self.view.nodes.items()
            if node != self.view.node_id and info.get("grpc")}
        for node, client in list(self.clients.items()):
            if wanted.get(node) != client.target:
                del self.clients[node]
                self._drop(lambda key, node=node: key[0] == node)
                asyncio.ensure_future(client.close())
        for node, target in wanted.items():
            if node not in self.clients:
                client = self.clients[node] = RouteClient(self, node, target)
                client.start()

    def sources(self, queue: str) -> list[RemotePartition]:
        return [p for (node, q, index), p in self.proxies.items() if q == queue]

    def received(self, client: RouteClient, message: broker_pb2.RouteDeliveries) -> None:
        key = (client.node, message.queue, message.partition)
        records = segment.unpack(message.records)
        if message.queue not in self._credits:
            # No consumer here any more (credit 0 is on its way): hand them straight back, uncounted.
            client.settle(message.queue, message.partition, message.epoch, list(message.offsets), "return")
            return
        proxy = self.proxies.get(key)
        if proxy is not None and (proxy.epoch != message.epoch or proxy.client is not client):
            self._drop(lambda k: k == key)
            proxy = None
        new = proxy is None
        if proxy is None:
            proxy = self.proxies[key] = RemotePartition(client, message.queue, message.partition, message.epoch)
        proxy.add(records, message.offsets, message.deliveries, message.returned)
        self.manager.source_readable(message.queue, refresh=new)

    def stream_lost(self, client: RouteClient) -> None:
        self._drop(lambda key: self.proxies[key].client is client)

    def prune(self) -> None:
        """Drop proxies of partitions whose owner or epoch changed (their messages are the new owner's now)."""
        owners = self.view.owners
        seen = self.view.max_epoch

        def stale(key: tuple[str, str, int]) -> bool:
            # Only what the view shows to be superseded: a newer epoch, or the key gone at the proxy's epoch or later
            # (a new owner may deliver before this node's watch shows its key; its proxy must stay).
            epoch = self.proxies[key].epoch
            owner = owners.get((key[1], key[2]))
            if owner is not None:
                return owner.epoch > epoch or (owner.epoch == epoch and owner.node != key[0])
            return seen.get((key[1], key[2]), 0) >= epoch

        self._drop(stale)

    def _drop(self, which: Any) -> None:
        dropped = [key for key in self.proxies if which(key)]
        queues = set()
        for key in dropped:
            proxy = self.proxies.pop(key)
            proxy.drop(tell_owner=proxy.client.connected)
            queues.add(key[1])
        for queue in queues:
            self.manager.source_readable(queue, refresh=True)

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        for client in list(self.clients.values()):
            await client.close()
        self.clients.clear()
        self.proxies.clear()
