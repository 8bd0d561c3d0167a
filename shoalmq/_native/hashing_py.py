"""Pure-Python twin of ``hashing.pyx``: the reference the compiled module is tested against."""

BytesLike = bytes | bytearray | memoryview

FNV32_OFFSET = 2166136261
FNV32_PRIME = 16777619


def fnv1a_32(data: BytesLike) -> int:
    """Return the 32-bit FNV-1a hash of a bytes-like object."""
    if data is None or isinstance(data, str):
        raise TypeError(f"expected a bytes-like object, not {type(data).__name__!r}")
    h = FNV32_OFFSET
    for byte in memoryview(data).cast("B"):
        h = ((h ^ byte) * FNV32_PRIME) & 0xFFFFFFFF
    return h


def partition_of(key: BytesLike, partitions: int) -> int:
    """Return the partition in ``[0, partitions)`` that ``key`` hashes to."""
    if partitions <= 0:
        raise ValueError(f"partitions must be positive, got {partitions}")
    return fnv1a_32(key) % partitions
