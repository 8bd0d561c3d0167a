"""A guard in front of amqtt's packet reader: whole frames only, validated, bounded in size.

amqtt 0.12.1 reads a packet field by field from the stream and, after a malformed field, keeps reading mid-packet:
the connection desynchronises and hangs. ``FrameGuardReader`` reads each frame whole (fixed header, remaining
length, body), checks it against MQTT 3.1.1 before amqtt sees a byte of it, and serves amqtt's reads from that
frame only. A read that would run past the frame (a length field larger than the packet) is refused as well. A
refused frame closes the connection: the reason is logged once, with the spec clause, and other clients are
unaffected.
"""

from __future__ import annotations

import asyncio
import logging

from amqtt.adapters import ReaderAdapter

# One exception for every malformed frame, from the codec (fast path) or from these checks. Deliberately not an
# amqtt ``MQTTError``: amqtt's reader discards those and reads on (mid-packet); any other exception ends its reader
# loop, which closes the connection.
from shoalmq._native._errors import MalformedPacket, PacketTooLarge
from shoalmq._native.mqtt_packets import (
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
)

log = logging.getLogger(__name__)

_SERVER_TO_CLIENT = {CONNACK: "CONNACK", SUBACK: "SUBACK", UNSUBACK: "UNSUBACK", PINGRESP: "PINGRESP"}
_FLAGS_0010 = {PUBREL, SUBSCRIBE, UNSUBSCRIBE}
_ID_ONLY = {PUBACK, PUBREC, PUBREL, PUBCOMP}


def _utf8_string(body: bytes, pos: int, what: str, *, wildcards: bool) -> tuple[str, int]:
    if pos + 2 > len(body):
        raise MalformedPacket(f"{what}: length field runs past the packet [MQTT-1.5.3]")
    length = int.from_bytes(body[pos:pos + 2], "big")
    end = pos + 2 + length
    if end > len(body):
        raise MalformedPacket(f"{what}: {length} bytes announced, packet too short [MQTT-1.5.3]")
    raw = body[pos + 2:end]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket(f"{what}: not valid UTF-8 [MQTT-1.5.3-1]") from None
    if "\x00" in text:
        raise MalformedPacket(f"{what}: contains U+0000 [MQTT-1.5.3-2]")
    if not wildcards and ("+" in text or "#" in text):
        raise MalformedPacket(f"{what}: wildcard in a topic name [MQTT-3.3.2-2]")
    if not text:
        raise MalformedPacket(f"{what}: empty [MQTT-4.7.3-1]")
    return text, end


def refusal(exc: MalformedPacket) -> str:
    """How a refused packet is named in the log line that closes its connection."""
    return f"{'an oversize' if isinstance(exc, PacketTooLarge) else 'a malformed'} packet: {exc}"


def check_first_byte(first: int, *, first_frame: bool) -> None:
    """Raise MalformedPacket unless ``first`` (a fixed header's type and flags byte) can start a valid MQTT 3.1.1
    packet from a client: checked as soon as the byte arrives, so that bytes that cannot be MQTT (an HTTP request,
    noise) close the connection at once instead of waiting for a frame that never completes."""
    kind, flags = first >> 4, first & 0x0F
    if first_frame != (kind == CONNECT):
        raise MalformedPacket("the first packet must be CONNECT, and only the first [MQTT-3.1.0-1] [MQTT-3.1.0-2]")
    if kind in (0, 15):
        raise MalformedPacket(f"reserved packet type {kind} [MQTT-2.2.1]")
    if kind in _SERVER_TO_CLIENT:
        raise MalformedPacket(f"{_SERVER_TO_CLIENT[kind]} is sent by servers only")
    if kind == PUBLISH:
        qos = (flags >> 1) & 3
        if qos == 3:
            raise MalformedPacket("PUBLISH with QoS 3 [MQTT-3.3.1-4]")
        if qos == 0 and flags & 0x08:
            raise MalformedPacket("PUBLISH with QoS 0 and DUP set [MQTT-3.3.1-2]")
        return
    expected_flags = 0b0010 if kind in _FLAGS_0010 else 0
    if flags != expected_flags:
        raise MalformedPacket(f"packet type {kind} with flags {flags:#06b}, expected {expected_flags:#06b} "
                              "[MQTT-2.2.2-1] [MQTT-2.2.2-2]")


def check_frame(first: int, body: bytes, *, first_frame: bool) -> None:
    """Raise MalformedPacket unless the frame ``first`` (type and flags byte) + ``body`` is valid MQTT 3.1.1
    from a client. Field contents that are not about framing (a CONNECT's fields, say) are left to amqtt."""
    check_first_byte(first, first_frame=first_frame)
    kind, flags = first >> 4, first & 0x0F
    if kind == PUBLISH:
        _, pos = _utf8_string(body, 0, "PUBLISH topic", wildcards=False)
        if (flags >> 1) & 3 and pos + 2 > len(body):
            raise MalformedPacket("PUBLISH without its packet identifier [MQTT-2.3.1]")
        return
    if kind in _ID_ONLY and len(body) != 2:
        raise MalformedPacket(f"packet type {kind} must be 2 bytes long, is {len(body)}")
    if kind in (PINGREQ, DISCONNECT) and body:
        raise MalformedPacket(f"packet type {kind} must be empty, has {len(body)} bytes")
    if kind in (SUBSCRIBE, UNSUBSCRIBE):
        name = "SUBSCRIBE" if kind == SUBSCRIBE else "UNSUBSCRIBE"
        pos, filters = 2, 0
        if len(body) < 2:
            raise MalformedPacket(f"{name} without its packet identifier")
        while pos < len(body):
            _, pos = _utf8_string(body, pos, f"{name} topic filter", wildcards=True)
            if kind == SUBSCRIBE:
                if pos >= len(body):
                    raise MalformedPacket("SUBSCRIBE topic filter without its QoS byte [MQTT-3.8.3-1]")
                if body[pos] > 2:
                    raise MalformedPacket(f"SUBSCRIBE with requested QoS byte {body[pos]} [MQTT-3-8.3-4]")
                pos += 1
            filters += 1
        if not filters:
            raise MalformedPacket(f"{name} without a topic filter [MQTT-3.8.3-3] [MQTT-3.10.3-2]")


class FrameGuardReader(ReaderAdapter):
    """Feeds amqtt whole, valid frames of at most ``max_packet_size`` bytes (fixed header included)."""

    def __init__(self, reader: asyncio.StreamReader, max_packet_size: int,
                 on_refused: callable | None = None) -> None:
        self._reader = reader
        self.max_packet_size = max_packet_size
        self._frame = b""
        self._pos = 0
        self._frames = 0
        self._on_refused = on_refused

    async def read(self, n: int = -1) -> bytes:
        if self._pos >= len(self._frame):
            if not await self._next_frame():
                return b""
        if n < 0:
            n = len(self._frame) - self._pos
        end = self._pos + n
        if end > len(self._frame):
            self._refuse(MalformedPacket(f"a field runs {end - len(self._frame)} byte(s) past the end of its packet "
                                         "[MQTT-2.2.3]"))
        data = self._frame[self._pos:end]
        self._pos = end
        return data

    async def _next_frame(self) -> bool:
        try:
            first = await self._reader.readexactly(1)
        except asyncio.IncompleteReadError:
            return False
        header = bytearray(first)
        length, multiplier = 0, 1
        for _ in range(4):
            try:
                byte = (await self._reader.readexactly(1))[0]
            except asyncio.IncompleteReadError:
                return False
            header.append(byte)
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            if not byte & 0x80:
                break
        else:
            self._refuse(MalformedPacket("remaining length longer than 4 bytes [MQTT-2.2.3]"))
        if len(header) + length > self.max_packet_size:
            self._refuse(PacketTooLarge(f"packet of {len(header) + length} bytes exceeds max_packet_size "
                                        f"{self.max_packet_size}"))
        try:
            body = await self._reader.readexactly(length)
        except asyncio.IncompleteReadError:
            return False
        try:
            check_frame(first[0], body, first_frame=self._frames == 0)
        except MalformedPacket as exc:
            self._refuse(exc)
        self._frames += 1
        self._frame = bytes(header) + body
        self._pos = 0
        return True

    def _refuse(self, exc: MalformedPacket) -> None:
        if self._on_refused is not None:
            self._on_refused(exc)
        raise exc

    def feed_eof(self) -> None:
        self._reader.feed_eof()
