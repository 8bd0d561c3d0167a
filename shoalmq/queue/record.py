"""The stored form of a queue message: key length u16 | key | payload.

The key is the topic after the queue name (``$queue/<name>/<key>``), kept so that a message is delivered on the
topic it was published on. The partition log stores records as opaque bytes; the queue manager writes and reads
them, and a forwarding node builds them so that the owner can append them as they come.
"""

from __future__ import annotations

import struct

_KEY_LEN = struct.Struct(">H")


def encode_record(key: bytes, payload: bytes) -> bytes:
    return _KEY_LEN.pack(len(key)) + key + payload


def split_record(record: bytes) -> tuple[bytes, bytes]:
    """(key, payload) of a record; ValueError if it is not one."""
    if len(record) < 2:
        raise ValueError("record shorter than its key length")
    (key_len,) = _KEY_LEN.unpack_from(record, 0)
    if 2 + key_len > len(record):
        raise ValueError("record key runs past its end")
    return record[2:2 + key_len], record[2 + key_len:]


def payload_size(record: bytes) -> int:
    """The payload's length in a record, without copying it; ValueError if it is not a record."""
    if len(record) < 2:
        raise ValueError("record shorter than its key length")
    size = len(record) - 2 - _KEY_LEN.unpack_from(record, 0)[0]
    if size < 0:
        raise ValueError("record key runs past its end")
    return size
