"""Partition logs and the store that commits them: group commit, acks, redelivery state, limits, recovery.

One ``Store`` per node owns a backend (LMDB, or memory for unit tests) and every ``PartitionLog`` on it.

Writing. ``PartitionLog.enqueue`` appends a payload to the partition's pending list, gives it the next offset and
returns the store's current ``flush``: one future shared by every write that will ride in the next commit (no
future or task per message). The store commits when the first write arrives and no commit is running (at the end
of the current event-loop iteration, so the messages of one socket read share a commit), and otherwise as soon as
the running commit ends: under load, commits grow by themselves, at low load a message waits for one sync, not an
interval. One commit carries every partition's pending appends, as segments of at most ``batch_size`` messages,
and every pending state change (deliveries, acks, deletions) in one transaction, synced before its flush resolves.
With ``sync="async"`` enqueue returns an already-resolved future and commits start when ``batch_size`` messages
are pending or ``flush_interval`` after the first one: faster for the publisher, and a crash loses what was
acknowledged in the last interval.

Reading. Committed messages enter the partition's ring buffer (``shoalmq._native.RingBuffer``, the hot head of the
partition) while it has room and nothing older is waiting on disk; otherwise they stay on disk only and the ring
is refilled from the segments when it runs low. Room is counted in entries (``ring_capacity``) and in bytes: a
partition's ring holds at most ``ring_bytes`` and all rings of the store together at most ``memory_budget``
(payload bytes plus ``RECORD_OVERHEAD`` a message). Beyond that, messages wait on disk; ``take`` reads back what
it hands out whatever the budgets, so a message larger than a budget, or a partition whose siblings hold the whole
node budget, is still delivered. ``take`` pops ready messages, drops expired ones, counts the
delivery and holds them in flight until ``ack`` (deleted) or ``nack`` (back to the head of the partition, ahead of
the ring, delivery count kept). Delivery counts and acks change a per-segment state (a bytearray) in memory,
written with the next commit.

Recovery. Opening a store reads the ``partitions`` and ``states`` databases (never the payloads): every message
not acked is ready again, in offset order, with its delivery count; offsets continue from the high-water mark.

Replication's seam (a leader's log copied to followers). ``append_at`` writes records at given offsets (a gap
allowed: the skipped offsets are never used), with their delivery counts; ``advance_to`` raises the high-water mark;
``truncate`` removes every message from an offset on (a follower's diverged tail); ``committed_offset`` and
``wait_committed`` say what is durable; ``epoch``/``set_epoch`` keep the partition's leader epoch with it, and
``epochs`` its epoch history ((epoch, start offset) pairs: ``begin_epoch``, ``set_epochs``, ``epoch_end`` to find
where a follower diverged, cut by ``truncate``), stored in the partition's record; ``first_offset`` and
``read_messages`` are what a leader sends a follower catching up, and ``Store.on_durable`` hands it each commit's
appends to its ``replicated`` partitions (``Store.on_acked``, their consumers' acks). A read limit, ``set_visible`` (a leader's replicated offset; 0 on a
follower), keeps committed messages at or above it on disk, hidden: not loaded, not taken, not counted in ``ready``
(a count of them keeps it O(1)); ``ack_stored`` applies a leader's acks to them on a follower, and ``reset_reads``
drops the ring and the in-flight messages to read the partition over from disk (a leader demoted, a follower
promoted). None of it costs the hot path (``enqueue``, ``take``, ``ack``) anything beyond a constant check: a pending
run with a gap before it or delivery counts is kept apart from the open run ``enqueue`` extends, uncommitted messages
are counted as offsets less the skipped ones, and the default read limit is past every offset.
"""

from __future__ import annotations

import asyncio
import bisect
import ctypes
import ctypes.util
import heapq
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from shoalmq._native import RingBuffer
from shoalmq._native import ring as native_ring  # the implementation RingBuffer comes from (its RingPool)
from shoalmq.errors import PayloadTooLarge, QueueFull, ShoalError, StorageError
from shoalmq.queue.storage import keys as K
from shoalmq.queue.storage.backend import Backend, Delete, Put
from shoalmq.stats import COMMIT_MESSAGES_BOUNDS, COMMIT_SECONDS_BOUNDS, Histogram

log = logging.getLogger(__name__)

SyncMode = Literal["fsync", "async"]
#: One commit's appends to one partition, in offset order (gaps between them perhaps): (first offset, batches of
#: stored payloads, one per segment written, and their delivery counts, one bytes per batch, or None if all 0).
Runs = list[tuple[int, list[list[bytes]], list[bytes] | None]]

#: Seconds between retries after a failed commit (a full disk, say).
RETRY_INTERVAL = 0.2
NEVER = 1 << 62
#: Up to this many messages, ``take`` pops records one by one instead of in a batch.
SMALL_TAKE = 2
#: What one message held in a ring costs besides its payload, in bytes, as counted against the byte budgets: the
#: ``bytes`` object's header (33), the ring's slots for it (26) and allocator rounding.
RECORD_OVERHEAD = 64
#: Default byte budgets of the rings (see ``Store``; README.md says why these).
DEFAULT_RING_BYTES = 8 << 20
DEFAULT_MEMORY_BUDGET = 256 << 20
#: Once the rings hold this many bytes less than at their peak (and a quarter of it or less), the store asks the
#: allocator to give freed memory back to the system (glibc keeps freed blocks for reuse, so a drained backlog would
#: otherwise stay resident): ``TRIM_DELAY`` seconds after the last commit (the last acks: what consumers took is
#: freed by then), and at the latest ``TRIM_MAX_WAIT`` seconds after the rings drained.
TRIM_AFTER_FREED = 16 << 20
TRIM_DELAY = 1.0
TRIM_MAX_WAIT = 10.0
#: ``_Segment.remaining`` of a segment ``truncate`` removed.
DROPPED = -1
#: Loop turns without new pending writes after which a commit starts (fsync mode). The fast path enqueues a whole
#: socket read in one turn, but a packet on amqtt's path spans several (a task per packet, a wait_for per header):
#: with 2 turns, commits there shrank to one message each.
QUIET_TURNS = 6


@dataclass(frozen=True)
class Limits:
    """Per-queue limits, enforced by each of the queue's partitions."""

    #: Most messages (ready, in flight or being written) a partition holds; a publish beyond it is refused.
    max_depth: int | None = None
    #: Seconds a message may wait before delivery; older ones are dropped (and counted) instead. None: forever.
    ttl: float | None = None
    #: Largest payload accepted, in bytes.
    max_payload: int = 256 * 1024


class Truncated(ShoalError):
    """What a ``wait_committed`` future fails with when its offset was removed by ``truncate`` first."""


#: Tie-breakers for the committed-offset waiters of equal offsets (futures do not compare).
_waiter_ids = itertools.count()


def _entry_epoch(entry: tuple[int, int]) -> int:
    return entry[0]


def _entry_start(entry: tuple[int, int]) -> int:
    return entry[1]


def now_ms() -> int:
    return int(time.time() * 1000)


_malloc_trim: Callable[[int], int] | None = None


def release_freed_memory() -> bool:
    """Ask the C allocator to return freed memory to the system (glibc's ``malloc_trim``); False where there is
    no such call (another libc)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = _no_trim
    if _malloc_trim is _no_trim:
        return False
    _malloc_trim(0)
    return True


def _no_trim(pad: int) -> int:
    return 0


class Message:
    """A message taken for delivery; it stays in flight until acked or nacked."""

    __slots__ = ("deliveries", "enqueued_at", "last_holder", "offset", "payload", "returned", "_index", "_segment")

    def __init__(self, offset: int, payload: bytes, enqueued_at: int, deliveries: int,
                 segment: _Segment, index: int) -> None:
        self.offset = offset
        self.payload = payload
        self.enqueued_at = enqueued_at
        #: Delivery attempts: takes, less those handed back uncounted (``nack(..., counted=False)``).
        self.deliveries = deliveries
        #: Handed back uncounted at least once (it may have reached a consumer: its next delivery is a DUP).
        self.returned = False
        #: For the layer above: who last held it when it was handed back (it lives and dies with the message).
        self.last_holder: object = None
        self._segment = segment
        self._index = index

    def __repr__(self) -> str:
        return f"Message(offset={self.offset}, deliveries={self.deliveries}, {len(self.payload)} bytes)"


class _Segment:
    """The in-memory state of one committed segment: a delivery count (or ACKED) per message."""

    __slots__ = ("count", "enqueued_at", "first", "remaining", "state")

    def __init__(self, first: int, enqueued_at: int, state: bytearray) -> None:
        self.first = first
        self.count = len(state)
        self.enqueued_at = enqueued_at
        self.state = state
        self.remaining = len(state) - state.count(K.ACKED)


class PartitionLog:
    """One partition of one queue: an ordered log of messages with offsets, a ring-buffer head and ack state."""

    def __init__(self, store: Store, queue: str, index: int, pid: int, next_offset: int, limits: Limits,
                 epoch: int = 0, epochs: list[tuple[int, int]] | None = None) -> None:
        self.store = store
        self.queue = queue
        self.index = index
        self.pid = pid
        self.set_limits(limits)
        # Its records count in the store's pool: the node's budget is the pool's cost, kept by the ring itself.
        self.ring = RingBuffer(store.ring_capacity, store.pool)
        # Offsets: [.. loaded_upto) are in the ring, in flight or acked; [loaded_upto .. committed_end) wait on
        # disk; [committed_end .. next_offset) are pending in memory or being committed. Any of them may also be
        # unused (a failed commit's, or skipped by append_at/advance_to); `_skipped` counts the unused ones in
        # [committed_end .. next_offset), so that next_offset - committed_end - _skipped messages are uncommitted.
        # committed_end is the lowest uncommitted offset, or next_offset if none (see `committed_offset`).
        self._next_offset = next_offset
        self._committed_end = next_offset
        self._loaded_upto = next_offset
        self._skipped = 0
        # The open pending run (what enqueue extends): offsets pending_first .. next_offset-1, delivery counts 0.
        self._pending: list[bytes] = []
        self._pending_first = next_offset
        # Closed pending runs before it, in offset order: (first, records, delivery counts or None). Only
        # append_at and advance_to make them (a gap, or delivery counts); the commit writes each run as segments.
        self._pending_runs: list[tuple[int, list[bytes], bytes | None]] = []
        # First offsets of segments a truncation removed or cut: the next commit deletes or rewrites them.
        self._truncated: set[int] = set()
        # wait_committed futures, a heap by offset.
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._epoch = epoch
        # The epoch history: (leader epoch, first offset written in it), both increasing (see `begin_epoch`).
        self._epochs: list[tuple[int, int]] = list(epochs) if epochs else []
        # The read limit (`set_visible`): only offsets below it enter the ring, are taken or count as ready.
        # Committed messages at or above it, not acked, are hidden: `_hidden` counts them (0 at the default limit,
        # which nothing reaches), so that `ready` stays O(1).
        self._visible = NEVER
        self._hidden = 0
        #: The store's ``on_durable`` reports this partition's committed appends (a leader's, for its followers).
        self.replicated = False
        self._segments: dict[int, _Segment] = {}
        self._segment_starts: list[int] = []
        self._dirty_segments: set[_Segment] = set()
        self._inflight: dict[int, Message] = {}
        # Messages handed back by nack, by offset: delivered before anything in the ring.
        self._requeued: list[tuple[int, Message]] = []
        self._depth = 0
        self._registered = False
        self._meta_dirty = False
        #: The offset given to the last enqueued message.
        self.last_offset = next_offset - 1
        #: Messages dropped because their TTL passed before delivery.
        self.expired = 0
        #: Messages appended by ``enqueue`` and ``enqueue_many`` (publishes, forwarded ones included; not moves).
        self.published = 0

    def set_limits(self, limits: Limits) -> None:
        """Apply the queue's limits (from now on: messages already stored stay)."""
        self.limits = limits
        self._max_payload = limits.max_payload
        self._max_depth = limits.max_depth if limits.max_depth is not None else 1 << 62

    # -- counts -----------------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Messages not yet acked: ready, in flight, or being written. O(1)."""
        return self._depth

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def ready(self) -> int:
        """Committed messages waiting for delivery (in the ring or on disk), below the read limit. O(1)."""
        return (self._depth - len(self._inflight) - (self._next_offset - self._committed_end - self._skipped)
                - self._hidden)

    @property
    def next_offset(self) -> int:
        """The high-water mark: the offset the next appended message gets."""
        return self._next_offset

    @property
    def committed_offset(self) -> int:
        """The offset after the last message known durable: every message below it that was appended is on disk
        (the offsets of a failed commit's messages, which were refused, lie below it too). It is ``next_offset``
        when nothing is pending or being committed. See ``wait_committed``."""
        return self._committed_end

    @property
    def first_offset(self) -> int:
        """The lowest offset of a message not yet acked (or removed), committed or not; ``next_offset`` if none.
        Costs a look at the first segments (those fully acked but not yet deleted are skipped)."""
        segments = self._segments
        for start in self._segment_starts:
            segment = segments[start]
            if segment.remaining:
                state = segment.state
                return start + len(state) - len(state.lstrip(b"\xff"))
        if self._next_offset - self._committed_end - self._skipped:  # something is uncommitted
            running = self.store._running
            if running is not None:
                for part, runs, _ in running.appended:
                    if part is self and runs:
                        return runs[0][0]
            if self._pending_runs:
                return self._pending_runs[0][0]
            if self._pending:
                return self._pending_first
        return self._next_offset

    @property
    def epoch(self) -> int:
        """The partition's leader epoch, stored with it (0 until ``set_epoch`` or ``begin_epoch``)."""
        return self._epoch

    @property
    def epochs(self) -> list[tuple[int, int]]:
        """The epoch history, stored with the partition: (leader epoch, first offset written in it) pairs, both in
        increasing order (a start may repeat: an epoch in which nothing was written); empty for a new partition.
        A copy: change it with ``begin_epoch``, ``set_epochs`` or ``truncate``."""
        return list(self._epochs)

    @property
    def visible_offset(self) -> int:
        """The read limit: only messages at offsets below it enter the ring, are taken or count in ``ready`` (see
        ``set_visible``). A huge number (everything visible) unless set; 0 on a follower."""
        return self._visible

    # -- writing ----------------------------------------------------------------------------------------

    def enqueue(self, payload: bytes) -> asyncio.Future[None]:
        """Append a message; the returned future resolves once it is durable (see ``Store``).

        Raises PayloadTooLarge, QueueFull or StorageError (the store cannot write) without storing anything.
        The message's offset is ``last_offset`` right after the call.
        """
        if type(payload) is not bytes:
            payload = bytes(payload)
        if len(payload) > self._max_payload:
            raise PayloadTooLarge(f"payload of {len(payload)} bytes exceeds max_payload {self._max_payload} "
                                  f"of queue {self.queue!r}")
        if self._depth >= self._max_depth:
            raise QueueFull(f"queue {self.queue!r} partition {self.index} is full ({self._depth} messages)")
        store = self.store
        if store.failure is not None:
            raise store.failure
        if not self._pending:
            store._dirty_partitions.add(self)
        self._pending.append(payload)
        self.last_offset = self._next_offset
        self._next_offset += 1
        self._depth += 1
        self.published += 1
        store._pending_count += 1
        if not store._commit_requested:
            store._request_commit()
        elif store._pending_count >= store._early_commit_at:
            store._commit_early()
        return store._flush

    def enqueue_many(self, records: list[bytes]) -> asyncio.Future[None]:
        """Append messages in order, as ``enqueue`` does one (each must be ``bytes``): all or none. The returned
        future resolves once all are durable. PayloadTooLarge, QueueFull or StorageError before anything is stored.
        """
        count = len(records)
        if not count:
            return self.store._flush
        largest = max(map(len, records))
        if largest > self._max_payload:
            raise PayloadTooLarge(f"payload of {largest} bytes exceeds max_payload {self._max_payload} "
                                  f"of queue {self.queue!r}")
        self.check_room(count)
        store = self.store
        if not self._pending:
            store._dirty_partitions.add(self)
        self._pending.extend(records)
        self._next_offset += count
        self.last_offset = self._next_offset - 1
        self._depth += count
        self.published += count
        return store._appended(count)

    def check_room(self, count: int) -> None:
        """QueueFull unless ``count`` more messages fit the partition's ``max_depth``; StorageError while the store
        cannot write."""
        if self._depth + count > self._max_depth:
            raise QueueFull(f"queue {self.queue!r} partition {self.index} is full ({self._depth} messages)")
        if self.store.failure is not None:
            raise self.store.failure

    # -- replication: writing at given offsets, truncating, committed offset, epoch ---------------------------

    def append_at(self, offset: int, records: list[bytes], deliveries: bytes | None = None) -> asyncio.Future[None]:
        """Append ``records`` (stored payloads) at offsets ``offset``, ``offset + 1``, ...: what a follower does with
        what its leader sent. ``offset`` must be at least ``next_offset`` (ValueError otherwise, nothing stored);
        offsets between ``next_offset`` and ``offset`` are skipped, never used, and the high-water mark jumps.

        ``deliveries``: each message's initial delivery count (0..254, one byte per record; a moved message keeps
        its count); all 0 if None. PayloadTooLarge, QueueFull or StorageError as ``enqueue_many``, all or nothing.
        Returns the store's shared flush future, resolved once the records are durable. No records: ``advance_to``.
        """
        if offset < self._next_offset:
            raise ValueError(f"append_at({offset}) on queue {self.queue!r} partition {self.index}: below "
                             f"next_offset {self._next_offset}")
        count = len(records)
        if deliveries is not None:
            deliveries = bytes(deliveries)
            if len(deliveries) != count:
                raise ValueError(f"{len(deliveries)} delivery counts for {count} records")
            if count and max(deliveries) > K.MAX_DELIVERIES_COUNTED:
                raise ValueError(f"a delivery count above {K.MAX_DELIVERIES_COUNTED}")
            if deliveries.count(0) == count:
                deliveries = None
        store = self.store
        if not count:
            self.advance_to(offset)
            return store._flush
        records = [r if type(r) is bytes else bytes(r) for r in records]
        largest = max(map(len, records))
        if largest > self._max_payload:
            raise PayloadTooLarge(f"payload of {largest} bytes exceeds max_payload {self._max_payload} "
                                  f"of queue {self.queue!r}")
        self.check_room(count)
        if offset > self._next_offset:
            self._skip_to(offset)
        if deliveries is None:
            self._pending.extend(records)
        else:
            self._close_run()
            self._pending_runs.append((offset, records, deliveries))
            self._pending_first = offset + count
        store._dirty_partitions.add(self)
        self._next_offset = offset + count
        self.last_offset = self._next_offset - 1
        self._depth += count
        return store._appended(count)

    def advance_to(self, offset: int) -> None:
        """Raise the high-water mark to at least ``offset`` (a new owner continuing after the previous owner's
        offsets): the offsets skipped are never used. Written with the next commit."""
        if offset <= self._next_offset:
            return
        self._skip_to(offset)
        self._next_offset = offset
        self._meta_dirty = True
        self.store._mark_dirty(self)

    def _skip_to(self, offset: int) -> None:
        """Offsets next_offset .. offset-1 become unused (the caller moves next_offset)."""
        self._close_run()
        self._pending_first = offset
        if self._next_offset - self._committed_end - self._skipped:
            self._skipped += offset - self._next_offset
        else:  # nothing uncommitted: the committed offset moves past the gap at once
            self._raise_committed(offset)

    def _close_run(self) -> None:
        """End the open pending run (a gap or delivery counts follow it)."""
        if self._pending:
            self._pending_runs.append((self._pending_first, self._pending, None))
            self._pending = []

    def _raise_committed(self, offset: int) -> None:
        """Nothing below ``offset`` is uncommitted: make it the committed offset."""
        if self._loaded_upto == self._committed_end:  # nothing waits on disk, nor will in the skipped offsets
            self._loaded_upto = offset
        self._committed_end = offset
        if self._waiters:
            self._settle_waiters(offset)

    def truncate(self, offset: int) -> int:
        """Remove every message at ``offset`` or above (a follower whose log diverged from its leader's): committed,
        being committed or pending; ready, handed back or in flight (those are forgotten: a late ack or nack of one
        counts for nothing). The high-water mark becomes ``offset``, so ``append_at(offset, ...)`` writes there
        again. Returns how many messages were removed. Synchronous, also while a commit runs: what that commit is
        writing at or above ``offset`` is cut out of it, and the next commit deletes (or rewrites, for a segment
        that straddles ``offset``) what reached the disk; that commit also records the new high-water mark, and
        until it is durable a restart shows the log as it was. ``wait_committed`` futures for offsets at or above
        ``offset`` fail with ``Truncated``. The epoch history loses its entries that start at ``offset`` or above
        (written by the same commit). An ``offset`` at or above ``next_offset`` changes nothing else."""
        if offset < 0:
            raise ValueError(f"cannot truncate at a negative offset ({offset})")
        store = self.store
        epochs = self._epochs
        if epochs and epochs[-1][1] >= offset:
            del epochs[bisect.bisect_left(epochs, offset, key=_entry_start):]
            self._meta_dirty = True
            store._mark_dirty(self)
        if offset >= self._next_offset:
            return 0
        acked = K.ACKED
        # Pending: the open run, then the closed runs before it.
        pending_removed = 0
        if self._pending:
            keep = max(offset - self._pending_first, 0)
            pending_removed += len(self._pending) - keep
            del self._pending[keep:]
        if not self._pending:
            self._pending_first = offset
        runs = []
        for first, records, deliveries in self._pending_runs:
            keep = offset - first
            if keep <= 0:
                pending_removed += len(records)
                continue
            if keep < len(records):
                pending_removed += len(records) - keep
                records = records[:keep]
                deliveries = deliveries[:keep] if deliveries is not None else None
            runs.append((first, records, deliveries))
        self._pending_runs = runs
        store._pending_count = max(store._pending_count - pending_removed, 0)
        uncommitted = len(self._pending) + sum(len(records) for _, records, _ in runs)
        # Being committed: cut out of the running commit (whose writes are on disk already, or failed).
        removed = pending_removed
        running = store._running
        if running is not None:
            for entry in running.appended:
                if entry[0] is self:
                    cut, kept = self._cut_commit(entry, offset)
                    removed += cut
                    uncommitted += kept
                    break
        # Committed segments: those at or above the offset go, the one straddling it loses its tail.
        uncommitted_removed = removed
        starts, segments = self._segment_starts, self._segments
        i = bisect.bisect_left(starts, offset)
        for first in starts[i:]:
            segment = segments.pop(first)
            removed += segment.remaining
            segment.remaining = DROPPED  # (a failed commit carrying its state must not put it back)
            self._dirty_segments.discard(segment)
            self._truncated.add(first)
        del starts[i:]
        if i:
            segment = segments[starts[i - 1]]
            keep = offset - segment.first
            if keep < segment.count:
                tail = segment.state[keep:]
                gone = len(tail) - tail.count(acked)
                removed += gone
                segment.remaining -= gone
                del segment.state[keep:]
                segment.count = keep
                self._dirty_segments.add(segment)
                self._truncated.add(segment.first)
        if self._hidden:
            # The committed messages removed lie at or above the offset: all hidden if it is at or above the read
            # limit, and every hidden one is removed if it is not.
            self._hidden = self._hidden - (removed - uncommitted_removed) if offset >= self._visible else 0
        # In flight, handed back, in the ring.
        for message_offset in [o for o in self._inflight if o >= offset]:
            del self._inflight[message_offset]
        if any(o >= offset for o, _ in self._requeued):
            self._requeued = [item for item in self._requeued if item[0] < offset]
            heapq.heapify(self._requeued)
        ring = self.ring
        if ring and self._loaded_upto > offset:
            if ring.head_offset >= offset:
                ring.clear()
            else:
                offsets, payloads, enqueued, deliveries = ring.pop_many(len(ring))
                push = ring.push
                for k in range(int(offsets.searchsorted(offset))):
                    push(int(offsets[k]), payloads[k], int(enqueued[k]), int(deliveries[k]))
        # Counts and offsets.
        self._depth -= removed
        self._next_offset = offset
        self.last_offset = min(self.last_offset, offset - 1)
        if self._committed_end > offset:
            self._committed_end = offset
            self._loaded_upto = min(self._loaded_upto, offset)
        if not uncommitted:
            self._raise_committed(offset)
        self._skipped = offset - self._committed_end - uncommitted
        if self._waiters:
            self._drop_waiters(offset)
        self._meta_dirty = True
        store._mark_dirty(self)
        return removed

    def _cut_commit(self, entry: list, offset: int) -> tuple[int, int]:
        """Cut the messages at ``offset`` or above out of the running commit's appends of this partition (``entry``
        of its ``appended``); the next commit deletes or rewrites the segments it wrote. (removed, kept)."""
        _, runs, end = entry
        removed = kept = 0
        cut_runs = []
        for first, batches, deliveries in runs:
            position = first
            kept_batches: list[list[bytes]] = []
            kept_deliveries: list[bytes] = []
            for j, payloads in enumerate(batches):
                n = len(payloads)
                keep = min(max(offset - position, 0), n)
                if keep < n:
                    self._truncated.add(position)
                    removed += n - keep
                if keep:
                    kept_batches.append(payloads[:keep] if keep < n else payloads)
                    if deliveries is not None:
                        kept_deliveries.append(deliveries[j][:keep])
                    kept += keep
                position += n
            if kept_batches:
                cut_runs.append((first, kept_batches, kept_deliveries if deliveries is not None else None))
        entry[1] = cut_runs
        entry[2] = min(end, offset)
        return removed, kept

    def wait_committed(self, offset: int) -> asyncio.Future[None]:
        """A future resolved once ``committed_offset > offset`` (the message at ``offset`` is durable, or the offset
        was skipped). It fails with the store's StorageError if the commit holding the offset fails (in ``async``
        mode the messages are kept and retried: wait again), and with ``Truncated`` if ``truncate`` removes the
        offset first. One heap entry per call, no future per message."""
        future = self.store._loop.create_future()
        if offset < self._committed_end:
            future.set_result(None)
        else:
            heapq.heappush(self._waiters, (offset, next(_waiter_ids), future))
        return future

    def _settle_waiters(self, below: int, error: BaseException | None = None) -> None:
        """Resolve (or fail with ``error``) the waiters for offsets below ``below``."""
        waiters = self._waiters
        while waiters and waiters[0][0] < below:
            future = heapq.heappop(waiters)[2]
            if not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)

    def _drop_waiters(self, offset: int) -> None:
        """Fail the waiters for offsets at or above ``offset`` (truncated)."""
        kept = []
        for item in self._waiters:
            if item[0] < offset:
                kept.append(item)
            elif not item[2].done():
                item[2].set_exception(Truncated(f"offset {item[0]} of queue {self.queue!r} partition "
                                                f"{self.index} was truncated"))
        heapq.heapify(kept)
        self._waiters = kept

    def set_epoch(self, epoch: int) -> None:
        """Record the partition's leader epoch (written with the next commit: ``await store.flush()`` to know it is
        durable). Epochs only grow: ValueError for one below the stored epoch."""
        if epoch < self._epoch:
            raise ValueError(f"epoch {epoch} of queue {self.queue!r} partition {self.index} is below the stored "
                             f"epoch {self._epoch}")
        if epoch != self._epoch:
            self._epoch = epoch
            self._meta_dirty = True
            self.store._mark_dirty(self)

    def begin_epoch(self, epoch: int, start: int | None = None) -> None:
        """Start leader epoch ``epoch`` at offset ``start`` (``next_offset`` if None): the entry (epoch, start) is
        appended to the epoch history, and the partition's ``epoch`` is raised to it (as ``set_epoch``; never
        lowered). ValueError, nothing changed, unless ``epoch`` is above the last entry's epoch and ``start`` at
        least its start (neither negative). Written with the next commit."""
        if start is None:
            start = self._next_offset
        epochs = self._epochs
        if epoch < 0 or start < 0 or epochs and (epoch <= epochs[-1][0] or start < epochs[-1][1]):
            last = f"the last entry {epochs[-1]}" if epochs else "no entry"
            raise ValueError(f"cannot begin epoch {epoch} at offset {start} on queue {self.queue!r} partition "
                             f"{self.index}: {last}")
        epochs.append((epoch, start))
        self._epoch = max(self._epoch, epoch)
        self._meta_dirty = True
        self.store._mark_dirty(self)

    def set_epochs(self, entries: Iterable[tuple[int, int]]) -> None:
        """Replace the epoch history (a follower adopting its leader's): (epoch, start) pairs, epochs strictly
        increasing, starts never decreasing, neither negative (ValueError otherwise, nothing changed). The partition's
        ``epoch`` is left as it is. Written with the next commit."""
        history = [(int(epoch), int(start)) for epoch, start in entries]
        for (epoch, start), (next_epoch, next_start) in itertools.pairwise(history):
            if next_epoch <= epoch or next_start < start:
                raise ValueError(f"epoch history of queue {self.queue!r} partition {self.index} not increasing: "
                                 f"{(epoch, start)} then {(next_epoch, next_start)}")
        if history and min(history[0]) < 0:
            raise ValueError(f"epoch history of queue {self.queue!r} partition {self.index}: a negative entry "
                             f"{history[0]}")
        if history != self._epochs:
            self._epochs = history
            self._meta_dirty = True
            self.store._mark_dirty(self)

    def epoch_end(self, epoch: int) -> tuple[int, int]:
        """What a follower asks its leader to find where their logs diverge (KIP-101/KIP-279): ``(e, end)``, ``e``
        the largest epoch of the history at or below ``epoch`` and ``end`` the start of the entry after it, or
        ``next_offset`` if it is the last. No entry at or below ``epoch``: ``(0, start of the first entry)``, or
        ``(0, next_offset)`` if the history is empty."""
        epochs = self._epochs
        if not epochs:
            return 0, self._next_offset
        i = bisect.bisect_right(epochs, epoch, key=_entry_epoch)
        if not i:
            return 0, epochs[0][1]
        return epochs[i - 1][0], epochs[i][1] if i < len(epochs) else self._next_offset

    # -- replication: what a partition lets be read (a leader's committed messages, none on a follower) -------

    def set_visible(self, offset: int) -> None:
        """Raise the read limit to ``offset`` (a lower one is ignored): only messages below it enter the ring, are
        taken or count in ``ready``; committed ones at or above it wait on disk, hidden. What becomes visible is
        loaded into the ring as its room and the byte budgets allow (the rest as it drains), and
        ``store.on_readable`` is told of this partition (at once) if any message became ready."""
        old = self._visible
        if offset <= old:
            return
        self._visible = offset
        shown = 0
        if self._hidden:
            shown = self._live_between(old, min(offset, self._committed_end))
            self._hidden -= shown
        if self._loaded_upto < self._committed_end and self._loaded_upto < offset:
            self._refill()
        if shown:
            self._tell_readable()

    def reset_reads(self, visible: int) -> list[int]:
        """Start reading the partition over from disk with the read limit ``visible`` (which may be below the
        current one): 0 on a leader that becomes a follower, everything (``NEVER``) or the replicated offset on a
        follower promoted. The ring, the in-flight messages and those handed back are dropped: every committed
        message not acked is ready again from disk, with the delivery count of its segment state (a late ``ack``
        or ``nack`` of one dropped counts for nothing). Then what is visible is loaded as ``set_visible`` does
        (``store.on_readable`` told if anything is ready). Returns the offsets that were in flight, in order."""
        if visible < 0:
            raise ValueError(f"cannot set a negative read limit ({visible})")
        dropped = sorted(self._inflight)
        self._inflight = {}
        self._requeued = []
        self.ring.clear()
        starts = self._segment_starts
        self._loaded_upto = starts[0] if starts else self._committed_end
        self._visible = visible
        self._hidden = self._live_between(visible, self._committed_end)
        if self._loaded_upto < self._committed_end and self._loaded_upto < visible:
            self._refill()
        if self.ready:
            self._tell_readable()
        return dropped

    def ack_stored(self, offsets: Iterable[int]) -> list[int]:
        """Apply acks of messages that are hidden here (a follower applying its leader's consumer acks): each
        committed message at or above the read limit and not acked yet is acked (its segment deleted once all of
        it is, as ``ack`` does), written with the next commit. Returns the offsets at or above
        ``committed_offset`` (pending or being committed, or not appended yet: no segment holds them), for the
        caller to apply after the next commit; others (acked, unknown or truncated, and visible ones, whose
        deliveries this partition tracks itself) are ignored."""
        later: list[int] = []
        committed_end, visible = self._committed_end, self._visible
        starts, segments, dirty, acked = self._segment_starts, self._segments, self._dirty_segments, K.ACKED
        done = 0
        for offset in offsets:
            if offset >= committed_end:
                later.append(offset)
                continue
            if offset < visible:
                continue
            i = bisect.bisect_right(starts, offset) - 1
            if i < 0:
                continue
            segment = segments[starts[i]]
            index = offset - segment.first
            if index >= segment.count or segment.state[index] == acked:
                continue
            segment.state[index] = acked  # what _settle does
            segment.remaining -= 1
            dirty.add(segment)
            done += 1
        if done:
            self._depth -= done
            self._hidden -= done
            self.store._mark_dirty(self)
        return later

    def _live_between(self, low: int, high: int) -> int:
        """How many committed messages at offsets ``low`` .. ``high - 1`` are not acked (bytearray counts of the
        segment states involved)."""
        if low >= high:
            return 0
        starts, segments, acked = self._segment_starts, self._segments, K.ACKED
        i = max(bisect.bisect_right(starts, low) - 1, 0)
        live = 0
        while i < len(starts) and starts[i] < high:
            segment = segments[starts[i]]
            i += 1
            first = segment.first
            begin, stop = max(low - first, 0), min(high - first, segment.count)
            if begin < stop:
                live += stop - begin - segment.state.count(acked, begin, stop)
        return live

    def _tell_readable(self) -> None:
        """Messages became ready outside a commit: tell the store's reader, as ``_commit_done`` does."""
        on_readable = self.store.on_readable
        if on_readable is not None:
            on_readable([self])

    def read_messages(self, start: int, max_count: int) -> list[tuple[int, bytes, int]]:
        """Up to ``max_count`` committed messages not acked, from offset ``start`` on, in offset order, as (offset,
        payload, delivery count): what a leader sends a follower catching up. Read from the segments on disk; the
        ring, the in-flight set and the delivery counts are left as they are."""
        out: list[tuple[int, bytes, int]] = []
        if max_count <= 0:
            return out
        starts, segments = self._segment_starts, self._segments
        backend = self.store.backend
        acked = K.ACKED
        i = max(bisect.bisect_right(starts, start) - 1, 0)
        while i < len(starts) and len(out) < max_count:
            segment = segments[starts[i]]
            i += 1
            first, count, state = segment.first, segment.count, segment.state
            low = max(start - first, 0)
            if low >= count or not segment.remaining:
                continue
            with backend.view(K.SEGMENTS, K.segment_key(self.pid, first)) as value:
                if value is None:
                    raise StorageError(f"segment {first} of {self.queue}/{self.index} missing from the log")
                lengths = K.segment_lengths(value)
                position = K.segment_payload_start(lengths, low)
                for index in range(low, count):
                    length = lengths[index]
                    if state[index] != acked:
                        out.append((first + index, bytes(value[position:position + length]), state[index]))
                        if len(out) >= max_count:
                            break
                    position += length
        return out

    # -- reading ----------------------------------------------------------------------------------------

    def take(self, max_count: int, now: int | None = None) -> list[Message]:
        """Take up to ``max_count`` ready messages for delivery, oldest first, and hold them in flight.

        Each taken message's delivery count goes up by one (written with the next commit). Messages past their
        TTL are dropped instead, acked and counted in ``expired``.
        """
        out: list[Message] = []
        if max_count <= 0:
            return out
        ttl_cutoff = None
        if self.limits.ttl is not None:
            ttl_cutoff = (now if now is not None else now_ms()) - int(self.limits.ttl * 1000)
        segments_touched = self._dirty_segments
        while self._requeued and len(out) < max_count:
            _, message = heapq.heappop(self._requeued)
            segment, index = message._segment, message._index
            if ttl_cutoff is not None and message.enqueued_at < ttl_cutoff:
                self._settle(segment, index)
                self.expired += 1
                continue
            message.deliveries += 1
            segment.state[index] = min(message.deliveries, K.MAX_DELIVERIES_COUNTED)
            segments_touched.add(segment)
            self._inflight[message.offset] = message
            out.append(message)
        while len(out) < max_count:
            if (len(self.ring) < max_count - len(out) and self._loaded_upto < self._committed_end
                    and self._loaded_upto < self._visible):
                self._refill(max_count - len(out) - len(self.ring))
            ring = self.ring
            if not ring:
                break
            wanted = max_count - len(out)
            if wanted <= SMALL_TAKE:
                # A few messages (a consumer's window refilling after an ack): pop them one by one, which
                # costs less than the three arrays of a batch pop.
                pop_record = ring.pop_record
                records = [pop_record() for _ in range(min(wanted, len(ring)))]
            else:
                offsets, payloads, enqueued, deliveries = ring.pop_many(wanted)
                records = zip(offsets.tolist(), enqueued.tolist(), deliveries.tolist(), payloads)
            inflight = self._inflight
            first = end = 0  # the segment of the last record (ring offsets ascend: usually the next one's too)
            for offset, enqueued_at, count, payload in records:
                if not first <= offset < end:
                    segment = self._segment_of(offset)
                    first, end, state = segment.first, segment.first + segment.count, segment.state
                    segments_touched.add(segment)
                index = offset - first
                if ttl_cutoff is not None and enqueued_at < ttl_cutoff:
                    self._settle(segment, index)
                    self.expired += 1
                    continue
                count += 1
                state[index] = count if count < K.MAX_DELIVERIES_COUNTED else K.MAX_DELIVERIES_COUNTED
                message = Message(offset, payload, enqueued_at, count, segment, index)
                inflight[offset] = message
                out.append(message)
        if self._dirty_segments:
            self.store._mark_dirty(self)
        return out

    def ack(self, offsets: Iterable[int]) -> int:
        """Remove in-flight messages for good; returns how many were in flight (others are ignored). A replicated
        partition's acks also go to ``Store.on_acked`` (its leader's followers apply them)."""
        if self.replicated:
            offsets = list(offsets)
        done = 0
        inflight, dirty, acked = self._inflight, self._dirty_segments, K.ACKED
        for offset in offsets:
            message = inflight.pop(offset, None)
            if message is not None:  # what _settle does, inlined
                segment = message._segment
                segment.state[message._index] = acked
                segment.remaining -= 1
                dirty.add(segment)
                done += 1
        if done:
            self._depth -= done
            self.store._mark_dirty(self)
            if self.replicated and self.store.on_acked is not None:
                self.store.on_acked(self, offsets)  # type: ignore[arg-type]
        return done

    def nack(self, offsets: Iterable[int], counted: bool = True) -> int:
        """Hand in-flight messages back: they go to the head of the partition (in offset order) and are the next
        to be taken. Returns how many were in flight.

        ``counted``: the delivery attempt stands (a consumer ended, or timed out, holding the message). False: the
        message never reached a consumer as far as the caller knows (a handoff took it back, a route stream broke,
        a prefetch nobody took), so the take is not counted: its delivery count goes back by one, and it is
        marked ``returned`` (its next delivery carries DUP, since it may have been seen)."""
        done = 0
        requeued = self._requeued
        for offset in offsets:
            message = self._inflight.pop(offset, None)
            if message is not None:
                if not counted:
                    self._uncount(message)
                heapq.heappush(requeued, (offset, message))
                done += 1
        return done

    def _uncount(self, message: Message) -> None:
        message.returned = True
        if message.deliveries > 0:
            message.deliveries -= 1
            segment = message._segment
            segment.state[message._index] = min(message.deliveries, K.MAX_DELIVERIES_COUNTED)
            self._dirty_segments.add(segment)
            self.store._mark_dirty(self)

    def inflight_messages(self) -> list[Message]:
        return list(self._inflight.values())

    # -- internals ----------------------------------------------------------------------------------------

    def _settle(self, segment: _Segment, index: int) -> None:
        segment.state[index] = K.ACKED
        segment.remaining -= 1
        self._depth -= 1
        self._dirty_segments.add(segment)

    def _segment_of(self, offset: int) -> _Segment:
        starts = self._segment_starts
        return self._segments[starts[bisect.bisect_right(starts, offset) - 1]]

    def _add_segment(self, segment: _Segment) -> None:
        self._segments[segment.first] = segment
        if not self._segment_starts or segment.first > self._segment_starts[-1]:
            self._segment_starts.append(segment.first)
        else:
            bisect.insort(self._segment_starts, segment.first)

    def _drop_segment(self, segment: _Segment) -> None:
        del self._segments[segment.first]
        starts = self._segment_starts
        del starts[bisect.bisect_left(starts, segment.first)]

    @property
    def ring_cost(self) -> int:
        """What the ring counts for against the byte budgets: its payloads plus RECORD_OVERHEAD a message."""
        return self.ring.nbytes + RECORD_OVERHEAD * len(self.ring)

    def _refill(self, at_least: int = 0) -> None:
        """Load messages waiting on disk into the ring, oldest first, while it has room: ``at_least`` of them
        whatever the byte budgets (``take`` hands them out at once), then more while the budgets, counting those
        too, allow (an empty ring takes one message larger than the partition's budget, within the node's). Only
        those below the read limit (``set_visible``).

        A segment whose rest fits is copied and unpacked whole; of one that does not, only the payloads that fit
        are read (through a view of the value: a large segment costs what is loaded, not its size)."""
        store = self.store
        ring = self.ring
        pool = store.pool
        starts = self._segment_starts
        i = max(bisect.bisect_right(starts, self._loaded_upto) - 1, 0)
        backend = store.backend
        acked = K.ACKED
        overhead = RECORD_OVERHEAD
        limit = min(self._committed_end, self._visible)
        while i < len(starts) and self._loaded_upto < limit:
            segment = self._segments[starts[i]]
            first = segment.first
            if first >= limit:
                break  # hidden: what lies between here and the limit are unused offsets
            i += 1
            count = min(segment.count, limit - first)  # (the part below the read limit)
            start = self._loaded_upto - first
            if start >= count:
                continue
            if segment.remaining <= 0:
                # Every message acked (or truncated): nothing to read, and the next commit may have deleted its value.
                self._loaded_upto = first + count
                continue
            start = max(start, 0)  # offsets below the segment are unused (failed commits, gaps)
            # Room left (the slow loop below keeps it current).
            free = ring.free
            part_room = store.ring_bytes - ring.nbytes - overhead * len(ring)
            node_room = store.memory_budget - pool.cost
            if not free or at_least <= 0 and (node_room < overhead or part_room < overhead and ring):
                return  # no room for even an empty message: leave the segment unread
            state, enqueued_at, push = segment.state, segment.enqueued_at, ring.push
            with backend.view(K.SEGMENTS, K.segment_key(self.pid, first)) as value:
                if value is None:
                    raise StorageError(f"segment {first} of {self.queue}/{self.index} missing from the log")
                lengths = K.segment_lengths(value)
                left = count - start
                rest = sum(lengths[start:count])  # (a truncated segment's value may be longer until rewritten)
                if (left <= free and (left <= at_least or rest + overhead * left <= min(part_room, node_room))
                        and (start == 0 and count == segment.count or rest * 2 >= len(value))):
                    # The rest of the segment fits and is most of it: unpack it whole, in C.
                    payloads = K.unpack_segment(bytes(value))
                    for index in range(start, count):
                        if state[index] != acked:
                            push(first + index, payloads[index], enqueued_at, state[index])
                    at_least -= left
                else:
                    # Read the payloads one by one, while they fit.
                    position = K.segment_payload_start(lengths, start)
                    for index in range(start, count):
                        length = lengths[index]
                        if state[index] != acked:
                            cost = length + overhead
                            if not free or at_least <= 0 and (
                                    cost > node_room or cost > part_room and ring):
                                self._loaded_upto = first + index
                                return
                            push(first + index, bytes(value[position:position + length]), enqueued_at,
                                 state[index])
                            at_least -= 1
                            free -= 1
                            part_room -= cost
                            node_room -= cost
                        position += length
            self._loaded_upto = first + count
        if i >= len(starts) or starts[i] >= limit:
            # Every segment below the limit is loaded; what lies between here and the limit (committed_end, or the
            # read limit) are unused offsets (failed commits, gaps, truncated).
            self._loaded_upto = max(self._loaded_upto, limit)

    def _on_committed(self, runs: list[tuple[int, list[list[bytes]], list[bytes] | None]], enqueued_at: int) -> None:
        """Segments appended by a successful commit become readable: each enters the ring if nothing older waits on
        disk, as far as the ring's room and the byte budgets allow (an empty ring takes one message larger than
        the partition's budget, within the node's); the rest waits on disk for ``_refill``. Only messages below the
        read limit enter; those at or above it are counted hidden. ``runs``: (first offset, batches, delivery counts
        per batch or None), in offset order, with gaps between them perhaps."""
        ring = self.ring
        store = self.store
        visible = self._visible
        # The end of what is committed so far: offsets between it and the next segment are unused.
        end = previous = self._committed_end
        count = 0
        for first, batches, deliveries in runs:
            offset = first
            for j, payloads in enumerate(batches):
                n = len(payloads)
                segment = _Segment(offset, enqueued_at,
                                   bytearray(n) if deliveries is None else bytearray(deliveries[j]))
                self._add_segment(segment)
                if offset + n > visible:  # (a new segment has nothing acked: all of it at or above the limit hides)
                    self._hidden += offset + n - max(offset, visible)
                if self._loaded_upto == end and offset < visible:  # nothing older waits on disk
                    if ring:
                        room = store.ring_bytes - ring.nbytes - RECORD_OVERHEAD * len(ring)
                    else:
                        room = max(store.ring_bytes, len(payloads[0]) + RECORD_OVERHEAD)
                    room = min(room, store.memory_budget - store.pool.cost)
                    counts = deliveries[j] if deliveries is not None else None
                    if offset + n > visible:  # only the part below the read limit enters
                        payloads = payloads[:visible - offset]
                        counts = counts[:visible - offset] if counts is not None else None
                    if counts is None:
                        pushed = ring.push_upto(offset, payloads, enqueued_at, room, RECORD_OVERHEAD)
                    else:
                        pushed = self._push_counted(offset, payloads, counts, enqueued_at, room)
                    self._loaded_upto = offset + pushed
                offset += n
                end = offset
            count += offset - first
        self._committed(previous, end, count)

    def _push_counted(self, first: int, payloads: list[bytes], deliveries: bytes, enqueued_at: int,
                      room: int) -> int:
        """``ring.push_upto`` for records with delivery counts (appended by ``append_at``)."""
        ring = self.ring
        free = ring.free
        pushed = 0
        for payload in payloads:
            cost = len(payload) + RECORD_OVERHEAD
            if not free or cost > room:
                break
            ring.push(first + pushed, payload, enqueued_at, deliveries[pushed])
            pushed += 1
            free -= 1
            room -= cost
        return pushed

    def _committed(self, previous: int, end: int, count: int, error: BaseException | None = None) -> None:
        """A commit ended that carried ``count`` of the uncommitted messages (stored, or refused if ``error``),
        the last of them before ``end``: the committed offset moves up to the first message still pending."""
        new = self._pending_runs[0][0] if self._pending_runs else self._pending_first
        if self._loaded_upto == end:  # nothing waits on disk, nor in the unused offsets up to the pending ones
            self._loaded_upto = new
        self._skipped -= new - previous - count
        self._committed_end = new
        if self._waiters:
            self._settle_waiters(new, error)

    def _on_failed(self, runs: list[tuple[int, list[list[bytes]], list[bytes] | None]],
                   error: BaseException) -> None:
        """Appends whose commit failed were never stored: forget them; their offsets stay unused."""
        count = sum(len(payloads) for _, batches, _ in runs for payloads in batches)
        self._depth -= count
        self._committed(self._committed_end, self._committed_end, count, error)
        self._meta_dirty = True  # the next commit records the high-water mark past the unused offsets


class Store:
    """The node's partition logs over one backend, with the group-commit machinery they share."""

    def __init__(self, backend: Backend, *, sync: SyncMode = "fsync", batch_size: int = 500,
                 flush_interval: float = 0.010, ring_capacity: int = 16384, ring_bytes: int = DEFAULT_RING_BYTES,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET) -> None:
        """``ring_capacity``: most messages in one partition's ring. ``ring_bytes``: most bytes in one partition's
        ring; ``memory_budget``: most bytes in all the rings of this store together (both count payloads plus
        ``RECORD_OVERHEAD`` a message). What does not fit waits on disk and is read back as the rings drain."""
        if sync not in ("fsync", "async"):
            raise ValueError(f"sync must be 'fsync' or 'async', got {sync!r}")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if ring_bytes < 1 or memory_budget < 1:
            raise ValueError("ring_bytes and memory_budget must be at least 1 byte")
        self.backend = backend
        self.sync = sync
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.ring_capacity = ring_capacity
        self.ring_bytes = ring_bytes
        self.memory_budget = memory_budget
        #: Every partition's ring counts in it: ``pool.cost`` is what they hold together, against ``memory_budget``
        #: (its peak is reset when freed memory is given back, ``_trim``).
        self.pool = native_ring.RingPool(RECORD_OVERHEAD)
        self._trim_timer: asyncio.TimerHandle | None = None
        self._trim_since = self._trim_at = 0.0
        #: How many times freed memory was given back to the system.
        self.trims = 0
        self._loop = asyncio.get_running_loop()
        self._partitions: dict[tuple[str, int], PartitionLog] = {}
        self._dirty_partitions: set[PartitionLog] = set()
        self._pending_count = 0
        self._commit_requested = False
        self._committing = False
        self._timer: asyncio.TimerHandle | None = None
        # In async mode, while a timer waits for the interval: the pending count that starts a commit sooner.
        self._early_commit_at = NEVER
        self._gather_seen = self._gather_quiet = 0
        self._gather_started = 0.0
        self._commit_end: asyncio.Future[None] | None = None
        self._flush: asyncio.Future[None] = self._new_flush()
        # The commit between its write and its _commit_done (truncate cuts what it appended).
        self._running: _Commit | None = None
        self._next_pid = 1
        self._closed = False
        self._stopped = False
        #: The error of the last failed commit, raised by enqueue until a commit succeeds again.
        self.failure: StorageError | None = None
        #: Called after each successful commit with the partitions it made new messages readable in (and by
        #: ``set_visible``/``reset_reads`` with the partition they made messages ready in).
        self.on_readable: Callable[[list[PartitionLog]], None] | None = None
        #: Called after each successful commit that appended to partitions whose ``replicated`` is set, once, with
        #: (partition, runs) for each of them (``Runs``: its appends of the commit, as ``_on_committed`` got them):
        #: what a leader sends its followers. Called after the partitions made them readable.
        self.on_durable: Callable[[list[tuple[PartitionLog, Runs]]], None] | None = None
        #: Called with (partition, offsets) when ``ack`` removes messages of a ``replicated`` partition.
        self.on_acked: Callable[[PartitionLog, list[int]], None] | None = None
        self._queue_definitions: dict[str, dict] = {}
        self._pending_definitions: list[tuple[str, dict]] = []
        #: Writes outside the partition logs (``stage``), the last one per key: a value, or None to delete.
        self._staged: dict[tuple[str, bytes], bytes | None] = {}
        self.commits = 0
        #: Seconds each successful commit's write took, and the messages it wrote (``/metrics``).
        self.commit_seconds = Histogram(COMMIT_SECONDS_BOUNDS)
        self.commit_messages = Histogram(COMMIT_MESSAGES_BOUNDS)
        #: Commits that failed.
        self.commit_failures = 0
        self._recovered: dict[tuple[str, int], tuple[int, int, int, list[tuple[int, int]], list[_Segment]]] = {}
        self._recover()

    # -- opening and recovery -------------------------------------------------------------------------------

    def _recover(self) -> None:
        started = time.perf_counter()
        for key, value in self.backend.scan(K.QUEUES):
            self._queue_definitions[key.decode()] = json.loads(value)
        by_pid: dict[int, tuple[str, int, int, int, list[tuple[int, int]]]] = {}
        for key, value in self.backend.scan(K.PARTITIONS):
            queue, index = K.parse_partition_key(key)
            pid, next_offset, epoch, epochs = K.unpack_partition(value)
            by_pid[pid] = (queue, index, next_offset, epoch, epochs)
            self._next_pid = max(self._next_pid, pid + 1)
        segments: dict[int, list[_Segment]] = {pid: [] for pid in by_pid}
        for key, value in self.backend.scan(K.STATES):
            pid, first = K.parse_segment_key(key)
            enqueued_at, state = K.unpack_state(value)
            if pid in segments:
                segments[pid].append(_Segment(first, enqueued_at, state))
        for pid, (queue, index, next_offset, epoch, epochs) in by_pid.items():
            self._recovered[(queue, index)] = (pid, next_offset, epoch, epochs, segments[pid])
        #: Messages not acked that recovery found, and how long reading them took (seconds).
        self.recovered_messages = sum(s.remaining for parts in segments.values() for s in parts)
        self.recovery_seconds = time.perf_counter() - started

    def queue_names(self) -> list[str]:
        """The queues defined in this store."""
        return sorted(self._queue_definitions)

    def queue_definition(self, name: str) -> dict | None:
        """What ``define_queue`` stored for ``name`` (its partition count, ...), or None."""
        return self._queue_definitions.get(name)

    def define_queue(self, name: str, definition: dict, replace: bool = False) -> None:
        """Record a new queue's definition (``replace``: a new version of a defined queue's, the partition count
        unchanged); it is written with the next commit (before any of its messages)."""
        known = self._queue_definitions.get(name)
        if known is not None and not replace:
            raise ValueError(f"queue {name!r} is already defined")
        if replace and (known is None or known.get("partitions") != definition.get("partitions")):
            raise ValueError(f"queue {name!r}: only a defined queue's definition is replaced, its partitions kept")
        self._queue_definitions[name] = definition
        self._pending_definitions.append((name, definition))
        if not self._commit_requested and self._timer is None:
            self._timer = self._loop.call_later(self.flush_interval, self._commit_now)

    def drop_queue(self, name: str) -> None:
        """Forget a queue whose partitions hold no message (``depth`` 0, nothing pending: purge them and wait for
        the commit first): its partitions and its definition are deleted with the next commit. A later
        ``partition`` of the same name starts a new, empty log. ValueError if a partition still holds messages."""
        parts = [part for (queue, _), part in self._partitions.items() if queue == name]
        busy = [part.index for part in parts if part.depth or part._pending or part._pending_runs]
        if busy:
            raise ValueError(f"queue {name!r} still holds messages in partition(s) {busy}")
        for part in parts:
            del self._partitions[(name, part.index)]
            self._dirty_partitions.discard(part)
            for first in part._segment_starts:  # (fully acked segments whose deletion is still to be written)
                key = K.segment_key(part.pid, first)
                self.stage(K.SEGMENTS, key, None)
                self.stage(K.STATES, key, None)
            part.ring.clear()
            self.stage(K.PARTITIONS, K.partition_key(name, part.index), None)
        for key in [key for key in self._recovered if key[0] == name]:  # stored, never opened: must be empty
            pid, _, _, _, segments = self._recovered.pop(key)
            for segment in segments:
                seg_key = K.segment_key(pid, segment.first)
                self.stage(K.SEGMENTS, seg_key, None)
                self.stage(K.STATES, seg_key, None)
            self.stage(K.PARTITIONS, K.partition_key(*key), None)
        if self._queue_definitions.pop(name, None) is not None:
            self._pending_definitions = [(n, d) for n, d in self._pending_definitions if n != name]
            self.stage(K.QUEUES, name.encode(), None)

    def stage(self, db: str, key: bytes, value: bytes | None) -> None:
        """Write ``value`` under ``key`` in ``db`` (None: delete the key) with the next commit, which is asked for
        as an append asks for it; ``pending_flush`` is then that commit's flush. Of several writes to one key
        before a commit, the last one wins. A commit that fails keeps them for its retry (a newer write to the same
        key still wins)."""
        self._staged[(db, key)] = value
        if not self._commit_requested:
            self._request_commit()

    @property
    def pending_flush(self) -> asyncio.Future[None]:
        """The flush of the next commit: done once what was enqueued or staged so far is durable."""
        return self._flush

    def known_partitions(self) -> list[tuple[str, int]]:
        """The (queue, partition) pairs this store holds, recovered or opened."""
        return sorted(set(self._recovered) | set(self._partitions))

    def partition(self, queue: str, index: int, limits: Limits = Limits()) -> PartitionLog:
        """The log of partition ``index`` of ``queue``, recovered from the backend if it was stored before."""
        key = (queue, index)
        existing = self._partitions.get(key)
        if existing is not None:
            return existing
        recovered = self._recovered.pop(key, None)
        if recovered is None:
            pid, next_offset, epoch, epochs, segments = self._next_pid, 0, 0, [], []
            self._next_pid += 1
        else:
            pid, next_offset, epoch, epochs, segments = recovered
        part = PartitionLog(self, queue, index, pid, next_offset, limits, epoch, epochs)
        part._registered = recovered is not None
        if segments:
            first = segments[0].first
            part._loaded_upto = first
            for segment in segments:
                part._add_segment(segment)
                part._depth += segment.remaining
            part._refill()
        self._partitions[key] = part
        if not part._registered:
            self._mark_dirty(part)
        return part

    # -- group commit -----------------------------------------------------------------------------------------

    def _new_flush(self) -> asyncio.Future[None]:
        future = self._loop.create_future()
        if self.sync == "async":
            future.set_result(None)
        return future

    def _appended(self, count: int) -> asyncio.Future[None]:
        """``count`` messages were appended to a partition's pending writes: ask for the commit that carries them
        (see ``_request_commit``); returns its flush."""
        self._pending_count += count
        if not self._commit_requested:
            self._request_commit()
        elif self._pending_count >= self._early_commit_at:
            self._commit_early()
        return self._flush

    def _mark_dirty(self, part: PartitionLog) -> None:
        """A partition has state changes (deliveries, acks, registration) to write. They ride with the next commit
        of appends, or, if none comes within ``flush_interval``, with one of their own: at low load, a delivery and
        an ack do not each cost a sync."""
        self._dirty_partitions.add(part)
        if not self._commit_requested and self._timer is None:
            self._timer = self._loop.call_later(self.flush_interval, self._commit_now)

    def _commit_now(self) -> None:
        self._timer = None
        self._commit_requested = True
        self._start_commit()

    def _request_commit(self) -> None:
        self._commit_requested = True
        if self._committing:
            return  # the running commit starts the next one when it ends
        if self.sync == "fsync":
            self._gather()
        elif self._pending_count >= self.batch_size:
            self._loop.call_soon(self._start_commit)
        elif self._timer is None:
            self._timer = self._loop.call_later(self.flush_interval, self._start_commit)
            self._early_commit_at = self.batch_size

    def _gather(self) -> None:
        """Start gathering for a commit (fsync mode): see ``_commit_when_drained``."""
        self._gather_seen = self._pending_count
        self._gather_quiet = 0
        self._gather_started = self._loop.time()
        self._loop.call_soon(self._commit_when_drained)

    def _commit_when_drained(self) -> None:
        """Commit once the input stops adding to the pending writes, or at ``batch_size`` or ``flush_interval``.

        A commit runs in the event loop and blocks it for its fsyncs, so committing at the first chance would make
        commits of a few messages each under load. Instead, each loop turn checks whether the pending count grew:
        after ``QUIET_TURNS`` turns without growth (every socket read so far is in), or once ``batch_size``
        messages are pending, or ``flush_interval`` after gathering began, the commit starts. At low load that is
        a few loop turns, microseconds: a lone message waits for one sync, not the interval."""
        if not self._commit_requested or self._committing or self._stopped:
            return
        pending = self._pending_count
        self._gather_quiet = 0 if pending > self._gather_seen else self._gather_quiet + 1
        self._gather_seen = pending
        if (self._gather_quiet >= QUIET_TURNS or pending >= self.batch_size
                or self._loop.time() - self._gather_started >= self.flush_interval):
            self._start_commit()
        else:
            self._loop.call_soon(self._commit_when_drained)

    def _commit_early(self) -> None:
        """In async mode, ``batch_size`` messages are pending before the interval ended: commit now."""
        self._early_commit_at = NEVER
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop.call_soon(self._start_commit)

    def _start_commit(self) -> None:
        self._early_commit_at = NEVER
        if self._timer is not None:
            self._timer.cancel()  # no-op if it is what called us
            self._timer = None
        if self._committing or not self._commit_requested or self._stopped:
            return  # a running commit starts the next one when it ends
        self._commit_requested = False
        puts: list[Put] = []
        deletes: list[Delete] = []
        commit = _Commit(self._flush, [], [], now_ms(), self._pending_count)
        commit.definitions, self._pending_definitions = self._pending_definitions, []
        for name, definition in commit.definitions:
            puts.append((K.QUEUES, name.encode(), json.dumps(definition, sort_keys=True).encode()))
        commit.staged, self._staged = self._staged, {}
        for (db, key), value in commit.staged.items():
            if value is None:
                deletes.append((db, key))
            else:
                puts.append((db, key, value))
        for part in self._dirty_partitions:
            self._collect(part, commit, puts, deletes)
        self._dirty_partitions = set()
        self._flush = self._new_flush()
        self._pending_count = 0
        self._committing = True
        self._running = commit
        error: StorageError | None = None
        started = time.perf_counter()
        try:
            self.backend.commit(puts, deletes)
        except StorageError as exc:
            error = exc
        except Exception as exc:  # never leave _committing set: no commit would ever run again
            log.exception("unexpected error in a commit")
            error = StorageError(f"commit failed: {exc!r}")
        commit.seconds = time.perf_counter() - started
        # Resolved on the next loop iteration, so that callbacks never run inside an enqueue or flush call.
        self._loop.call_soon(self._commit_done, commit, error)

    def _collect(self, part: PartitionLog, commit: _Commit, puts: list[Put], deletes: list[Delete]) -> None:
        """Move a partition's pending appends and state changes into a commit."""
        key_of = K.segment_key
        runs: list[tuple[int, list[list[bytes]], list[bytes] | None]] = []
        if part._pending or part._pending_runs:
            if part._pending_runs:
                pending_runs, part._pending_runs = part._pending_runs, []
                if part._pending:
                    pending_runs.append((part._pending_first, part._pending, None))
            else:
                pending_runs = [(part._pending_first, part._pending, None)]
            part._pending = []
            part._pending_first = part._next_offset
            size = self.batch_size
            for first, pending, deliveries in pending_runs:
                batches = [pending[i:i + size] for i in range(0, len(pending), size)]
                offset = first
                if deliveries is None:
                    for payloads in batches:
                        key = key_of(part.pid, offset)
                        puts.append((K.SEGMENTS, key, K.pack_segment(payloads)))
                        puts.append((K.STATES, key, K.pack_state(commit.enqueued_at, bytes(len(payloads)))))
                        offset += len(payloads)
                    runs.append((first, batches, None))
                else:
                    counts = [deliveries[i:i + size] for i in range(0, len(deliveries), size)]
                    for payloads, initial in zip(batches, counts):
                        key = key_of(part.pid, offset)
                        puts.append((K.SEGMENTS, key, K.pack_segment(payloads)))
                        puts.append((K.STATES, key, K.pack_state(commit.enqueued_at, initial)))
                        offset += len(payloads)
                    runs.append((first, batches, counts))
            commit.appended.append([part, runs, part._next_offset])
            part._meta_dirty = True
        if part._truncated:
            self._collect_truncated(part, commit, runs, puts, deletes)
        if part._dirty_segments:
            segments = list(part._dirty_segments)
            part._dirty_segments = set()
            for segment in segments:
                key = key_of(part.pid, segment.first)
                if segment.remaining == 0:
                    deletes.append((K.SEGMENTS, key))
                    deletes.append((K.STATES, key))
                else:
                    puts.append((K.STATES, key, K.pack_state(segment.enqueued_at, segment.state)))
            commit.states.append((part, segments))
        if part._meta_dirty or not part._registered:
            part._meta_dirty = False
            puts.append((K.PARTITIONS, K.partition_key(part.queue, part.index),
                         K.pack_partition(part.pid, part._next_offset, part._epoch, part._epochs)))
            commit.registered.append(part)

    def _collect_truncated(self, part: PartitionLog, commit: _Commit,
                           runs: list[tuple[int, list[list[bytes]], list[bytes] | None]],
                           puts: list[Put], deletes: list[Delete]) -> None:
        """What a truncation left to write: segments it removed are deleted (unless this commit writes new ones
        under the same keys), a segment it cut is rewritten with the payloads it keeps (its state, a dirty
        segment's, is written below)."""
        truncated, part._truncated = part._truncated, set()
        written = set()
        for first, batches, _ in runs:
            for payloads in batches:
                written.add(first)
                first += len(payloads)
        for first in sorted(truncated):
            key = K.segment_key(part.pid, first)
            segment = part._segments.get(first)
            if segment is None:
                if first not in written:
                    deletes.append((K.SEGMENTS, key))
                    deletes.append((K.STATES, key))
                continue
            part._dirty_segments.add(segment)  # its state is rewritten, or both deleted if nothing is left
            if segment.remaining:
                try:
                    with self.backend.view(K.SEGMENTS, key) as value:
                        if value is not None:
                            puts.append((K.SEGMENTS, key, K.truncate_segment(value, segment.count)))
                except (ValueError, StorageError) as exc:  # keep the commit going: its state still says count
                    log.error("cannot rewrite truncated segment %d of %s/%d: %s", first, part.queue, part.index,
                              exc)
        commit.truncations.append((part, truncated))

    def _commit_done(self, commit: _Commit, error: BaseException | None) -> None:
        self._committing = False
        self._running = None
        if error is None:
            self.commits += 1
            self.commit_seconds.observe(commit.seconds)
            self.commit_messages.observe(commit.count)
            if self.failure is not None:
                log.warning("partition log writable again")
                self.failure = None
            for part in commit.registered:
                part._registered = True
            for part, runs, _ in commit.appended:
                part._on_committed(runs, commit.enqueued_at)
            if self.on_durable is not None and commit.appended:
                self._tell_durable(commit)
            for part, segments in commit.states:
                for segment in segments:
                    if segment.remaining == 0 and part._segments.get(segment.first) is segment:
                        part._drop_segment(segment)
            if not commit.flush.done():
                commit.flush.set_result(None)
            if self.on_readable is not None and commit.appended:
                # (Not the partitions whose appends all lie at or above their read limit: hidden, none readable.)
                readable = [part for part, runs, _ in commit.appended if not runs or runs[0][0] < part._visible]
                if readable:
                    self.on_readable(readable)
            pool = self.pool
            if pool.peak - pool.cost >= TRIM_AFTER_FREED and pool.cost * 4 <= pool.peak:
                self._arm_trim()
        else:
            self._commit_failed(commit, error)
        waiter, self._commit_end = self._commit_end, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._commit_requested and self._timer is None:
            if self.sync == "fsync":
                self._gather()
            else:
                self._loop.call_soon(self._start_commit)

    def _tell_durable(self, commit: _Commit) -> None:
        """Give ``on_durable`` the appends of a successful commit to its replicated partitions (if any). An error
        it raises is logged: it must not stop the commit from completing."""
        durable = [(part, runs) for part, runs, _ in commit.appended if part.replicated and runs]
        if durable:
            try:
                self.on_durable(durable)  # type: ignore[misc]
            except Exception:
                log.exception("on_durable failed")

    def _commit_failed(self, commit: _Commit, error: BaseException) -> None:
        self.commit_failures += 1
        if not isinstance(error, StorageError):
            error = StorageError(f"commit failed: {error!r}")
        if self.sync == "async":
            # The publishers were acknowledged already: keep their messages and write them with the retry.
            if self.failure is None or str(self.failure) != str(error):
                log.error("%s: %d acknowledged message(s) kept in memory, retrying", error, commit.count)
            for part, runs, end in commit.appended:
                restored = [(first, [p for batch in batches for p in batch],
                             None if deliveries is None else b"".join(deliveries))
                            for first, batches, deliveries in runs if batches]
                count = sum(len(records) for _, records, _ in restored)
                if (len(restored) == 1 and restored[0][2] is None and not part._pending_runs
                        and restored[0][0] + count == part._pending_first):
                    part._pending[:0] = restored[0][1]  # the open run continues it, as before
                    part._pending_first = restored[0][0]
                else:
                    part._pending_runs[:0] = restored
                self._pending_count += count
                self._dirty_partitions.add(part)
                if part._waiters:
                    part._settle_waiters(end, error)
        else:
            if self.failure is None or str(self.failure) != str(error):
                log.error("%s: %d message(s) not stored, their publishers not acknowledged", error, commit.count)
            for part, runs, _ in commit.appended:
                part._on_failed(runs, error)
                self._dirty_partitions.add(part)
        self.failure = error
        self._pending_definitions[:0] = commit.definitions
        for key, value in commit.staged.items():
            self._staged.setdefault(key, value)  # (a newer write of the key, staged since, wins)
        for part, segments in commit.states:
            # Kept in memory, written by the next commit (but not those a truncation removed meanwhile).
            part._dirty_segments.update(s for s in segments if s.remaining != DROPPED)
            self._dirty_partitions.add(part)
        for part, truncated in commit.truncations:
            part._truncated |= truncated
            self._dirty_partitions.add(part)
        for part in commit.registered:
            part._meta_dirty = True
            self._dirty_partitions.add(part)
        if not commit.flush.done():
            commit.flush.set_exception(error)
            commit.flush.exception()  # retrieved: a publisher that never awaits it must not log it again
        # Retry (the state changes, and a probe that clears `failure` once the disk has room) after a pause.
        self._commit_requested = True
        if self._timer is None:
            self._timer = self._loop.call_later(RETRY_INTERVAL, self._start_commit)

    def _arm_trim(self) -> None:
        """The rings drained (see TRIM_AFTER_FREED): give freed memory back once the commits stop for a while."""
        now = self._loop.time()
        if self._trim_timer is None:
            self._trim_since = now
            self._trim_timer = self._loop.call_later(TRIM_DELAY, self._trim)
        self._trim_at = min(now + TRIM_DELAY, self._trim_since + TRIM_MAX_WAIT)

    def _trim(self) -> None:
        if self._loop.time() < self._trim_at:  # commits since the timer was set: wait for them to stop
            self._trim_timer = self._loop.call_at(self._trim_at, self._trim)
            return
        self._trim_timer = None
        self.pool.reset_peak()
        started = time.perf_counter()
        if release_freed_memory():
            self.trims += 1
            log.debug("freed memory given back to the system in %.1f ms", (time.perf_counter() - started) * 1000)

    async def flush(self) -> None:
        """Wait until everything enqueued or changed so far is committed; StorageError if a commit fails."""
        while self._committing or self._dirty_partitions or self._pending_definitions or self._staged:
            if not self._committing:
                self._commit_requested = True
                self._start_commit()
            if self._commit_end is None:
                self._commit_end = self._loop.create_future()
            await asyncio.shield(self._commit_end)
            if self.failure is not None:
                raise self.failure

    async def close(self) -> None:
        """Commit what is pending, then close the backend."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.flush()
        except StorageError as exc:
            log.error("closing with changes not written: %s", exc)
        finally:
            self._stopped = True
            if self._timer is not None:
                self._timer.cancel()
            if self._trim_timer is not None:
                self._trim_timer.cancel()
            self.backend.close()


@dataclass
class _Commit:
    """What one commit carries, to apply to memory once it succeeds (or undo if it fails)."""

    flush: asyncio.Future[None]
    #: Per partition: [part, runs (first offset, batches, delivery counts per batch or None), end (next_offset
    #: when collected)]; a list, since ``truncate`` cuts it while the commit runs.
    appended: list[list]
    states: list[tuple[PartitionLog, list[_Segment]]]
    enqueued_at: int
    count: int
    registered: list[PartitionLog] = field(default_factory=list)
    definitions: list[tuple[str, dict]] = field(default_factory=list)
    #: What ``stage`` wrote: (db, key) -> value, or None for a delete.
    staged: dict[tuple[str, bytes], bytes | None] = field(default_factory=dict)
    #: Per partition: the segment keys (first offsets) a truncation left it to delete or rewrite.
    truncations: list[tuple[PartitionLog, set[int]]] = field(default_factory=list)
    #: Seconds the backend's write took.
    seconds: float = 0.0
