"""MQTT 3.1.1 control packet types [MQTT-2.2.1]: the one home of these numbers for the codec (both twins) and the
front end. ``mqtt_codec.pyx`` repeats the few it needs as C constants (a ``cdef enum`` cannot import);
tests/test_mqtt_codec.py checks that they agree with this module."""

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

#: The packets that carry only a packet identifier (fixed header ``type << 4 | flags``, length 2, id u16).
ACK_NAMES = {PUBACK: "PUBACK", PUBREC: "PUBREC", PUBREL: "PUBREL", PUBCOMP: "PUBCOMP"}
#: SUBACK's return code for a refused subscription [MQTT-3.9.3].
SUBACK_FAILURE = 0x80


def fixed_header(first: int, remaining: int) -> bytes:
    """A fixed header: the type-and-flags byte ``first`` and ``remaining`` as a remaining length [MQTT-2.2.3]."""
    header = bytearray((first,))
    while True:
        remaining, byte = divmod(remaining, 128)
        header.append(byte | (0x80 if remaining else 0))
        if not remaining:
            return bytes(header)


def frame(first: int, body: bytes) -> bytes:
    """A whole packet: its fixed header, then ``body``."""
    return fixed_header(first, len(body)) + body
