"""The batched front end: every packet after CONNECT parsed in bulk from each socket read, beside amqtt.

amqtt reads a packet field by field, with a task per packet: ~100 µs of CPU per packet. ``QueueFastProtocol``
is the connection's asyncio protocol instead. Each read is split into frames by the Cython codec
(``shoalmq._native.mqtt_codec``), many per call, and then:

- a PUBLISH to a ``$queue`` (or ``$SYS``, to be refused) topic goes, with the others of the same read, to
  ``QueueProtocolHandler.queue_publishes``, as runs of one topic and QoS: one call into the queue manager per
  run, one write of acks per commit;
- the PUBACKs of a read go to the handler as one list (``queue_acks``; applied as one batch per loop iteration);
  a PUBREL of a QoS 2 queue publish goes to the handler;
- a PUBLISH to an ordinary topic goes, with the others of the same read, to ``ordinary_publishes`` (the session
  engine, ``shoalmq.broker.sessions``); PUBACKs that are not of queue deliveries, PUBRECs, PUBCOMPs and PUBRELs
  go to the engine through the handler; SUBSCRIBE and UNSUBSCRIBE are checked by the frame guard's rules and
  answered by the handler; PINGREQ is answered here;
- CONNECT and DISCONNECT are checked by the frame guard's rules and fed, whole, to the amqtt stream reader behind
  the protocol, which handles them.

Frames that arrive before amqtt has answered the CONNECT (it creates the handler) wait, in order, and are processed
once it has. A malformed frame closes the connection, with the reason logged once.

Ordering: publishes are handed on in the order they came (a run of ``$queue/`` publishes ends where an ordinary one
comes), and the handler acknowledges them in that order, whatever each waits for (a commit, a peer) [MQTT-4.6.0-2].

Flow control: a publisher that outruns the disk is slowed by withheld PUBACKs; once ``MAX_UNACKED`` of its publishes
wait for a commit, the protocol stops reading its socket until they are acknowledged. A publisher that outruns the
subscribers of an ordinary topic is held the same way (``hold("subscribers")``, by the handler) while one of them
that is still acknowledging has a queue past its high-water mark.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from shoalmq import stats
from shoalmq._native import mqtt_codec
from shoalmq._native.mqtt_packets import (
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBSCRIBE,
    frame,
)
from shoalmq.broker.frames import MalformedPacket, check_first_byte, check_frame, refusal

log = logging.getLogger(__name__)
STATS = stats.FRONT_END

#: Publishes of one connection waiting for their commit before its socket stops being read.
MAX_UNACKED = 4096


def _reencode(packet: tuple) -> tuple[int, bytes]:
    """The first byte and body of a decoded packet, to hand it to amqtt."""
    kind, flags = packet[0], packet[1]
    if kind == PUBLISH:
        _, _, topic, packet_id, payload = packet
        topic_bytes = topic.encode()
        body = len(topic_bytes).to_bytes(2, "big") + topic_bytes
        if (flags >> 1) & 3:
            body += packet_id.to_bytes(2, "big")
        return (kind << 4) | flags, body + payload
    if kind in (4, 5, 6, 7):
        return (kind << 4) | flags, packet[2].to_bytes(2, "big")
    return (kind << 4) | flags, packet[2]


class QueueFastProtocol(asyncio.StreamReaderProtocol):
    """One client connection: ``$queue/`` frames handled in batches, the rest passed to amqtt."""

    def __init__(self, client_connected_cb: Callable[..., Any], max_packet_size: int) -> None:
        loop = asyncio.get_running_loop()
        super().__init__(asyncio.StreamReader(limit=1 << 20, loop=loop), client_connected_cb, loop)
        self.max_packet_size = max_packet_size
        self.handler: Any = None  # the connection's QueueProtocolHandler, once amqtt has accepted the CONNECT
        self.last_read = loop.time()
        self._loop = loop
        self._buffer = b""
        self._held: list[tuple] = []
        self._frames = 0
        self._decoded = 0  # packets decoded on this connection
        self._unacked = 0
        self._holds: set[str] = set()  # why the socket is not read: "commits", "subscribers"
        self._dead = False
        self._transport_ref: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport_ref = transport  # type: ignore[assignment]
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._dead:
            return
        STATS.bytes_received += len(data)
        buffer = self._buffer + data if self._buffer else data
        try:
            packets, consumed = mqtt_codec.decode(buffer, self.max_packet_size)
            if consumed < len(buffer):  # part of a frame: its first byte must be able to start one
                check_first_byte(buffer[consumed], first_frame=not (self._decoded or packets))
        except MalformedPacket as exc:
            self._malformed(exc)
            return
        if packets:  # keep-alive counts control packets: part of a frame is not one [MQTT-3.1.2-24]
            self.last_read = self._loop.time()
            self._decoded += len(packets)
        self._buffer = buffer[consumed:]
        if self.handler is None or self._held:
            self._held.extend(packets)
            if self.handler is None:
                self._forward_connect()
                return
            packets, self._held = self._held, []
        self._process(packets)

    def _forward_connect(self) -> None:
        """Before amqtt has a handler, only the CONNECT may pass; the rest waits in order."""
        if self._frames == 0 and self._held:
            packet = self._held.pop(0)
            self._pass_to_amqtt(packet)

    def link(self, handler: Any) -> None:
        """amqtt accepted the CONNECT and sent CONNACK: frames can now go to the handler."""
        self.handler = handler
        if self._held:
            packets, self._held = self._held, []
            self._process(packets)

    def _process(self, packets: list[tuple]) -> None:
        handler = self.handler
        # Publishes to ``$queue/`` (and the other ``$`` topics the queue side refuses), as runs of one topic and
        # QoS: [topic, qos, packet ids, payloads]; publishes to ordinary topics, as decoded, in order.
        runs: list[tuple[str, int, list[int], list[bytes]]] = []
        run: tuple[str, int, list[int], list[bytes]] | None = None
        ordinary: list[tuple] = []
        acks: list[int] = []  # PUBACKs, of queue deliveries and of ordinary ones
        for packet in packets:
            kind = packet[0]
            if kind == PUBLISH:
                topic = packet[2]
                if topic.startswith(("$queue", "$SYS")):
                    if ordinary:  # (in the order they came: their acks are one stream [MQTT-4.6.0-2])
                        handler.ordinary_publishes(ordinary)
                        ordinary = []
                    qos = (packet[1] >> 1) & 3
                    if run is None or qos != run[1] or topic != run[0]:
                        run = (topic, qos, [], [])
                        runs.append(run)
                    run[2].append(packet[3])
                    run[3].append(packet[4])
                else:
                    if runs:
                        self._publish(runs)
                        runs, run = [], None
                    ordinary.append(packet)
                continue
            if kind == PUBACK:
                acks.append(packet[2])
                continue
            # Anything else: what came before it is handled first, in order.
            if runs:
                self._publish(runs)
                runs, run = [], None
            if ordinary:
                handler.ordinary_publishes(ordinary)
                ordinary = []
            if acks and not self._acks(acks):
                return
            acks = []
            if kind == PUBREL:
                if not handler.queue_pubrel(packet[2]):
                    handler.ordinary_pubrel(packet[2])
                continue
            if kind in (PUBREC, PUBCOMP):
                handler.ordinary_acks(kind, [packet[2]])
                continue
            if kind in (SUBSCRIBE, UNSUBSCRIBE, PINGREQ):
                if not self._check(packet):
                    return
                if kind == SUBSCRIBE:
                    handler.subscribe_packet(packet[2])
                elif kind == UNSUBSCRIBE:
                    handler.unsubscribe_packet(packet[2])
                else:
                    handler.write(b"\xd0\x00")  # PINGRESP
                continue
            if not self._pass_to_amqtt(packet):  # DISCONNECT (and what the guard refuses)
                return
        if runs:
            self._publish(runs)
        if ordinary:
            handler.ordinary_publishes(ordinary)
        if acks:
            self._acks(acks)

    def _check(self, packet: tuple) -> bool:
        """The frame guard's checks, for a frame the fast path answers itself."""
        first, body = _reencode(packet)
        try:
            check_frame(first, body, first_frame=False)
        except MalformedPacket as exc:
            self._malformed(exc)
            return False
        return True

    def _acks(self, packet_ids: list[int]) -> bool:
        """Consumer PUBACKs to the handler as one batch; those that are not of queue deliveries are of ordinary
        ones."""
        others = self.handler.queue_acks(packet_ids)
        if others:
            self.handler.ordinary_acks(PUBACK, others)
        return True

    def _publish(self, runs: list[tuple[str, int, list[int], list[bytes]]]) -> None:
        acked = sum(len(run[2]) for run in runs if run[1])
        flush = self.handler.queue_publishes(runs)
        if acked and flush is not None:
            self._unacked += acked
            if self._unacked >= MAX_UNACKED:
                self.hold("commits")
            flush.add_done_callback(lambda f, n=acked: self._acknowledged(n))

    def _acknowledged(self, count: int) -> None:
        self._unacked -= count
        if self._unacked < MAX_UNACKED // 2:
            self.release("commits")

    def hold(self, reason: str) -> None:
        """Stop reading the socket for ``reason`` (until ``release`` of every reason held)."""
        if not self._holds and not self._dead:
            self._transport_ref.pause_reading()  # type: ignore[union-attr]
        self._holds.add(reason)

    def release(self, reason: str) -> None:
        if reason in self._holds:
            self._holds.discard(reason)
            if not self._holds and not self._dead:
                self._transport_ref.resume_reading()  # type: ignore[union-attr]

    def _pass_to_amqtt(self, packet: tuple) -> bool:
        first, body = _reencode(packet)
        try:
            check_frame(first, body, first_frame=self._frames == 0)
        except MalformedPacket as exc:
            self._malformed(exc)
            return False
        self._frames += 1
        super().data_received(frame(first, body))
        return True

    def _malformed(self, exc: MalformedPacket) -> None:
        self._dead = True
        peer = self._transport_ref.get_extra_info("peername") if self._transport_ref else None
        where = f"{peer[0]}:{peer[1]}" if peer else "?"
        log.warning("connection from %s sent %s; closing it", where, refusal(exc))
        if self._transport_ref is not None:
            self._transport_ref.abort()
