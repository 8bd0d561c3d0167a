"""Pure-Python twin of ``mqtt_codec.pyx``: MQTT 3.1.1 framing of the hot packets, in bulk.

``mqtt_codec.pyi`` documents the interface. Both implementations raise the same exceptions, with the same
messages, for the same input (tests/test_mqtt_codec.py); the PUBLISH checks are those of
``shoalmq/broker/frames.py`` (same wording, same spec clauses), plus packet identifier 0.
"""

from operator import index

from ._errors import MalformedPacket, PacketTooLarge
from .mqtt_packets import ACK_NAMES as _ACK_NAMES
from .mqtt_packets import PUBACK, PUBCOMP, PUBLISH, PUBREL

__all__ = ["MAX_REMAINING_LENGTH", "MalformedPacket", "decode", "encode_acks", "encode_publishes", "encode_records"]

MAX_REMAINING_LENGTH = 268_435_455
_SSIZE_MAX = (1 << 63) - 1


def _int_arg(value: object, name: str, low: int, high: int) -> int:
    number = index(value)  # TypeError for what is not an integer (float, str, None)
    if not low <= number <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value!r}")
    return number


def _varint(remaining: int) -> bytes:
    out = bytearray()
    while remaining >= 128:
        out.append((remaining & 0x7F) | 0x80)
        remaining >>= 7
    out.append(remaining)
    return bytes(out)


def decode(data: bytes, max_packet_size: int) -> tuple[list[tuple], int]:
    """Parse every complete frame of ``data``; ``(packets, consumed)``. See mqtt_codec.pyi."""
    if type(data) is not bytes:
        raise TypeError(f"data must be bytes, not {type(data).__name__!r}")
    max_size = _int_arg(max_packet_size, "max_packet_size", 0, _SSIZE_MAX)
    n = len(data)
    pos = 0
    packets: list[tuple] = []
    while pos < n:
        # Fixed header: type and flags, then the remaining length in 1 to 4 bytes.
        p, remaining, shift = pos + 1, 0, 0
        while True:
            if p >= n:
                return packets, pos
            byte = data[p]
            p += 1
            remaining |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift == 28:
                raise MalformedPacket("remaining length longer than 4 bytes [MQTT-2.2.3]")
        body = p
        if body - pos + remaining > max_size:
            raise PacketTooLarge(f"packet of {body - pos + remaining} bytes exceeds max_packet_size {max_size}")
        kind, flags = data[pos] >> 4, data[pos] & 0x0F
        if kind in (0, 15):
            raise MalformedPacket(f"reserved packet type {kind} [MQTT-2.2.1]")
        end = body + remaining
        if end > n:
            break
        if kind == PUBLISH:
            qos = (flags >> 1) & 3
            if qos == 3:
                raise MalformedPacket("PUBLISH with QoS 3 [MQTT-3.3.1-4]")
            if qos == 0 and flags & 0x08:
                raise MalformedPacket("PUBLISH with QoS 0 and DUP set [MQTT-3.3.1-2]")
            if remaining < 2:
                raise MalformedPacket("PUBLISH topic: length field runs past the packet [MQTT-1.5.3]")
            topic_len = (data[body] << 8) | data[body + 1]
            cursor = body + 2 + topic_len
            if cursor > end:
                raise MalformedPacket(f"PUBLISH topic: {topic_len} bytes announced, packet too short [MQTT-1.5.3]")
            try:
                topic = data[body + 2:cursor].decode("utf-8")
            except UnicodeDecodeError:
                raise MalformedPacket("PUBLISH topic: not valid UTF-8 [MQTT-1.5.3-1]") from None
            if "\x00" in topic:
                raise MalformedPacket("PUBLISH topic: contains U+0000 [MQTT-1.5.3-2]")
            if "+" in topic or "#" in topic:
                raise MalformedPacket("PUBLISH topic: wildcard in a topic name [MQTT-3.3.2-2]")
            if not topic:
                raise MalformedPacket("PUBLISH topic: empty [MQTT-4.7.3-1]")
            if qos:
                if cursor + 2 > end:
                    raise MalformedPacket("PUBLISH without its packet identifier [MQTT-2.3.1]")
                packet_id = (data[cursor] << 8) | data[cursor + 1]
                if packet_id == 0:
                    raise MalformedPacket("PUBLISH with packet identifier 0 [MQTT-2.3.1-1]")
                cursor += 2
            else:
                packet_id = 0
            packets.append((PUBLISH, flags, topic, packet_id, data[cursor:end]))
        elif PUBACK <= kind <= PUBCOMP:
            expected = 2 if kind == PUBREL else 0
            if flags != expected:
                raise MalformedPacket(f"{_ACK_NAMES[kind]} with flags {flags:#06b}, expected {expected:#06b} "
                                      "[MQTT-2.2.2-1] [MQTT-2.2.2-2]")
            if remaining != 2:
                raise MalformedPacket(f"{_ACK_NAMES[kind]} with remaining length {remaining}, must be 2 "
                                      f"[MQTT-3.{kind}.1]")
            packets.append((kind, flags, (data[body] << 8) | data[body + 1]))
        else:
            packets.append((kind, flags, data[body:end]))
        pos = end
    return packets, pos


def encode_acks(kind: int, packet_ids: list[int]) -> bytes:
    """Concatenated 4-byte ack frames of type ``kind``, one per packet identifier. See mqtt_codec.pyi."""
    kind = _int_arg(kind, "kind", PUBACK, PUBCOMP)
    if not isinstance(packet_ids, list):
        raise TypeError(f"packet_ids must be a list, not {type(packet_ids).__name__!r}")
    first = (kind << 4) | (2 if kind == PUBREL else 0)
    out = bytearray()
    for packet_id in tuple(packet_ids):
        packet_id = _int_arg(packet_id, "packet_id", 1, 0xFFFF)
        out += bytes((first, 2, packet_id >> 8, packet_id & 0xFF))
    return bytes(out)


def encode_publishes(items: list[tuple[bytes, bytes, int, bool]]) -> bytes:
    """Concatenated PUBLISH frames, QoS 0 or 1, one per ``(topic, payload, packet_id, dup)``. See mqtt_codec.pyi."""
    if not isinstance(items, list):
        raise TypeError(f"items must be a list, not {type(items).__name__!r}")
    parts: list[bytes] = []
    for item in tuple(items):
        if not isinstance(item, tuple) or len(item) != 4:
            raise TypeError(f"items must be (topic, payload, packet_id, dup) tuples, not {item!r:.80}")
        topic, payload, packet_id, dup = item
        if type(topic) is not bytes:
            raise TypeError(f"topic must be bytes, not {type(topic).__name__!r}")
        if type(payload) is not bytes:
            raise TypeError(f"payload must be bytes, not {type(payload).__name__!r}")
        packet_id = _int_arg(packet_id, "packet_id", 0, 0xFFFF)
        dup = bool(dup)
        if dup and packet_id == 0:
            raise ValueError("a QoS 0 PUBLISH (packet_id 0) cannot have DUP set [MQTT-3.3.1-2]")
        if len(topic) > 0xFFFF:
            raise ValueError(f"topic of {len(topic)} bytes, longer than 65535 [MQTT-1.5.3]")
        remaining = 2 + len(topic) + (2 if packet_id else 0) + len(payload)
        if remaining > MAX_REMAINING_LENGTH:
            raise ValueError(f"PUBLISH of remaining length {remaining}, more than {MAX_REMAINING_LENGTH} "
                             "[MQTT-2.2.3]")
        first = 0x3A if dup else (0x32 if packet_id else 0x30)
        parts.append(bytes((first,)) + _varint(remaining) + len(topic).to_bytes(2, "big"))
        parts.append(topic)
        if packet_id:
            parts.append(packet_id.to_bytes(2, "big"))
        parts.append(payload)
    return b"".join(parts)


def encode_records(prefix: bytes, records: list[bytes], packet_ids: list[int], dups: bytes | None = None) -> bytes:
    """Concatenated PUBLISH frames of stored queue records (``key length u16 | key | payload``), each on ``prefix``
    or ``prefix/key``, with the packet identifiers of ``packet_ids``. See mqtt_codec.pyi."""
    if type(prefix) is not bytes:
        raise TypeError(f"prefix must be bytes, not {type(prefix).__name__!r}")
    if not isinstance(records, list):
        raise TypeError(f"records must be a list, not {type(records).__name__!r}")
    if not isinstance(packet_ids, list):
        raise TypeError(f"packet_ids must be a list, not {type(packet_ids).__name__!r}")
    if dups is not None and type(dups) is not bytes:
        raise TypeError(f"dups must be bytes or None, not {type(dups).__name__!r}")
    records, packet_ids = tuple(records), tuple(packet_ids)
    if len(packet_ids) != len(records):
        raise ValueError(f"{len(records)} records but {len(packet_ids)} packet_ids")
    if dups is not None and len(dups) != len(records):
        raise ValueError(f"{len(records)} records but {len(dups)} dups")
    items = []
    for i, record in enumerate(records):
        if type(record) is not bytes:
            raise TypeError(f"record must be bytes, not {type(record).__name__!r}")
        packet_id = _int_arg(packet_ids[i], "packet_id", 0, 0xFFFF)
        dup = dups is not None and dups[i] != 0
        if dup and packet_id == 0:
            raise ValueError("a QoS 0 PUBLISH (packet_id 0) cannot have DUP set [MQTT-3.3.1-2]")
        if len(record) < 2:
            raise ValueError("record shorter than its key length")
        key_len = int.from_bytes(record[:2], "big")
        if 2 + key_len > len(record):
            raise ValueError("record key runs past its end")
        topic = prefix + b"/" + record[2:2 + key_len] if key_len else prefix
        if len(topic) > 0xFFFF:
            raise ValueError(f"topic of {len(topic)} bytes, longer than 65535 [MQTT-1.5.3]")
        remaining = 2 + len(topic) + (2 if packet_id else 0) + len(record) - 2 - key_len
        if remaining > MAX_REMAINING_LENGTH:
            raise ValueError(f"PUBLISH of remaining length {remaining}, more than {MAX_REMAINING_LENGTH} "
                             "[MQTT-2.2.3]")
        items.append((topic, record[2 + key_len:], packet_id, dup))
    return encode_publishes(items)
