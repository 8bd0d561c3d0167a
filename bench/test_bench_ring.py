"""The ring buffer of message records, compiled vs pure Python (run: make bench).

Every ready message goes through a partition's ring once (a push when it is stored, a pop when it is delivered),
so the single push+pop pair is the figure that matters; the batch pair is the path of a bulk load or redelivery.

The single-pair benchmarks run PAIRS pairs inside one benchmarked call, so that pytest-benchmark's own per-call
overhead (~0.3 µs here) does not swamp a ~0.1 µs operation: with PAIRS = 1000, **the time per round in µs is the
time per pair in ns**. The deque row is a reference, not a contender: two calls of C methods of a built-in type
from the same Python loop, storing nothing but the payload, which is about the floor for any ring called from
Python one message at a time.
"""

import collections

import pytest

from shoalmq._native import ring, ring_py

PAIRS = 1000  # single push+pop pairs per round: µs per round == ns per pair
BATCH = 500  # payloads per push_many / pop_many round
T0 = 1_763_800_000_000  # enqueued_at, ms since the epoch
PAYLOAD = bytes(range(100))
BATCH_PAYLOADS = [bytes([i % 256]) * 100 for i in range(BATCH)]

IMPLEMENTATIONS = [pytest.param(ring, id="native"), pytest.param(ring_py, id="pure")]


def push_pop_pairs(buffer, count: int) -> None:
    push, pop, payload, enqueued_at = buffer.push, buffer.pop, PAYLOAD, T0
    for offset in range(count):
        push(offset, payload, enqueued_at)
        pop()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_push_pop_single_x1000(benchmark, impl) -> None:
    buffer = impl.RingBuffer()
    buffer.push_many(0, [PAYLOAD] * 100, T0)  # a non-empty ring, as in a partition with a backlog
    benchmark.extra_info["pairs_per_round"] = PAIRS
    benchmark(push_pop_pairs, buffer, PAIRS)
    assert len(buffer) == 100


def deque_pairs(queue: collections.deque, count: int) -> None:
    append, popleft, payload = queue.append, queue.popleft, PAYLOAD
    for _ in range(count):
        append(payload)
        popleft()


def test_reference_deque_append_popleft_x1000(benchmark) -> None:
    queue: collections.deque[bytes] = collections.deque([PAYLOAD] * 100)
    benchmark.extra_info["pairs_per_round"] = PAIRS
    benchmark(deque_pairs, queue, PAIRS)
    assert len(queue) == 100


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_push_many_pop_many_500(benchmark, impl) -> None:
    buffer = impl.RingBuffer()

    def one_round():
        buffer.push_many(0, BATCH_PAYLOADS, T0)
        return buffer.pop_many(BATCH)

    benchmark.extra_info["messages_per_round"] = BATCH
    offsets, payloads, _, _ = benchmark(one_round)
    assert len(payloads) == BATCH and offsets[-1] == BATCH - 1 and len(buffer) == 0
