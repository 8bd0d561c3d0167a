"""A bounded ring buffer (a deque) of message records: a partition's in-memory queue of ready messages.

``ring.pyx`` (compiled) and ``ring_py.py`` (pure Python) implement this same interface and raise the same
exception types for the same input. Arguments are checked first (``TypeError``, ``ValueError``), room second
(``RingFull``); a call that raises leaves the buffer unchanged.
"""

from collections.abc import Iterable
from typing import Final, SupportsIndex, final

import numpy
import numpy.typing

from ._errors import RingFull as RingFull

DEFAULT_CAPACITY: Final[int]
"""16384."""
MAX_CAPACITY: Final[int]
"""2**30: the largest capacity accepted."""
MAX_DELIVERIES: Final[int]
"""65535: ``deliveries`` is stored as an unsigned 16-bit integer."""
MAX_RECORD_BYTES: Final[int]
"""2**30: the largest ``record_bytes`` of a ``RingPool``."""

@final
class RingPool:
    """Totals over every ``RingBuffer`` created with this pool (``RingBuffer(capacity, pool)``), kept by the
    buffers' own operations: the records they hold together, and the bytes of their payloads. A node's partitions
    share one, so that their common byte budget is read in O(1) with no bookkeeping by the caller.

    ``record_bytes`` is what each record is counted for besides its payload (its share of the buffer's arrays
    and of its payload's object header, say), in ``cost``. A buffer that is cleared or freed takes what it held
    out of the totals. Cannot be pickled or copied.
    """

    def __init__(self, record_bytes: SupportsIndex = 0) -> None:
        """An empty pool. ``ValueError`` unless ``0 <= record_bytes <= MAX_RECORD_BYTES``."""
    @property
    def nbytes(self) -> int:
        """The sum of the lengths of the payloads its buffers hold (read-only)."""
    @property
    def count(self) -> int:
        """The number of records its buffers hold (read-only)."""
    @property
    def record_bytes(self) -> int:
        """What a record counts for in ``cost`` besides its payload (read-only)."""
    @property
    def cost(self) -> int:
        """``nbytes + record_bytes * count`` (read-only)."""
    @property
    def peak(self) -> int:
        """The highest ``cost`` since the pool was made or ``reset_peak`` was called (read-only)."""
    def reset_peak(self) -> None:
        """Start ``peak`` again from the current ``cost``."""

@final
class RingBuffer:
    """A bounded FIFO of message records that also takes records back at the head.

    A record is ``offset`` (int64), ``payload`` (``bytes``), ``enqueued_at`` (int64, milliseconds since the
    epoch) and ``deliveries`` (0..65535, how many times the message was delivered). New messages are pushed at
    the tail, consumers pop from the head, and a message handed back for redelivery is pushed at the head.

    ``nbytes`` is the sum of the lengths of the payloads held, kept by every operation (the caller's memory
    accounting reads it in O(1)). The compiled version allocates its arrays lazily: an empty buffer owns none,
    they grow by doubling up to ``capacity`` slots as records come, and they are freed again when the buffer
    drains empty (arrays of more than 512 slots) or is cleared; ``sys.getsizeof`` counts them. So a buffer costs
    memory for the records it holds, not for its capacity.

    Every single operation is O(1) (amortized: a push that grows the arrays copies the records). Integer
    arguments take anything with ``__index__`` (``int``, ``bool``, numpy integers); anything else (``float``,
    ``str``, ``None``) is a ``TypeError``. An offset or ``enqueued_at`` outside the signed 64-bit range and a
    ``deliveries`` outside 0..65535 are a ``ValueError``. A payload must be exactly ``bytes`` (not ``bytearray``,
    ``memoryview``, ``str`` or a ``bytes`` subclass): ``TypeError``.
    """

    def __init__(self, capacity: SupportsIndex = 16384, pool: RingPool | None = None) -> None:
        """An empty buffer of ``capacity`` records (no memory is allocated for them yet), counted in ``pool``'s
        totals if given (``TypeError`` if it is not a ``RingPool`` of the same implementation).

        ``ValueError`` unless ``capacity`` is a power of two between 2 and ``MAX_CAPACITY``. A push that needs
        larger arrays raises ``MemoryError`` (compiled version) if they cannot be allocated, leaving the buffer
        unchanged.
        """
    @property
    def capacity(self) -> int:
        """How many records the buffer holds when full (read-only)."""
    @property
    def free(self) -> int:
        """``capacity - len(self)``: how many more records fit (read-only)."""
    @property
    def nbytes(self) -> int:
        """The sum of the lengths of the payloads held (read-only); 0 when empty."""
    @property
    def pool(self) -> RingPool | None:
        """The pool the buffer was created with (read-only)."""
    def __len__(self) -> int:
        """The number of records held."""
    def __bool__(self) -> bool:
        """Whether any record is held."""
    def push(
        self, offset: SupportsIndex, payload: bytes, enqueued_at: SupportsIndex, deliveries: SupportsIndex = 0
    ) -> None:
        """Append a record at the tail. ``RingFull`` if the buffer is full."""
    def push_front(
        self, offset: SupportsIndex, payload: bytes, enqueued_at: SupportsIndex, deliveries: SupportsIndex
    ) -> None:
        """Insert a record at the head, to be popped next (a message handed back for redelivery).

        ``RingFull`` if the buffer is full.
        """
    def push_many(self, first_offset: SupportsIndex, payloads: Iterable[bytes], enqueued_at: SupportsIndex) -> None:
        """Append one record per payload at the tail, all or nothing.

        The records get offsets ``first_offset``, ``first_offset + 1``, ..., the same ``enqueued_at`` and
        ``deliveries`` 0. A list or tuple is read as is; any other iterable is first turned into a list.
        ``TypeError`` (nothing pushed) if ``payloads`` is not iterable or one of them is not ``bytes``;
        ``ValueError`` if the last offset would not fit in int64; ``RingFull`` (nothing pushed) if
        ``len(payloads) > free``. An empty ``payloads`` does nothing, even on a full buffer.
        """
    def push_upto(
        self,
        first_offset: SupportsIndex,
        payloads: Iterable[bytes],
        enqueued_at: SupportsIndex,
        max_bytes: SupportsIndex,
        record_bytes: SupportsIndex = 0,
    ) -> int:
        """Append the longest prefix of ``payloads`` that fits, as ``push_many`` would; return its length.

        A prefix fits if it has at most ``free`` records and each record costing ``len(payload) + record_bytes``,
        they cost at most ``max_bytes`` together (a ``max_bytes`` below zero counts as zero).
        Never raises ``RingFull``: what does not fit is not pushed. The arguments are checked as by
        ``push_many``, all payloads included, before anything is pushed; ``ValueError`` if ``record_bytes < 0``.
        """
    def pop(self) -> bytes:
        """Remove the head record and return its payload. ``IndexError`` if the buffer is empty."""
    def pop_record(self) -> tuple[int, int, int, bytes]:
        """Remove the head record and return ``(offset, enqueued_at, deliveries, payload)``: one call for what
        ``head_offset``, ``head_enqueued_at``, ``head_deliveries`` and ``pop`` give. ``IndexError`` if empty."""
    def peek(self) -> bytes:
        """The head record's payload, left in place. ``IndexError`` if the buffer is empty."""
    @property
    def head_offset(self) -> int:
        """The head record's offset (read-only). ``IndexError`` if the buffer is empty."""
    @property
    def head_enqueued_at(self) -> int:
        """The head record's ``enqueued_at`` (read-only). ``IndexError`` if the buffer is empty."""
    @property
    def head_deliveries(self) -> int:
        """The head record's delivery count (read-only). ``IndexError`` if the buffer is empty."""
    def pop_many(
        self, max_count: SupportsIndex
    ) -> tuple[
        numpy.typing.NDArray[numpy.int64],
        list[bytes],
        numpy.typing.NDArray[numpy.int64],
        numpy.typing.NDArray[numpy.uint16],
    ]:
        """Remove up to ``max_count`` records from the head, oldest first.

        Returns ``(offsets, payloads, enqueued_at, deliveries)``: fresh, writable, one-dimensional arrays of
        dtype int64, int64 and uint16, and a list of payloads, all of length ``min(max_count, len(self))``
        (zero when the buffer is empty). ``ValueError`` if ``max_count < 0``.
        """
    def clear(self) -> None:
        """Remove every record (dropping the buffer's references to their payloads)."""
