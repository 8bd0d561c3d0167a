"""The frame guard's checks, frame by frame (the broker tests send the same frames over real sockets)."""

import pytest

from shoalmq.broker.frames import MalformedPacket, check_frame

VALID = [
    (0x10, b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x00", True),  # CONNECT
    (0x30, b"\x00\x03a/b" + b"payload", False),  # PUBLISH QoS 0
    (0x32, b"\x00\x09$queue/q1\x00\x07x", False),  # PUBLISH QoS 1
    (0x3D, b"\x00\x03a/b\x00\x07", False),  # PUBLISH QoS 2, DUP, retain, empty payload
    (0x40, b"\x00\x07", False),  # PUBACK
    (0x62, b"\x00\x07", False),  # PUBREL
    (0x82, b"\x00\x01\x00\x03a/#\x01\x00\x01+\x02", False),  # SUBSCRIBE, two filters
    (0xA2, b"\x00\x01\x00\x03a/b", False),  # UNSUBSCRIBE
    (0xC0, b"", False),  # PINGREQ
    (0xE0, b"", False),  # DISCONNECT
]

INVALID = [
    (0x30, b"\x00\x03a/b", True, "first packet must be CONNECT"),
    (0x10, b"\x00\x04MQTT", False, "only the first"),
    (0x00, b"", False, "reserved packet type 0"),
    (0xF0, b"", False, "reserved packet type 15"),
    (0x20, b"\x00\x00", False, "CONNACK is sent by servers only"),
    (0x36, b"\x00\x03a/b\x00\x01", False, "QoS 3"),
    (0x38, b"\x00\x03a/b", False, "QoS 0 and DUP"),
    (0x30, b"\x00\x03a/+", False, "wildcard"),
    (0x30, b"\x00\x00", False, "empty"),
    (0x30, b"\x00\x02\xc3\x28", False, "not valid UTF-8"),
    (0x30, b"\x00\x03a\x00b", False, "U\\+0000"),
    (0x30, b"\x00\x09abc", False, "packet too short"),
    (0x32, b"\x00\x03a/b\x00", False, "without its packet identifier"),
    (0x40, b"\x00\x07\x00", False, "must be 2 bytes"),
    (0x60, b"\x00\x07", False, "flags 0b0000, expected 0b0010"),
    (0xC0, b"\x00", False, "must be empty"),
    (0x82, b"\x00\x01", False, "without a topic filter"),
    (0x82, b"\x00\x01\x00\x03a/b", False, "without its QoS byte"),
    (0x82, b"\x00\x01\x00\x03a/b\x04", False, "requested QoS byte 4"),
]


@pytest.mark.parametrize("first, body, first_frame", VALID)
def test_valid_frames_pass(first: int, body: bytes, first_frame: bool) -> None:
    check_frame(first, body, first_frame=first_frame)


@pytest.mark.parametrize("first, body, first_frame, message", INVALID)
def test_invalid_frames_are_refused_with_the_reason(first: int, body: bytes, first_frame: bool, message: str) -> None:
    with pytest.raises(MalformedPacket, match=message):
        check_frame(first, body, first_frame=first_frame)
