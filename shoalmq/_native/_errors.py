"""Exceptions shared by a compiled module and its pure-Python twin, so callers catch one class whichever is loaded."""


class RingFull(Exception):
    """A push onto a ``RingBuffer`` that has no room left; the buffer is unchanged."""


class MalformedPacket(ValueError):
    """Bytes from a client that break MQTT 3.1.1 (or the broker's ``max_packet_size``), found by ``mqtt_codec``;
    the message names the rule and its spec clause. The connection that sent them is closed."""


class PacketTooLarge(MalformedPacket):
    """A packet larger than the broker's ``max_packet_size``: not against MQTT, over the broker's limit. The
    connection that sent it is closed all the same (MQTT 3.1.1 has no way to refuse one packet)."""
