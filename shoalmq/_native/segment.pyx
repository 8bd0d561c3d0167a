# cython: language_level=3
"""A list of payloads packed into one bytes value, and back: the body of a partition-log segment.

Layout (big-endian): count u32 | lengths u32[count] | payloads, concatenated. The pure-Python twin is
``segment_py.py``; tests/test_native.py runs the same tests against both.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from libc.stdint cimport uint32_t, uint8_t
from libc.string cimport memcpy


cdef inline void _put_u32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline uint32_t _get_u32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


def pack(list payloads not None) -> bytes:
    """Pack a list of ``bytes`` into one segment value."""
    cdef Py_ssize_t count = PyList_GET_SIZE(payloads)
    cdef Py_ssize_t i, size, total = 4 + 4 * count
    cdef object item
    if count > 0xFFFFFFFF:
        raise ValueError("too many payloads for one segment")
    for i in range(count):
        item = <object>PyList_GET_ITEM(payloads, i)
        if not PyBytes_CheckExact(item):
            raise TypeError(f"payloads must be bytes, not {type(item).__name__!r}")
        size = PyBytes_GET_SIZE(item)
        if size > 0xFFFFFFFF:
            raise ValueError("payload too large for a segment")
        total += size
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef uint8_t* head = <uint8_t*>PyBytes_AS_STRING(out)
    cdef uint8_t* body = head + 4 + 4 * count
    _put_u32(head, <uint32_t>count)
    for i in range(count):
        item = <object>PyList_GET_ITEM(payloads, i)
        size = PyBytes_GET_SIZE(item)
        _put_u32(head + 4 + 4 * i, <uint32_t>size)
        memcpy(body, PyBytes_AS_STRING(item), size)
        body += size
    return out


def unpack(bytes value not None) -> list:
    """The payloads of a segment value; ValueError if the value is not a well-formed segment."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value)
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(value)
    if n < 4:
        raise ValueError(f"corrupt segment: {n} bytes, too short for a header")
    cdef Py_ssize_t count = _get_u32(p)
    if 4 + 4 * count > n:
        raise ValueError(f"corrupt segment: {n} bytes cannot hold {count} lengths")
    cdef Py_ssize_t i, size, pos = 4 + 4 * count
    for i in range(count):
        pos += _get_u32(p + 4 + 4 * i)
    if pos != n:
        raise ValueError(f"corrupt segment: {n} bytes, lengths say {pos}")
    out = [None] * count
    pos = 4 + 4 * count
    for i in range(count):
        size = _get_u32(p + 4 + 4 * i)
        out[i] = PyBytes_FromStringAndSize(<const char*>(p + pos), size)
        pos += size
    return out
