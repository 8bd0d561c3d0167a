"""amqtt's broker, taught ``$queue/`` topics: durable publishes, competing consumers, acks, redelivery.

amqtt 0.12.1 has no hook that can hold back a PUBACK or pick one consumer per message, so ShoalMQ subclasses it.
The overrides are few and named here; docs/design.md ("amqtt seams") lists them and the tests that cover them.

- ``ShoalBroker._initialize_client_session``: after amqtt reads CONNECT, turns its handler into a
  ``QueueProtocolHandler`` and its session into a ``QueueSession`` (``__class__`` assignment: amqtt hard-codes the
  classes it builds); bounds the wait for CONNECT (amqtt waits forever); and enforces keep-alive at 1.5 times
  the client's value, as MQTT 3.1.1 asks (amqtt never drops a silent client).
- ``ShoalBroker.add_subscription`` / ``_del_subscription``: a ``$queue/`` filter registers the connection with the
  queue manager, any other with the session engine, never amqtt's subscription table, so a subscriber to ``#``
  never sees queue traffic.
- ``QueueProtocolHandler.queue_publishes`` / ``queue_acks`` / ``queue_pubrel``: the queue side of a connection,
  called in batches by the fast path (``shoalmq.broker.fastpath``), which takes ``$queue/`` frames off amqtt's
  reader. A ``$queue/`` publish is acknowledged (PUBACK, or PUBREC for QoS 2) only when its commit is durable; a
  refused one closes the connection, and so does a publish to ``$SYS`` (amqtt would leave it half-dead).
  ``handle_publish``, ``handle_puback`` and ``handle_pubrel`` route to the same methods for any such frame that
  reaches amqtt.
- ``ShoalBroker._handle_disconnect``: when a newer connection of the client took the session over, the older
  connection's end does not mark the session disconnected (amqtt would, and then drop the newer connection).
- ``handle_read_timeout``: keep-alive expiry closes the connection. ``stop``: the consumer is gone; its
  unacknowledged messages go back to their queues. ``start`` (after CONNACK): links the connection's fast path,
  and a client with clean session off is a consumer of its queues again without subscribing anew.
- ``QueueSession.next_packet_id`` / ``queue_packet_ids``: amqtt's own packet ids skip the ids of queue deliveries in
  flight, and a batch of deliveries takes its ids from amqtt's counter (``_packet_id``), skipping amqtt's
  ``inflight_in`` and ``inflight_out``.

- Ordinary topics: after CONNACK the fast path hands every ordinary PUBLISH, SUBSCRIBE, UNSUBSCRIBE and ack to
  the handler (``ordinary_publishes``, ``subscribe_packet``, ``unsubscribe_packet``, ``ordinary_acks``,
  ``ordinary_pubrel``), which drives the broker's ``SessionEngine`` (``shoalmq.broker.sessions``); the handler is
  the engine's connection (``write``, ``buffered``, ``close``). ``ShoalBroker._broadcast_message`` and
  ``retain_message`` route what amqtt still publishes itself (a will) through the engine, and CONNACK's session
  present flag (``Session.parent``) is the engine's.

The connection's transport is reached through amqtt's ``StreamWriterAdapter`` (its ``_writer``), to write acks and
deliveries and to close the connection.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from typing import Any

from amqtt.broker import Broker
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import Session
from amqtt.utils import gen_client_id
from transitions import MachineError

from shoalmq._native import mqtt_codec
from shoalmq._native.mqtt_packets import PUBACK, PUBCOMP, PUBREC, SUBACK_FAILURE, frame
from shoalmq.broker.security import (BAD_CREDENTIALS, NOT_AUTHORIZED, READ, WRITE, Identity, Security,
                                     certificate_name)
from shoalmq import stats
from shoalmq.broker.session_store import SessionStore
from shoalmq.broker.sessions import Limits, Message, SessionEngine
from shoalmq.broker.sessions import Session as OrdinarySession
from shoalmq.errors import PayloadTooLarge, QueueFull, ShoalError, StorageError
from shoalmq.logs import RepeatLimiter
from shoalmq.queue.manager import BadQueueName, Delivery, QueueManager, is_queue_topic, queue_of_filter

log = logging.getLogger(__name__)
#: Refusals and denials, once per client (id and address) and kind a minute, with a count.
refusals = RepeatLimiter(log)
STATS = stats.FRONT_END


def refusal_reason(exc: BaseException) -> str:
    """The ``reason`` label of a refused queue publish (``shoalmq.stats.FrontEnd.refused``)."""
    if isinstance(exc, PayloadTooLarge):
        return "too_large"
    if isinstance(exc, QueueFull):
        return "full"
    if isinstance(exc, StorageError):
        return "storage"
    if isinstance(exc, BadQueueName):
        return "bad_topic"
    return "other"

#: Seconds between checks whether a publisher held back by its subscribers may be read again.
HOLD_CHECK = 0.005



def parse_subscribe(body: bytes) -> tuple[int, list[tuple[str, int]]]:
    """The packet id and (filter, requested QoS) pairs of a SUBSCRIBE body (checked by the frame guard)."""
    pos, requests = 2, []
    while pos < len(body):
        length = int.from_bytes(body[pos:pos + 2], "big")
        requests.append((body[pos + 2:pos + 2 + length].decode(), body[pos + 2 + length]))
        pos += 3 + length
    return int.from_bytes(body[:2], "big"), requests


def parse_unsubscribe(body: bytes) -> tuple[int, list[str]]:
    pos, filters = 2, []
    while pos < len(body):
        length = int.from_bytes(body[pos:pos + 2], "big")
        filters.append(body[pos + 2:pos + 2 + length].decode())
        pos += 2 + length
    return int.from_bytes(body[:2], "big"), filters


class SessionStates:
    """amqtt's session state machine (``Session.transitions``: new, connected, disconnected), without the
    ``transitions`` library: building its ``Machine`` for every CONNECT was ~70% of amqtt's cost of a connection.
    Same triggers, same callbacks (``_on_enter_connected``/``_on_enter_disconnected``, a reflexive disconnect
    included), the same ``MachineError`` for a connect while connected (amqtt's take-over path catches it)."""

    __slots__ = ("state", "_session")

    def __init__(self, session: Session) -> None:
        self.state = "new"
        self._session = session

    def connect(self) -> bool:
        if self.state == "connected":
            raise MachineError("\"Can't trigger event connect from state connected!\"")
        self.state = "connected"
        self._session._on_enter_connected()
        return True

    def disconnect(self) -> bool:
        self.state = "disconnected"
        self._session._on_enter_disconnected()
        return True

    def is_new(self) -> bool:
        return self.state == "new"

    def is_connected(self) -> bool:
        return self.state == "connected"

    def is_disconnected(self) -> bool:
        return self.state == "disconnected"


def _init_states(self: Session) -> None:
    self.transitions = SessionStates(self)


#: amqtt's own, kept for the test that checks ``SessionStates`` behaves as it does.
AMQTT_INIT_STATES = Session._init_states
Session._init_states = _init_states  # type: ignore[method-assign]  # (every amqtt session: see SessionStates)


class QueueSession(Session):
    """amqtt's session, with the queue state that must outlive one connection of a persistent session."""

    #: Queue deliveries in flight, by packet identifier.
    queue_inflight: dict[int, Delivery]
    #: Packet ids of queue deliveries taken back (a handoff, an ack timeout) and not given out again: the client's
    #: late PUBACK for one is dropped here, quietly, not passed to amqtt (which warned once per message).
    queue_revoked: set[int]
    #: Queues this client consumes at QoS 0 (at most once).
    queue_qos0: set[str]
    #: QoS 2 queue publishes stored (or being stored), waiting for PUBREL: packet id -> its commit [MQTT-4.3.3-2].
    queue_qos2: dict[int, asyncio.Future[None]]
    #: The client's session of ordinary topics (``shoalmq.broker.sessions``), once it is connected.
    ordinary: OrdinarySession | None = None
    #: Who the client is to the ACL (set when it is authenticated), and its address.
    identity: Identity | None = None
    peer: str = "?"

    @property
    def next_packet_id(self) -> int:
        """amqtt's next packet id that is not a queue delivery's either (AMQTTError if all 65,535 are in use)."""
        for _ in range(65535):
            packet_id = Session.next_packet_id.fget(self)  # type: ignore[attr-defined]
            if packet_id not in self.queue_inflight:
                self.queue_revoked.discard(packet_id)
                return packet_id
        raise AMQTTError("no free packet identifier: 65,535 messages in flight")

    def queue_packet_ids(self, deliveries: list[Delivery]) -> list[int]:
        """Give each delivery the next free packet id, from amqtt's own counter (``_packet_id``; ids in amqtt's
        ``inflight_in``/``inflight_out`` or of queue deliveries are skipped), and hold it in ``queue_inflight``.
        What ``next_packet_id`` does for one id, inlined for a batch. AMQTTError if all 65,535 are in use."""
        inflight, amqtt_in = self.queue_inflight, self.inflight_in
        amqtt_out = self.ordinary.inflight if self.ordinary is not None else self.inflight_out
        revoked = self.queue_revoked
        packet_id = self._packet_id
        ids = []
        for delivery in deliveries:
            packet_id = packet_id % 65535 + 1
            if packet_id in inflight or packet_id in amqtt_out or packet_id in amqtt_in:
                start = packet_id
                while packet_id in inflight or packet_id in amqtt_out or packet_id in amqtt_in:
                    packet_id = packet_id % 65535 + 1
                    if packet_id == start:
                        self._packet_id = packet_id
                        raise AMQTTError("no free packet identifier: 65,535 messages in flight")
            inflight[packet_id] = delivery
            delivery.packet_id = packet_id
            ids.append(packet_id)
        self._packet_id = packet_id
        if revoked:
            revoked.difference_update(ids)
        return ids


class QueueProtocolHandler(BrokerProtocolHandler):
    """amqtt's per-connection handler, also a queue publisher and a competing consumer."""

    queues: QueueManager
    window: int

    def _init_queue_state(self, queues: QueueManager, live: dict[str, QueueProtocolHandler],
                          broker: ShoalBroker) -> None:
        self.broker_of_queues = broker
        self.engine = broker.engine
        self._fast: Any = None  # the connection's QueueFastProtocol, once linked
        self.security: Security = broker.security
        #: ACL answers for this connection's publishes: topic -> allowed (cleared when the rules change).
        self._writable: dict[str, bool] = {}
        self._denied_warned = False
        self._keep_alive_timer: asyncio.TimerHandle | None = None
        self._held_topics: set[str] | None = None  # topics whose subscribers hold this publisher back
        self.queues = queues
        self.window = queues.consumer_window
        self._live = live
        self._pending_acks: list[Delivery] = []
        #: Acknowledgements of publishes waiting, in order: (what they wait for, the acks).
        self._acks_waiting: collections.deque[tuple[asyncio.Future[None], list[bytes]]] = collections.deque()
        self._ack_scheduled = False
        self._closing = False

    @property
    def name(self) -> str:
        """The consumer's name in logs: its client id."""
        return f"client {self.session.client_id}" if self.session is not None else "a client"

    @property
    def _queue_inflight(self) -> dict[int, Delivery]:
        return self.session.queue_inflight  # type: ignore[union-attr]

    # -- publishing -----------------------------------------------------------------------------------

    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        """A PUBLISH that reached amqtt's reader (the fast path takes them all) goes where the fast path's go."""
        topic = publish_packet.topic_name or ""
        qos, payload = publish_packet.qos or 0, bytes(publish_packet.data or b"")
        if topic.startswith(("$queue", "$SYS")):
            self.queue_publishes([(topic, qos, [publish_packet.packet_id or 0], [payload])])
        elif self.session is not None and self.session.ordinary is not None:  # type: ignore[attr-defined]
            flags = (qos << 1) | (1 if publish_packet.retain_flag else 0)
            self.ordinary_publishes([(3, flags, topic, publish_packet.packet_id or 0, payload)])

    def queue_publishes(self, runs: list[tuple[str, int, list[int], list[bytes]]]) -> asyncio.Future[None] | None:
        """Store publishes to ``$queue/`` topics, given as runs of one topic and QoS: (topic, qos, packet ids,
        payloads); the fast path sends ``$SYS`` publishes here too, to be refused.

        Each is acknowledged (PUBACK, or PUBREC for QoS 2) once its commit is durable (on a cluster, a partition
        owned elsewhere: once its owner answers), in the order the PUBLISHes came, ordinary ones included
        [MQTT-4.6.0-2] (``_acknowledge_in_order``). A run is
        stored whole or not at all (``QueueManager.publish_many``). A publish that is refused, or to a ``$SYS`` topic
        or a ``$queue`` one that names no queue, closes the connection, and nothing after it is stored. Returns the
        commit the last acknowledged publish waits for (None if none does)."""
        by_flush: dict[int, tuple[asyncio.Future[None], list[bytes]]] = {}
        last: asyncio.Future[None] | None = None
        for topic, qos, packet_ids, payloads in runs:
            STATS.publishes_received += len(payloads)
            if self._closing:
                break  # refused: nothing after it is stored
            if not is_queue_topic(topic):
                STATS.refused["", "bad_topic"] += len(payloads)
                self._refuse(f"publish to {topic!r}: " + ("$SYS topics are reserved for the broker"
                             if topic.startswith("$SYS") else "not a queue topic ($queue/<name>)"), "bad-topic")
                break
            refusal = self._queue_refusal(topic, WRITE)
            if refusal is not None:
                STATS.refused[_queue_name(topic), "acl" if refusal.startswith("denied") else "not_created"] += \
                    len(payloads)
                self._refuse(f"publish to {topic!r} refused: {refusal}", "publish-refused")
                break
            if qos == 2:
                last = self._queue_publishes_qos2(topic, packet_ids, payloads, by_flush) or last
                continue
            try:
                flush = self.queues.publish_many(topic, payloads)
            except ShoalError as exc:
                STATS.refused[_queue_name(topic), refusal_reason(exc)] += len(payloads)
                self._refuse(f"publish to {topic!r} refused: {exc}", "publish-refused")
                break
            if qos == 0:
                continue
            entry = by_flush.get(id(flush))
            if entry is None:
                entry = by_flush[id(flush)] = (flush, [])
            entry[1].append(mqtt_codec.encode_acks(PUBACK, packet_ids))
            last = flush
        for flush, acks in by_flush.values():
            self._acknowledge_in_order(flush, b"".join(acks))
        return last

    def _queue_refusal(self, topic: str, access: int) -> str | None:
        """Why the client may not publish to (``WRITE``) or consume (``READ``) this ``$queue/`` topic, or None: the
        ACL, and the creation of a queue on first use (which needs write access and ``auto_create_queues``)."""
        security = self.security
        identity = self.session.identity  # type: ignore[union-attr]
        if security.acl is not None:
            allowed = self._may_write(topic) if access == WRITE else security.may_subscribe(identity, topic)
            if not allowed:
                return "denied by the ACL"
        try:
            name = queue_of_filter(topic) if access == READ else topic[len("$queue/"):].split("/", 1)[0]
        except BadQueueName:
            return None  # (the queue manager says what is wrong with it)
        if name is None:
            return None
        refusal = self.queues.creation_refused(name)
        if refusal is not None:
            return refusal
        if (access == READ and security.acl is not None and not self.queues.known(name)
                and not security.may(identity, f"$queue/{name}", WRITE)):
            return f"queue {name!r} does not exist, and creating it needs write access"
        return None

    def _queue_publishes_qos2(self, topic: str, packet_ids: list[int], payloads: list[bytes],
                              by_flush: dict[int, tuple[asyncio.Future[None], list[bytes]]]
                              ) -> asyncio.Future[None] | None:
        """QoS 2 publishes one by one: a retransmission of one stored already is only acknowledged again
        [MQTT-4.3.3-2]. A persistent session also records the packet id (with the message's commit) until PUBREL,
        so a retransmission after the client was away, or after a restart, is not stored twice."""
        qos2 = self.session.queue_qos2  # type: ignore[union-attr]
        ordinary = self.session.ordinary  # type: ignore[union-attr]
        last = None
        for packet_id, payload in zip(packet_ids, payloads):
            flush = qos2.get(packet_id)
            if flush is None and ordinary is not None and packet_id in ordinary.inbound_qos2:
                flush = qos2[packet_id] = asyncio.get_running_loop().create_future()
                flush.set_result(None)  # stored before: acknowledged again
            if flush is None:
                try:
                    flush = self.queues.publish(topic, payload)
                except ShoalError as exc:
                    STATS.refused[_queue_name(topic), refusal_reason(exc)] += 1
                    self._refuse(f"publish to {topic!r} refused: {exc}", "publish-refused")
                    break
                qos2[packet_id] = flush
                if ordinary is not None and ordinary.persistent:
                    self.engine.receive_qos2(ordinary, packet_id)
            entry = by_flush.get(id(flush))
            if entry is None:
                entry = by_flush[id(flush)] = (flush, [])
            entry[1].append(mqtt_codec.encode_acks(PUBREC, [packet_id]))
            last = flush
        return last

    def _acknowledge_in_order(self, flush: asyncio.Future[None] | None, acks: bytes) -> None:
        """Send ``acks`` once ``flush`` (the commit, or a peer's answer, the publishes wait for; None: nothing) is
        done and every ack before them was sent: one stream per connection, in the order the PUBLISHes came
        [MQTT-4.6.0-2], whatever each waits for. A publish not stored closes the connection, unacknowledged
        with everything after it."""
        waiting = self._acks_waiting
        if not waiting and (flush is None or (flush.done() and not flush.cancelled() and flush.exception() is None)):
            self._write(acks)
            return
        if waiting and (flush is None or flush is waiting[-1][0]):
            waiting[-1][1].append(acks)
            return
        waiting.append((flush, [acks]))  # type: ignore[arg-type]
        flush.add_done_callback(self._acks_ready)  # type: ignore[union-attr]

    def _acks_ready(self, done: asyncio.Future[None]) -> None:
        if not done.cancelled():
            done.exception()  # retrieved here, whether or not its acks are still sent (see below)
        waiting = self._acks_waiting
        while waiting and waiting[0][0].done():
            flush, acks = waiting.popleft()
            error = "cancelled" if flush.cancelled() else flush.exception()
            if error is not None:
                waiting.clear()  # (what follows a publish not stored is not acknowledged either)
                self._refuse(f"publish not stored: {error}")
                return
            self._write(b"".join(acks))

    async def handle_pubrel(self, pubrel: Any) -> None:
        if not self.queue_pubrel(pubrel.packet_id):
            await super().handle_pubrel(pubrel)

    def queue_pubrel(self, packet_id: int) -> bool:
        """The end of a QoS 2 queue publish: PUBCOMP. False if the packet id is not one of ours."""
        qos2 = self.session.queue_qos2  # type: ignore[union-attr]
        if packet_id not in qos2:
            return False
        del qos2[packet_id]
        if self.session.ordinary is not None:  # type: ignore[union-attr]
            self.engine.release(self.session.ordinary, packet_id)  # type: ignore[union-attr]
        self._write(mqtt_codec.encode_acks(PUBCOMP, [packet_id]))
        return True

    # -- consuming --------------------------------------------------------------------------------------

    def deliver(self, deliveries: list[Delivery]) -> None:
        """Write a batch of deliveries of one queue as PUBLISH frames, encoded from the stored records in one call
        and written in one write."""
        if self._closing or self.session is None:
            self.queues.hand_back(deliveries, counted=False)  # never written: not a delivery attempt
            self.queues.consumer_gone(self)
            return
        queue = deliveries[0].queue
        records = [d.message.payload for d in deliveries]
        STATS.publishes_sent += len(records)
        session: QueueSession = self.session  # type: ignore[assignment]
        if queue.name in session.queue_qos0:  # at most once: the manager removed them as they were handed over
            self._write(mqtt_codec.encode_records(queue.topic_prefix, records, [0] * len(records)))
            return
        ids = session.queue_packet_ids(deliveries)
        dups = None
        for i, delivery in enumerate(deliveries):
            message = delivery.message
            if message.deliveries > 1 or message.returned:
                if dups is None:
                    dups = bytearray(len(deliveries))
                dups[i] = 1
        self._write(mqtt_codec.encode_records(queue.topic_prefix, records, ids,
                                              bytes(dups) if dups is not None else None))

    def revoke(self, deliveries: list[Delivery]) -> None:
        """The manager took these back (ack timeout, unsubscribe): their packet ids are free again."""
        inflight = self._queue_inflight
        revoked = self.session.queue_revoked  # type: ignore[union-attr]
        for delivery in deliveries:
            if inflight.get(delivery.packet_id) is delivery:
                del inflight[delivery.packet_id]
                revoked.add(delivery.packet_id)

    async def handle_puback(self, puback: Any) -> None:
        if not self.queue_ack(puback.variable_header.packet_id):
            await super().handle_puback(puback)

    def queue_ack(self, packet_id: int) -> bool:
        """A consumer's PUBACK of a queue delivery (applied with the others of this loop iteration, as one batch).
        False if the packet id is not one of ours."""
        return not self.queue_acks([packet_id])

    def queue_acks(self, packet_ids: list[int]) -> list[int]:
        """Consumer PUBACKs, applied with the others of this loop iteration as one batch. Returns the packet ids
        that are not queue deliveries of this connection (for amqtt), in order."""
        inflight = self._queue_inflight
        pending = self._pending_acks
        others = []
        for packet_id in packet_ids:
            delivery = inflight.pop(packet_id, None)
            if delivery is not None:
                pending.append(delivery)
            elif packet_id in self.session.queue_revoked:  # type: ignore[union-attr]
                self.session.queue_revoked.discard(packet_id)  # type: ignore[union-attr]  # taken back: too late
            else:
                others.append(packet_id)
        if pending and not self._ack_scheduled:
            self._ack_scheduled = True
            asyncio.get_running_loop().call_soon(self._apply_acks)
        return others

    def _apply_acks(self) -> None:
        self._ack_scheduled = False
        acks, self._pending_acks = self._pending_acks, []
        self.queues.ack(acks)

    # -- ordinary topics (shoalmq.broker.sessions) ---------------------------------------------------------

    def write(self, data: bytes) -> None:
        """The session engine's writes (its connection interface)."""
        self._write(data)

    def buffered(self) -> int:
        transport = self._transport()
        return transport.get_write_buffer_size() if transport is not None else 0

    def close(self) -> None:
        self._close()

    def ordinary_publishes(self, publishes: list[tuple]) -> None:
        """PUBLISHes to ordinary topics, decoded (``(3, flags, topic, packet id, payload)``), in order: each routed
        to the subscribers it matches, then acknowledged (PUBACK, or PUBREC for QoS 2) in one write. A QoS 2
        publish sent again before its PUBREL is acknowledged again, not routed again [MQTT-4.3.3-2]."""
        STATS.publishes_received += len(publishes)
        if self._closing:
            return  # refused: nothing after it is taken
        session = self.session.ordinary  # type: ignore[union-attr]
        engine = self.engine
        acks = bytearray()
        topics = set()
        engine.take_flush()  # (what was written before these publishes is not theirs to wait for)
        acl = self.security.acl is not None
        for _, flags, topic, packet_id, payload in publishes:
            topics.add(topic)
            qos = (flags >> 1) & 3
            if acl and not self._may_write(topic):
                if qos:  # (MQTT 3.1.1 has no negative acknowledgement: acknowledged, not routed)
                    acks += (b"\x50\x02" if qos == 2 else b"\x40\x02") + packet_id.to_bytes(2, "big")
                continue
            if qos == 2:
                if engine.receive_qos2(session, packet_id):
                    engine.publish(Message(topic, payload, 2, bool(flags & 1)))
                acks += b"\x50\x02" + packet_id.to_bytes(2, "big")
                continue
            engine.publish(Message(topic, payload, qos, bool(flags & 1)))
            if qos:
                acks += b"\x40\x02" + packet_id.to_bytes(2, "big")
        if acks:
            self._acknowledge_in_order(engine.take_flush(), bytes(acks))
        if self._fast is not None and self._held_topics is None and any(
                engine.holding_back(topic, session) for topic in topics):
            self._held_topics = topics
            self._fast.hold("subscribers")
            asyncio.get_running_loop().call_later(HOLD_CHECK, self._check_held)

    def _may_write(self, topic: str) -> bool:
        """The ACL's answer for a publish to ``topic`` (remembered per connection); a refusal is logged once."""
        allowed = self._writable.get(topic)
        if allowed is None:
            if len(self._writable) >= 1024:
                self._writable.clear()
            allowed = self._writable[topic] = self.security.may(self.session.identity, topic, WRITE)  # type: ignore
        if not allowed:
            STATS.refused["" if not is_queue_topic(topic) else _queue_name(topic), "acl"] += 1
            if not self._denied_warned:
                self._denied_warned = True
                session = self.session
                refusals.log((session.client_id, session.peer, "acl-publish"),  # type: ignore[union-attr]
                             "%s from %s: publish to %r denied by the ACL; its publishes the ACL denies are dropped",
                             self.name, session.peer, topic)  # type: ignore[union-attr]
        return allowed

    def _check_held(self) -> None:
        """Read the publisher again once no subscriber of what it sent holds it back."""
        if self._closing or self._held_topics is None:
            return
        publisher = self.session.ordinary  # type: ignore[union-attr]
        if any(self.engine.holding_back(topic, publisher) for topic in self._held_topics):
            asyncio.get_running_loop().call_later(HOLD_CHECK, self._check_held)
            return
        self._held_topics = None
        self._fast.release("subscribers")

    def ordinary_acks(self, kind: int, packet_ids: list[int]) -> None:
        """PUBACKs (``kind`` PUBACK), PUBRECs or PUBCOMPs of deliveries of ordinary topics; ids that are none of
        its messages in flight are ignored (a late ack after a takeover, say)."""
        session, engine = self.session.ordinary, self.engine  # type: ignore[union-attr]
        if session is None:
            return
        ack = engine.puback if kind == PUBACK else engine.pubrec if kind == PUBREC else engine.pubcomp
        for packet_id in packet_ids:
            ack(session, packet_id)

    def ordinary_pubrel(self, packet_id: int) -> None:
        """PUBREL of an inbound QoS 2 publish: PUBCOMP [MQTT-4.3.3-2]."""
        if self.session.ordinary is not None:  # type: ignore[union-attr]
            self.engine.release(self.session.ordinary, packet_id)  # type: ignore[union-attr]
        self._write(mqtt_codec.encode_acks(PUBCOMP, [packet_id]))

    def subscribe_packet(self, body: bytes) -> None:
        """SUBSCRIBE: queue filters to the queue manager, the others to the session engine; SUBACK, then the
        retained messages the filters match [MQTT-3.8.4-1] [MQTT-3.8.4-3]."""
        if self._closing:
            return  # refused: nothing after it is taken
        packet_id, requests = parse_subscribe(body)
        granted = bytearray()
        for topic_filter, qos in requests:
            if topic_filter.startswith("$queue"):
                granted.append(self.broker_of_queues.subscribe_queue(topic_filter, qos, self.session))
            elif self.security.acl is not None and not self.security.may_subscribe(
                    self.session.identity, topic_filter):  # type: ignore[union-attr]
                log.info("%s from %s: subscription to %r denied by the ACL", self.name,
                         self.session.peer, topic_filter)  # type: ignore[union-attr]
                granted.append(SUBACK_FAILURE)
            else:
                granted += bytes(self.engine.subscribe(self.session.ordinary, [(topic_filter, qos)]))  # type: ignore
        self._write(frame(0x90, packet_id.to_bytes(2, "big") + bytes(granted)))

    def unsubscribe_packet(self, body: bytes) -> None:
        if self._closing:
            return  # refused: nothing after it is taken
        packet_id, filters = parse_unsubscribe(body)
        ordinary = []
        for topic_filter in filters:
            if topic_filter.startswith("$queue"):
                self.broker_of_queues._del_subscription(topic_filter, self.session)
            else:
                ordinary.append(topic_filter)
        self.engine.unsubscribe(self.session.ordinary, ordinary)  # type: ignore[union-attr]
        self._write(b"\xb0\x02" + packet_id.to_bytes(2, "big"))

    # -- connection life ------------------------------------------------------------------------------

    async def start(self) -> None:
        """After CONNACK: the connection's fast path takes over ``$queue/`` frames, and a client with a persistent
        session is a consumer of its queues again at once."""
        assert self.session is not None
        session = self.session
        session.ordinary, _ = self.engine.connect(  # type: ignore[attr-defined]
            session.client_id, session.clean_session, self,
            busy=lambda packet_id: packet_id in session.queue_inflight,  # type: ignore[attr-defined]
            username=session.identity.username if session.identity else None)  # type: ignore[attr-defined]
        # Linked before amqtt's start, which may wait (up to 10 s) for a PUBREL that the fast path holds.
        transport = self._transport()
        protocol = transport.get_protocol() if transport is not None else None
        if hasattr(protocol, "link"):
            self._fast = protocol
            protocol.link(self)
        await super().start()
        for name, qos in list(session.ordinary.queues.items()):  # type: ignore[attr-defined]
            refusal = self._queue_refusal(f"$queue/{name}", READ)
            if refusal is not None:
                log.warning("%s: kept subscription to queue %s dropped: %s", self.name, name, refusal)
                self.engine.set_queue_subscription(session.ordinary, name, None)  # type: ignore[attr-defined]
                continue
            if qos == 0:
                self.session.queue_qos0.add(name)  # type: ignore[attr-defined]
            self.queues.subscribe(self, name, at_most_once=qos == 0)

    def rules_changed(self) -> None:
        """The ACL was reloaded: forget its remembered answers, and stop consuming the queues it now denies."""
        self._writable.clear()
        self._denied_warned = False
        session = self.session
        if session is None or self.security.acl is None:
            return
        for name in list(self.queues.subscriptions(self)):
            if not self.security.may_subscribe(session.identity, f"$queue/{name}"):  # type: ignore[attr-defined]
                log.warning("%s: the reloaded ACL denies reading queue %s: unsubscribed", self.name, name)
                self.queues.unsubscribe(self, name)
                if getattr(session, "ordinary", None) is not None:
                    self.engine.set_queue_subscription(session.ordinary, name, None)  # type: ignore[attr-defined]

    def _keep_alive_due(self) -> None:
        self._keep_alive_timer = None
        self.handle_read_timeout()

    def handle_read_timeout(self) -> None:
        if self._closing:
            return  # closed already: said once, aborted once
        fast = self._fast
        if fast is not None and self.session is not None:
            loop = asyncio.get_running_loop()
            remaining = fast.last_read + self.session.keep_alive - loop.time()
            if remaining > 0:
                # amqtt saw nothing, but the client sent whole packets on the fast path: look again when 1.5x
                # keep-alive has passed since the last of them (amqtt's own timer would wait a whole period more).
                if self._keep_alive_timer is None:
                    self._keep_alive_timer = loop.call_later(remaining, self._keep_alive_due)
                return
        client = self.session.client_id if self.session else "?"
        log.info("client %s sent nothing within 1.5 x its keep-alive: closing its connection", client)
        self._close()
        reader = getattr(self.reader, "feed_eof", None)
        if reader is not None:
            reader()  # amqtt's reader loop ends now, whether or not the aborted transport reports its loss

    async def stop(self) -> None:
        self._closing = True
        if self._keep_alive_timer is not None:
            self._keep_alive_timer.cancel()
            self._keep_alive_timer = None
        if self.session is not None and self._live.get(self.session.client_id) is self:
            del self._live[self.session.client_id]
        if self._pending_acks:
            self._apply_acks()  # acks already read count, or those messages would be delivered again
        if self.session is not None:
            ordinary = getattr(self.session, "ordinary", None)
            if ordinary is not None:
                self.engine.end(ordinary, self)  # (a will is published by amqtt's disconnect, through the engine)
            requeued, dead = self.queues.consumer_gone(self)
            if requeued or dead:
                log.info("client %s from %s left with %d unacknowledged queue message(s): %d requeued, %d moved to "
                         "the dead-letter queue (delivered max_deliveries times)", self.session.client_id,
                         self.session.peer, requeued + dead, requeued, dead)  # type: ignore[attr-defined]
            self._queue_inflight.clear()
        await super().stop()

    def _refuse(self, reason: str, kind: str = "refused") -> None:
        """MQTT 3.1.1 has no negative acknowledgement: log the reason (once a minute per client and kind, with
        a count) and close the connection."""
        if self._closing:
            return
        client = self.session.client_id if self.session else "?"
        peer = getattr(self.session, "peer", "?")
        refusals.log((client, peer, kind), "client %s from %s: %s; closing its connection", client, peer, reason)
        self._close()

    def _close(self) -> None:
        self._closing = True
        transport = self._transport()
        if transport is not None:
            transport.abort()

    def _write(self, data: bytes) -> None:
        if self._closing or not data:
            return
        transport = self._transport()
        if transport is not None and not transport.is_closing():
            STATS.bytes_sent += len(data)
            transport.write(data)

    def _transport(self) -> asyncio.Transport | None:
        writer = getattr(self.writer, "_writer", None)  # amqtt's StreamWriterAdapter wraps an asyncio StreamWriter
        return writer.transport if writer is not None else None


class ShoalBroker(Broker):
    """amqtt's broker with ``$queue/`` topics served by a ``QueueManager``."""

    def __init__(self, config: dict[str, Any], queues: QueueManager, connect_timeout: float = 10.0,
                 limits: Limits | None = None, security: Security | None = None) -> None:
        super().__init__(config)
        self.queues = queues
        #: Authentication and the ACL (``shoalmq.broker.security``; without files: anyone may do anything).
        self.security = security or Security()
        #: Sessions, subscriptions and retained messages of ordinary topics (a persistent session also keeps its
        #: queue subscriptions), stored with the queues' commits and read back here.
        self.engine = SessionEngine(limits, SessionStore(queues.store), may_read=self._may_read)
        sessions, messages = self.engine.recover()
        if sessions or self.engine.retained:
            log.info("%d persistent session(s) holding %d message(s), and %d retained message(s), recovered",
                     sessions, messages, len(self.engine.retained))
        #: The current connection of each client id.
        self._live: dict[str, QueueProtocolHandler] = {}
        #: Seconds a new connection has to send CONNECT.
        self.connect_timeout = connect_timeout

    @property
    def connected(self) -> int:
        """Clients connected now."""
        return len(self._live)

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str,
                                         remote_port: int) -> tuple[BrokerProtocolHandler, Session]:
        try:
            handler, session = await asyncio.wait_for(
                self._read_connect(reader, writer, remote_address, remote_port), self.connect_timeout)
        except TimeoutError:
            await writer.close()
            raise AMQTTError(f"no CONNECT from {remote_address}:{remote_port} "
                             f"within {self.connect_timeout:.0f} s") from None
        if not isinstance(session, QueueSession):
            session.__class__ = QueueSession
            session.queue_inflight = {}  # type: ignore[attr-defined]
            session.queue_revoked = set()  # type: ignore[attr-defined]
            session.queue_qos0 = set()  # type: ignore[attr-defined]
            session.queue_qos2 = {}  # type: ignore[attr-defined]
            session.ordinary = None  # type: ignore[attr-defined]
        handler.__class__ = QueueProtocolHandler
        handler._init_queue_state(self.queues, self._live, self)  # type: ignore[attr-defined]
        previous = self._live.get(session.client_id)
        if previous is not None and previous is not handler:
            # [MQTT-3.1.4-2]: the newer connection of a client id takes over; amqtt leaves the older one open
            # when the new one asks for a clean session.
            log.info("client %s connected again: closing its previous connection", session.client_id)
            previous._close()
        self._live[session.client_id] = handler  # type: ignore[assignment]
        # CONNACK's session present flag [MQTT-3.2.2-2] is the session engine's answer: amqtt drops the persistent
        # sessions of anonymous clients a second after they leave, and the engine keeps them.
        kept = self.engine.sessions.get(session.client_id)
        session.parent = int(not session.clean_session and kept is not None and kept.persistent)
        if session.keep_alive > 0:
            # [MQTT-3.1.2-24]: one and a half times the keep-alive (amqtt adds its own delay, 0 here).
            session.keep_alive = math.ceil(session.keep_alive * 1.5)
        return handler, session

    async def _read_connect(self, reader: Any, writer: Any, remote_address: str,
                            remote_port: int) -> tuple[BrokerProtocolHandler, Session]:
        """amqtt's ``_initialize_client_session`` with authentication first: amqtt reads the CONNECT, then (before
        it checks anything) deletes the stored session of a clean-session CONNECT's client id, or overwrites a live
        session's will and credentials with the new CONNECT's. Here the client is authenticated before either, so
        a CONNECT with a wrong password that names a connected client's id gets its CONNACK refusal and touches
        nothing. The rest is amqtt's, as in 0.12.1."""
        try:
            handler, session = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except AMQTTError as exc:
            raise AMQTTError(f"[MQTT-3.1.0-1] {remote_address}:{remote_port}: can't read the first packet as "
                             f"CONNECT: {exc}") from exc
        except MQTTError as exc:
            await writer.close()
            raise MQTTError(exc) from exc
        except NoDataError as exc:
            self.logger.error(f"No data from (client @={remote_address}:{remote_port}) : {exc}")
            raise AMQTTError(exc) from exc
        if session.clean_session and not session.client_id:
            session.client_id = gen_client_id()
        stream = getattr(writer, "_writer", None)  # amqtt's StreamWriterAdapter wraps an asyncio StreamWriter
        ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
        code, identity = await self._check_client(session, remote_address, certificate_name(ssl_object))
        if code:
            STATS.connects_refused["bad_credentials" if code == BAD_CREDENTIALS else "not_authorized"] += 1
            writer.write(b"\x20\x02\x00" + bytes((code,)))  # CONNACK, refused [MQTT-3.2.2-5]
            await writer.drain()
            await writer.close()
            raise AMQTTError(f"client {session.client_id} from {remote_address} refused")
        if session.clean_session:
            await self._delete_session(session.client_id)
            session.parent = 0
        elif session.client_id in self._sessions:
            existing, _ = self._sessions[session.client_id]
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "keep_alive", "username",
                         "password"):
                setattr(existing, name, getattr(session, name))
            session = existing
            session.parent = 1
        else:
            session.parent = 0
        session.peer = remote_address  # type: ignore[attr-defined]
        session.identity = identity  # type: ignore[attr-defined]
        return handler, session

    async def _check_client(self, session: Session, peer: str, certificate: str | None) -> tuple[int, Identity]:
        """(CONNACK code, identity): the password file (or the client certificate) and the anonymous rule decide,
        not amqtt's plugins, and a will must be on a topic the client may write. A refusal is logged once, with
        the client's address, never its password."""
        password = session.password.encode() if session.password is not None else None
        code, username = await self.security.authenticate(session.username, password, peer, certificate)
        identity = Identity(session.client_id or "", username)
        if code == 0 and session.will_flag and session.will_topic and not self.security.may(
                identity, session.will_topic, WRITE):
            refusals.log((session.client_id, peer, "will-denied"), "client %s from %s refused: its will's topic %r "
                         "is denied by the ACL", session.client_id, peer, session.will_topic)
            code = NOT_AUTHORIZED
        elif code:
            # (a generated client id differs on every attempt: an anonymous client is known by its address)
            refusals.log((session.client_id if session.username else "", peer, session.username, code),
                         "client %s from %s refused: %s", session.client_id, peer,
                         "bad username or password" if code == BAD_CREDENTIALS else
                         "not authorized (anonymous clients are not allowed)")
        return code, identity

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        """Done already, before amqtt touched any session (``_read_connect``): a client that gets here is in."""
        return True

    def _may_read(self, client_id: str, username: str | None, topic: str) -> bool:
        return self.security.may(Identity(client_id, username), topic, READ)

    def rules_changed(self) -> None:
        """SIGHUP reloaded the password and ACL files."""
        self.engine.rules_changed()
        for handler in list(self._live.values()):
            handler.rules_changed()

    async def _broadcast_message(self, session: Session | None, topic: str | None, data: bytes | bytearray | None,
                                 force_qos: int | None = None) -> None:
        """What amqtt still publishes itself (a will, when a connection ends without DISCONNECT) goes through the
        session engine."""
        if topic:
            self.engine.publish(Message(topic, bytes(data or b""), force_qos or 0))

    async def retain_message(self, source_session: Session | None, topic_name: str | None,
                             data: bytes | bytearray | None, qos: int | None = None) -> None:
        if topic_name:
            self.engine.retain(topic_name, bytes(data or b""), qos or 0)

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        topic_filter, qos = subscription
        if not topic_filter.startswith("$queue"):
            ordinary = getattr(session, "ordinary", None)
            if ordinary is None:
                return SUBACK_FAILURE
            return self.engine.subscribe(ordinary, [(topic_filter, qos)])[0]
        return self.subscribe_queue(topic_filter, qos, session)

    def subscribe_queue(self, topic_filter: str, qos: int, session: Session) -> int:
        """A ``$queue/`` subscription: the connection consumes the queue. Returns the QoS granted (at most 1),
        or SUBACK_FAILURE."""
        try:
            name = queue_of_filter(topic_filter)
        except BadQueueName as exc:
            log.warning("client %s: subscription refused: %s", session.client_id, exc)
            return SUBACK_FAILURE
        handler = self._handler_of(session)
        if name is None or handler is None:
            return SUBACK_FAILURE
        refusal = handler._queue_refusal(f"$queue/{name}", READ)
        if refusal is not None:
            log.warning("client %s from %s: subscription to queue %s refused: %s", session.client_id,
                        getattr(session, "peer", "?"), name, refusal)
            return SUBACK_FAILURE
        granted = 1 if qos >= 1 else 0
        if granted == 0:
            session.queue_qos0.add(name)  # type: ignore[attr-defined]
        else:
            session.queue_qos0.discard(name)  # type: ignore[attr-defined]
        self.queues.subscribe(handler, name, at_most_once=granted == 0)
        ordinary = getattr(session, "ordinary", None)
        if ordinary is not None:
            self.engine.set_queue_subscription(ordinary, name, granted)
        return granted

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        if not a_filter.startswith("$queue"):
            ordinary = getattr(session, "ordinary", None)
            if ordinary is not None:
                self.engine.unsubscribe(ordinary, [a_filter])
            return 0
        try:
            name = queue_of_filter(a_filter)
        except BadQueueName:
            return 0
        ordinary = getattr(session, "ordinary", None)
        if name is not None and ordinary is not None:
            self.engine.set_queue_subscription(ordinary, name, None)
        handler = self._handler_of(session)
        if name is None or handler is None or name not in self.queues.subscriptions(handler):
            return 0
        self.queues.unsubscribe(handler, name)
        return 1

    def _handler_of(self, session: Session) -> QueueProtocolHandler | None:
        """The current connection of this session (not an older one of the same client id)."""
        handler = self._live.get(session.client_id)
        return handler if handler is not None and handler.session is session else None

    async def _handle_disconnect(self, client_session: Session, handler: BrokerProtocolHandler,
                                 disconnect_waiter: asyncio.Future[Any]) -> None:
        current = self._sessions.get(client_session.client_id)
        if current is not None and current[1] is not handler:
            # A newer connection of this client took over: the session is its now. amqtt would mark it
            # disconnected here, and its session monitor would then drop it and close the newer connection.
            await self._stop_handler(handler)
            return
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)


def _queue_name(topic: str) -> str:
    """The queue a ``$queue/`` topic names, as the ``queue`` label of a refusal (not checked)."""
    return topic[len("$queue/"):].split("/", 1)[0][:128]
