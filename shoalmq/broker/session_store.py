"""Persistent sessions and retained messages on disk: written through the node's group commit, read back at start.

``SessionEngine`` calls this for what must survive a restart or a ``kill -9``: a persistent session (clean
session off) with its subscriptions, its queue subscriptions and the inbound QoS 2 packet ids awaiting PUBREL; each
QoS 1 or 2 message it holds, queued or in flight; and the retained messages. Each change is one ``Store.stage``
(the last write of a key before a commit wins), so the writes of a loop turn ride with the queues' next commit,
and ``take_flush`` gives the front end that commit's flush to wait for before it acknowledges a publish.

Layout (three databases of the node's LMDB environment, ``shoalmq.queue.storage.keys``):

``sessions``          key: client id (UTF-8)
                      value: JSON ``{"subscriptions": {filter: qos}, "queues": {queue: qos}, "inbound": [packet
                      ids], "left_at": unix time or null, "username": name or null}``
``session_messages``  key: len u16 | client id | seq u64 (a session's messages in the order they reached it)
                      value: qos u8 | flags u8 (1: sent as retained, 2: released, PUBREL sent) | packet id u16
                      (0: queued, not yet sent) | topic length u16 | topic | payload (none once released)
``retained``          key: topic (UTF-8)
                      value: qos u8 | payload

A message is stored once per persistent session that holds it (a fan-out to N such sessions writes N copies).
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from dataclasses import dataclass, field

from shoalmq.queue.storage import Store
from shoalmq.queue.storage.keys import RETAINED, SESSION_MESSAGES, SESSIONS

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">BBHH")
_U16 = struct.Struct(">H")
_SEQ = struct.Struct(">Q")

RETAIN_FLAG, RELEASED_FLAG = 1, 2


@dataclass(slots=True)
class StoredMessage:
    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    released: bool
    packet_id: int  # 0: queued, not sent yet


@dataclass(slots=True)
class StoredSession:
    client_id: str
    subscriptions: dict[str, int]
    queues: dict[str, int]
    inbound: list[int]
    left_at: float | None
    username: str | None = None
    messages: list[StoredMessage] = field(default_factory=list)


def message_key(client_id: str, seq: int) -> bytes:
    client = client_id.encode()
    return _U16.pack(len(client)) + client + _SEQ.pack(seq)


def parse_message_key(key: bytes) -> tuple[str, int]:
    length = _U16.unpack_from(key, 0)[0]
    if len(key) != 2 + length + 8:
        raise ValueError(f"a message key of {len(key)} bytes, its client id says {2 + length + 8}")
    return key[2:2 + length].decode(), _SEQ.unpack_from(key, 2 + length)[0]


def pack_message(topic: str, payload: bytes, qos: int, retain: bool, released: bool, packet_id: int) -> bytes:
    name = topic.encode()
    flags = (RETAIN_FLAG if retain else 0) | (RELEASED_FLAG if released else 0)
    return b"".join((_HEADER.pack(qos, flags, packet_id, len(name)), name, b"" if released else payload))


def unpack_message(seq: int, value: bytes) -> StoredMessage:
    qos, flags, packet_id, length = _HEADER.unpack_from(value, 0)
    start = _HEADER.size
    if start + length > len(value) or qos not in (1, 2):
        raise ValueError(f"a session message of {len(value)} bytes with QoS {qos} and a {length}-byte topic")
    return StoredMessage(seq, value[start:start + length].decode(), bytes(value[start + length:]), qos,
                         bool(flags & RETAIN_FLAG), bool(flags & RELEASED_FLAG), packet_id)


class SessionStore:
    """The engine's writes to the store, and what it reads back at start."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._staged = False

    # -- writes -----------------------------------------------------------------------------------------

    def put_session(self, client_id: str, subscriptions: dict[str, int], queues: dict[str, int],
                    inbound: set[int], left_at: float | None, username: str | None = None) -> None:
        value = json.dumps({"subscriptions": subscriptions, "queues": queues, "inbound": sorted(inbound),
                            "left_at": left_at, "username": username}, separators=(",", ":"))
        self.store.stage(SESSIONS, client_id.encode(), value.encode())
        self._staged = True

    def delete_session(self, client_id: str, seqs: list[int]) -> None:
        stage = self.store.stage
        stage(SESSIONS, client_id.encode(), None)
        for seq in seqs:
            stage(SESSION_MESSAGES, message_key(client_id, seq), None)
        self._staged = True

    def put_message(self, client_id: str, seq: int, topic: str, payload: bytes, qos: int, retain: bool,
                    packet_id: int, released: bool = False) -> None:
        self.store.stage(SESSION_MESSAGES, message_key(client_id, seq),
                         pack_message(topic, payload, qos, retain, released, packet_id))
        self._staged = True

    def delete_message(self, client_id: str, seq: int) -> None:
        self.store.stage(SESSION_MESSAGES, message_key(client_id, seq), None)
        self._staged = True

    def put_retained(self, topic: str, payload: bytes, qos: int) -> None:
        self.store.stage(RETAINED, topic.encode(), bytes((qos,)) + payload)
        self._staged = True

    def delete_retained(self, topic: str) -> None:
        self.store.stage(RETAINED, topic.encode(), None)
        self._staged = True

    def take_flush(self) -> asyncio.Future[None] | None:
        """The flush of the commit that carries what was written since the last call (None if nothing was)."""
        if not self._staged:
            return None
        self._staged = False
        return self.store.pending_flush

    # -- reading back -----------------------------------------------------------------------------------

    def load(self) -> tuple[list[StoredSession], list[tuple[str, bytes, int]]]:
        """The stored sessions (each with its messages in order) and retained messages (topic, payload, QoS).
        A record that cannot be read is logged and skipped, never fatal."""
        backend = self.store.backend
        sessions: dict[str, StoredSession] = {}
        for key, value in backend.scan(SESSIONS):
            try:
                record = json.loads(value)
                client_id = key.decode()
                sessions[client_id] = StoredSession(
                    client_id, {str(f): int(q) for f, q in record.get("subscriptions", {}).items()},
                    {str(n): int(q) for n, q in record.get("queues", {}).items()},
                    [int(i) for i in record.get("inbound", [])], record.get("left_at"), record.get("username"))
            except (ValueError, TypeError, AttributeError) as exc:
                log.error("stored session %r unreadable, skipped: %s", key, exc)
        orphans = 0
        for key, value in backend.scan(SESSION_MESSAGES):
            try:
                client_id, seq = parse_message_key(key)
                message = unpack_message(seq, value)
            except (ValueError, UnicodeDecodeError, struct.error) as exc:
                log.error("stored session message %r unreadable, skipped: %s", key, exc)
                continue
            session = sessions.get(client_id)
            if session is None:
                orphans += 1
                self.store.stage(SESSION_MESSAGES, key, None)
                continue
            session.messages.append(message)
        if orphans:
            log.warning("%d stored message(s) of sessions no longer stored: deleted", orphans)
        retained = []
        for key, value in backend.scan(RETAINED):
            if value:
                try:
                    retained.append((key.decode(), bytes(value[1:]), min(value[0], 2)))
                except UnicodeDecodeError:
                    log.error("stored retained message %r unreadable, skipped", key)
        return list(sessions.values()), retained  # (messages in seq order: the keys are, big-endian)
