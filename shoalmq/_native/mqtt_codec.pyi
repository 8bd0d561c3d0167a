"""MQTT 3.1.1 framing of the hot packets (PUBLISH and its acks), in bulk.

Built for a batched front end: every frame of a socket read parsed in one ``decode`` call, the acks and the
deliveries of a turn encoded into one ``bytes`` each. The compiled module (``mqtt_codec.pyx``) and its pure-Python
twin (``mqtt_codec_py.py``) have this interface and raise the same exceptions, with the same messages, for the same
input. Bytes arguments must be exactly ``bytes`` (``TypeError`` otherwise); integer arguments follow ``__index__``
(``TypeError`` for ``float``, ``str``, ``None``; ``ValueError`` out of range).
"""

from ._errors import MalformedPacket as MalformedPacket

MAX_REMAINING_LENGTH: int
"""268,435,455: the largest remaining length four bytes can encode [MQTT-2.2.3]."""

def decode(data: bytes, max_packet_size: int) -> tuple[list[tuple], int]:
    """Parse every complete frame of ``data`` from offset 0: ``(packets, consumed)``.

    ``consumed`` is where the first incomplete frame starts (``len(data)`` if there is none): the caller keeps
    ``data[consumed:]`` and puts it in front of the next read. Each packet is a tuple:

    - PUBLISH: ``(3, flags, topic: str, packet_id: int, payload: bytes)``; ``packet_id`` is 0 for QoS 0;
      ``qos = (flags >> 1) & 3``, ``dup = flags & 8``, ``retain = flags & 1``;
    - PUBACK, PUBREC, PUBREL, PUBCOMP: ``(type, flags, packet_id)``;
    - any other type: ``(type, flags, body: bytes)``, for the slow path (its contents are not checked here).

    ``MalformedPacket`` (a ``ValueError``; the message names the rule and its MQTT 3.1.1 clause) for the first bad
    frame; the frames before it are not returned (the caller closes the connection). The checks on the fixed header
    apply as soon as the fixed header is in ``data``, before the body has arrived, in this order: a remaining length
    longer than 4 bytes [MQTT-2.2.3]; a frame (fixed header included) larger than ``max_packet_size``; packet type 0
    or 15 [MQTT-2.2.1]. The others apply once the whole frame is in ``data``:

    - PUBLISH: QoS 3 [MQTT-3.3.1-4]; QoS 0 with DUP [MQTT-3.3.1-2]; a topic length running past the frame
      [MQTT-1.5.3]; a topic that is not valid UTF-8 [MQTT-1.5.3-1], contains U+0000 [MQTT-1.5.3-2], a wildcard
      ``+`` or ``#`` [MQTT-3.3.2-2], or is empty [MQTT-4.7.3-1]; QoS 1 or 2 without a packet identifier
      [MQTT-2.3.1], or with packet identifier 0 [MQTT-2.3.1-1];
    - PUBACK, PUBREC, PUBCOMP with flags other than 0, PUBREL with flags other than 2 [MQTT-2.2.2-1]
      [MQTT-2.2.2-2]; any of the four with a remaining length other than 2 [MQTT-3.4.1] to [MQTT-3.7.1].

    ``TypeError`` if ``data`` is not ``bytes``; ``ValueError`` if ``max_packet_size`` is negative.
    """

def encode_acks(kind: int, packet_ids: list[int]) -> bytes:
    """Concatenated 4-byte ack frames of type ``kind``, one per identifier, in order.

    ``kind``: 4 PUBACK, 5 PUBREC, 6 PUBREL (sent with flags 0b0010), 7 PUBCOMP. ``ValueError`` for another kind or
    an identifier outside 1..65535; ``TypeError`` if ``packet_ids`` is not a list.
    """

def encode_publishes(items: list[tuple[bytes, bytes, int, bool]]) -> bytes:
    """Concatenated PUBLISH frames (retain flag clear), one per ``(topic, payload, packet_id, dup)``, in order.

    ``topic`` is the topic name as UTF-8 ``bytes``, used as given (it was checked when it was published);
    ``packet_id`` 0 makes a QoS 0 PUBLISH (``dup`` must then be false), 1..65535 a QoS 1 PUBLISH with that
    identifier and DUP set if ``dup`` is true. Items may be any ``tuple`` of four (a named tuple, say).

    ``TypeError`` if ``items`` is not a list, an item not a 4-tuple, a topic or payload not ``bytes``;
    ``ValueError`` for a ``packet_id`` outside 0..65535, DUP on a QoS 0 item, a topic longer than 65535 bytes, or
    a frame whose remaining length would exceed ``MAX_REMAINING_LENGTH``. Nothing is returned for a call that
    raises.
    """

def encode_records(prefix: bytes, records: list[bytes], packet_ids: list[int], dups: bytes | None = None) -> bytes:
    """Concatenated PUBLISH frames (retain flag clear) of stored queue records, one per record, in order: what
    ``encode_publishes`` makes of ``(topic, payload, packet_id, dup)`` items, without building them.

    A record is ``key length (u16, big-endian) | key | payload`` (``shoalmq.queue.record``); its topic is
    ``prefix`` when the key is empty and ``prefix + b"/" + key`` otherwise, so a queue's deliveries are encoded
    from their stored form with the queue's topic (``$queue/<name>``) as the prefix. ``packet_ids[i]`` is the
    identifier of record ``i`` (0: QoS 0); ``dups``, if given, holds one byte per record, non-zero for DUP.

    ``TypeError`` if ``prefix`` or a record is not ``bytes``, ``records`` or ``packet_ids`` not a list, ``dups``
    neither ``bytes`` nor None. ``ValueError`` if the lengths differ, for a record shorter than 2 bytes or whose
    key runs past its end, and for what ``encode_publishes`` refuses. Nothing is returned for a call that raises.
    """
