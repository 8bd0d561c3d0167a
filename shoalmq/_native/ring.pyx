# cython: language_level=3
"""A bounded ring buffer (a deque) of message records: a partition's in-memory queue of ready messages.

Each record is ``(offset, payload, enqueued_at, deliveries)``. The fixed-width fields live in C arrays, the
payloads in a C array of owned ``PyObject*``; the arrays have ``_alloc`` slots (a power of two, at most
``capacity``) and are indexed with ``& mask``. They are allocated lazily and grow by doubling as records come
(``capacity`` is the logical bound): an empty ring owns no arrays, and one that drains empty with more than
``KEEP_SLOTS`` slots frees them, so a partition costs memory for what it holds, not for what it could hold. A push
or pop allocates no Python object beyond what it returns (a push that grows the arrays allocates C memory); the
batch operations loop in C. ``nbytes``, the payload bytes held, is kept up to date by every operation in C, and
so are the totals of the ``RingPool`` the ring was created with (the rings of a node share one: its byte budget is
read in O(1), with no bookkeeping by the caller).

The pure-Python twin is ``ring_py.py``; ``ring.pyi`` documents the interface. Both raise the same exceptions for
the same input (tests/test_ring.py): arguments are checked first (``TypeError``/``ValueError``), room second
(``RingFull``), and a call that raises leaves the buffer unchanged.

Payloads must be exactly ``bytes``. Besides matching the twin, this keeps the buffer out of reference cycles (a
``bytes`` refers to nothing, so the class needs no GC support) and makes dropping a reference run no Python code.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.list cimport PyList_New
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF, Py_XDECREF
from cpython.sequence cimport PySequence_Fast, PySequence_Fast_GET_SIZE, PySequence_Fast_ITEMS
from libc.stdint cimport INT64_MAX, int64_t, uint16_t
from libc.stdlib cimport calloc, malloc
from libc.stdlib cimport free as c_free  # `free` is also a property of RingBuffer
from libc.string cimport memcpy

import numpy

from ._errors import RingFull

__all__ = ["DEFAULT_CAPACITY", "MAX_CAPACITY", "RingBuffer", "RingFull", "RingPool"]

DEFAULT_CAPACITY = 16384
MAX_CAPACITY = 1 << 30
MAX_DELIVERIES = 0xFFFF
#: The largest per-record cost a RingPool counts (so that its totals cannot overflow).
MAX_RECORD_BYTES = 1 << 30
#: Slots allocated by the first push (fewer if the capacity is smaller).
cdef Py_ssize_t MIN_SLOTS = 16
#: A ring that drains empty keeps arrays of up to this many slots (13 KB); larger ones are freed. Keeping a few
#: hundred spares a ring that a consumer empties at every take from reallocating at every refill.
cdef Py_ssize_t KEEP_SLOTS = 512

cdef extern from "Python.h":
    # Raw-pointer forms of a few API calls, so that Cython does no reference counting around them.
    bint _is_bytes "PyBytes_CheckExact" (PyObject* o)
    Py_ssize_t _bytes_size "PyBytes_GET_SIZE" (PyObject* o)
    void _list_set_item_steal "PyList_SET_ITEM" (object lst, Py_ssize_t i, PyObject* item)
    void _incref_ptr "Py_INCREF" (PyObject* o)
    Py_ssize_t _as_ssize_clamped "PyNumber_AsSsize_t" (object o, PyObject* exc) except? -1

cdef object _np_empty = numpy.empty
cdef object _INT64 = numpy.dtype(numpy.int64)
cdef object _UINT16 = numpy.dtype(numpy.uint16)


cdef inline int64_t _int64_arg(object value, str name) except? -1:
    # __index__ semantics, as operator.index in the twin: TypeError for float, str, None.
    cdef int overflow = 0
    cdef long long number = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow:
        raise ValueError(f"{name} must fit in a signed 64-bit integer, got {value!r}")
    return number


cdef inline int _deliveries_arg(object value) except -1:
    cdef int overflow = 0
    cdef long long number = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow or number < 0 or number > 0xFFFF:
        raise ValueError(f"deliveries must be in 0..{MAX_DELIVERIES}, got {value!r}")
    return <int>number


cdef inline int _check_payload(object payload) except -1:
    if not _is_bytes(<PyObject*>payload):
        raise TypeError(f"payload must be bytes, not {type(payload).__name__!r}")
    return 0


cdef int _fill(object array, const void* first, size_t first_bytes, const void* second, size_t second_bytes) except -1:
    """Copy two runs of bytes into a fresh, contiguous, writable array (numpy, through the buffer protocol)."""
    cdef Py_buffer view
    PyObject_GetBuffer(array, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
    if <size_t>view.len != first_bytes + second_bytes:  # cannot happen with the arrays made here
        PyBuffer_Release(&view)
        raise RuntimeError("pop_many: output array has the wrong size")
    memcpy(view.buf, first, first_bytes)
    if second_bytes:
        memcpy((<char*>view.buf) + first_bytes, second, second_bytes)
    PyBuffer_Release(&view)
    return 0


@cython.final
cdef class RingPool:
    """Totals over the rings created with this pool; see ``ring.pyi``."""

    cdef Py_ssize_t _nbytes
    cdef Py_ssize_t _count
    cdef Py_ssize_t _record_bytes
    cdef Py_ssize_t _peak

    def __cinit__(self, record_bytes=0):
        cdef Py_ssize_t extra = _as_ssize_clamped(record_bytes, NULL)
        if extra < 0 or extra > MAX_RECORD_BYTES:
            raise ValueError(f"record_bytes must be in 0..{MAX_RECORD_BYTES}, got {record_bytes!r}")
        self._record_bytes = extra

    cdef inline void _add(self, Py_ssize_t nbytes, Py_ssize_t count) noexcept:
        cdef Py_ssize_t cost
        self._nbytes += nbytes
        self._count += count
        if count > 0:
            cost = self._nbytes + self._record_bytes * self._count
            if cost > self._peak:
                self._peak = cost

    @property
    def nbytes(self):
        return self._nbytes

    @property
    def count(self):
        return self._count

    @property
    def record_bytes(self):
        return self._record_bytes

    @property
    def cost(self):
        return self._nbytes + self._record_bytes * self._count

    @property
    def peak(self):
        return self._peak

    @cython.always_allow_keywords(False)
    def reset_peak(self):
        self._peak = self._nbytes + self._record_bytes * self._count

    def __repr__(self):
        return f"RingPool(record_bytes={self._record_bytes}, count={self._count}, nbytes={self._nbytes})"

    def __reduce__(self):
        raise TypeError("RingPool objects cannot be pickled or copied")


@cython.final
@cython.no_gc  # its only object references are bytes and a RingPool, which refer to nothing: no cycles
cdef class RingBuffer:
    """A bounded deque of message records; see ``ring.pyi`` for the interface."""

    cdef int64_t* _offsets
    cdef int64_t* _enqueued_at
    cdef uint16_t* _deliveries
    cdef PyObject** _payloads  # owned references; NULL in every slot that holds no record
    cdef size_t _mask  # _alloc - 1
    cdef size_t _head  # slot of the head record
    cdef Py_ssize_t _count
    cdef Py_ssize_t _capacity
    cdef Py_ssize_t _alloc  # slots allocated: 0 (no arrays), or a power of two <= _capacity
    cdef Py_ssize_t _nbytes  # sum of the lengths of the payloads held
    cdef RingPool _pool  # or None; its totals include this ring's records

    def __cinit__(self, capacity=DEFAULT_CAPACITY, RingPool pool=None):
        cdef int overflow = 0
        cdef long long number = PyLong_AsLongLongAndOverflow(capacity, &overflow)
        if overflow or number < 2 or number > MAX_CAPACITY or (number & (number - 1)) != 0:
            raise ValueError(f"capacity must be a power of two between 2 and {MAX_CAPACITY}, got {capacity!r}")
        self._pool = pool
        self._capacity = <Py_ssize_t>number
        self._alloc = 0  # the arrays come with the first push
        self._mask = 0
        self._head = 0
        self._count = 0
        self._nbytes = 0

    def __dealloc__(self):
        self._drop_all()
        self._release()

    cdef void _release(self) noexcept:
        """Free the arrays (the buffer must be empty)."""
        c_free(self._offsets)
        c_free(self._enqueued_at)
        c_free(self._deliveries)
        c_free(self._payloads)
        self._offsets = self._enqueued_at = NULL
        self._deliveries = NULL
        self._payloads = NULL
        self._alloc = 0
        self._mask = 0
        self._head = 0

    cdef inline void _emptied(self) noexcept:
        """The last record was just removed: give large arrays back."""
        if self._alloc > KEEP_SLOTS:
            self._release()

    cdef int _grow(self, Py_ssize_t needed) except -1:
        """Make the arrays hold at least ``needed`` records (``needed <= capacity``): new arrays of the next power
        of two, the records copied to them in order from slot 0. MemoryError leaves the buffer unchanged."""
        cdef Py_ssize_t alloc = self._alloc if self._alloc else MIN_SLOTS
        while alloc < needed:
            alloc <<= 1
        if alloc > self._capacity:
            alloc = self._capacity
        cdef int64_t* offsets = <int64_t*>malloc(<size_t>alloc * sizeof(int64_t))
        cdef int64_t* enqueued_at = <int64_t*>malloc(<size_t>alloc * sizeof(int64_t))
        cdef uint16_t* deliveries = <uint16_t*>malloc(<size_t>alloc * sizeof(uint16_t))
        cdef PyObject** payloads = <PyObject**>calloc(<size_t>alloc, sizeof(PyObject*))
        if offsets == NULL or enqueued_at == NULL or deliveries == NULL or payloads == NULL:
            c_free(offsets)
            c_free(enqueued_at)
            c_free(deliveries)
            c_free(payloads)
            raise MemoryError(f"cannot allocate {alloc} slots of a ring buffer")
        cdef size_t head = self._head
        cdef size_t run = <size_t>self._count  # records before the end of the old arrays; the rest are at slot 0
        if self._count and head + run > <size_t>self._alloc:
            run = <size_t>self._alloc - head
        cdef size_t rest = <size_t>self._count - run
        if self._count:
            memcpy(offsets, self._offsets + head, run * sizeof(int64_t))
            memcpy(offsets + run, self._offsets, rest * sizeof(int64_t))
            memcpy(enqueued_at, self._enqueued_at + head, run * sizeof(int64_t))
            memcpy(enqueued_at + run, self._enqueued_at, rest * sizeof(int64_t))
            memcpy(deliveries, self._deliveries + head, run * sizeof(uint16_t))
            memcpy(deliveries + run, self._deliveries, rest * sizeof(uint16_t))
            memcpy(payloads, self._payloads + head, run * sizeof(PyObject*))  # the references move over
            memcpy(payloads + run, self._payloads, rest * sizeof(PyObject*))
        c_free(self._offsets)
        c_free(self._enqueued_at)
        c_free(self._deliveries)
        c_free(self._payloads)
        self._offsets = offsets
        self._enqueued_at = enqueued_at
        self._deliveries = deliveries
        self._payloads = payloads
        self._alloc = alloc
        self._mask = <size_t>alloc - 1
        self._head = 0
        return 0

    cdef void _drop_all(self) noexcept:
        cdef Py_ssize_t k
        cdef size_t i
        cdef PyObject* payload
        if self._payloads == NULL:
            return
        for k in range(self._count):
            i = (self._head + <size_t>k) & self._mask
            payload = self._payloads[i]
            self._payloads[i] = NULL
            Py_XDECREF(payload)
        if self._pool is not None:
            self._pool._add(-self._nbytes, -self._count)
        self._head = 0
        self._count = 0
        self._nbytes = 0

    @property
    def capacity(self):
        return self._capacity

    @property
    def free(self):
        return self._capacity - self._count

    @property
    def nbytes(self):
        return self._nbytes

    @property
    def pool(self):
        return self._pool

    def __len__(self):
        return self._count

    def __bool__(self):
        return self._count != 0

    def __repr__(self):
        return f"RingBuffer(capacity={self._capacity}, len={self._count})"

    def __reduce__(self):
        raise TypeError("RingBuffer objects cannot be pickled or copied")

    def __sizeof__(self):
        # The object and its arrays (not the payloads, which are objects of their own).
        cdef Py_ssize_t slot = <Py_ssize_t>(2 * sizeof(int64_t) + sizeof(uint16_t) + sizeof(PyObject*))
        return <Py_ssize_t>type(self).__basicsize__ + self._alloc * slot

    cdef inline void _store(self, size_t i, int64_t offset, object payload, int64_t enqueued_at,
                            int deliveries) noexcept:
        Py_INCREF(payload)
        self._payloads[i] = <PyObject*>payload
        self._offsets[i] = offset
        self._enqueued_at[i] = enqueued_at
        self._deliveries[i] = <uint16_t>deliveries
        cdef Py_ssize_t size = _bytes_size(<PyObject*>payload)
        self._nbytes += size
        if self._pool is not None:
            self._pool._add(size, 1)

    def push(self, offset, payload, enqueued_at, deliveries=0):
        cdef int64_t off = _int64_arg(offset, "offset")
        _check_payload(payload)
        cdef int64_t enq = _int64_arg(enqueued_at, "enqueued_at")
        cdef int dlv = _deliveries_arg(deliveries)
        if self._count >= self._capacity:
            raise RingFull(f"ring buffer is full (capacity {self._capacity})")
        if self._count >= self._alloc:
            self._grow(self._count + 1)
        self._store((self._head + <size_t>self._count) & self._mask, off, payload, enq, dlv)
        self._count += 1

    def push_front(self, offset, payload, enqueued_at, deliveries):
        cdef int64_t off = _int64_arg(offset, "offset")
        _check_payload(payload)
        cdef int64_t enq = _int64_arg(enqueued_at, "enqueued_at")
        cdef int dlv = _deliveries_arg(deliveries)
        if self._count >= self._capacity:
            raise RingFull(f"ring buffer is full (capacity {self._capacity})")
        if self._count >= self._alloc:
            self._grow(self._count + 1)
        cdef size_t i = (self._head - 1) & self._mask  # size_t arithmetic: wraps from slot 0 to the last slot
        self._store(i, off, payload, enq, dlv)
        self._head = i
        self._count += 1

    def push_many(self, first_offset, payloads, enqueued_at):
        cdef int64_t first = _int64_arg(first_offset, "first_offset")
        seq = PySequence_Fast(payloads, "payloads must be an iterable of bytes")  # list/tuple as is, else list()
        cdef int64_t enq = _int64_arg(enqueued_at, "enqueued_at")
        cdef Py_ssize_t n = PySequence_Fast_GET_SIZE(seq)
        cdef PyObject** items = PySequence_Fast_ITEMS(seq)
        cdef Py_ssize_t k
        if n == 0:
            return
        if first > INT64_MAX - <int64_t>(n - 1):
            raise ValueError(f"offsets {first}..{first}+{n - 1} do not fit in a signed 64-bit integer")
        for k in range(n):  # validate everything before storing anything
            if not _is_bytes(items[k]):
                raise TypeError(f"payloads[{k}] must be bytes, not {type(<object>items[k]).__name__!r}")
        if n > self._capacity - self._count:
            raise RingFull(f"ring buffer has room for {self._capacity - self._count} entries, not {n}")
        self._append(first, items, n, enq)

    def push_upto(self, first_offset, payloads, enqueued_at, max_bytes, record_bytes=0):
        cdef int64_t first = _int64_arg(first_offset, "first_offset")
        seq = PySequence_Fast(payloads, "payloads must be an iterable of bytes")
        cdef int64_t enq = _int64_arg(enqueued_at, "enqueued_at")
        cdef Py_ssize_t budget = _as_ssize_clamped(max_bytes, NULL)  # clamps huge values
        cdef Py_ssize_t extra = _as_ssize_clamped(record_bytes, NULL)
        if extra < 0:
            raise ValueError(f"record_bytes must be >= 0, got {record_bytes!r}")
        cdef Py_ssize_t n = PySequence_Fast_GET_SIZE(seq)
        cdef PyObject** items = PySequence_Fast_ITEMS(seq)
        cdef Py_ssize_t k, size
        if n == 0:
            return 0
        if first > INT64_MAX - <int64_t>(n - 1):
            raise ValueError(f"offsets {first}..{first}+{n - 1} do not fit in a signed 64-bit integer")
        for k in range(n):
            if not _is_bytes(items[k]):
                raise TypeError(f"payloads[{k}] must be bytes, not {type(<object>items[k]).__name__!r}")
        cdef Py_ssize_t room = self._capacity - self._count
        cdef Py_ssize_t fit = 0
        if budget < 0:
            budget = 0
        while fit < n and fit < room:
            size = _bytes_size(items[fit])
            if size > budget - extra:  # cannot overflow: 0 <= budget, extra <= PY_SSIZE_T_MAX
                break
            budget -= size + extra
            fit += 1
        if fit:
            self._append(first, items, fit, enq)
        return fit

    cdef int _append(self, int64_t first, PyObject** items, Py_ssize_t n, int64_t enq) except -1:
        """Append ``n`` checked payloads (there is room) at the tail, growing the arrays if needed."""
        cdef Py_ssize_t k
        cdef size_t i, tail
        cdef Py_ssize_t nbytes = 0
        if self._count + n > self._alloc:
            self._grow(self._count + n)
        tail = self._head + <size_t>self._count
        for k in range(n):
            i = (tail + <size_t>k) & self._mask
            _incref_ptr(items[k])
            nbytes += _bytes_size(items[k])
            self._payloads[i] = items[k]
            self._offsets[i] = first + <int64_t>k
            self._enqueued_at[i] = enq
            self._deliveries[i] = 0
        self._count += n
        self._nbytes += nbytes
        if self._pool is not None:
            self._pool._add(nbytes, n)
        return 0

    cdef inline object _take_head(self):
        """Remove the head record (the buffer must not be empty) and return its payload."""
        cdef size_t i = self._head
        cdef PyObject* slot = self._payloads[i]
        self._payloads[i] = NULL
        self._head = (i + 1) & self._mask
        self._count -= 1
        cdef Py_ssize_t size = _bytes_size(slot)
        self._nbytes -= size
        if self._pool is not None:
            self._pool._add(-size, -1)
        if self._count == 0:
            self._emptied()
        payload = <object>slot  # takes a new reference ...
        Py_DECREF(payload)  # ... and this drops the one the ring held
        return payload

    @cython.always_allow_keywords(False)  # METH_NOARGS: the cheapest call
    def pop(self):
        if self._count == 0:
            raise IndexError("pop from an empty ring buffer")
        return self._take_head()

    @cython.always_allow_keywords(False)
    def pop_record(self):
        if self._count == 0:
            raise IndexError("pop from an empty ring buffer")
        cdef size_t i = self._head
        # Read the fields first: taking the last record may free the arrays.
        cdef int64_t offset = self._offsets[i]
        cdef int64_t enqueued_at = self._enqueued_at[i]
        cdef uint16_t deliveries = self._deliveries[i]
        payload = self._take_head()
        return (offset, enqueued_at, deliveries, payload)

    @cython.always_allow_keywords(False)  # METH_NOARGS: the cheapest call
    def peek(self):
        if self._count == 0:
            raise IndexError("peek at an empty ring buffer")
        return <object>self._payloads[self._head]

    @property
    def head_offset(self):
        if self._count == 0:
            raise IndexError("head_offset of an empty ring buffer")
        return self._offsets[self._head]

    @property
    def head_enqueued_at(self):
        if self._count == 0:
            raise IndexError("head_enqueued_at of an empty ring buffer")
        return self._enqueued_at[self._head]

    @property
    def head_deliveries(self):
        if self._count == 0:
            raise IndexError("head_deliveries of an empty ring buffer")
        return self._deliveries[self._head]

    def pop_many(self, max_count):
        cdef Py_ssize_t wanted = _as_ssize_clamped(max_count, NULL)  # clamps huge values, like min() in the twin
        if wanted < 0:
            raise ValueError(f"max_count must be >= 0, got {max_count!r}")
        cdef Py_ssize_t n = wanted if wanted < self._count else self._count
        # Allocate every result first: once records are moved out, nothing may fail.
        offsets = _np_empty(n, _INT64)
        enqueued = _np_empty(n, _INT64)
        deliveries = _np_empty(n, _UINT16)
        payloads = PyList_New(n)
        if n == 0:
            return offsets, payloads, enqueued, deliveries
        cdef size_t head = self._head
        cdef size_t run = <size_t>n  # records before the end of the arrays; the rest start at slot 0
        if head + run > <size_t>self._alloc:
            run = <size_t>self._alloc - head
        cdef size_t rest = <size_t>n - run
        _fill(offsets, self._offsets + head, run * sizeof(int64_t), self._offsets, rest * sizeof(int64_t))
        _fill(enqueued, self._enqueued_at + head, run * sizeof(int64_t), self._enqueued_at, rest * sizeof(int64_t))
        _fill(deliveries, self._deliveries + head, run * sizeof(uint16_t), self._deliveries, rest * sizeof(uint16_t))
        cdef Py_ssize_t k
        cdef size_t i
        cdef Py_ssize_t nbytes = 0
        cdef bint drains = n == self._count  # then nbytes drops to 0: no need to read each payload's size
        for k in range(n):  # the list takes over the ring's references
            i = (head + <size_t>k) & self._mask
            if not drains:
                nbytes += _bytes_size(self._payloads[i])
            _list_set_item_steal(payloads, k, self._payloads[i])
            self._payloads[i] = NULL
        self._head = (head + <size_t>n) & self._mask
        self._count -= n
        if drains:
            nbytes = self._nbytes
        self._nbytes -= nbytes
        if self._pool is not None:
            self._pool._add(-nbytes, -n)
        if drains:
            self._emptied()
        return offsets, payloads, enqueued, deliveries

    @cython.always_allow_keywords(False)  # METH_NOARGS: the cheapest call
    def clear(self):
        self._drop_all()
        self._release()
