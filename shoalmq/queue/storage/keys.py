"""How partition logs are laid out as keys and values (in LMDB, or in the in-memory backend's dicts).

Three named databases, all keys big-endian so that byte order is numeric order:

``segments``   key: pid u32 | first_offset u64 (12 bytes)
               value: count u32 | lengths u32[count] | payloads, concatenated
               One segment holds the messages of one partition written by one commit (at most
               ``batch_size`` of them), with consecutive offsets first_offset .. first_offset+count-1.
               A range scan over the prefix ``pid`` returns a partition's segments in offset order.
``states``     key: same as the segment's
               value: enqueued_at_ms u64 | count u32 | state u8[count]
               state[i] is the delivery count of message first_offset+i (0..254), or 255 once acked.
               Written with the segment, rewritten when deliveries or acks change it; the segment and its
               state are deleted together when every message is acked. Recovery reads only this database
               (and ``partitions``), never the payloads, so it costs O(segments), not O(messages).
``queues``     key: queue name (UTF-8)
               value: JSON, at least ``{"partitions": N}``: a queue's partition count, fixed once written.
``partitions`` key: queue name (UTF-8) | 0x00 | partition u32
               value: pid u32 | next_offset u64 | epoch u64 | (epoch u64 | start u64)[n]
               pid is a node-local id that keeps message keys short; next_offset is the high-water mark
               that keeps offsets growing after every message below it was acked and deleted (it may lie
               past the last segment: offsets skipped by ``append_at`` or ``advance_to`` are never used);
               epoch is the partition's leader epoch (``set_epoch``); the pairs after it are the epoch
               history (``PartitionLog.epochs``: each leader epoch with the first offset written in it, both
               increasing), none for a partition that has none (a 20-byte value). A value of the older
               12-byte form (pid | next_offset) reads as epoch 0, with no history.

Three more hold the persistent sessions of ordinary topics and the retained messages, written through the same
group commit (``Store.stage``; the layout is ``shoalmq.broker.session_store``'s): ``sessions``,
``session_messages`` and ``retained``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from shoalmq._native import segment

SEGMENTS = "segments"
STATES = "states"
PARTITIONS = "partitions"
QUEUES = "queues"
SESSIONS = "sessions"
SESSION_MESSAGES = "session_messages"
RETAINED = "retained"
DATABASES = (SEGMENTS, STATES, PARTITIONS, QUEUES, SESSIONS, SESSION_MESSAGES, RETAINED)

ACKED = 255
MAX_DELIVERIES_COUNTED = 254

_SEGMENT_KEY = struct.Struct(">IQ")
_STATE_HEADER = struct.Struct(">QI")
_PARTITION_VALUE = struct.Struct(">IQQ")
_PARTITION_VALUE_V0 = struct.Struct(">IQ")  # before the epoch was stored
_EPOCH_ENTRY = struct.Struct(">QQ")  # one entry of the epoch history, after the 20-byte partition value
_U32 = struct.Struct(">I")

SEGMENT_KEY_SIZE = _SEGMENT_KEY.size


def segment_key(pid: int, first_offset: int) -> bytes:
    return _SEGMENT_KEY.pack(pid, first_offset)


def parse_segment_key(key: bytes) -> tuple[int, int]:
    return _SEGMENT_KEY.unpack(key)


def pid_prefix(pid: int) -> bytes:
    return _U32.pack(pid)


#: Encode a list of payloads as one segment value, and back (Cython, in shoalmq._native.segment).
pack_segment = segment.pack
unpack_segment = segment.unpack


def segment_lengths(value: bytes | memoryview) -> tuple[int, ...]:
    """The payload lengths of a segment value (``bytes``, or a view of one: what the partition log reads back a
    part of, without copying the rest), checked as ``unpack_segment`` checks them: ValueError if corrupt."""
    size = len(value)
    if size < 4:
        raise ValueError(f"corrupt segment: {size} bytes, too short for a header")
    count = _U32.unpack_from(value, 0)[0]
    if 4 + 4 * count > size:
        raise ValueError(f"corrupt segment: {size} bytes cannot hold {count} lengths")
    lengths = struct.unpack_from(f">{count}I", value, 4)
    if 4 + 4 * count + sum(lengths) != size:
        raise ValueError(f"corrupt segment: {size} bytes, lengths say {4 + 4 * count + sum(lengths)}")
    return lengths


def segment_payload_start(lengths: tuple[int, ...], index: int) -> int:
    """Where payload ``index`` starts in a segment value whose payload lengths are ``lengths``."""
    return 4 + 4 * len(lengths) + sum(lengths[:index])


def truncate_segment(value: bytes | memoryview, keep: int) -> bytes:
    """The segment value holding only the first ``keep`` payloads of ``value`` (what a truncation leaves of a
    segment that straddles the truncation point), copying only those; ValueError if corrupt or shorter."""
    lengths = segment_lengths(value)
    if not 0 <= keep <= len(lengths):
        raise ValueError(f"cannot keep {keep} payloads of a segment of {len(lengths)}")
    start = 4 + 4 * len(lengths)
    kept = lengths[:keep]
    return struct.pack(f">I{keep}I", keep, *kept) + bytes(value[start:start + sum(kept)])


def pack_state(enqueued_at: int, state: bytes | bytearray) -> bytes:
    return _STATE_HEADER.pack(enqueued_at, len(state)) + state


def unpack_state(value: bytes) -> tuple[int, bytearray]:
    """(enqueued_at, state): the state as a ``bytearray`` (one byte per message; item writes are cheap)."""
    enqueued_at, count = _STATE_HEADER.unpack_from(value, 0)
    state = bytearray(value[_STATE_HEADER.size:_STATE_HEADER.size + count])
    if len(state) != count:
        raise ValueError(f"state record of {len(state)} entries, its header says {count}")
    return enqueued_at, state


def partition_key(queue: str, partition: int) -> bytes:
    return queue.encode() + b"\x00" + _U32.pack(partition)


def parse_partition_key(key: bytes) -> tuple[str, int]:
    # The partition number is the last 4 bytes (it may itself contain zero bytes).
    return key[:-5].decode(), _U32.unpack(key[-4:])[0]


def pack_partition(pid: int, next_offset: int, epoch: int = 0, epochs: Iterable[tuple[int, int]] = ()) -> bytes:
    """The ``partitions`` value: ``epochs`` is the epoch history, (epoch, start offset) pairs (none: 20 bytes)."""
    return _PARTITION_VALUE.pack(pid, next_offset, epoch) + b"".join(_EPOCH_ENTRY.pack(*entry) for entry in epochs)


def unpack_partition(value: bytes) -> tuple[int, int, int, list[tuple[int, int]]]:
    """(pid, next_offset, epoch, epoch history as (epoch, start) pairs); the older 12-byte value (no epoch) reads
    as epoch 0, it and the 20-byte one (no history) with an empty history."""
    size = len(value)
    if size == _PARTITION_VALUE_V0.size:
        return (*_PARTITION_VALUE_V0.unpack(value), 0, [])
    if size < _PARTITION_VALUE.size or (size - _PARTITION_VALUE.size) % _EPOCH_ENTRY.size:
        raise ValueError(f"corrupt partition record: {size} bytes, expected {_PARTITION_VALUE.size} plus "
                         f"{_EPOCH_ENTRY.size} a history entry")
    pid, next_offset, epoch = _PARTITION_VALUE.unpack_from(value, 0)
    epochs = list(_EPOCH_ENTRY.iter_unpack(value[_PARTITION_VALUE.size:]))
    return pid, next_offset, epoch, epochs
