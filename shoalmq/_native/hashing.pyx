# cython: language_level=3
"""FNV-1a (32-bit) hashing: picks a key's partition and spreads partitions over nodes.

The pure-Python twin is ``hashing_py.py``; both must give the same answers (tests/test_native.py).
``bytes`` is read in place; other bytes-like objects go through the buffer protocol (slower: a memoryview).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from libc.stdint cimport uint32_t

cdef uint32_t FNV32_OFFSET = 2166136261u
cdef uint32_t FNV32_PRIME = 16777619u


cdef inline uint32_t _fnv1a(const unsigned char* data, Py_ssize_t n) noexcept nogil:
    cdef uint32_t h = FNV32_OFFSET
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ data[i]) * FNV32_PRIME
    return h


cdef uint32_t _hash_object(object data) except? 0:
    cdef const unsigned char[::1] view
    if PyBytes_CheckExact(data):
        return _fnv1a(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
    if data is None or isinstance(data, str):
        raise TypeError(f"expected a bytes-like object, not {type(data).__name__!r}")
    view = data
    if view.shape[0] == 0:
        return FNV32_OFFSET
    return _fnv1a(&view[0], view.shape[0])


def fnv1a_32(data) -> int:
    """Return the 32-bit FNV-1a hash of a bytes-like object."""
    return _hash_object(data)


def partition_of(key, Py_ssize_t partitions) -> int:
    """Return the partition in ``[0, partitions)`` that ``key`` hashes to."""
    if partitions <= 0:
        raise ValueError(f"partitions must be positive, got {partitions}")
    return _hash_object(key) % <uint32_t>partitions
