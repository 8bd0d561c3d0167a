"""A list of payloads packed into one bytes value, and back: the body of a partition-log segment.

Layout (big-endian): count u32 | lengths u32[count] | payloads, concatenated.
"""

def pack(payloads: list[bytes]) -> bytes:
    """Pack a list of ``bytes`` into one segment value (``TypeError`` for anything but ``bytes`` items)."""

def unpack(value: bytes) -> list[bytes]:
    """The payloads of a segment value; ``ValueError`` if the value is not a well-formed segment."""
