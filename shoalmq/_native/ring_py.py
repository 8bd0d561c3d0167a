"""Pure-Python twin of ``ring.pyx``: the readable reference the compiled ring buffer is tested against.

A ``RingBuffer`` is a bounded deque of message records ``(offset, payload, enqueued_at, deliveries)``: new
messages go in at the tail, consumers take from the head, and a message handed back for redelivery goes back in
at the head. ``ring.pyi`` documents the interface; both implementations raise the same exceptions for the same
input (tests/test_ring.py). Arguments are checked first (``TypeError``/``ValueError``), room second (``RingFull``),
and a call that raises leaves the buffer unchanged. ``nbytes`` (the payload bytes held) is kept by every operation,
and so are the totals of the ``RingPool`` the buffer was created with.
"""

from collections import deque
from operator import index

import numpy

from ._errors import RingFull

__all__ = ["DEFAULT_CAPACITY", "MAX_CAPACITY", "RingBuffer", "RingFull", "RingPool"]

DEFAULT_CAPACITY = 16384
MAX_CAPACITY = 1 << 30
MAX_DELIVERIES = 0xFFFF
MAX_RECORD_BYTES = 1 << 30
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1


def _int64_arg(value: object, name: str) -> int:
    number = index(value)  # TypeError for what is not an integer (float, str, None)
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise ValueError(f"{name} must fit in a signed 64-bit integer, got {value!r}")
    return number


def _deliveries_arg(value: object) -> int:
    number = index(value)
    if not 0 <= number <= MAX_DELIVERIES:
        raise ValueError(f"deliveries must be in 0..{MAX_DELIVERIES}, got {value!r}")
    return number


def _check_payload(payload: object) -> None:
    # Exactly bytes: not bytearray/memoryview (mutable, or a view of something mutable), not a bytes subclass.
    if type(payload) is not bytes:
        raise TypeError(f"payload must be bytes, not {type(payload).__name__!r}")


def _payload_list(payloads: object) -> list[bytes]:
    """A list or tuple as is; any other iterable as a list (as PySequence_Fast in the compiled version)."""
    if type(payloads) is not list and type(payloads) is not tuple:
        try:
            iter(payloads)  # type: ignore[call-overload]
        except TypeError:
            raise TypeError("payloads must be an iterable of bytes") from None
        payloads = list(payloads)  # type: ignore[call-overload]
    return payloads  # type: ignore[return-value]


def _check_batch(first: int, payloads: list[bytes]) -> None:
    count = len(payloads)
    if count == 0:
        return
    if first > _INT64_MAX - (count - 1):
        raise ValueError(f"offsets {first}..{first}+{count - 1} do not fit in a signed 64-bit integer")
    for position, payload in enumerate(payloads):
        if type(payload) is not bytes:
            raise TypeError(f"payloads[{position}] must be bytes, not {type(payload).__name__!r}")


class RingPool:
    """Totals over the rings created with this pool; see ``ring.pyi``."""

    __slots__ = ("_count", "_nbytes", "_peak", "_record_bytes")

    def __init__(self, record_bytes: int = 0) -> None:
        extra = index(record_bytes)
        if not 0 <= extra <= MAX_RECORD_BYTES:
            raise ValueError(f"record_bytes must be in 0..{MAX_RECORD_BYTES}, got {record_bytes!r}")
        self._record_bytes = extra
        self._nbytes = self._count = self._peak = 0

    def _add(self, nbytes: int, count: int) -> None:
        self._nbytes += nbytes
        self._count += count
        if count > 0:
            self._peak = max(self._peak, self.cost)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def count(self) -> int:
        return self._count

    @property
    def record_bytes(self) -> int:
        return self._record_bytes

    @property
    def cost(self) -> int:
        return self._nbytes + self._record_bytes * self._count

    @property
    def peak(self) -> int:
        return self._peak

    def reset_peak(self) -> None:
        self._peak = self.cost

    def __repr__(self) -> str:
        return f"RingPool(record_bytes={self._record_bytes}, count={self._count}, nbytes={self._nbytes})"

    def __reduce__(self):
        raise TypeError("RingPool objects cannot be pickled or copied")


class RingBuffer:
    """A bounded deque of message records; see ``ring.pyi`` for the interface."""

    __slots__ = ("_capacity", "_nbytes", "_pool", "_records")

    def __init__(self, capacity: int = DEFAULT_CAPACITY, pool: RingPool | None = None) -> None:
        number = index(capacity)
        if not 2 <= number <= MAX_CAPACITY or number & (number - 1):
            raise ValueError(f"capacity must be a power of two between 2 and {MAX_CAPACITY}, got {capacity!r}")
        if pool is not None and type(pool) is not RingPool:
            raise TypeError(f"Argument 'pool' has incorrect type (expected shoalmq._native.ring.RingPool, "
                            f"got {type(pool).__name__})")
        self._pool = pool
        self._capacity = number
        # Records are (offset, payload, enqueued_at, deliveries); no maxlen: a full deque would drop, not refuse.
        self._records: deque[tuple[int, bytes, int, int]] = deque()
        self._nbytes = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def free(self) -> int:
        return self._capacity - len(self._records)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def pool(self) -> RingPool | None:
        return self._pool

    def _added(self, nbytes: int, count: int) -> None:
        self._nbytes += nbytes
        if self._pool is not None:
            self._pool._add(nbytes, count)

    def __len__(self) -> int:
        return len(self._records)

    def __bool__(self) -> bool:
        return bool(self._records)

    def __repr__(self) -> str:
        return f"RingBuffer(capacity={self._capacity}, len={len(self._records)})"

    def __reduce__(self):  # as the compiled one, which cannot be (a copy here would share the deque)
        raise TypeError("RingBuffer objects cannot be pickled or copied")

    def push(self, offset: int, payload: bytes, enqueued_at: int, deliveries: int = 0) -> None:
        record = self._record(offset, payload, enqueued_at, deliveries)
        if len(self._records) >= self._capacity:
            raise RingFull(f"ring buffer is full (capacity {self._capacity})")
        self._records.append(record)
        self._nbytes += len(payload)
        if self._pool is not None:
            self._pool._add(len(payload), 1)

    def push_front(self, offset: int, payload: bytes, enqueued_at: int, deliveries: int) -> None:
        record = self._record(offset, payload, enqueued_at, deliveries)
        if len(self._records) >= self._capacity:
            raise RingFull(f"ring buffer is full (capacity {self._capacity})")
        self._records.appendleft(record)
        self._nbytes += len(payload)
        if self._pool is not None:
            self._pool._add(len(payload), 1)

    @staticmethod
    def _record(offset: object, payload: object, enqueued_at: object, deliveries: object) -> tuple[int, bytes, int, int]:
        number = _int64_arg(offset, "offset")
        _check_payload(payload)
        return number, payload, _int64_arg(enqueued_at, "enqueued_at"), _deliveries_arg(deliveries)  # type: ignore[return-value]

    def push_many(self, first_offset: int, payloads: list[bytes], enqueued_at: int) -> None:
        first = _int64_arg(first_offset, "first_offset")
        payloads = _payload_list(payloads)
        enqueued = _int64_arg(enqueued_at, "enqueued_at")
        _check_batch(first, payloads)
        count = len(payloads)
        if count == 0:
            return
        free = self._capacity - len(self._records)
        if count > free:
            raise RingFull(f"ring buffer has room for {free} entries, not {count}")
        self._records.extend((first + i, payload, enqueued, 0) for i, payload in enumerate(payloads))
        self._added(sum(map(len, payloads)), count)

    def push_upto(self, first_offset: int, payloads: list[bytes], enqueued_at: int, max_bytes: int,
                  record_bytes: int = 0) -> int:
        first = _int64_arg(first_offset, "first_offset")
        payloads = _payload_list(payloads)
        enqueued = _int64_arg(enqueued_at, "enqueued_at")
        budget = max(index(max_bytes), 0)  # below zero counts as zero, as in the compiled version
        extra = index(record_bytes)
        if extra < 0:
            raise ValueError(f"record_bytes must be >= 0, got {record_bytes!r}")
        _check_batch(first, payloads)
        fit = 0
        for payload in payloads[:self._capacity - len(self._records)]:
            if len(payload) + extra > budget:
                break
            budget -= len(payload) + extra
            fit += 1
        if fit:
            self._records.extend((first + i, payload, enqueued, 0) for i, payload in enumerate(payloads[:fit]))
            self._added(sum(map(len, payloads[:fit])), fit)
        return fit

    def pop(self) -> bytes:
        if not self._records:
            raise IndexError("pop from an empty ring buffer")
        payload = self._records.popleft()[1]
        self._nbytes -= len(payload)
        if self._pool is not None:
            self._pool._add(-len(payload), -1)
        return payload

    def pop_record(self) -> tuple[int, int, int, bytes]:
        if not self._records:
            raise IndexError("pop from an empty ring buffer")
        offset, payload, enqueued_at, deliveries = self._records.popleft()
        self._nbytes -= len(payload)
        if self._pool is not None:
            self._pool._add(-len(payload), -1)
        return offset, enqueued_at, deliveries, payload

    def peek(self) -> bytes:
        if not self._records:
            raise IndexError("peek at an empty ring buffer")
        return self._records[0][1]

    @property
    def head_offset(self) -> int:
        if not self._records:
            raise IndexError("head_offset of an empty ring buffer")
        return self._records[0][0]

    @property
    def head_enqueued_at(self) -> int:
        if not self._records:
            raise IndexError("head_enqueued_at of an empty ring buffer")
        return self._records[0][2]

    @property
    def head_deliveries(self) -> int:
        if not self._records:
            raise IndexError("head_deliveries of an empty ring buffer")
        return self._records[0][3]

    def pop_many(self, max_count: int) -> tuple[numpy.ndarray, list[bytes], numpy.ndarray, numpy.ndarray]:
        wanted = index(max_count)
        if wanted < 0:
            raise ValueError(f"max_count must be >= 0, got {max_count!r}")
        count = min(wanted, len(self._records))
        if count == 0:
            return (
                numpy.empty(0, dtype=numpy.int64),
                [],
                numpy.empty(0, dtype=numpy.int64),
                numpy.empty(0, dtype=numpy.uint16),
            )
        popleft = self._records.popleft
        offsets, payloads, enqueued, deliveries = zip(*[popleft() for _ in range(count)])
        self._added(-sum(map(len, payloads)), -count)
        return (
            numpy.array(offsets, dtype=numpy.int64),
            list(payloads),
            numpy.array(enqueued, dtype=numpy.int64),
            numpy.array(deliveries, dtype=numpy.uint16),
        )

    def clear(self) -> None:
        self._added(-self._nbytes, -len(self._records))
        self._records.clear()

    def __del__(self) -> None:
        # As the compiled buffer does when it is freed: what it held leaves its pool.
        pool = getattr(self, "_pool", None)  # None too if __init__ raised
        if pool is not None:
            pool._add(-self._nbytes, -len(self._records))
