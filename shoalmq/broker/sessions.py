"""MQTT 3.1.1 sessions and the fan-out of ordinary topics, apart from any socket or codec.

The engine of ordinary topics (``docs/design.md``, "Ordinary topics and sessions"): the fast path decodes the
packets and ``QueueProtocolHandler`` calls this. It is protocol-neutral: a connection is anything with ``write``,
``buffered`` and ``close``; an MQTT 5 codec maps its packets onto the same calls (its session expiry and receive
maximum become a session's ``persistent`` lifetime and ``limits.max_inflight``). With a ``SessionStore``
(``shoalmq.broker.session_store``), what a persistent session holds and the retained messages are written through
the node's group commit as they change, and ``recover`` reads them back at start; ``take_flush`` is the commit a
publish waits for before it is acknowledged. Without one, everything is in memory.

- **Subscriptions** are kept per session (filter -> QoS) and in one ``TopicTree`` for all; a publish is matched once
  per topic of a batch and goes to every matching session at min(publish QoS, subscription QoS) [MQTT-3.3.5-1].
- **Outbound QoS 1 and 2**: at most ``max_inflight`` messages in flight per session, the rest queued in order (at
  most ``max_queued`` messages and ``max_queued_bytes`` bytes; beyond that a message is dropped, counted, and logged
  once per session). A persistent session keeps its queue and its messages in flight while offline; on resume, the
  ones in flight go again first, in order, with DUP (or their PUBREL) [MQTT-4.4.0-1], then the queue.
- **QoS 0** goes only to a connected session, never queued: to one whose connection is congested (``buffered``
  over ``max_buffered``) it is dropped and counted.
- **Inbound QoS 2** is delivered on PUBLISH and its packet id held until PUBREL, so a resent PUBLISH is not
  delivered twice [MQTT-4.3.3-2].
- **Retained messages**: a publish with RETAIN replaces the topic's retained message, an empty one clears it
  [MQTT-3.3.1-5] [MQTT-3.3.1-10] [MQTT-3.3.1-11]; a SUBSCRIBE gets the retained messages its filter matches, with
  RETAIN set [MQTT-3.3.1-6] [MQTT-3.3.1-8]; live deliveries have RETAIN clear [MQTT-3.3.1-9].
- **Wills** are published through ``end(session, connection, will)`` when a connection ends without DISCONNECT.
- **Writes**: what a session is sent in one event-loop turn goes in one ``write`` (``flush``, scheduled once per
  turn).
- **Publishers are held back** (``holding_back``) while a subscriber of their topic that is still acknowledging
  has more than half its queue limit waiting, or one still reading (its write buffer drains) has more than half
  of ``max_buffered`` waiting: the front end stops reading the publisher until it drains, so a fast publisher
  does not overflow a subscriber that is merely slower; one that stopped (for ``stalled_after``) holds nobody,
  and its limits apply.
- **Expiry**: a persistent session whose client stays away ``limits.expiry`` seconds is forgotten, with what it
  held (mosquitto's ``persistent_client_expiration``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from shoalmq import stats
from shoalmq._native import TopicTree, mqtt_codec
from shoalmq._native.mqtt_packets import PUBLISH, PUBREL, SUBACK_FAILURE, fixed_header
from shoalmq._native.topic_tree import check_filter
from shoalmq.broker.session_store import SessionStore

log = logging.getLogger(__name__)
STATS = stats.FRONT_END



@dataclass(slots=True)
class Message:
    """An application message as published (MQTT 5's properties will join it)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    #: Encoded once for all its subscribers (``publish_frame``): the QoS 0 frame, and the part of a QoS 1/2
    #: frame after its first byte up to the packet id (the same for both: the packet id is in the length).
    frame0: bytes | None = field(default=None, repr=False, compare=False)
    head: bytes | None = field(default=None, repr=False, compare=False)


@dataclass(slots=True)
class Limits:
    """Per-session bounds, as mosquitto names them."""

    #: QoS 1 and 2 messages in flight to one session (mosquitto's ``max_inflight_messages``).
    max_inflight: int = 20
    #: Messages queued for one session beyond those in flight, or while it is offline (``max_queued_messages``;
    #: 0: no limit, as in mosquitto).
    max_queued: int = 1000
    #: Bytes of payload queued for one session (``max_queued_bytes``; 0: no limit).
    max_queued_bytes: int = 0
    #: Bytes waiting in a connection's transport past which it gets no more QoS 0 messages.
    max_buffered: int = 4 << 20
    #: Seconds a persistent session is kept while its client is away (mosquitto's
    #: ``persistent_client_expiration``; None: until the broker stops).
    expiry: float | None = None
    #: Seconds since its last acknowledgement after which a subscriber no longer holds back publishers.
    stalled_after: float = 1.0

    @property
    def high_water(self) -> int:
        """Queued messages past which a subscriber that is still acknowledging holds its publishers back: half of
        ``max_queued`` (10,000 without a limit)."""
        return max(self.max_queued // 2, 1) if self.max_queued else 10_000


class Connection(Protocol):
    def write(self, data: bytes) -> None: ...
    def buffered(self) -> int: ...
    def close(self) -> None: ...


SENT, RELEASED = 0, 1  # an outbound QoS 2 message: PUBLISH sent; PUBREC received and PUBREL sent


class Outbound:
    __slots__ = ("packet_id", "message", "qos", "retain", "state", "seq")

    def __init__(self, packet_id: int, message: Message, qos: int, retain: bool, seq: int = 0) -> None:
        self.packet_id = packet_id
        self.message = message
        self.qos = qos
        self.retain = retain  # sent as a retained message (on SUBSCRIBE), so resent as one
        self.state = SENT
        self.seq = seq  # its key in the session store (0: not stored)


class Session:
    """What MQTT 3.1.1 keeps for a client id: subscriptions, outbound messages in flight and queued, inbound QoS 2
    packet ids awaiting PUBREL. ``persistent`` (clean session off): kept after the connection ends."""

    def __init__(self, client_id: str, persistent: bool, busy: Callable[[int], bool] | None = None) -> None:
        self.client_id = client_id
        self.persistent = persistent
        self.subscriptions: dict[str, int] = {}
        #: packet id -> message in flight, in the order they were sent.
        self.inflight: dict[int, Outbound] = {}
        #: (message, QoS, RETAIN flag to send, seq in the session store or 0) waiting for room in flight or for
        #: the client to come back.
        self.queued: collections.deque[tuple[Message, int, bool, int]] = collections.deque()
        self.queued_bytes = 0
        #: Messages dropped for this session (queue full, QoS 0 to a congested or absent connection).
        self.dropped = 0
        self.inbound_qos2: set[int] = set()
        #: Queue subscriptions of a persistent session (queue -> granted QoS), kept for the broker's queues.
        self.queues: dict[str, int] = {}
        #: When its client left (unix time), for an expiry that outlives a restart.
        self.left_at: float | None = None
        #: The username its client authenticated as (what the ACL knows it by), and the ACL's answers so far:
        #: topic -> may receive it.
        self.username: str | None = None
        self.readable: dict[str, bool] = {}
        self.connection: Connection | None = None
        #: Packet ids used by others on the same connection (a connection's queue deliveries): skipped.
        self.busy = busy
        self._next_id = 0
        self._out: list[bytes] = []
        self._warned = False
        self._expiry: asyncio.TimerHandle | None = None
        #: When the client last acknowledged a message (or connected): a subscriber that stopped acknowledging
        #: does not hold publishers back.
        self.last_ack = 0.0
        #: Bytes written to the connection, how many of them had left its write buffer when last looked at, and
        #: when that last grew: a subscriber whose buffer drains is still reading (what QoS 0, which has no acks,
        #: tells of progress), even while the broker fills the buffer faster.
        self.written = 0
        self.last_drained_bytes = 0
        self.last_drained = 0.0

    def next_packet_id(self) -> int:
        """The next identifier not in flight (nor ``busy``); RuntimeError if all 65,535 are."""
        inflight, busy = self.inflight, self.busy
        packet_id = self._next_id
        for _ in range(65535):
            packet_id = packet_id % 65535 + 1
            if packet_id not in inflight and (busy is None or not busy(packet_id)):
                self._next_id = packet_id
                return packet_id
        raise RuntimeError(f"client {self.client_id}: all 65,535 packet identifiers are in flight")


def publish_frame(message: Message, qos: int, packet_id: int, *, dup: bool = False, retain: bool = False) -> bytes:
    """One PUBLISH frame [MQTT-3.3]. A live delivery (neither DUP nor RETAIN) reuses what was encoded for the
    message's other subscribers: all of a QoS 0 frame, all but the first byte and packet id of a QoS 1/2 one."""
    if not (dup or retain):
        if qos == 0:
            frame0 = message.frame0
            if frame0 is None:
                frame0 = message.frame0 = _encode_publish(message, 0, 0, False, False)
            return frame0
        head = message.head
        if head is None:
            head = message.head = _encode_publish(message, 1, 0, False, False)[1:-2 - len(message.payload)]
        return b"".join((_FIRST_BYTE[qos], head, packet_id.to_bytes(2, "big"), message.payload))
    return _encode_publish(message, qos, packet_id, dup, retain)


_FIRST_BYTE = {qos: bytes(((PUBLISH << 4) | (qos << 1),)) for qos in (1, 2)}


def _encode_publish(message: Message, qos: int, packet_id: int, dup: bool, retain: bool) -> bytes:
    topic = message.topic.encode()
    header = fixed_header((PUBLISH << 4) | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0),
                          2 + len(topic) + (2 if qos else 0) + len(message.payload))
    ident = packet_id.to_bytes(2, "big") if qos else b""
    return b"".join((header, len(topic).to_bytes(2, "big"), topic, ident, message.payload))


class _Level:
    __slots__ = ("children", "message")

    def __init__(self) -> None:
        self.children: dict[str, _Level] = {}
        self.message: Message | None = None


class RetainedMessages(Mapping[str, Message]):
    """The retained messages, by topic, and in a tree of topic levels so that a SUBSCRIBE finds those its filter
    matches by walking the filter (``matching``), not by testing every retained topic."""

    def __init__(self) -> None:
        self._by_topic: dict[str, Message] = {}
        self._root = _Level()

    def __getitem__(self, topic: str) -> Message:
        return self._by_topic[topic]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_topic)

    def __len__(self) -> int:
        return len(self._by_topic)

    def set(self, message: Message) -> None:
        node = self._root
        for name in message.topic.split("/"):
            child = node.children.get(name)
            if child is None:
                child = node.children[name] = _Level()
            node = child
        node.message = message
        self._by_topic[message.topic] = message

    def clear_topic(self, topic: str) -> bool:
        """Forget the retained message of ``topic``; False if it had none. Emptied levels are pruned."""
        if self._by_topic.pop(topic, None) is None:
            return False
        path = [self._root]
        names = topic.split("/")
        for name in names:
            path.append(path[-1].children[name])
        path[-1].message = None
        for depth in range(len(names), 0, -1):
            node = path[depth]
            if node.message is not None or node.children:
                break
            del path[depth - 1].children[names[depth - 1]]
        return True

    def matching(self, levels: list[str]) -> list[Message]:
        """The retained messages whose topics the filter (its levels, from ``check_filter``) matches [MQTT-4.7];
        a wildcard first level matches no ``$`` topic [MQTT-4.7.2-1]."""
        found: list[Message] = []
        last = len(levels)

        def subtree(node: _Level, top: bool) -> None:
            if node.message is not None:
                found.append(node.message)
            for name, child in node.children.items():
                if not (top and name.startswith("$")):
                    subtree(child, False)

        def walk(node: _Level, depth: int) -> None:
            if depth == last:
                if node.message is not None:
                    found.append(node.message)
                return
            level = levels[depth]
            if level == "#":
                subtree(node, depth == 0)  # (includes the parent level itself: "a/#" matches "a")
            elif level == "+":
                for name, child in node.children.items():
                    if not (depth == 0 and name.startswith("$")):
                        walk(child, depth + 1)
            else:
                child = node.children.get(level)
                if child is not None:
                    walk(child, depth + 1)

        walk(self._root, 0)
        return found


class SessionEngine:
    """Every session of a node, its subscriptions, the retained messages, and the fan-out between them."""

    def __init__(self, limits: Limits | None = None, durable: SessionStore | None = None,
                 may_read: Callable[[str, str | None, str], bool] | None = None) -> None:
        self.limits = limits or Limits()
        self.durable = durable
        #: The ACL: whether (client id, username) may receive a topic (None: everyone may receive everything).
        self.may_read = may_read
        self.tree = TopicTree()
        self.sessions: dict[str, Session] = {}
        self.retained = RetainedMessages()
        self._dirty: list[Session] = []
        self._flush_scheduled = False
        self._seq = 0  # the last seq given to a stored message
        #: Messages of ordinary topics dropped for any session (its queue full, its connection congested).
        self.dropped = 0

    # -- durability --------------------------------------------------------------------------------

    def recover(self) -> tuple[int, int]:
        """Read back the persistent sessions and retained messages of the session store (in the running loop:
        expiry timers are armed); returns (sessions, messages) recovered."""
        durable = self.durable
        if durable is None:
            return 0, 0
        stored, retained = durable.load()
        for topic, payload, qos in retained:
            self.retained.set(Message(topic, payload, qos, True))
        count = 0
        now = time.time()
        for record in stored:
            session = Session(record.client_id, True)
            session.username = record.username
            session.queues = record.queues
            session.inbound_qos2 = set(record.inbound)
            for topic_filter, qos in record.subscriptions.items():
                try:
                    check_filter(topic_filter)
                except ValueError:
                    continue
                self.tree.subscribe(topic_filter, session, qos)
                session.subscriptions[topic_filter] = qos
            for m in record.messages:
                self._seq = max(self._seq, m.seq)
                message = Message(m.topic, m.payload, m.qos)
                if m.packet_id and m.packet_id not in session.inflight:
                    out = Outbound(m.packet_id, message, m.qos, m.retain, m.seq)
                    out.state = RELEASED if m.released else SENT
                    session.inflight[m.packet_id] = out
                    session._next_id = m.packet_id
                else:
                    session.queued.append((message, m.qos, m.retain, m.seq))
                    session.queued_bytes += len(m.payload)
                count += 1
            self.sessions[record.client_id] = session
            # Away since it left, or (connected when the broker stopped) since now.
            session.left_at = record.left_at if record.left_at is not None else now
            if record.left_at is None:
                self._store_session(session)
            if self.limits.expiry is not None:
                remaining = self.limits.expiry - (now - session.left_at)
                if remaining <= 0:
                    self._expire(session)
                    continue
                session._expiry = asyncio.get_running_loop().call_later(remaining, self._expire, session)
        return len(self.sessions), count

    def take_flush(self) -> asyncio.Future[None] | None:
        """The commit that makes durable what the engine wrote since the last call (None: nothing to wait for)."""
        return self.durable.take_flush() if self.durable is not None else None

    def _store_session(self, session: Session) -> None:
        if self.durable is not None and session.persistent:
            self.durable.put_session(session.client_id, session.subscriptions, session.queues,
                                     session.inbound_qos2, session.left_at, session.username)

    def set_queue_subscription(self, session: Session, queue: str, qos: int | None) -> None:
        """A persistent session's subscription to a queue (None: unsubscribed), kept with the session."""
        if not session.persistent:
            return
        if qos is None:
            if session.queues.pop(queue, None) is None:
                return
        else:
            if session.queues.get(queue) == qos:
                return
            session.queues[queue] = qos
        self._store_session(session)

    # -- connections -------------------------------------------------------------------------------

    def connect(self, client_id: str, clean: bool, connection: Connection,
                busy: Callable[[int], bool] | None = None, username: str | None = None) -> tuple[Session, bool]:
        """A connection of ``client_id`` was accepted: its session, and whether it was resumed (CONNACK's session
        present flag [MQTT-3.2.2-2]). A resumed session sends what it has in flight again, then its queue."""
        existing = self.sessions.get(client_id)
        if existing is not None and existing.connection is not None and existing.connection is not connection:
            older, existing.connection = existing.connection, None
            existing._out.clear()
            older.close()  # a newer connection of the client takes over [MQTT-3.1.4-2]
        if existing is not None and (clean or not existing.persistent):
            self._forget(existing)
            existing = None
        if existing is None:
            session = Session(client_id, not clean, busy)
            self.sessions[client_id] = session
            present = False
        else:
            session, present = existing, True
            session.busy = busy
            if session._expiry is not None:
                session._expiry.cancel()
                session._expiry = None
        session.connection = connection
        if session.username != username:
            session.username = username
            session.readable.clear()
        session.written = session.last_drained_bytes = 0
        session.last_ack = session.last_drained = time.monotonic()
        if session.persistent:
            session.left_at = None
            self._store_session(session)
        if present:
            self._resume(session)
        return session, present

    def end(self, session: Session, connection: Connection, will: Message | None = None) -> None:
        """``connection`` of the session ended (``will``: it ended without DISCONNECT and the client left one,
        published even when a newer connection took the session over [MQTT-3.1.2-8]). A persistent session
        stays, queuing what arrives for it; a clean one is forgotten."""
        if session.connection is connection:
            session.connection = None
            session._out.clear()
            if not session.persistent:
                self._forget(session)
            else:
                session.left_at = time.time()
                self._store_session(session)
                if self.limits.expiry is not None:
                    session._expiry = asyncio.get_running_loop().call_later(self.limits.expiry, self._expire,
                                                                            session)
        if will is not None:
            self.publish(will)

    def _expire(self, session: Session) -> None:
        session._expiry = None
        if session.connection is None and self.sessions.get(session.client_id) is session:
            log.info("session of client %s expired after %.0f s away: %d queued and %d in-flight message(s) "
                     "dropped", session.client_id, self.limits.expiry, len(session.queued), len(session.inflight))
            self._forget(session)

    def _forget(self, session: Session) -> None:
        for topic_filter in session.subscriptions:
            self.tree.unsubscribe(topic_filter, session)
        session.subscriptions.clear()
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
            if self.durable is not None and session.persistent:
                seqs = [out.seq for out in session.inflight.values() if out.seq]
                seqs += [entry[3] for entry in session.queued if entry[3]]
                self.durable.delete_session(session.client_id, seqs)

    def _resume(self, session: Session) -> None:
        for out in session.inflight.values():
            if out.state == RELEASED:
                self._send(session, mqtt_codec.encode_acks(PUBREL, [out.packet_id]))
            else:
                self._send(session, publish_frame(out.message, out.qos, out.packet_id, dup=True, retain=out.retain))
        self._pump(session)

    # -- subscriptions -----------------------------------------------------------------------------

    def subscribe(self, session: Session, requests: Iterable[tuple[str, int]]) -> list[int]:
        """SUBSCRIBE: the granted QoS of each (filter, QoS), or 0x80 for a filter refused; then the retained
        messages each filter matches [MQTT-3.8.4-3]."""
        granted = []
        for topic_filter, qos in requests:
            try:
                levels = check_filter(topic_filter)
            except ValueError as exc:
                log.info("client %s: subscription to %r refused: %s", session.client_id, topic_filter, exc)
                granted.append(SUBACK_FAILURE)
                continue
            qos = min(qos, 2)
            self.tree.subscribe(topic_filter, session, qos)
            session.subscriptions[topic_filter] = qos
            granted.append(qos)
            for message in self.retained.matching(levels):
                if self.may_read is None or self._may_read(session, message.topic):
                    self._deliver(session, message, min(message.qos, qos), retain=True)
        self._store_session(session)
        return granted

    def unsubscribe(self, session: Session, filters: Iterable[str]) -> None:
        changed = False
        for topic_filter in filters:
            if session.subscriptions.pop(topic_filter, None) is not None:
                self.tree.unsubscribe(topic_filter, session)
                changed = True
        if changed:
            self._store_session(session)

    # -- publishing --------------------------------------------------------------------------------

    def retain(self, topic: str, payload: bytes, qos: int) -> None:
        """Keep (or, for an empty payload, clear) the retained message of ``topic`` without routing it."""
        self._set_retained(Message(topic, payload, qos, True))

    def _set_retained(self, message: Message) -> None:
        topic = message.topic
        # ($SYS topics are the broker's own, published again every interval: never stored.)
        durable = self.durable if not topic.startswith("$SYS/") else None
        if message.payload:
            self.retained.set(message)
            if durable is not None:
                durable.put_retained(topic, message.payload, message.qos)
        elif self.retained.clear_topic(topic) and durable is not None:
            durable.delete_retained(topic)

    def publish(self, message: Message) -> int:
        """Route one message to every matching session; returns how many it went to."""
        if message.retain:
            self._set_retained(message)
        matched = self.tree.match(message.topic)
        if self.may_read is not None:
            topic = message.topic
            matched = {session: qos for session, qos in matched.items() if self._may_read(session, topic)}
        for session, qos in matched.items():
            self._deliver(session, message, qos if qos < message.qos else message.qos, retain=False)
        return len(matched)

    def _may_read(self, session: Session, topic: str) -> bool:
        answers = session.readable
        allowed = answers.get(topic)
        if allowed is None:
            if len(answers) >= 1024:
                answers.clear()
            allowed = answers[topic] = self.may_read(session.client_id, session.username, topic)  # type: ignore
        return allowed

    def rules_changed(self) -> None:
        """The ACL changed: every remembered answer is asked again."""
        for session in self.sessions.values():
            session.readable.clear()

    def holding_back(self, topic: str, publisher: Session | None = None) -> bool:
        """Whether a subscriber of ``topic`` (other than ``publisher``, whose acks are not read while it is held)
        should make its publishers wait: it has a queue past its high-water mark while it still acknowledges, or
        a connection with more than half of ``max_buffered`` waiting while it still reads (its buffer drained),
        within ``stalled_after`` either way. A subscriber that stopped, or is away, holds nobody back: its queue
        limits apply, and QoS 0 past ``max_buffered`` is dropped."""
        limits = self.limits
        high, stalled, buffer_high = limits.high_water, limits.stalled_after, limits.max_buffered // 2
        now = time.monotonic()
        for session in self.tree.match(topic):
            connection = session.connection
            if connection is None or session is publisher:
                continue
            if len(session.queued) >= high and now - session.last_ack < stalled:
                return True
            buffered = connection.buffered()
            drained = session.written - buffered
            if drained > session.last_drained_bytes:
                session.last_drained = now
                session.last_drained_bytes = drained
            if buffered > buffer_high and now - session.last_drained < stalled:
                return True
        return False

    def _deliver(self, session: Session, message: Message, qos: int, retain: bool) -> None:
        connection = session.connection
        if qos == 0:
            if connection is None:
                return  # at most once: not kept for an offline session
            if connection.buffered() > self.limits.max_buffered:
                self._drop(session, "its connection is congested", message)
                return
            self._send(session, publish_frame(message, 0, 0, retain=retain))
            return
        seq = 0
        if session.persistent and self.durable is not None:
            self._seq += 1
            seq = self._seq
        if connection is not None and not session.queued and len(session.inflight) < self.limits.max_inflight:
            self._send_inflight(session, message, qos, retain, seq)
            return
        limits = self.limits
        if (limits.max_queued and len(session.queued) >= limits.max_queued) or (
                limits.max_queued_bytes and session.queued_bytes + len(message.payload) > limits.max_queued_bytes):
            self._drop(session, "its queue is full", message)
            return
        session.queued.append((message, qos, retain, seq))
        session.queued_bytes += len(message.payload)
        if seq:
            self.durable.put_message(session.client_id, seq, message.topic, message.payload, qos,  # type: ignore
                                     retain, 0)

    def _send_inflight(self, session: Session, message: Message, qos: int, retain: bool, seq: int) -> None:
        packet_id = session.next_packet_id()
        session.inflight[packet_id] = Outbound(packet_id, message, qos, retain, seq)
        if seq:
            self.durable.put_message(session.client_id, seq, message.topic, message.payload, qos,  # type: ignore
                                     retain, packet_id)
        self._send(session, publish_frame(message, qos, packet_id, retain=retain))

    def _pump(self, session: Session) -> None:
        """Send queued messages while the session has room in flight."""
        queued, limit = session.queued, self.limits.max_inflight
        while queued and len(session.inflight) < limit and session.connection is not None:
            message, qos, retain, seq = queued.popleft()
            session.queued_bytes -= len(message.payload)
            self._send_inflight(session, message, qos, retain, seq)

    def _drop(self, session: Session, why: str, message: Message) -> None:
        session.dropped += 1
        self.dropped += 1
        if not session._warned:
            session._warned = True
            log.warning("client %s: dropping messages because %s (first: QoS %d on %r); counted, logged once per "
                        "session", session.client_id, why, message.qos, message.topic)

    # -- acknowledgements ----------------------------------------------------------------------------

    def puback(self, session: Session, packet_id: int) -> bool:
        """PUBACK of a QoS 1 message; False if the id is not one (the caller may own it)."""
        out = session.inflight.get(packet_id)
        if out is None or out.qos != 1:
            return False
        del session.inflight[packet_id]
        if out.seq:
            self.durable.delete_message(session.client_id, out.seq)  # type: ignore[union-attr]
        session.last_ack = time.monotonic()
        self._pump(session)
        return True

    def pubrec(self, session: Session, packet_id: int) -> bool:
        """PUBREC of a QoS 2 message: PUBREL goes out, and the message stays in flight until PUBCOMP."""
        out = session.inflight.get(packet_id)
        if out is None or out.qos != 2:
            return False
        out.state = RELEASED
        if out.seq:
            message = out.message
            self.durable.put_message(session.client_id, out.seq, message.topic, b"", 2,  # type: ignore[union-attr]
                                     out.retain, packet_id, released=True)
        self._send(session, mqtt_codec.encode_acks(PUBREL, [packet_id]))
        return True

    def pubcomp(self, session: Session, packet_id: int) -> bool:
        out = session.inflight.get(packet_id)
        if out is None or out.qos != 2 or out.state != RELEASED:
            return False
        del session.inflight[packet_id]
        if out.seq:
            self.durable.delete_message(session.client_id, out.seq)  # type: ignore[union-attr]
        session.last_ack = time.monotonic()
        self._pump(session)
        return True

    def receive_qos2(self, session: Session, packet_id: int) -> bool:
        """An inbound QoS 2 PUBLISH: True if it is new (route it), False for a resend not yet released."""
        if packet_id in session.inbound_qos2:
            return False
        session.inbound_qos2.add(packet_id)
        self._store_session(session)
        return True

    def release(self, session: Session, packet_id: int) -> None:
        """PUBREL of an inbound QoS 2 message (the caller answers PUBCOMP)."""
        if packet_id in session.inbound_qos2:
            session.inbound_qos2.discard(packet_id)
            self._store_session(session)

    # -- writes -----------------------------------------------------------------------------------

    def _send(self, session: Session, frame: bytes) -> None:
        if session.connection is None:
            return
        if not session._out:
            self._dirty.append(session)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self.flush)
        session._out.append(frame)

    def flush(self) -> None:
        """Write what each session was sent this turn, one write per connection."""
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        for session in dirty:
            out, session._out = session._out, []
            if out and session.connection is not None:
                STATS.publishes_sent += len(out)
                data = b"".join(out)
                session.written += len(data)
                session.connection.write(data)
