"""The MQTT codec: the compiled module and its pure-Python twin, the same tests against both, and the two compared
on random input."""

import collections
import random

import pytest

import shoalmq._native as native
from shoalmq._native import MalformedPacket, mqtt_codec_py

IMPLEMENTATIONS = [pytest.param(native.mqtt_codec, id="native"), pytest.param(mqtt_codec_py, id="pure")]
MAX = 1 << 20  # the broker's default max_packet_size
PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 3, 4, 5, 6, 7


def frame(first: int, body: bytes) -> bytes:
    """A frame with a one-byte remaining length, written out by hand (the codec is not used to build it)."""
    assert len(body) < 128
    return bytes([first, len(body)]) + body


# Hand-written frames and what decode makes of them.
KNOWN = [
    (b"\x30\x07\x00\x03a/bhi", (PUBLISH, 0, "a/b", 0, b"hi")),  # QoS 0
    (b"\x31\x05\x00\x03a/b", (PUBLISH, 1, "a/b", 0, b"")),  # QoS 0, retain, empty payload
    (b"\x32\x14\x00\x0d$queue/orders\x00\x07abc", (PUBLISH, 2, "$queue/orders", 7, b"abc")),  # QoS 1
    (b"\x3a\x07\x00\x03a/b\x12\x34", (PUBLISH, 10, "a/b", 0x1234, b"")),  # QoS 1, DUP
    (b"\x35\x0b\x00\x05\xc3\xa9/\xc3\xbc\xff\xff\x00\x01", (PUBLISH, 5, "é/ü", 65535, b"\x00\x01")),  # QoS 2, retain
    (b"\x40\x02\x00\x01", (PUBACK, 0, 1)),
    (b"\x50\x02\x01\x02", (PUBREC, 0, 0x0102)),
    (b"\x62\x02\xff\xff", (PUBREL, 2, 65535)),
    (b"\x70\x02\x00\x09", (PUBCOMP, 0, 9)),
    (b"\xc0\x00", (12, 0, b"")),  # PINGREQ
    (b"\xe0\x00", (14, 0, b"")),  # DISCONNECT
    (b"\x82\x08\x00\x01\x00\x03a/#\x01", (8, 2, b"\x00\x01\x00\x03a/#\x01")),  # SUBSCRIBE
    (b"\xa2\x07\x00\x01\x00\x03a/b", (10, 2, b"\x00\x01\x00\x03a/b")),  # UNSUBSCRIBE
    (b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00", (1, 0, b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x00")),  # CONNECT
    (b"\x20\x02\x00\x00", (2, 0, b"\x00\x00")),  # CONNACK: not for a server, but the slow path's to refuse
]

VALID_PREFIX = b"\x32\x08\x00\x03a/b\x00\x01x"  # one good QoS 1 PUBLISH before the bad frame

MALFORMED = [
    pytest.param(b"\x30\xff\xff\xff\xff\x01", r"remaining length longer than 4 bytes \[MQTT-2\.2\.3\]",
                 id="rl-5-bytes"),
    pytest.param(b"\x30\x80\x80\x80\x80", r"longer than 4 bytes \[MQTT-2\.2\.3\]", id="rl-5th-byte-not-arrived"),
    pytest.param(b"\x00\x00", r"reserved packet type 0 \[MQTT-2\.2\.1\]", id="type-0"),
    pytest.param(b"\xf0\x00", r"reserved packet type 15 \[MQTT-2\.2\.1\]", id="type-15"),
    pytest.param(b"\x0f\x05", r"reserved packet type 0 ", id="type-0-body-not-arrived"),
    pytest.param(frame(0x36, b"\x00\x03a/b\x00\x01"), r"QoS 3 \[MQTT-3\.3\.1-4\]", id="qos-3"),
    pytest.param(frame(0x3E, b"\x00\x03a/b\x00\x01"), r"QoS 3 \[MQTT-3\.3\.1-4\]", id="qos-3-dup"),
    pytest.param(frame(0x38, b"\x00\x03a/b"), r"QoS 0 and DUP set \[MQTT-3\.3\.1-2\]", id="qos-0-dup"),
    pytest.param(frame(0x30, b""), r"topic: length field runs past the packet \[MQTT-1\.5\.3\]", id="no-topic"),
    pytest.param(frame(0x30, b"\x00"), r"length field runs past the packet \[MQTT-1\.5\.3\]", id="topic-len-1-byte"),
    pytest.param(frame(0x30, b"\x00\x05a/b"), r"5 bytes announced, packet too short \[MQTT-1\.5\.3\]",
                 id="topic-past-frame"),
    pytest.param(frame(0x32, b"\xff\xffa/b\x00\x01"), r"65535 bytes announced", id="topic-past-frame-qos1"),
    pytest.param(frame(0x30, b"\x00\x02\xc3\x28"), r"not valid UTF-8 \[MQTT-1\.5\.3-1\]", id="utf8-bad-byte"),
    pytest.param(frame(0x30, b"\x00\x03\xed\xa0\x80"), r"not valid UTF-8 \[MQTT-1\.5\.3-1\]", id="utf8-surrogate"),
    pytest.param(frame(0x30, b"\x00\x02\xc0\xaf"), r"not valid UTF-8 \[MQTT-1\.5\.3-1\]", id="utf8-overlong"),
    pytest.param(frame(0x30, b"\x00\x02a\xc3"), r"not valid UTF-8 \[MQTT-1\.5\.3-1\]", id="utf8-truncated"),
    pytest.param(frame(0x30, b"\x00\x03a\x00b"), r"contains U\+0000 \[MQTT-1\.5\.3-2\]", id="nul"),
    pytest.param(frame(0x30, b"\x00\x03a/+"), r"wildcard in a topic name \[MQTT-3\.3\.2-2\]", id="wildcard-plus"),
    pytest.param(frame(0x32, b"\x00\x01#\x00\x01"), r"wildcard in a topic name \[MQTT-3\.3\.2-2\]", id="wildcard-hash"),
    pytest.param(frame(0x30, b"\x00\x00"), r"topic: empty \[MQTT-4\.7\.3-1\]", id="empty-topic"),
    pytest.param(frame(0x32, b"\x00\x00\x00\x01x"), r"topic: empty \[MQTT-4\.7\.3-1\]", id="empty-topic-qos1"),
    pytest.param(frame(0x32, b"\x00\x03a/b"), r"without its packet identifier \[MQTT-2\.3\.1\]", id="qos1-no-id"),
    pytest.param(frame(0x34, b"\x00\x03a/b\x00"), r"without its packet identifier \[MQTT-2\.3\.1\]", id="qos2-half-id"),
    pytest.param(frame(0x32, b"\x00\x03a/b\x00\x00x"), r"packet identifier 0 \[MQTT-2\.3\.1-1\]", id="qos1-id-0"),
    pytest.param(frame(0x3C, b"\x00\x03a/b\x00\x00"), r"packet identifier 0 \[MQTT-2\.3\.1-1\]", id="qos2-id-0"),
    pytest.param(frame(0x41, b"\x00\x01"), r"PUBACK with flags 0b0001, expected 0b0000 \[MQTT-2\.2\.2-1\]",
                 id="puback-flags"),
    pytest.param(frame(0x58, b"\x00\x01"), r"PUBREC with flags 0b1000, expected 0b0000 \[MQTT-2\.2\.2-1\]",
                 id="pubrec-flags"),
    pytest.param(frame(0x60, b"\x00\x01"), r"PUBREL with flags 0b0000, expected 0b0010 \[MQTT-2\.2\.2-1\]",
                 id="pubrel-flags-0"),
    pytest.param(frame(0x63, b"\x00\x01"), r"PUBREL with flags 0b0011, expected 0b0010", id="pubrel-flags-3"),
    pytest.param(frame(0x72, b"\x00\x01"),
                 r"PUBCOMP with flags 0b0010, expected 0b0000 \[MQTT-2\.2\.2-1\] \[MQTT-2\.2\.2-2\]",
                 id="pubcomp-flags"),
    pytest.param(frame(0x40, b"\x00\x01\x00"), r"PUBACK with remaining length 3, must be 2 \[MQTT-3\.4\.1\]",
                 id="puback-3-bytes"),
    pytest.param(frame(0x50, b"\x00"), r"PUBREC with remaining length 1, must be 2 \[MQTT-3\.5\.1\]",
                 id="pubrec-1-byte"),
    pytest.param(frame(0x62, b""), r"PUBREL with remaining length 0, must be 2 \[MQTT-3\.6\.1\]", id="pubrel-empty"),
    pytest.param(frame(0x70, b"\x00\x01\x02\x03"), r"PUBCOMP with remaining length 4, must be 2 \[MQTT-3\.7\.1\]",
                 id="pubcomp-4-bytes"),
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_malformed_packet_is_one_value_error_class(impl) -> None:
    assert impl.MalformedPacket is MalformedPacket is mqtt_codec_py.MalformedPacket
    assert issubclass(MalformedPacket, ValueError)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_known_frames_decode(impl) -> None:
    for data, expected in KNOWN:
        assert impl.decode(data, MAX) == ([expected], len(data)), data
    data = b"".join(data for data, _ in KNOWN)
    assert impl.decode(data, MAX) == ([expected for _, expected in KNOWN], len(data))
    assert impl.decode(b"", MAX) == ([], 0)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_decoded_fields_are_exact_types(impl) -> None:
    packets, _ = impl.decode(b"\x32\x09\x00\x03a/b\x00\x07hi" + b"\x30\x05\x00\x03a/b", MAX)
    assert len(packets) == 2
    for packet in packets:
        assert [type(field) for field in packet] == [int, int, str, int, bytes]
    (other,), _ = impl.decode(b"\xc0\x00", MAX)
    assert type(other[2]) is bytes


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_encode_acks_layout(impl) -> None:
    for kind, first in ((PUBACK, 0x40), (PUBREC, 0x50), (PUBREL, 0x62), (PUBCOMP, 0x70)):
        data = impl.encode_acks(kind, [1, 0x0102, 65535])
        assert data == bytes([first, 2, 0, 1, first, 2, 1, 2, first, 2, 0xFF, 0xFF])
        assert type(data) is bytes
        assert impl.decode(data, MAX) == ([(kind, first & 0x0F, 1), (kind, first & 0x0F, 0x0102),
                                           (kind, first & 0x0F, 65535)], 12)
    assert impl.encode_acks(PUBACK, []) == b""


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_encode_publishes_layout(impl) -> None:
    assert impl.encode_publishes([(b"a/b", b"hi", 0, False)]) == b"\x30\x07\x00\x03a/bhi"
    assert impl.encode_publishes([(b"a/b", b"hi", 10, False)]) == b"\x32\x09\x00\x03a/b\x00\x0ahi"
    assert impl.encode_publishes([(b"a/b", b"", 0x1234, True)]) == b"\x3a\x07\x00\x03a/b\x12\x34"
    assert impl.encode_publishes([(b"a/b", b"hi", 0, False), (b"a/b", b"", 0x1234, True)]) == (
        b"\x30\x07\x00\x03a/bhi" b"\x3a\x07\x00\x03a/b\x12\x34")
    assert impl.encode_publishes([]) == b""
    Delivery = collections.namedtuple("Delivery", "topic payload packet_id dup")
    assert impl.encode_publishes([Delivery(b"a/b", b"hi", 10, 0)]) == b"\x32\x09\x00\x03a/b\x00\x0ahi"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_publish_round_trip(impl) -> None:
    items = [
        (b"$queue/orders", b"x" * 100, 1, False),
        (b"$queue/orders", b"y" * 100, 2, True),
        (b"$queue/ordert", b"z", 3, False),  # same length as the topic before, other bytes
        (b"$queue/orders", b"", 0, False),
        ("é/ü/日本".encode(), bytes(range(256)) * 3, 65535, True),
        (b"a", bytes(70_000), 9, False),
        (b"t" * 65535, b"longest topic", 0, False),
        (b"$queue/orders", b"\x00", 4, False),
    ]
    data = impl.encode_publishes(items)
    expected = [(PUBLISH, 0x0A if dup else (0x02 if pid else 0), topic.decode(), pid, payload)
                for topic, payload, pid, dup in items]
    assert impl.decode(data, MAX) == (expected, len(data))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(("bad", "match"), MALFORMED)
def test_malformed_frames_are_refused(impl, bad, match) -> None:
    for data in (bad, VALID_PREFIX + bad, VALID_PREFIX + bad + VALID_PREFIX):
        with pytest.raises(MalformedPacket, match=match):
            impl.decode(data, MAX)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_fixed_header_is_checked_before_the_body_arrives(impl) -> None:
    assert impl.decode(b"\x30\x80\x80\x80", MAX) == ([], 0)  # 3 length bytes, all continued: wait for more
    assert impl.decode(VALID_PREFIX + b"\x30\xff\xff\xff\x7f", 1 << 30) == ([(3, 2, "a/b", 1, b"x")], 10)
    with pytest.raises(MalformedPacket, match="exceeds max_packet_size 1048576"):
        impl.decode(VALID_PREFIX + b"\x30\xff\xff\xff\x7f", MAX)
    with pytest.raises(MalformedPacket, match="reserved packet type 15"):
        impl.decode(b"\xf0\x05", MAX)
    # Body checks wait for the whole frame.
    assert impl.decode(b"\x36\x07\x00\x03a/b", MAX) == ([], 0)
    assert impl.decode(b"\x41\x02\x00", MAX) == ([], 0)


RL_HEADERS = {
    127: b"\x7f",
    128: b"\x80\x01",
    16383: b"\xff\x7f",
    16384: b"\x80\x80\x01",
    2097151: b"\xff\xff\x7f",
    2097152: b"\x80\x80\x80\x01",
}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("remaining", sorted(RL_HEADERS))
def test_remaining_length_boundaries(impl, remaining) -> None:
    payload = bytes(remaining - 3)  # topic length field (2) + topic b"t" (1) + payload
    data = impl.encode_publishes([(b"t", payload, 0, False)])
    header = b"\x30" + RL_HEADERS[remaining]
    assert data[:len(header) + 3] == header + b"\x00\x01t"
    assert len(data) == len(header) + remaining
    assert impl.decode(data, 1 << 30) == ([(3, 0, "t", 0, payload)], len(data))
    assert impl.decode(data + b"\xc0\x00", 1 << 30) == ([(3, 0, "t", 0, payload), (12, 0, b"")], len(data) + 2)
    assert impl.decode(data[:-1], 1 << 30) == ([], 0)
    assert impl.decode(data[:len(header) - 1], 1 << 30) == ([], 0)  # the length itself cut short
    assert impl.decode(b"\xc0\x00" + data[:len(header)], 1 << 30) == ([(12, 0, b"")], 2)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_largest_remaining_length_is_accepted_in_the_header(impl) -> None:
    assert impl.decode(b"\x30\xff\xff\xff\x7f", 1 << 30) == ([], 0)
    assert impl.MAX_REMAINING_LENGTH == 268_435_455


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("payload_size", [0, 100, 200])
def test_max_packet_size_at_and_one_over_the_limit(impl, payload_size) -> None:
    data = impl.encode_publishes([(b"$queue/orders", bytes(payload_size), 5, False)])
    size = len(data)
    header = 2 if size - 2 < 128 else 3
    assert impl.decode(data, size) == ([(3, 2, "$queue/orders", 5, bytes(payload_size))], size)
    with pytest.raises(MalformedPacket, match=f"packet of {size} bytes exceeds max_packet_size {size - 1}"):
        impl.decode(data, size - 1)
    # Known from the fixed header alone, before the body arrives.
    assert impl.decode(data[:header], size) == ([], 0)
    with pytest.raises(MalformedPacket, match="exceeds max_packet_size"):
        impl.decode(data[:header], size - 1)
    with pytest.raises(MalformedPacket, match="exceeds max_packet_size"):
        impl.decode(b"\x40\x02\x00\x01" + data, size - 1)  # the ack fits, the PUBLISH does not
    assert impl.decode(b"\x40\x02\x00\x01", 4) == ([(4, 0, 1)], 4)
    with pytest.raises(MalformedPacket, match="packet of 4 bytes exceeds max_packet_size 3"):
        impl.decode(b"\x40\x02\x00\x01", 3)


def split_sample() -> tuple[bytes, list[int], list[tuple]]:
    """Several frames of every kind decode handles (two with a 2-byte remaining length), their end offsets and
    the packets they decode to."""
    frames = [
        (b"\x30\x07\x00\x03a/bhi", (3, 0, "a/b", 0, b"hi")),
        (mqtt_codec_py.encode_publishes([(b"$queue/orders/customer-42", b"p" * 200, 17, True)]),
         (3, 10, "$queue/orders/customer-42", 17, b"p" * 200)),
        (b"\x40\x02\x00\x07", (4, 0, 7)),
        (b"\x50\x02\x00\x08", (5, 0, 8)),
        (b"\x62\x02\x00\x09", (6, 2, 9)),
        (b"\x70\x02\x00\x0a", (7, 0, 10)),
        (b"\xc0\x00", (12, 0, b"")),
        (b"\x82\x08\x00\x01\x00\x03a/#\x01", (8, 2, b"\x00\x01\x00\x03a/#\x01")),
        (b"\x35\x0b\x00\x05\xc3\xa9/\xc3\xbc\xff\xff\x00\x01", (3, 5, "é/ü", 65535, b"\x00\x01")),
        (b"\x32\x07\x00\x03a/b\x00\x01", (3, 2, "a/b", 1, b"")),
        (b"\x33\x82\x01\x00\x03a/b\x00\x02" + b"q" * 123, (3, 3, "a/b", 2, b"q" * 123)),  # RL 130
    ]
    ends, offset = [], 0
    for data, _ in frames:
        offset += len(data)
        ends.append(offset)
    return b"".join(data for data, _ in frames), ends, [packet for _, packet in frames]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_incomplete_frames_at_every_split_point(impl) -> None:
    data, ends, expected = split_sample()
    assert impl.decode(data, MAX) == (expected, len(data))
    for cut in range(len(data) + 1):
        first_read, second_read = data[:cut], data[cut:]
        packets, consumed = impl.decode(first_read, MAX)
        assert consumed == max([0] + [end for end in ends if end <= cut]), cut
        pending = first_read[consumed:] + second_read
        more, consumed_more = impl.decode(pending, MAX)
        assert consumed_more == len(pending), cut
        assert packets + more == expected, cut


class BytesSubclass(bytes):
    pass


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_decode_argument_errors(impl) -> None:
    for bad in ("\x30\x00", bytearray(b"\xc0\x00"), memoryview(b"\xc0\x00"), BytesSubclass(b"\xc0\x00"), None, 5):
        with pytest.raises(TypeError):
            impl.decode(bad, MAX)
    for bad in ("1", 1.5, None):
        with pytest.raises(TypeError):
            impl.decode(b"\xc0\x00", bad)
    with pytest.raises(ValueError, match="max_packet_size"):
        impl.decode(b"\xc0\x00", -1)
    assert impl.decode(b"", 0) == ([], 0)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_encode_acks_errors(impl) -> None:
    for kind in (0, 3, 8, 15, -1, 2**70):
        with pytest.raises(ValueError, match="kind must be in 4..7") as info:
            impl.encode_acks(kind, [1])
        assert not isinstance(info.value, MalformedPacket)
    for packet_id in (0, 65536, -1, 2**64):
        with pytest.raises(ValueError, match="packet_id must be in 1..65535"):
            impl.encode_acks(PUBACK, [1, packet_id])
    for packet_id in ("1", 1.0, None, b"\x01"):
        with pytest.raises(TypeError):
            impl.encode_acks(PUBACK, [packet_id])
    for kind in ("4", 4.0, None):
        with pytest.raises(TypeError):
            impl.encode_acks(kind, [1])
    for packet_ids in ((1, 2), None, b"\x00\x01"):
        with pytest.raises(TypeError):
            impl.encode_acks(PUBACK, packet_ids)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_encode_publishes_errors(impl) -> None:
    good = (b"a/b", b"x", 1, False)
    type_errors = [
        ("a/b", b"x", 1, False),  # topic not bytes
        (bytearray(b"a/b"), b"x", 1, False),
        (b"a/b", "x", 1, False),  # payload not bytes
        (b"a/b", bytearray(b"x"), 1, False),
        (b"a/b", memoryview(b"x"), 1, False),
        (b"a/b", None, 1, False),
        (BytesSubclass(b"a/b"), b"x", 1, False),
        (b"a/b", BytesSubclass(b"x"), 1, False),
        (b"a/b", b"x", "1", False),  # packet_id not an integer
        (b"a/b", b"x", 1.0, False),
        (b"a/b", b"x", None, False),
        [b"a/b", b"x", 1, False],  # item not a tuple
        (b"a/b", b"x", 1),  # not four fields
        (b"a/b", b"x", 1, False, None),
    ]
    for item in type_errors:
        with pytest.raises(TypeError):
            impl.encode_publishes([good, item])
    for items in ((good,), None, good):
        with pytest.raises(TypeError):
            impl.encode_publishes(items)
    value_errors = [
        ((b"a/b", b"x", -1, False), "packet_id must be in 0..65535"),
        ((b"a/b", b"x", 65536, False), "packet_id must be in 0..65535"),
        ((b"a/b", b"x", 2**70, False), "packet_id must be in 0..65535"),
        ((b"a/b", b"x", 0, True), r"QoS 0 PUBLISH .* cannot have DUP set \[MQTT-3\.3\.1-2\]"),
        ((b"t" * 65536, b"x", 1, False), "topic of 65536 bytes, longer than 65535"),
    ]
    for item, match in value_errors:
        with pytest.raises(ValueError, match=match):
            impl.encode_publishes([good, item])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_encode_publishes_refuses_a_frame_past_the_largest_remaining_length(impl) -> None:
    payload = bytes(268_435_451)  # calloc'd: no page is touched, the size check comes before any copy
    with pytest.raises(ValueError, match=r"remaining length 268435456, more than 268435455 \[MQTT-2\.2\.3\]"):
        impl.encode_publishes([(b"t", payload, 1, False)])  # 2 + 1 + 2 + 268,435,451
    with pytest.raises(ValueError, match="remaining length 268435456"):  # the first is 268,435,455: allowed
        impl.encode_publishes([(b"tt", payload, 0, False), (b"ttt", payload, 0, False)])


class Meddler:
    """An argument whose ``__index__`` / ``__bool__`` empties the list it came in: the encoders work from a
    snapshot of the list, so the output is that of the list as it was passed (and the compiled one stays in its
    buffer)."""

    def __init__(self, victim: list, value: int) -> None:
        self.victim, self.value = victim, value

    def __index__(self) -> int:
        self.victim.clear()
        return self.value

    def __bool__(self) -> bool:
        self.victim.clear()
        return bool(self.value)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_encoders_work_from_a_snapshot_of_the_list(impl) -> None:
    items: list = [(b"a/b", b"x", 1, False)]
    items += [(b"a/b", b"y" * 300, Meddler(items, 5), Meddler(items, 1)), (b"c", b"z", 0, False)]
    assert impl.encode_publishes(items) == b"".join((b"\x32\x08\x00\x03a/b\x00\x01x",
                                                     b"\x3a\xb3\x02\x00\x03a/b\x00\x05" + b"y" * 300,
                                                     b"\x30\x04\x00\x01cz"))
    assert items == []
    ids: list = [1]
    ids += [Meddler(ids, 2), 3]
    assert impl.encode_acks(PUBACK, ids) == b"\x40\x02\x00\x01\x40\x02\x00\x02\x40\x02\x00\x03"
    assert ids == []


# --- the two implementations compared on random input --------------------------------------------------------

TOPICS = [b"$queue/orders", b"$queue/orders/customer-42", b"a/b", "é/ü".encode(), b"x" * 40, b"a/+", b"#", b"",
          b"a\x00b", b"\xc3\x28", b"\xed\xa0\x80", b"\xff"]


def random_frame(rng: random.Random) -> bytes:
    choice = rng.random()
    if choice < 0.55:
        flags = rng.choice([0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 2, 2, 2, 6, 8])
        topic = rng.choice(TOPICS) if rng.random() < 0.3 else rng.choice(TOPICS[:5])
        body = len(topic).to_bytes(2, "big") + topic
        if (flags >> 1) & 3:
            body += rng.choice([rng.randrange(1, 65536), rng.randrange(1, 65536), 0]).to_bytes(2, "big")
        body += rng.randbytes(rng.choice([0, 1, 5, 100, 120, 200]))
    elif choice < 0.8:
        kind = rng.choice([4, 5, 6, 7])
        flags = 2 if kind == 6 else 0
        if rng.random() < 0.1:
            flags = rng.randrange(16)
        body = rng.randrange(65536).to_bytes(2, "big")
        if rng.random() < 0.1:
            body = rng.randbytes(rng.choice([0, 1, 3]))
        flags |= kind << 4
    else:
        flags = rng.choice([0x10, 0x82, 0xA2, 0xC0, 0xE0, 0x20, 0x00, 0xF0, 0x90])
        body = rng.randbytes(rng.choice([0, 2, 7, 130]))
    if choice < 0.55:
        flags |= 0x30
    remaining, length = len(body), bytearray()
    while True:
        length.append((remaining & 0x7F) | (0x80 if remaining >= 128 else 0))
        remaining >>= 7
        if not remaining:
            break
    return bytes([flags]) + bytes(length) + body


def random_buffer(rng: random.Random) -> bytes:
    data = bytearray(b"".join(random_frame(rng) for _ in range(rng.randrange(1, 8))))
    mutation = rng.random()
    if mutation < 0.15 and data:
        data[rng.randrange(len(data))] = rng.randrange(256)
    elif mutation < 0.3:
        del data[rng.randrange(len(data) + 1):]
    elif mutation < 0.35:
        data += rng.randbytes(rng.randrange(1, 6))
    return bytes(data)


def outcome(impl, data: bytes, max_packet_size: int):
    try:
        return "ok", impl.decode(data, max_packet_size)
    except MalformedPacket as exc:
        return "malformed", str(exc)


def test_native_and_pure_agree_on_random_input() -> None:
    rng = random.Random(20261122)
    kinds: collections.Counter[str] = collections.Counter()
    for _ in range(4000):
        data = random_buffer(rng)
        max_packet_size = MAX if rng.random() < 0.8 else rng.randrange(2, 300)
        native_outcome = outcome(native.mqtt_codec, data, max_packet_size)
        assert native_outcome == outcome(mqtt_codec_py, data, max_packet_size), data
        kinds[native_outcome[0]] += 1
    assert kinds["ok"] > 1000 and kinds["malformed"] > 1000, kinds


def test_native_and_pure_encode_alike_on_random_input() -> None:
    rng = random.Random(7)
    for _ in range(1000):
        items = []
        for _ in range(rng.randrange(0, 12)):
            packet_id = rng.choice([0, rng.randrange(1, 65536)])
            items.append((rng.choice(TOPICS[:5]), rng.randbytes(rng.choice([0, 3, 100, 130, 20_000])), packet_id,
                          bool(packet_id) and rng.random() < 0.3))
        data = native.mqtt_codec.encode_publishes(items)
        assert data == mqtt_codec_py.encode_publishes(items)
        assert native.mqtt_codec.decode(data, MAX) == mqtt_codec_py.decode(data, MAX)
        ids = [rng.randrange(1, 65536) for _ in range(rng.randrange(0, 50))]
        kind = rng.choice([4, 5, 6, 7])
        assert native.mqtt_codec.encode_acks(kind, ids) == mqtt_codec_py.encode_acks(kind, ids)


def record(key: bytes, payload: bytes) -> bytes:
    return len(key).to_bytes(2, "big") + key + payload


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_encode_records_matches_encode_publishes(impl) -> None:
    records = [record(b"", b"hello"), record(b"eu/4711", b"x" * 200), record(b"", b""), record(b"k", b"\x00")]
    ids, dups = [1, 65535, 0, 7], b"\x00\x01\x00\x01"
    expected = impl.encode_publishes([(b"$queue/orders", b"hello", 1, False),
                                      (b"$queue/orders/eu/4711", b"x" * 200, 65535, True),
                                      (b"$queue/orders", b"", 0, False), (b"$queue/orders/k", b"\x00", 7, True)])
    assert impl.encode_records(b"$queue/orders", records, ids, dups) == expected
    assert impl.encode_records(b"$queue/orders", records, ids, None) == impl.encode_records(
        b"$queue/orders", records, ids, bytes(4))
    assert impl.encode_records(b"$queue/orders", [], [], None) == b""
    packets, consumed = impl.decode(expected, MAX)
    assert consumed == len(expected) and [p[2] for p in packets] == [
        "$queue/orders", "$queue/orders/eu/4711", "$queue/orders", "$queue/orders/k"]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_encode_records_errors(impl) -> None:
    good = record(b"k", b"x")
    for args in [("$queue/q", [good], [1], None), (b"$queue/q", (good,), [1], None), (b"$queue/q", [good], (1,), None),
                 (b"$queue/q", [good], [1], bytearray(1)), (b"$queue/q", [bytearray(good)], [1], None),
                 (b"$queue/q", [BytesSubclass(good)], [1], None), (b"$queue/q", [good], ["1"], None)]:
        with pytest.raises(TypeError):
            impl.encode_records(*args)
    value_errors = [
        (([good, good], [1], None), "3 records but 2 packet_ids"),
        (([good], [1], b"\x00\x00"), "2 records but 3 dups"),
        (([b"\x00"], [1], None), "record shorter than its key length"),
        (([b"\x00\x05abc"], [1], None), "record key runs past its end"),
        (([good], [65536], None), "packet_id must be in 0..65535"),
        (([good], [0], b"\x01"), r"QoS 0 PUBLISH .* cannot have DUP set \[MQTT-3\.3\.1-2\]"),
        (([record(b"k" * 65530, b"")], [1], None), "topic of 65539 bytes, longer than 65535"),
    ]
    for (records, ids, dups), match in value_errors:
        with pytest.raises(ValueError, match=match):
            impl.encode_records(b"$queue/q", [good] + records, [1] + ids, None if dups is None else b"\x00" + dups)


def test_native_and_pure_encode_records_alike_on_random_input() -> None:
    rng = random.Random(11)
    for _ in range(500):
        count = rng.randrange(0, 12)
        records = [record(rng.choice([b"", b"k", b"eu/4711", "é".encode()]),
                          rng.randbytes(rng.choice([0, 3, 100, 130, 20_000]))) for _ in range(count)]
        ids = [rng.choice([0, rng.randrange(1, 65536)]) for _ in range(count)]
        dups = bytes(int(bool(i) and rng.random() < 0.3) for i in ids) if rng.random() < 0.5 else None
        prefix = rng.choice([b"$queue/orders", b"$queue/a.dlq"])
        data = native.mqtt_codec.encode_records(prefix, records, ids, dups)
        assert data == mqtt_codec_py.encode_records(prefix, records, ids, dups)
        assert native.mqtt_codec.decode(data, MAX) == mqtt_codec_py.decode(data, MAX)


@pytest.mark.parametrize("codec", IMPLEMENTATIONS)
def test_packet_types_have_one_home_and_the_codecs_agree_with_it(codec) -> None:
    """``mqtt_packets`` holds the packet types [MQTT-2.2.1]; the compiled codec repeats a few as C constants."""
    from shoalmq._native import mqtt_packets as P

    assert (P.CONNECT, P.PUBLISH, P.PUBACK, P.PUBREC, P.PUBREL, P.PUBCOMP, P.SUBSCRIBE, P.DISCONNECT) == (
        1, 3, 4, 5, 6, 7, 8, 14)
    packets, _ = codec.decode(b"\x32\x05\x00\x01x\x00\x01" + codec.encode_acks(P.PUBACK, [1])
                              + codec.encode_acks(P.PUBREC, [2]) + codec.encode_acks(P.PUBREL, [3])
                              + codec.encode_acks(P.PUBCOMP, [4]), MAX)
    assert [p[0] for p in packets] == [P.PUBLISH, P.PUBACK, P.PUBREC, P.PUBREL, P.PUBCOMP]
