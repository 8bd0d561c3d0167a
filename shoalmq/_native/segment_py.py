"""Pure-Python twin of ``segment.pyx``: count u32 | lengths u32[count] | payloads, big-endian."""

import struct

import numpy as np

_U32 = struct.Struct(">I")


def pack(payloads: list[bytes]) -> bytes:
    """Pack a list of ``bytes`` into one segment value (``TypeError`` for anything but ``bytes`` items)."""
    if not isinstance(payloads, list):
        raise TypeError(f"payloads must be a list, not {type(payloads).__name__!r}")
    for item in payloads:
        if type(item) is not bytes:
            raise TypeError(f"payloads must be bytes, not {type(item).__name__!r}")
    lengths = np.fromiter(map(len, payloads), dtype=">u4", count=len(payloads))
    return b"".join((_U32.pack(len(payloads)), lengths.tobytes(), *payloads))


def unpack(value: bytes) -> list[bytes]:
    """The payloads of a segment value; ``ValueError`` if the value is not a well-formed segment."""
    if type(value) is not bytes:
        raise TypeError(f"value must be bytes, not {type(value).__name__!r}")
    n = len(value)
    if n < 4:
        raise ValueError(f"corrupt segment: {n} bytes, too short for a header")
    (count,) = _U32.unpack_from(value, 0)
    if 4 + 4 * count > n:
        raise ValueError(f"corrupt segment: {n} bytes cannot hold {count} lengths")
    lengths = np.frombuffer(value, dtype=">u4", count=count, offset=4)
    ends = (np.cumsum(lengths, dtype=np.int64) + (4 + 4 * count)).tolist()
    total = ends[-1] if ends else 4
    if total != n:
        raise ValueError(f"corrupt segment: {n} bytes, lengths say {total}")
    starts = [4 + 4 * count, *ends[:-1]]
    return [value[s:e] for s, e in zip(starts, ends)]
