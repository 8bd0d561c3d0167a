from typing_extensions import Buffer

def fnv1a_32(data: Buffer) -> int:
    """Return the 32-bit FNV-1a hash of a bytes-like object."""

def partition_of(key: Buffer, partitions: int) -> int:
    """Return the partition in ``[0, partitions)`` that ``key`` hashes to."""
