"""The ring buffer of message records: the compiled module and its pure-Python twin, run through the same bodies."""

import collections
import copy
import gc
import os
import pickle
import random
import sys

import numpy
import pytest

import shoalmq._native as native
from shoalmq._native import ring_py
from shoalmq._native._errors import RingFull

IMPLEMENTATIONS = [pytest.param(native.ring, id="native"), pytest.param(ring_py, id="pure")]

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
T0 = 1_763_800_000_000  # an enqueued_at, in milliseconds since the epoch
#: For tests of what only the compiled version does (its arrays), skipped when the suite runs on the twins.
compiled_only = pytest.mark.skipif(native.PURE_PYTHON, reason="suite asked to run against the pure-Python twins")


def drain(ring) -> list[tuple[int, bytes, int, int]]:
    """Pop every record, one at a time, reading its fields before each pop."""
    records = []
    while ring:
        records.append((ring.head_offset, ring.peek(), ring.head_enqueued_at, ring.head_deliveries))
        assert ring.pop() is records[-1][1]
    return records


def contents(ring) -> list[tuple[int, bytes, int, int]]:
    """Every record, oldest first, leaving the buffer as it was (pop_many, then push everything back)."""
    offsets, payloads, enqueued, deliveries = ring.pop_many(ring.capacity)
    records = list(zip(offsets.tolist(), payloads, enqueued.tolist(), deliveries.tolist()))
    for record in reversed(records):
        ring.push_front(*record)
    return records


def test_compiled_ring_is_loaded() -> None:
    if os.environ.get("SHOALMQ_PURE_PYTHON"):
        pytest.skip("suite asked to run against the pure-Python twins")
    assert native.ring.__file__.endswith(".so"), native.ring.__file__
    assert native.RingBuffer is native.ring.RingBuffer
    assert type(native.RingBuffer(2)).__module__ == "shoalmq._native.ring"


def test_both_implementations_raise_one_ringfull_class() -> None:
    assert native.RingFull is RingFull is native.ring.RingFull is ring_py.RingFull
    assert issubclass(RingFull, Exception)
    for impl in (native.ring, ring_py):
        ring = impl.RingBuffer(2)
        ring.push_many(0, [b"a", b"b"], T0)
        with pytest.raises(RingFull):
            ring.push(2, b"c", T0)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_capacity_must_be_a_power_of_two_of_at_least_two(impl) -> None:
    assert impl.RingBuffer().capacity == 16384 == impl.DEFAULT_CAPACITY
    for capacity in (2, 4, 8, 1024, 16384, 1 << 20):
        ring = impl.RingBuffer(capacity)
        assert (ring.capacity, ring.free, len(ring)) == (capacity, capacity, 0)
    assert impl.RingBuffer(capacity=8).capacity == 8
    assert impl.RingBuffer(numpy.int64(16)).capacity == 16
    for bad in (0, 1, 3, 6, 12, 1000, -2, -4, 2 * impl.MAX_CAPACITY, 1 << 64, 1 << 100, -(1 << 100), True):
        with pytest.raises(ValueError, match="capacity must be a power of two"):
            impl.RingBuffer(bad)
    for bad in (8.0, "8", None, b"8"):
        with pytest.raises(TypeError):
            impl.RingBuffer(bad)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_capacity_and_free_are_read_only(impl) -> None:
    ring = impl.RingBuffer(4)
    for name in ("capacity", "free", "nbytes", "head_offset", "head_enqueued_at", "head_deliveries"):
        with pytest.raises(AttributeError):
            setattr(ring, name, 2)
    assert ring.capacity == 4 and ring.free == 4


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_len_bool_free_and_repr(impl) -> None:
    ring = impl.RingBuffer(4)
    assert (len(ring), bool(ring), ring.free) == (0, False, 4)
    ring.push(1, b"a", T0)
    assert (len(ring), bool(ring), ring.free) == (1, True, 3)
    ring.push_many(2, [b"b", b"c", b"d"], T0)
    assert (len(ring), bool(ring), ring.free) == (4, True, 0)
    assert repr(ring) == "RingBuffer(capacity=4, len=4)"
    ring.pop()
    assert (len(ring), bool(ring), ring.free) == (3, True, 1)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_cannot_be_pickled_or_copied(impl) -> None:
    ring = impl.RingBuffer(4)
    ring.push(1, b"a", T0)
    for operation in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="cannot be pickled or copied"):
            operation(ring)
    assert drain(ring) == [(1, b"a", T0, 0)]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_fifo_order_with_every_field(impl) -> None:
    ring = impl.RingBuffer(16)
    expected = [(100 + i, f"message {i}".encode(), T0 + i * 7, i * 1000) for i in range(10)]
    for offset, payload, enqueued_at, deliveries in expected:
        ring.push(offset, payload, enqueued_at, deliveries)
    ring.push(110, b"default deliveries", T0)
    expected.append((110, b"default deliveries", T0, 0))
    assert drain(ring) == expected
    assert len(ring) == 0 and ring.free == 16


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_push_front_puts_records_back_at_the_head(impl) -> None:
    ring = impl.RingBuffer(8)
    ring.push(10, b"a", T0)
    ring.push(11, b"b", T0 + 1)
    ring.push_front(9, b"z", T0 - 1, 1)  # handed back: next to go out
    ring.push_front(8, b"y", T0 - 2, 65535)
    assert ring.peek() == b"y" and ring.head_offset == 8 and ring.head_deliveries == 65535
    ring.push(12, b"c", T0 + 2)
    assert drain(ring) == [
        (8, b"y", T0 - 2, 65535),
        (9, b"z", T0 - 1, 1),
        (10, b"a", T0, 0),
        (11, b"b", T0 + 1, 0),
        (12, b"c", T0 + 2, 0),
    ]
    # push_front onto an empty buffer, then a pop / push_front round trip as a redelivery does.
    ring.push_front(5, b"only", T0, 2)
    offset, deliveries, enqueued_at = ring.head_offset, ring.head_deliveries, ring.head_enqueued_at
    payload = ring.pop()
    ring.push_front(offset, payload, enqueued_at, deliveries + 1)
    assert drain(ring) == [(5, b"only", T0, 3)]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_full_buffer_refuses_single_pushes_and_is_unchanged(impl) -> None:
    ring = impl.RingBuffer(4)
    ring.push(0, b"a", T0, 1)
    ring.push_many(1, [b"b", b"c"], T0 + 1)
    ring.push_front(-1, b"z", T0 - 1, 2)
    before = contents(ring)
    with pytest.raises(RingFull, match="full"):
        ring.push(4, b"d", T0)
    with pytest.raises(RingFull, match="full"):
        ring.push_front(-2, b"y", T0, 0)
    assert (len(ring), ring.free) == (4, 0)
    assert contents(ring) == before == [(-1, b"z", T0 - 1, 2), (0, b"a", T0, 1), (1, b"b", T0 + 1, 0), (2, b"c", T0 + 1, 0)]
    ring.pop()
    ring.push(4, b"d", T0)  # room again
    assert len(ring) == 4


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_push_many_is_all_or_nothing(impl) -> None:
    ring = impl.RingBuffer(8)
    ring.push_many(0, [b"a", b"b", b"c"], T0)
    before = contents(ring)
    with pytest.raises(RingFull, match="room for 5 entries, not 6"):
        ring.push_many(3, [b"x"] * 6, T0)
    assert contents(ring) == before and ring.free == 5
    ring.push_many(3, [b"d", b"e", b"f", b"g", b"h"], T0 + 5)  # exactly the room left
    assert ring.free == 0
    ring.push_many(8, [], T0)  # nothing to push: fine even when full
    with pytest.raises(RingFull):
        ring.push_many(8, [b"i"], T0)
    records = drain(ring)
    assert [r[0] for r in records] == list(range(8))
    assert [r[1] for r in records] == [b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"h"]
    assert [r[2] for r in records] == [T0] * 3 + [T0 + 5] * 5
    assert [r[3] for r in records] == [0] * 8


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_push_many_takes_tuples_and_other_iterables(impl) -> None:
    ring = impl.RingBuffer(8)
    ring.push_many(0, (b"a", b"b"), T0)
    ring.push_many(2, (p for p in [b"c", b"d"]), T0)
    ring.push_many(first_offset=4, payloads=[b"e"], enqueued_at=T0)
    assert [r[:2] for r in drain(ring)] == [(0, b"a"), (1, b"b"), (2, b"c"), (3, b"d"), (4, b"e")]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_nbytes_is_the_sum_of_the_payload_lengths_held(impl) -> None:
    ring = impl.RingBuffer(8)
    assert ring.nbytes == 0
    ring.push(0, b"abc", T0)
    ring.push_front(1, b"", T0, 1)
    ring.push_many(2, [b"de", b"fghij"], T0)
    assert ring.nbytes == 10
    assert ring.push_upto(4, [b"1234", b"56789"], T0, 4) == 1
    assert ring.nbytes == 14
    for refused in (lambda: ring.push_many(5, [b"x"] * 4, T0), lambda: ring.push_many(5, [b"x", "y"], T0),
                    lambda: ring.push(5, bytearray(b"x"), T0), lambda: ring.push_upto(5, [b"x", 1], T0, 9)):
        with pytest.raises((RingFull, TypeError)):
            refused()
        assert ring.nbytes == 14
    ring.push_many(5, [b"k", b"lm", b"nop"], T0)  # full now
    with pytest.raises(RingFull):
        ring.push(8, b"q", T0)
    assert ring.nbytes == 20
    assert ring.pop() == b""  # the record pushed at the front
    assert ring.nbytes == 20
    assert ring.pop_record()[3] == b"abc"
    assert ring.nbytes == 17
    _, payloads, _, _ = ring.pop_many(2)
    assert payloads == [b"de", b"fghij"] and ring.nbytes == 10
    ring.push_many(8, [b"r" * 100, b"s" * 1000], T0)  # wraps around the end of the arrays
    assert ring.nbytes == 1110
    ring.clear()
    assert ring.nbytes == 0
    ring.push(9, b"t" * 70000, T0)
    assert ring.nbytes == 70000
    ring.pop_many(5)
    assert ring.nbytes == 0


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_push_upto_pushes_the_prefix_that_fits(impl) -> None:
    ring = impl.RingBuffer(8)
    batch = [b"a" * 10, b"b" * 20, b"c" * 30, b"d"]
    assert ring.push_upto(0, batch, T0, 29) == 1, "the second would make 30 bytes"
    assert ring.push_upto(1, batch[1:], T0 + 1, 50) == 2, "exactly 50"
    assert ring.push_upto(3, batch[3:], T0 + 2, 0) == 0
    assert ring.push_upto(3, batch[3:], T0 + 2, -5) == 0, "a negative budget counts as zero"
    assert ring.push_upto(3, [b"", b"", b"x"], T0 + 2, 0) == 2, "empty payloads cost nothing ..."
    assert ring.push_upto(5, [b"", b""], T0 + 2, 9, record_bytes=5) == 1, "... unless records have a cost"
    assert ring.push_upto(6, [b"", b"x"], T0 + 2, -(1 << 70)) == 1, "even below zero"
    assert ring.push_upto(7, [b"y"] * 5, T0 + 3, 1 << 70) == 1, "no more than the free entries"
    assert ring.free == 0
    assert ring.push_upto(8, [b"z"], T0, 100) == 0, "a full buffer takes none, without RingFull"
    assert ring.push_upto(8, [], T0, 0) == 0
    records = drain(ring)
    assert [r[0] for r in records] == list(range(8))
    assert [r[1] for r in records] == [b"a" * 10, b"b" * 20, b"c" * 30, b"", b"", b"", b"", b"y"]
    assert [r[2] for r in records] == [T0, T0 + 1, T0 + 1, T0 + 2, T0 + 2, T0 + 2, T0 + 2, T0 + 3]
    assert [r[3] for r in records] == [0] * 8
    assert ring.push_upto(first_offset=0, payloads=(p for p in [b"ab", b"cd"]), enqueued_at=T0, max_bytes=4,
                          record_bytes=0) == 2
    with pytest.raises(ValueError, match="record_bytes must be >= 0"):
        ring.push_upto(0, [b"a"], T0, 10, -1)
    with pytest.raises(TypeError):
        ring.push_upto(0, [b"a"], T0, 1.5)
    with pytest.raises(TypeError, match=r"payloads\[1\] must be bytes"):
        ring.push_upto(0, [b"a", "b"], T0, 0)  # every payload is checked, even those that would not fit
    assert len(ring) == 2 and ring.nbytes == 4


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_pool_totals_what_its_rings_hold(impl) -> None:
    pool = impl.RingPool(record_bytes=10)
    assert (pool.nbytes, pool.count, pool.cost, pool.peak, pool.record_bytes) == (0, 0, 0, 0, 10)
    a, b = impl.RingBuffer(8, pool), impl.RingBuffer(capacity=4, pool=pool)
    alone = impl.RingBuffer(4)
    assert a.pool is pool and b.pool is pool and alone.pool is None
    a.push(0, b"abc", T0)
    a.push_front(1, b"de", T0, 1)
    b.push_many(0, [b"x" * 100, b""], T0)
    assert b.push_upto(2, [b"y" * 5, b"z" * 50], T0, 30) == 1
    alone.push(0, b"not counted", T0)
    assert (pool.nbytes, pool.count) == (110, 5) and pool.cost == 110 + 5 * 10 == pool.peak
    with pytest.raises(RingFull):
        b.push_many(3, [b"1", b"2"], T0)
    with pytest.raises(TypeError):
        a.push_many(2, [b"ok", 3], T0)
    assert (pool.nbytes, pool.count) == (110, 5), "refused pushes count nothing"
    assert a.pop() == b"de" and a.pop_record()[3] == b"abc"
    assert (pool.nbytes, pool.count, pool.peak) == (105, 3, 160), "the peak stays"
    b.pop_many(2)
    assert (pool.nbytes, pool.count) == (5, 1)
    pool.reset_peak()
    assert pool.peak == pool.cost == 15
    a.push_many(2, [b"q" * 7] * 3, T0)
    b.clear()
    assert (pool.nbytes, pool.count, pool.peak) == (21, 3, 21 + 30 + 15)
    del a  # a buffer freed takes what it held out of its pool
    gc.collect()
    assert (pool.nbytes, pool.count, pool.cost) == (0, 0, 0)
    assert repr(pool) == "RingPool(record_bytes=10, count=0, nbytes=0)"
    for name in ("nbytes", "count", "cost", "peak", "record_bytes"):
        with pytest.raises(AttributeError):
            setattr(pool, name, 1)
    with pytest.raises(AttributeError):
        alone.pool = pool
    with pytest.raises(TypeError):
        pickle.dumps(pool)
    with pytest.raises(TypeError):
        copy.copy(pool)
    assert impl.RingPool().record_bytes == 0 and impl.MAX_RECORD_BYTES == 1 << 30
    for bad in (-1, (1 << 30) + 1, 1 << 70):
        with pytest.raises(ValueError, match="record_bytes must be in"):
            impl.RingPool(bad)
    for bad in (1.5, "1", None):
        with pytest.raises(TypeError):
            impl.RingPool(bad)
    with pytest.raises(TypeError, match="pool"):
        impl.RingBuffer(4, pool=5)
    other = ring_py if impl is native.ring else native.ring
    if other is not impl:  # (the same module when the suite runs on the twins)
        with pytest.raises(TypeError, match="pool"):
            impl.RingBuffer(4, pool=other.RingPool())


@compiled_only
def test_compiled_ring_allocates_its_arrays_lazily_and_frees_them_when_drained() -> None:
    ring = native.ring.RingBuffer(16384)
    empty = sys.getsizeof(ring)
    slot = 8 + 8 + 2 + 8  # offset, enqueued_at, deliveries, payload pointer
    assert empty < 200, "no arrays before the first push"
    ring.push(0, b"a", T0)
    assert sys.getsizeof(ring) == empty + 16 * slot
    ring.push_many(1, [b"b"] * 16, T0)
    assert sys.getsizeof(ring) == empty + 32 * slot, "doubled"
    ring.pop_many(17)
    assert sys.getsizeof(ring) == empty + 32 * slot, "small arrays are kept when the buffer drains"
    ring.push_many(0, [b"c"] * 1000, T0)
    assert sys.getsizeof(ring) == empty + 1024 * slot
    ring.pop_many(999)
    assert sys.getsizeof(ring) == empty + 1024 * slot
    ring.pop_record()
    assert sys.getsizeof(ring) == empty, "large arrays are freed when the buffer drains"
    ring.push_front(5, b"d", T0, 1)
    ring.push_many(6, [b"e"] * 100, T0)
    ring.pop()
    assert sys.getsizeof(ring) == empty + 128 * slot
    ring.clear()
    assert sys.getsizeof(ring) == empty
    small = native.ring.RingBuffer(4)
    small.push_many(0, [b"a"] * 4, T0)
    assert sys.getsizeof(small) == empty + 4 * slot, "never more slots than the capacity"


@compiled_only
def test_compiled_ring_grows_across_the_end_of_its_arrays() -> None:
    ring = native.ring.RingBuffer(1024)
    model: collections.deque[tuple[int, bytes, int, int]] = collections.deque()
    offset = 0
    for step in range(60):
        # Pop from the head (it moves into the arrays), push at the front and the tail (the tail wraps around the
        # end of the arrays), then push a batch that does not fit the arrays: they grow with the records wrapped.
        for _ in range(min(len(model), 3 + step % 5)):
            assert ring.pop() is model.popleft()[1], step
        if step % 3 == 0:
            ring.push_front(-step, bytes([step]), T0 - step, step)
            model.appendleft((-step, bytes([step]), T0 - step, step))
        batch = [os.urandom(step % 9) for _ in range(min(len(model) + 5, ring.free))]
        ring.push_many(offset, batch, T0 + step)
        model.extend((offset + i, p, T0 + step, 0) for i, p in enumerate(batch))
        offset += len(batch)
        assert (len(ring), ring.nbytes) == (len(model), sum(len(r[1]) for r in model)), step
    assert sys.getsizeof(ring) > sys.getsizeof(native.ring.RingBuffer(1024)) + 512 * 26
    assert drain(ring) == list(model)


@compiled_only
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_empty_compiled_rings_cost_no_resident_memory() -> None:
    def rss_anon_kib() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))

    before = rss_anon_kib()
    rings = [native.ring.RingBuffer(16384) for _ in range(2000)]
    grown = rss_anon_kib() - before
    # Arrays for 16,384 slots would be 416 KiB a ring (their calloc'd part touched: ~140 KiB resident each).
    assert grown < 2000 * 2, f"{grown} KiB for {len(rings)} empty rings"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_an_empty_buffer_has_no_head(impl) -> None:
    ring = impl.RingBuffer(4)
    for _ in range(2):  # new, then emptied
        with pytest.raises(IndexError):
            ring.pop()
        with pytest.raises(IndexError):
            ring.peek()
        for name in ("head_offset", "head_enqueued_at", "head_deliveries"):
            with pytest.raises(IndexError):
                getattr(ring, name)
        ring.push(1, b"a", T0)
        ring.pop()
    assert len(ring) == 0


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_wraps_around_many_times(impl) -> None:
    ring = impl.RingBuffer(4)
    model: collections.deque[tuple[int, bytes, int, int]] = collections.deque()
    next_offset = 0
    for cycle in range(200):  # the head goes round the 4 slots ~100 times, both ways
        for _ in range(3):
            record = (next_offset, str(next_offset).encode(), T0 + next_offset, next_offset % 7)
            ring.push(*record)
            model.append(record)
            next_offset += 1
        for _ in range(2):
            expected = model.popleft()
            assert (ring.head_offset, ring.head_enqueued_at, ring.head_deliveries) == (
                expected[0],
                expected[2],
                expected[3],
            )
            assert ring.pop() is expected[1]
        if cycle % 3 == 0:
            record = (-cycle, b"back", T0, cycle)
            ring.push_front(*record)
            model.appendleft(record)
        offsets, payloads, enqueued, deliveries = ring.pop_many(len(ring) - 1)
        expected = [model.popleft() for _ in range(len(offsets))]
        assert list(zip(offsets.tolist(), payloads, enqueued.tolist(), deliveries.tolist())) == expected
        assert len(ring) == len(model) == 1
    assert drain(ring) == list(model)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_pop_many_across_the_end_of_the_arrays(impl) -> None:
    ring = impl.RingBuffer(8)
    ring.push_many(0, [b"%d" % i for i in range(6)], T0)
    ring.pop_many(5)  # head now at slot 5 (offset 5)
    ring.push_many(6, [b"%d" % i for i in range(6, 12)], T0 + 1)  # slots 6, 7, then 0..3
    ring.push_front(4, b"four", T0 - 4, 9)  # slot 4: the records run 4..7, then 0..3
    assert len(ring) == 8 and ring.free == 0
    offsets, payloads, enqueued, deliveries = ring.pop_many(100)
    assert offsets.tolist() == list(range(4, 12))
    assert payloads == [b"four"] + [b"%d" % i for i in range(5, 12)]
    assert enqueued.tolist() == [T0 - 4, T0] + [T0 + 1] * 6
    assert deliveries.tolist() == [9] + [0] * 7
    assert len(ring) == 0


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_pop_record_gives_the_head_record_whole(impl) -> None:
    ring = impl.RingBuffer(4)
    with pytest.raises(IndexError, match="pop from an empty ring buffer"):
        ring.pop_record()
    payload = b"head" * 10
    ring.push(INT64_MAX, payload, INT64_MIN, 65535)
    ring.push_many(5, [b"a", b"b"], T0)
    ring.push_front(4, b"front", T0 - 1, 3)
    before = sys.getrefcount(payload)
    assert ring.pop_record() == (4, T0 - 1, 3, b"front")
    record = ring.pop_record()
    assert record == (INT64_MAX, INT64_MIN, 65535, payload) and record[3] is payload
    assert sys.getrefcount(payload) == before  # the ring's reference went to the tuple
    del record
    assert sys.getrefcount(payload) == before - 1
    assert [ring.pop_record() for _ in range(2)] == [(5, T0, 0, b"a"), (6, T0, 0, b"b")]
    assert len(ring) == 0 and ring.free == 4


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_pop_many_partial_empty_and_all(impl) -> None:
    ring = impl.RingBuffer(16)

    def check_types(result, n: int) -> None:
        offsets, payloads, enqueued, deliveries = result
        assert isinstance(payloads, list) and len(payloads) == n
        for array, dtype in ((offsets, numpy.int64), (enqueued, numpy.int64), (deliveries, numpy.uint16)):
            assert isinstance(array, numpy.ndarray)
            assert array.dtype == numpy.dtype(dtype) and array.shape == (n,)
            assert array.flags.c_contiguous and array.flags.writeable

    check_types(ring.pop_many(5), 0)  # empty buffer
    ring.push_many(INT64_MAX - 9, [b"p%d" % i for i in range(10)], INT64_MIN)
    ring.push(INT64_MIN, b"last", INT64_MAX, 65535)
    check_types(ring.pop_many(0), 0)
    assert len(ring) == 11
    result = ring.pop_many(4)  # partial
    check_types(result, 4)
    assert result[0].tolist() == [INT64_MAX - 9 + i for i in range(4)]
    assert result[1] == [b"p0", b"p1", b"p2", b"p3"]
    assert result[2].tolist() == [INT64_MIN] * 4
    result[0][:] = 0  # the arrays are the caller's own
    result = ring.pop_many(1 << 70)  # all that is left
    check_types(result, 7)
    assert result[0].tolist() == [INT64_MAX - 9 + i for i in range(4, 10)] + [INT64_MIN]
    assert result[2].tolist() == [INT64_MIN] * 6 + [INT64_MAX]
    assert result[3].tolist() == [0] * 6 + [65535]
    assert len(ring) == 0
    check_types(ring.pop_many(3), 0)
    for bad in (-1, -(1 << 70)):
        with pytest.raises(ValueError, match="max_count"):
            ring.pop_many(bad)
    with pytest.raises(TypeError):
        ring.pop_many(2.0)
    assert ring.pop_many(max_count=numpy.int32(2))[0].shape == (0,)


class BytesSubclass(bytes):
    pass


NOT_BYTES = ["text", bytearray(b"x"), memoryview(b"x"), None, 5, BytesSubclass(b"x"), [b"x"]]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_payloads_must_be_bytes(impl) -> None:
    ring = impl.RingBuffer(4)
    ring.push(0, b"keep", T0)
    for bad in NOT_BYTES:
        with pytest.raises(TypeError, match="must be bytes"):
            ring.push(1, bad, T0)
        with pytest.raises(TypeError, match="must be bytes"):
            ring.push_front(1, bad, T0, 0)
        with pytest.raises(TypeError, match=r"payloads\[1\] must be bytes"):
            ring.push_many(1, [b"ok", bad, b"ok"], T0)
    for bad in (5, None, 2.5):
        with pytest.raises(TypeError, match="payloads must be an iterable of bytes"):
            ring.push_many(1, bad, T0)
    with pytest.raises(TypeError):  # iterable, but of ints
        ring.push_many(1, b"abc", T0)
    assert drain(ring) == [(0, b"keep", T0, 0)]  # nothing else got in


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_integer_fields_are_int64_and_uint16(impl) -> None:
    ring = impl.RingBuffer(16)
    ring.push(INT64_MIN, b"a", INT64_MAX, 0)
    ring.push(INT64_MAX, b"b", INT64_MIN, 65535)
    ring.push(numpy.int64(7), b"c", numpy.uint32(5), numpy.uint16(3))
    ring.push(True, b"d", False, True)
    assert drain(ring) == [
        (INT64_MIN, b"a", INT64_MAX, 0),
        (INT64_MAX, b"b", INT64_MIN, 65535),
        (7, b"c", 5, 3),
        (1, b"d", 0, 1),
    ]
    ring.push_many(INT64_MAX, [b"one"], T0)  # the last offset is exactly INT64_MAX
    assert ring.pop_many(1)[0].tolist() == [INT64_MAX]
    for push in (ring.push, ring.push_front):
        for bad in (-1, 65536, 1 << 64, -(1 << 70)):
            with pytest.raises(ValueError, match=r"deliveries must be in 0\.\.65535") as info:
                push(1, b"x", T0, bad)
            assert type(info.value) is ValueError  # not OverflowError
        for bad in (INT64_MAX + 1, INT64_MIN - 1, 1 << 100):
            with pytest.raises(ValueError, match="offset must fit in a signed 64-bit integer") as info:
                push(bad, b"x", T0, 0)
            assert type(info.value) is ValueError
            with pytest.raises(ValueError, match="enqueued_at must fit in a signed 64-bit integer"):
                push(1, b"x", bad, 0)
        for bad in (1.0, "1", None, b"1"):
            with pytest.raises(TypeError):
                push(bad, b"x", T0, 0)
            with pytest.raises(TypeError):
                push(1, b"x", bad, 0)
            with pytest.raises(TypeError):
                push(1, b"x", T0, bad)
    with pytest.raises(ValueError, match="do not fit in a signed 64-bit integer"):
        ring.push_many(INT64_MAX - 1, [b"a", b"b", b"c"], T0)
    with pytest.raises(ValueError, match="first_offset must fit"):
        ring.push_many(INT64_MAX + 1, [b"a"], T0)
    with pytest.raises(ValueError, match="enqueued_at must fit"):
        ring.push_many(0, [b"a"], INT64_MIN - 1)
    with pytest.raises(TypeError):
        ring.push_many(0.0, [b"a"], T0)
    assert len(ring) == 0


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_bad_arguments_are_reported_before_a_full_buffer(impl) -> None:
    ring = impl.RingBuffer(2)
    ring.push_many(0, [b"a", b"b"], T0)
    with pytest.raises(TypeError):
        ring.push(2, "not bytes", T0)
    with pytest.raises(ValueError):
        ring.push_front(2, b"c", T0, -1)
    with pytest.raises(TypeError):
        ring.push_many(2, [b"c", None], T0)
    with pytest.raises(RingFull):
        ring.push_many(2, [b"c"], T0)
    assert contents(ring) == [(0, b"a", T0, 0), (1, b"b", T0, 0)]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_arguments_by_keyword(impl) -> None:
    ring = impl.RingBuffer(capacity=4)
    ring.push(offset=1, payload=b"a", enqueued_at=T0, deliveries=2)
    ring.push_front(offset=0, payload=b"z", enqueued_at=T0, deliveries=3)
    ring.push(2, b"b", enqueued_at=T0)
    assert drain(ring) == [(0, b"z", T0, 3), (1, b"a", T0, 2), (2, b"b", T0, 0)]
    with pytest.raises(TypeError):
        ring.push(1, b"a", T0, colour=1)
    with pytest.raises(TypeError):
        ring.push_front(1, b"a", T0)  # deliveries is required at the head


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_clear(impl) -> None:
    ring = impl.RingBuffer(4)
    ring.clear()
    ring.push_many(0, [b"a", b"b", b"c"], T0)
    ring.pop()
    ring.push_many(3, [b"d", b"e"], T0)  # wrapped
    ring.clear()
    assert (len(ring), bool(ring), ring.free) == (0, False, 4)
    with pytest.raises(IndexError):
        ring.peek()
    ring.push_many(10, [b"w", b"x", b"y", b"z"], T0)
    assert [r[:2] for r in drain(ring)] == [(10, b"w"), (11, b"x"), (12, b"y"), (13, b"z")]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_payload_references_are_taken_and_dropped(impl) -> None:
    payload = os.urandom(64)  # a fresh object, not a shared constant
    base = sys.getrefcount(payload)
    ring = impl.RingBuffer(8)

    def held() -> int:
        return sys.getrefcount(payload) - base

    # Each count is taken in a statement of its own: pytest's assertion rewriting keeps the operands of an
    # `assert` alive while it runs, which would add references of its own.
    ring.push(0, payload, T0)
    ring.push_front(1, payload, T0, 1)
    ring.push_many(2, [payload, payload], T0)
    assert held() == 4
    peeked = ring.peek()
    assert peeked is payload
    del peeked
    assert held() == 4
    popped = ring.pop()
    assert popped is payload
    count = held()
    assert count == 4  # 3 in the ring + `popped`
    del popped
    assert held() == 3
    ring.pop()  # result discarded
    assert held() == 2
    offsets, payloads, enqueued, deliveries = ring.pop_many(1)
    assert len(payloads) == 1
    assert payloads[0] is payload
    count = held()
    assert count == 2  # 1 in the ring + the list's
    del payloads
    assert held() == 1
    ring.clear()
    assert held() == 0
    for _ in range(3):  # full, and refused pushes take no reference
        ring.push_many(0, [payload] * 8, T0)
        with pytest.raises(RingFull):
            ring.push(9, payload, T0)
        with pytest.raises(RingFull):
            ring.push_front(9, payload, T0, 0)
        with pytest.raises(RingFull):
            ring.push_many(9, [payload], T0)
        with pytest.raises(TypeError):
            ring.push_many(9, [payload, "x"], T0)
        assert held() == 8
        ring.pop_many(8)
        assert held() == 0
    assert ring.push_upto(0, [payload] * 9, T0, 1 << 20) == 8
    assert held() == 8
    assert ring.push_upto(8, [payload], T0, 1 << 20) == 0
    assert held() == 8
    ring.clear()
    ring.push_many(0, [payload] * 5, T0)
    assert held() == 5
    del ring  # deallocating drops what is still held
    assert held() == 0
    big = impl.RingBuffer(1024)  # growing the arrays moves the references, it does not copy them
    for i in range(300):
        big.push(i, payload, T0)
        if i % 7 == 0:
            big.pop()
    count = held()
    assert count == len(big)
    big.pop_many(1024)  # drained: its arrays are freed
    assert held() == 0


def test_compiled_ring_does_not_leak_payloads_over_many_operations() -> None:
    payload = os.urandom(32)
    base = sys.getrefcount(payload)
    ring = native.ring.RingBuffer(16)
    for i in range(20_000):
        ring.push(i, payload, T0)
        if i % 3 == 0:
            ring.push_front(i, payload, T0, 1)
        if i % 5 == 0:
            ring.push_many(i, [payload, payload], T0)
        while ring.free < 4:
            if i % 2:
                ring.pop()
            else:
                ring.pop_many(3)
        if i % 97 == 0:
            ring.clear()
    ring.clear()
    assert sys.getrefcount(payload) == base


def test_implementations_raise_the_same_exceptions_for_the_same_input() -> None:
    def outcome(impl, call):
        ring = impl.RingBuffer(4, impl.RingPool())
        ring.push_many(0, [b"a", b"b", b"c"], T0)
        try:
            call(ring)
        except Exception as exc:  # noqa: BLE001 - comparing whatever is raised
            return type(exc), str(exc), len(ring)
        return None, None, len(ring)

    calls = {
        "push deliveries -1": lambda r: r.push(0, b"x", T0, -1),
        "push deliveries 2**64": lambda r: r.push(0, b"x", T0, 1 << 64),
        "push_front deliveries 65536": lambda r: r.push_front(0, b"x", T0, 65536),
        "push offset 2**63": lambda r: r.push(1 << 63, b"x", T0),
        "push enqueued_at -2**63-1": lambda r: r.push(0, b"x", INT64_MIN - 1),
        "push payload str": lambda r: r.push(0, "x", T0),
        "push payload bytearray": lambda r: r.push(0, bytearray(b"x"), T0),
        "push offset float": lambda r: r.push(1.5, b"x", T0),
        "push offset None": lambda r: r.push(None, b"x", T0),
        "push twice": lambda r: (r.push(3, b"d", T0), r.push(4, b"e", T0)),
        "push_many too many": lambda r: r.push_many(3, [b"d", b"e"], T0),
        "push_many bad item": lambda r: r.push_many(3, [b"d", 1], T0),
        "push_many not iterable": lambda r: r.push_many(3, 7, T0),
        "push_many offset overflow": lambda r: r.push_many(INT64_MAX, [b"d", b"e"], T0),
        "push_upto bad item": lambda r: r.push_upto(3, [b"d", 1], T0, 0),
        "push_upto not iterable": lambda r: r.push_upto(3, 7, T0, 0),
        "push_upto offset overflow": lambda r: r.push_upto(INT64_MAX, [b"d", b"e"], T0, 0),
        "push_upto max_bytes float": lambda r: r.push_upto(3, [b"d"], T0, 1.5),
        "push_upto max_bytes None": lambda r: r.push_upto(3, [b"d"], T0, None),
        "push_upto record_bytes -1": lambda r: r.push_upto(3, [b"d"], T0, 9, -1),
        "push_upto record_bytes str": lambda r: r.push_upto(3, [b"d"], T0, 9, "1"),
        "pop_many -1": lambda r: r.pop_many(-1),
        "pop_many str": lambda r: r.pop_many("1"),
        "capacity 3": lambda r: type(r)(3),
        "capacity 2**64": lambda r: type(r)(1 << 64),
        "pop on empty": lambda r: (r.clear(), r.pop()),
        "pool record_bytes -1": lambda r: type(r.pool)(-1),
        "pool record_bytes 2**31": lambda r: type(r.pool)(1 << 31),
        "pool record_bytes float": lambda r: type(r.pool)(1.5),
        "pool of the wrong type": lambda r: type(r)(4, pool=5),
        "peek on empty": lambda r: (r.clear(), r.peek()),
        "head_offset on empty": lambda r: (r.clear(), r.head_offset),
    }
    for name, call in calls.items():
        native_outcome, pure_outcome = outcome(native.ring, call), outcome(ring_py, call)
        assert native_outcome == pure_outcome, name
        assert native_outcome[0] is not None, name


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_random_operations_match_a_deque_model(impl, seed: int) -> None:
    rng = random.Random(seed)
    # Small capacities wrap around often; 128 and 256 also grow (and free) the compiled version's arrays.
    capacity = [2, 4, 8, 16, 128, 256][seed - 1]
    pool = impl.RingPool(record_bytes=seed)
    ring = impl.RingBuffer(capacity, pool)
    model: collections.deque[tuple[int, bytes, int, int]] = collections.deque()
    payloads = [os.urandom(rng.randrange(0, 20)) for _ in range(50)]
    interesting = [0, 1, -1, INT64_MIN, INT64_MAX, T0]

    def random_int64() -> int:
        return rng.choice(interesting) if rng.random() < 0.2 else rng.randrange(INT64_MIN, INT64_MAX + 1)

    for step in range(3000):
        op = rng.random()
        if op < 0.25:
            record = (random_int64(), rng.choice(payloads), random_int64(), rng.randrange(0, 65536))
            if len(model) == capacity:
                with pytest.raises(RingFull):
                    ring.push(*record)
            else:
                ring.push(*record)
                model.append(record)
        elif op < 0.35:
            record = (random_int64(), rng.choice(payloads), random_int64(), rng.choice([0, 1, 65535, rng.randrange(65536)]))
            if len(model) == capacity:
                with pytest.raises(RingFull):
                    ring.push_front(*record)
            else:
                ring.push_front(*record)
                model.appendleft(record)
        elif op < 0.40:
            batch = [rng.choice(payloads) for _ in range(rng.randrange(0, capacity + 2))]
            first, enqueued_at, max_bytes = rng.randrange(-(1 << 40), 1 << 40), random_int64(), rng.randrange(-5, 200)
            record_bytes = rng.choice([0, 0, 1, 7])
            fit, budget = 0, max(max_bytes, 0)
            for payload in batch[:capacity - len(model)]:
                if len(payload) + record_bytes > budget:
                    break
                budget -= len(payload) + record_bytes
                fit += 1
            assert ring.push_upto(first, batch, enqueued_at, max_bytes, record_bytes) == fit, step
            model.extend((first + i, p, enqueued_at, 0) for i, p in enumerate(batch[:fit]))
        elif op < 0.45:
            batch = [rng.choice(payloads) for _ in range(rng.randrange(0, capacity + 2))]
            first, enqueued_at = rng.randrange(-(1 << 40), 1 << 40), random_int64()
            if len(batch) > capacity - len(model):
                with pytest.raises(RingFull):
                    ring.push_many(first, batch, enqueued_at)
            else:
                ring.push_many(first, batch, enqueued_at)
                model.extend((first + i, p, enqueued_at, 0) for i, p in enumerate(batch))
        elif op < 0.65:
            if not model:
                with pytest.raises(IndexError):
                    ring.pop()
            else:
                expected = model.popleft()
                assert (ring.head_offset, ring.head_enqueued_at, ring.head_deliveries) == (
                    expected[0],
                    expected[2],
                    expected[3],
                ), step
                assert ring.pop() is expected[1], step
        elif op < 0.72:
            if not model:
                with pytest.raises(IndexError):
                    ring.peek()
                with pytest.raises(IndexError):
                    ring.head_deliveries
            else:
                assert ring.peek() is model[0][1], step
                assert ring.head_offset == model[0][0], step
        elif op < 0.97:
            n = rng.randrange(0, capacity + 3)
            offsets, got, enqueued, deliveries = ring.pop_many(n)
            expected = [model.popleft() for _ in range(min(n, len(model)))]
            assert offsets.dtype == numpy.int64 and enqueued.dtype == numpy.int64 and deliveries.dtype == numpy.uint16
            assert list(zip(offsets.tolist(), got, enqueued.tolist(), deliveries.tolist())) == expected, step
            assert all(a is b for a, b in zip(got, (r[1] for r in expected))), step
        else:
            ring.clear()
            model.clear()
        assert (len(ring), ring.free, bool(ring)) == (len(model), capacity - len(model), bool(model)), step
        assert ring.nbytes == sum(len(r[1]) for r in model) == pool.nbytes, step
        assert pool.count == len(model) and pool.cost == pool.nbytes + seed * len(model) <= pool.peak, step
    assert drain(ring) == list(model)
