"""Replicated partitions: one leader and R-1 followers per partition, commit on the in-sync set, failover by epoch.

A queue whose ``replication_factor`` is 2 or more keeps each partition on several nodes. Its etcd record
``/<cluster>/partitions/<queue>/<p>`` (no lease: it outlives any node) holds ``leader``, ``epoch``, ``replicas``
and ``isr`` (the in-sync set), and is only ever changed by a compare-and-swap on its mod revision
(``Etcd.put_if_revision_sync``). The leader appends publishes to its log; every follower opens one ``Replicate``
stream to each node it follows partitions of, and the leader pushes what each lacks (after its own group commit),
its consumers' acks and its commit offset, one stream message per loop turn for all partitions, and a heartbeat
when idle. A follower appends what it gets at the leader's offsets (``PartitionLog.append_at``), and reports its
durable offset after each of its own group commits.

The invariants (docs/design.md gives the argument at length):

1. **Commit.** A leader's commit offset (``hw``) rises only to what its own disk and every member of the ISR (and
   any member being added) have on disk, and only while the ISR has at least ``min_insync`` members (``async``
   queues: the leader's disk alone). A publish is acknowledged, and a message delivered, only below it. So every
   acknowledged message is on the disk of every ISR member.
2. **The record.** Leader, epoch and ISR change only by compare-and-swap on the record's revision; a new leader
   takes epoch + 1. A leader shrinks the ISR only by such a swap, never below ``min_insync``.
3. **Fencing.** A follower acknowledges writes only of the highest epoch it knows, and one that proposes itself
   stops acknowledging the old leader first. The winner was in the old leader's ISR, so the old leader can commit
   nothing more (it needs the winner's acks, or a swap that the moved record refuses): a leader frozen past its
   lease, or cut off by a network partition, that comes back can never get a write acknowledged.
4. **Who may lead.** A node leads only an epoch it began: by its own swap (creating the record, a failover, or
   re-claiming after a restart: always a new epoch), or a handoff that names it at an epoch above its own history.
   Only an ISR member whose log is synced (its stored epoch is not 0: a new or wiped disk is 0 until it catches
   up) may, so a node back with an empty disk never leads, nor truncates the others.
5. **Truncation.** Each log keeps its history of leader epochs (epoch, first offset). A follower starting to follow
   gets the leader's history and cuts its log where they part (Kafka's KIP-101/279), so no two replicas differ
   below the commit offset; then it adopts the leader's history.

Failover: a follower in the ISR that hears nothing from its leader (data or heartbeat) for ``FAILOVER_TIMEOUT``
(plus ``RANK_DELAY`` per rank, so the ISR's members do not all race) proposes itself. A follower behind catches up
from the leader's memory (recent commits) or disk (``read_messages``: live messages only, gaps where acked), and
joins the ISR once it has everything committed; an ISR member behind for ``replica_lag_ms`` leaves it. A graceful
leave hands each led partition to an in-sync follower once it has everything (``leave``).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import grpc

from shoalmq._native import segment
from shoalmq.cluster import stats
from shoalmq.cluster.replication_record import Record, parse_record
from shoalmq.cluster.transport import PeerGone, PeerStream, open_channel
from shoalmq.errors import NotOwner, ShoalError, StaleEpoch
from shoalmq.logs import Progress
from shoalmq.proto import broker_pb2, broker_pb2_grpc
from shoalmq.queue.config import QueueConfig

if TYPE_CHECKING:
    from shoalmq.cluster.assignment import PartitionAssigner
    from shoalmq.cluster.definitions import QueueDefinitions
    from shoalmq.cluster.etcd import Etcd
    from shoalmq.cluster.membership import Membership
    from shoalmq.cluster.view import ClusterView
    from shoalmq.queue.manager import QueueManager
    from shoalmq.queue.storage.log import PartitionLog

log = logging.getLogger(__name__)

Partition = tuple[str, int]
PartitionData = broker_pb2.PartitionData

#: Seconds between heartbeats on an idle replication stream.
HEARTBEAT_INTERVAL = 0.1
#: Seconds a follower waits, hearing nothing from its leader, before it proposes itself.
FAILOVER_TIMEOUT = 0.6
#: Extra seconds per rank among the in-sync followers (the first in id order goes first).
RANK_DELAY = 0.15
#: Seconds between the checks of leaders' silence, of lagging followers and of records to create.
TICK = 0.05
#: Bytes of recent commits a leader keeps in memory per partition for its followers (older ones are read from
#: disk).
BUFFER_BYTES = 8 << 20
#: A follower at least this many offsets behind its leader's commit logs its progress until it has caught up.
CATCH_UP_BEHIND = 10_000
#: Most messages and bytes of one partition read from disk for a follower catching up, per message sent.
CATCHUP_MESSAGES = 4096
CATCHUP_BYTES = 4 << 20
#: Stream messages a leader may have queued for one follower before it stops sending it data (it catches up from
#: disk when it drains).
SESSION_BACKLOG = 32
#: Seconds the assigner's preferred leader must have followed steadily before leadership is handed to it.
PREFERRED_AFTER = 3.0
#: Seconds a replica's node may be gone before the partition is placed without it.
REPLACE_AFTER = 60.0
#: Seconds consumers get to ack what they hold of a partition whose leadership moves gracefully.
ACK_GRACE = 1.0
#: Most consumer acks a leader keeps for one follower between two sends.
MAX_PENDING_ACKS = 1 << 20
#: Seconds a pre-vote waits for the other in-sync followers' answers.
PROBE_TIMEOUT = 0.2
#: ``PartitionProbe.heard_ms`` of a node that does not follow the leader asked about.
NEVER_HEARD = 0xFFFFFFFF
#: Seconds a graceful leave waits for a follower to have everything before it hands leadership over anyway.
HANDOFF_WAIT = 3.0


def synced(node: str, part: PartitionLog, record: Record) -> bool:
    """May ``node`` lead the partition (invariant 4): it is in the ISR and its log caught up with a leader's
    commit offset once (the stored epoch is set then; a new or wiped disk has 0)."""
    return node in record.isr and part.epoch > 0 and bool(part.epochs)


class Progress:
    """What a leader knows of one follower of one partition."""

    __slots__ = ("acks", "caught_up_at", "durable", "following", "following_since", "sent", "sent_commit",
                 "session", "tailing")

    def __init__(self, session: FollowerSession) -> None:
        self.session = session
        #: True once the follower truncated to our history and said where its log continues (and since when).
        self.following = False
        self.following_since = 0.0
        #: The offset the next data for it starts at.
        self.sent = 0
        #: Everything below is on its disk.
        self.durable = 0
        #: The commit offset last sent to it, and the consumers' acks not sent yet.
        self.sent_commit = -1
        self.acks: list[int] = []
        #: Caught up with the leader's disk once: what it lacks comes from memory (recent commits) from then on.
        self.tailing = False
        self.caught_up_at = session.replicator.clock()


class Leader:
    """This node leads a partition at ``epoch``."""

    def __init__(self, replicator: Replicator, part: PartitionLog, config: QueueConfig, record: Record,
                 hw: int) -> None:
        self.replicator = replicator
        self.part = part
        self.key: Partition = (part.queue, part.index)
        self.config = config
        self.record = record
        self.epoch = record.epoch
        #: The commit offset: everything below it is on every in-sync replica's disk.
        self.hw = hw
        self.followers: dict[str, Progress] = {}
        #: (first offset, records, their bytes) of recent commits, oldest first, for followers (BUFFER_BYTES at most).
        self.buffer: collections.deque[tuple[int, list[bytes], int]] = collections.deque()
        self.buffer_bytes = 0
        #: [offset, future] waiting for the commit offset to pass offset, in offset order.
        self.waiters: collections.deque[list[Any]] = collections.deque()
        self._waiter_turn = -1
        #: A record change (ISR) under way.
        self.changing = False
        #: Set while leadership is being handed over (a leave): no new writes.
        self.closing = False
        #: Nodes being added to the ISR -> the record revision the swap was tried at: counted for the commit until
        #: a record at least that new shows whether they are in it (a swap whose answer was lost may have won).
        self.adding: dict[str, int] = {}
        self.reason_logged = ""
        #: When this node began leading (members not following since count as behind from then).
        self.since = replicator.clock()

    # -- writes ---------------------------------------------------------------------------------------------

    def committed(self, offset: int, flush: asyncio.Future[None]) -> asyncio.Future[None]:
        """A future resolved once the message at ``offset`` is committed (on every in-sync replica), failed if
        its local commit fails or leadership moves first. Publishes of one loop turn share one future."""
        waiters = self.waiters
        turn = self.replicator.turn
        if waiters and self._waiter_turn == turn and not waiters[-1][1].done():
            entry = waiters[-1]
            entry[0] = offset
            if flush is not entry[2]:
                flush.add_done_callback(lambda f, e=entry: self._local_done(f, e))
            return entry[1]
        future = self.replicator.loop.create_future()
        entry = [offset, future, flush]
        if offset < self.hw:
            future.set_result(None)
            return future
        waiters.append(entry)
        self._waiter_turn = turn
        flush.add_done_callback(lambda f, e=entry: self._local_done(f, e))
        return future

    @staticmethod
    def _local_done(flush: asyncio.Future[None], entry: list[Any]) -> None:
        if flush.cancelled() or flush.exception() is None:
            return
        future = entry[1]
        if not future.done():
            future.set_exception(flush.exception())  # type: ignore[arg-type]

    def durable(self, runs: list[tuple[int, list[list[bytes]], Any]]) -> None:
        """Our own commit wrote these runs: keep them for the followers, and see if the commit offset moves."""
        buffer = self.buffer
        for first, batches, _ in runs:
            offset = first
            for payloads in batches:
                size = sum(map(len, payloads))
                buffer.append((offset, payloads, size))
                offset += len(payloads)
                self.buffer_bytes += size
        while self.buffer_bytes > BUFFER_BYTES and len(buffer) > 1:
            self.buffer_bytes -= buffer.popleft()[2]
        self.advance()
        self.replicator.wake_pump()

    def advance(self) -> None:
        """Raise the commit offset to what the in-sync set has on disk (invariant 1)."""
        part = self.part
        end = part.committed_offset
        if self.config.replication != "async":
            record = self.record
            if len(record.isr) < record.min_insync(self.config):
                self._hold(f"{len(record.isr)} of {record.min_insync(self.config)} in-sync replicas")
                return
            me = self.replicator.node_id
            for node in set(record.isr).union(self.adding):
                if node == me:
                    continue
                progress = self.followers.get(node)
                if progress is None or not progress.following:
                    self._hold(f"in-sync replica {node} is not following")
                    return
                end = min(end, progress.durable)
        if end <= self.hw:
            return
        if self.reason_logged:
            log.info("partition %s/%d acknowledges again", *self.key)
            self.reason_logged = ""
        self.hw = end
        part.set_visible(end)
        waiters = self.waiters
        while waiters and waiters[0][0] < end:
            future = waiters.popleft()[1]
            if not future.done():
                future.set_result(None)
        # (The followers learn the new commit offset with the next records, or at the next tick.)

    def _hold(self, reason: str) -> None:
        if self.reason_logged != reason and self.waiters:
            log.warning("partition %s/%d holds publishes: %s", self.key[0], self.key[1], reason)
            self.reason_logged = reason

    def settle_adding(self, record: Record) -> None:
        """A record newer than a swap that added a node settles it: in the ISR now, or definitely not."""
        self.adding = {n: rev for n, rev in self.adding.items() if n not in record.isr and record.revision <= rev}

    def acked(self, offsets: Iterable[int]) -> None:
        """Consumers acked these: each following follower gets them with its next records, or at the next tick
        (not urgent: an ack lost in a failover is a redelivery)."""
        for progress in self.followers.values():
            if progress.following:
                acks = progress.acks
                acks.extend(offsets)
                if len(acks) > MAX_PENDING_ACKS:  # (a follower not reading: it is redelivered the rest)
                    del acks[:len(acks) - MAX_PENDING_ACKS]

    def fail_waiters(self, error: ShoalError) -> None:
        waiters, self.waiters = self.waiters, collections.deque()
        for entry in waiters:
            if not entry[1].done():
                entry[1].set_exception(error)
                entry[1].exception()

    # -- followers ------------------------------------------------------------------------------------------

    def history(self) -> list[int]:
        return [n for entry in self.part.epochs for n in entry]

    def data_for(self, node: str, progress: Progress, budget: list[int], meta: bool) -> PartitionData | None:
        """The next message for one follower: what it lacks (from memory, else from disk, within ``budget``),
        with the acks and the commit offset; None if it lacks nothing (and, unless ``meta``, acks and the commit
        offset wait for the next records or the next tick: one stream message per commit, not three)."""
        part = self.part
        end = part.committed_offset
        records: list[bytes] = []
        offsets: list[int] = []
        new_end = 0
        if progress.sent < end and budget[0] > 0:
            start = progress.sent
            buffer = self.buffer
            # Only an in-sync follower tails from memory: a message there may have been acked since (the disk
            # skips those), and none that an in-sync follower lacks can have been (it is not committed yet).
            if (buffer and buffer[0][0] <= start and progress.tailing
                    and (node in self.record.isr or node in self.adding)):
                i = len(buffer) - 1
                while buffer[i][0] > start:  # (followers are usually at the tail: scan back from it)
                    i -= 1
                size = 0
                while i < len(buffer) and size < CATCHUP_BYTES:
                    first, payloads, nbytes = buffer[i]
                    skip = max(start - first, 0)
                    chunk = payloads[skip:] if skip else payloads
                    records.extend(chunk)
                    offsets.extend(range(first + skip, first + len(payloads)))
                    size += sum(map(len, chunk)) if skip else nbytes
                    i += 1
                new_end = end if i >= len(buffer) or not offsets else offsets[-1] + 1
            else:
                read = part.read_messages(start, CATCHUP_MESSAGES)
                size = 0
                for offset, payload, _ in read:
                    records.append(payload)
                    offsets.append(offset)
                    size += len(payload)
                    if size >= CATCHUP_BYTES:
                        break
                full = len(offsets) == CATCHUP_MESSAGES or size >= CATCHUP_BYTES
                new_end = offsets[-1] + 1 if full else end
                progress.tailing = not full  # caught up with the disk: the tail comes from memory from now on
            budget[0] -= size
            progress.sent = new_end
        if not records and not new_end and not (meta and (progress.acks or self.hw != progress.sent_commit)):
            return None
        progress.sent_commit = self.hw
        acks, progress.acks = progress.acks, []
        return PartitionData(queue=self.key[0], partition=self.key[1], epoch=self.epoch,
                             records=segment.pack(records) if records else b"", offsets=offsets,
                             end_offset=new_end, commit_offset=self.hw, acks=acks)

    def lag(self, now: float) -> tuple[int, float]:
        """(offsets, seconds) the furthest-behind replica lags: offsets it lacks of the leader's committed log
        (a replica not following lacks the partition's depth, as far as the leader knows), and seconds since it
        last had everything (0 for one that has)."""
        end = self.part.committed_offset
        worst, oldest = 0, 0.0
        for node in self.record.replicas:
            if node == self.replicator.node_id:
                continue
            progress = self.followers.get(node)
            if progress is None or not progress.following:
                behind, since = self.part.depth, now - (progress.caught_up_at if progress else self.since)
            else:
                behind = max(0, end - progress.durable)
                since = 0.0 if not behind else now - progress.caught_up_at
            worst, oldest = max(worst, behind), max(oldest, since)
        return worst, oldest

    def check_isr(self, now: float) -> None:
        """Shrink the ISR of members behind for ``replica_lag_ms``, add replicas that caught up, and grow the
        replicas towards the replication factor (each a compare-and-swap; one at a time)."""
        if self.changing or self.closing:
            return
        record = self.record
        me = self.replicator.node_id
        end = self.part.committed_offset
        lag = self.config.replica_lag_ms / 1000
        minimum = record.min_insync(self.config)
        for node in record.replicas:
            if node == me:
                continue
            progress = self.followers.get(node)
            if progress is not None and progress.following and progress.durable >= end:
                progress.caught_up_at = now
            if node in record.isr:
                behind_since = progress.caught_up_at if progress is not None else self.since
                if now - behind_since > lag and len(record.isr) > minimum:
                    isr = tuple(n for n in record.isr if n != node)
                    log.warning("partition %s/%d: replica %s is %s, leaving the in-sync set", *self.key, node,
                                "behind" if progress is not None else "not following")
                    self.replicator.change(self, replace(record, isr=isr))
                    return
            elif (progress is not None and progress.following and progress.durable >= self.hw
                  and progress.durable >= self._epoch_start):
                self.adding[node] = record.revision
                isr = tuple(n for n in record.replicas if n in record.isr or n == node)
                log.info("partition %s/%d: replica %s caught up, joining the in-sync set", *self.key, node)
                self.replicator.change(self, replace(record, isr=isr))
                return
        self._rebalance(now)

    def _rebalance(self, now: float) -> None:
        """Move the replicas towards the assigner's placement over the live nodes, one step at a time and never
        below the replication factor: add a wanted node (one over the factor at most), and once every wanted
        node is in sync, drop one that is not wanted; then hand leadership to the wanted leader once it has
        everything (a join, a node back, or the queue created while few nodes were up)."""
        record = self.record
        me = self.replicator.node_id
        factor = self.config.replication_factor
        wanted = self.replicator.wanted_replicas(self.key, self.config, record)
        if not wanted:
            return
        missing = [n for n in wanted if n not in record.replicas]
        if missing and len(record.replicas) <= factor:
            log.info("partition %s/%d: adding replica %s", *self.key, missing[0])
            self.replicator.change(self, replace(record, replicas=(*record.replicas, missing[0])))
            return
        extra = [n for n in record.replicas if n not in wanted and n != me]
        if extra and len(record.replicas) > factor and all(n in record.isr for n in wanted if n != me):
            drop = extra[0]
            isr = tuple(n for n in record.isr if n != drop)
            if len(isr) >= record.min_insync(self.config):
                log.info("partition %s/%d: dropping replica %s (placed elsewhere now)", *self.key, drop)
                self.replicator.change(self, replace(record, replicas=tuple(n for n in record.replicas if n != drop),
                                                     isr=isr))
                return
        preferred = wanted[0]
        if preferred != me and preferred in record.isr:
            progress = self.followers.get(preferred)
            # (Only once it has followed steadily for a while: a node just back still has streams to open.)
            if (progress is not None and progress.following and now - progress.following_since > PREFERRED_AFTER
                    and progress.durable >= self.part.committed_offset):
                self.replicator.hand_over(self, preferred)

    @property
    def _epoch_start(self) -> int:
        epochs = self.part.epochs
        return epochs[-1][1] if epochs else 0


class Follower:
    """This node follows a partition led by ``leader`` at ``epoch``."""

    def __init__(self, replicator: Replicator, part: PartitionLog, record: Record) -> None:
        self.replicator = replicator
        self.part = part
        self.key: Partition = (part.queue, part.index)
        self.leader = record.leader
        self.epoch = record.epoch
        self.subscribed = False
        #: The leader's commit offset, as last heard.
        self.leader_commit = 0
        #: The leader's epoch history (pairs), from its answer to our subscribe, and how many of them we took.
        self.history: list[tuple[int, int]] = []
        self._adopted = 0
        #: Set while proposing itself: nothing from the old leader is acknowledged any more.
        self.candidate = False
        #: The leader said it does not lead the partition: treat it as silent.
        self.refused = False
        self.started = replicator.clock()
        #: Acks of messages not yet durable here (applied after the next commit).
        self.deferred_acks: list[int] = []
        #: While at least CATCH_UP_BEHIND messages behind the leader's commit: progress logged every few seconds.
        self._catching_up: tuple[Progress, int] | None = None

    def state(self, subscribe: bool = False) -> broker_pb2.FollowerState:
        part = self.part
        epochs = part.epochs
        return broker_pb2.FollowerState(queue=self.key[0], partition=self.key[1], epoch=self.epoch,
                                        subscribe=subscribe, last_epoch=epochs[-1][0] if epochs else 0,
                                        end_offset=part.next_offset, durable_offset=part.committed_offset)

    def receive(self, data: PartitionData) -> None:
        part = self.part
        if data.status == PartitionData.NOT_LEADER:
            self.refused = True
            self.subscribed = False
            return
        if data.epoch < self.epoch or self.candidate:
            return  # a stale leader (invariant 3): nothing of it is acknowledged
        self.refused = False
        if data.epoch > self.epoch:  # the leader moved on before our view of the record did
            self.epoch = data.epoch
            if not data.has_history:
                self.subscribed = False
                self.replicator.resubscribe(self)
                return
        if data.has_history:
            self._truncate(data)
        if not self.subscribed:
            return
        if data.records:
            records = segment.unpack(data.records)
            offsets = list(data.offsets)
            if len(offsets) != len(records):
                log.error("replication data for %s/%d is malformed (%d offsets for %d records): resubscribing",
                          *self.key, len(offsets), len(records))
                self.subscribed = False
                self.replicator.resubscribe(self)
                return
            flush = None
            n = len(offsets)
            start = 0
            if offsets[0] < part.next_offset:  # sent twice (a resubscribe crossed data on the way)
                start = bisect.bisect_left(offsets, part.next_offset)
            try:
                if start >= n:
                    pass
                elif offsets[-1] - offsets[start] == n - 1 - start:  # (the usual case: one run, no gaps)
                    flush = part.append_at(offsets[start], records[start:] if start else records)
                else:
                    i = start
                    while i < n:
                        j = i + 1
                        while j < n and offsets[j] == offsets[j - 1] + 1:
                            j += 1
                        flush = part.append_at(offsets[i], records[i:j])
                        i = j
            except (ShoalError, ValueError) as exc:  # (a full disk, a limit this node has lower, a bad offset)
                log.warning("partition %s/%d: cannot store what leader %s sent (%s): following again", *self.key,
                            self.leader, exc)
                self.subscribed = False
                self.replicator.resubscribe(self)
                return
            if flush is not None:
                flush.add_done_callback(self._flushed)
        if data.end_offset > part.next_offset:
            part.advance_to(data.end_offset)
            self.replicator.report_soon(self)
        self._adopt_history()
        if data.acks:
            self.deferred_acks.extend(part.ack_stored(data.acks))
        if data.commit_offset > self.leader_commit:
            self.leader_commit = data.commit_offset
        behind = self.leader_commit - part.next_offset
        if behind >= CATCH_UP_BEHIND or self._catching_up is not None:
            self._progress(behind)
        self._mark_synced()

    def _progress(self, behind: int) -> None:
        """Say how far a follower far behind has come (at most every few seconds), and when it has caught up."""
        part = self.part
        if self._catching_up is None:
            what = f"partition {self.key[0]}/{self.key[1]}: catching up from leader {self.leader}"
            self._catching_up = (Progress(log, what, behind, "offsets"), part.next_offset)
            return
        progress, start = self._catching_up
        if behind > 0:
            progress.total = max(progress.total, part.next_offset - start + behind)
            progress.step(part.next_offset - start, f", at offset {part.next_offset:,} of {self.leader_commit:,}")
            return
        if progress.logged:
            log.info("partition %s/%d: caught up with leader %s: %s offsets copied in %.1f s", *self.key,
                     self.leader, f"{part.next_offset - start:,}", time.monotonic() - progress.started)
        self._catching_up = None

    def _truncate(self, data: PartitionData) -> None:
        """Cut the log where it parts from the leader's history (invariant 5), adopt the history, report."""
        part = self.part
        flat = list(data.history)
        history = [(flat[i], flat[i + 1]) for i in range(0, len(flat) - 1, 2)]
        self.history = history
        epochs = part.epochs
        cut = part.next_offset if epochs else 0  # (a log with no history keeps nothing it cannot place)
        if epochs:
            mine = epochs[-1][0]
            # The leader's end of the largest of its epochs not above our last one.
            theirs_epoch, theirs_end = 0, history[0][1] if history else 0
            for k, (epoch, start) in enumerate(history):
                if epoch <= mine:
                    theirs_epoch = epoch
                    theirs_end = history[k + 1][1] if k + 1 < len(history) else (1 << 63)
            _, my_end = part.epoch_end(theirs_epoch)
            cut = min(cut, my_end, theirs_end)
        if cut < part.next_offset:
            removed = part.truncate(cut)
            log.info("partition %s/%d: log cut at offset %d where it parts from leader %s's (%d message(s) "
                     "removed)", *self.key, cut, self.leader, removed)
        self.subscribed = True
        self._adopt_history(force=True)
        self.replicator.report_soon(self)

    def _adopt_history(self, force: bool = False) -> None:
        """Take the leader's epochs that cover our log (its last one from the moment the log reaches its start);
        ``force``: right after a truncation, replacing ours. Otherwise a look at one entry per data message."""
        history, end = self.history, self.part.next_offset
        count = 0 if force else self._adopted
        last = len(history) - 1
        while count <= last and (history[count][1] < end or count == last and history[count][1] == end):
            count += 1
        if force or count != self._adopted:
            self._adopted = count
            entries = history[:count]
            if entries != self.part.epochs:
                try:
                    self.part.set_epochs(entries)
                except ValueError as exc:
                    log.error("partition %s/%d: cannot adopt the leader's epochs %r: %s", *self.key, entries, exc)

    def _mark_synced(self) -> None:
        """Our log has everything the leader committed: it may lead (invariant 4) from now on."""
        part = self.part
        if part.epoch < self.epoch and self.subscribed and part.committed_offset >= self.leader_commit:
            part.set_epoch(self.epoch)

    def _flushed(self, flush: asyncio.Future[None]) -> None:
        if flush.cancelled() or flush.exception() is not None:
            return
        if self.deferred_acks:
            acks, self.deferred_acks = self.deferred_acks, []
            self.deferred_acks = self.part.ack_stored(acks)
        self._mark_synced()
        self.replicator.report_soon(self)

    def eligible(self, record: Record) -> bool:
        """May this node lead the partition (invariant 4)?"""
        return synced(self.replicator.node_id, self.part, record)


class FollowerSession:
    """The leader's end of one follower node's ``Replicate`` stream."""

    def __init__(self, replicator: Replicator, peer: str, identity: str | None = None) -> None:
        self.replicator = replicator
        self.peer = peer
        #: The node its certificate names (None: plain gRPC); the node id it gives must be this one.
        self.identity = identity
        self.node = ""
        self.outgoing: asyncio.Queue[broker_pb2.ReplicaData | None] = asyncio.Queue()
        self.pending: list[PartitionData] = []
        #: Set when the stream ends.
        self.closed = False
        #: (queue, partition) this stream follows here.
        self.partitions: set[Partition] = set()

    @property
    def backed_up(self) -> bool:
        return self.outgoing.qsize() >= SESSION_BACKLOG

    def send(self, data: PartitionData) -> None:
        self.pending.append(data)

    def flush(self) -> None:
        if self.pending:
            pending, self.pending = self.pending, []
            self.outgoing.put_nowait(broker_pb2.ReplicaData(partitions=pending))

    async def read(self, requests: AsyncIterator[broker_pb2.ReplicaRequest]) -> None:
        try:
            async for request in requests:
                if request.node:
                    if self.identity is not None and request.node != self.identity:
                        log.warning("replication stream from %s refused: it says it is node %s, its certificate "
                                    "names %s", self.peer, request.node, self.identity or "nobody")
                        return
                    self.node = request.node
                if not self.node:
                    continue
                for state in request.partitions:
                    self.replicator.follower_state(self, state)
                self.flush()
        finally:
            self.outgoing.put_nowait(None)


class FollowerLink:
    """This node's stream to one leader node, for every partition it follows there."""

    def __init__(self, replicator: Replicator, node: str, target: str) -> None:
        self.replicator = replicator
        self.node = node
        self.target = target
        self.partitions: dict[Partition, Follower] = {}
        self.last_heard = replicator.clock()
        self.stream = replicator.open_stream(target, "Replicate", self._received, self._lost, reconnect_delay=0.05,
                                             first=self._first)

    def _first(self) -> list[broker_pb2.ReplicaRequest]:
        states = []
        for follower in self.partitions.values():
            follower.subscribed = False
            states.append(follower.state(subscribe=True))
        return [broker_pb2.ReplicaRequest(node=self.replicator.node_id, partitions=states)]

    def start(self) -> None:
        self.stream.start()

    def _received(self, message: broker_pb2.ReplicaData) -> None:
        self.last_heard = self.replicator.clock()
        partitions = self.partitions
        for data in message.partitions:
            follower = partitions.get((data.queue, data.partition))
            if follower is not None:
                follower.receive(data)

    def _lost(self, error: PeerGone) -> None:
        for follower in self.partitions.values():
            follower.subscribed = False
        log.debug("replication stream to %s lost: %s", self.node, error)

    def send(self, states: list[broker_pb2.FollowerState]) -> None:
        stats.sent("replicate_progress", len(states))
        self.stream.send(broker_pb2.ReplicaRequest(node=self.replicator.node_id, partitions=states))

    async def close(self) -> None:
        await self.stream.close()


class Replicator:
    """The replicated partitions of one node: roles from the records, streams, commit, failover, handoffs."""

    def __init__(self, etcd: Etcd, membership: Membership, view: ClusterView, manager: QueueManager,
                 definitions: QueueDefinitions, assigner: PartitionAssigner, *,
                 clock: Callable[[], float] = time.monotonic, open_stream: Callable[..., Any] = PeerStream) -> None:
        self.etcd = etcd
        #: Seconds, for silences and lags (a fake clock in unit tests), and how streams to leaders are opened.
        self.clock = clock
        self.open_stream = open_stream
        #: Asks a peer ``ProbeLeaders`` (node, target, request) -> its answers; over gRPC unless a test sets it.
        self.probe_peer: Callable[..., Any] = self._probe_over_grpc
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._candidates: list[tuple[Follower, Record, float]] = []
        self._last_live: dict[str, float] = {}
        #: Led partitions not dispatched from for a moment (a move gives consumers time to ack what they hold).
        self.draining: set[Partition] = set()
        self.membership = membership
        self.view = view
        self.manager = manager
        self.definitions = definitions
        self.assigner = assigner
        self.node_id = membership.node_id
        self.loop = asyncio.get_running_loop()
        self.leaders: dict[Partition, Leader] = {}
        self.followers: dict[Partition, Follower] = {}
        self.links: dict[str, FollowerLink] = {}
        self.sessions: set[FollowerSession] = set()
        #: Called after this node's leaderships change (dispatch sources, held forwards).
        self.on_change: list[Callable[[], None]] = []
        #: Advanced every loop turn something is published (publishes of one turn share a future).
        self.turn = 0
        self.leaving = False
        self._pump_scheduled = False
        self._reports: dict[str, dict[Partition, Follower]] = {}
        self._report_scheduled = False
        self._task: asyncio.Task[None] | None = None
        self._proposing: set[Partition] = set()
        self._stopping = False
        self._last_heartbeat = 0.0
        self._ticks = 0

    # -- life -----------------------------------------------------------------------------------------------

    def attach(self) -> None:
        self.manager.store.on_durable = self._durable
        self.manager.store.on_acked = self._acked
        self.manager.replication = self
        self.view.on_owners.append(self.reconcile)
        self.view.on_definitions.append(self.reconcile)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="shoalmq-replication")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for leader in list(self.leaders.values()):
            self._demote(leader, "the node is stopping")
        for session in list(self.sessions):
            session.outgoing.put_nowait(None)
        await asyncio.gather(*(link.close() for link in self.links.values()), return_exceptions=True)
        self.links.clear()
        await asyncio.gather(*(channel.close() for channel in self._channels.values()), return_exceptions=True)
        self._channels.clear()

    def replicated(self, name: str) -> bool:
        config = self.view.definitions.get(name)
        return config is not None and config.replication_factor > 1

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(TICK)
            try:
                self._tick()
            except Exception:  # a bug must not end the loop that keeps replication going
                log.exception("replication check failed")

    def _tick(self) -> None:
        now = self.clock()
        self._ticks += 1
        if self._ticks % 10 == 0:
            self.reconcile()
        for leader in list(self.leaders.values()):
            leader.check_isr(now)
        for follower in list(self.followers.values()):
            self._check_leader(follower, now)
        if self.leaders:
            self._pump(meta=True)  # acks and commit offsets not sent with records since the last tick
        if now - self._last_heartbeat >= HEARTBEAT_INTERVAL:
            self._last_heartbeat = now
            for session in self.sessions:
                if session.outgoing.empty() and not session.pending:
                    session.outgoing.put_nowait(broker_pb2.ReplicaData())
            for link in self.links.values():
                # Unanswered subscribes (a leader that was not leading yet) are sent again.
                states = [f.state(subscribe=True) for f in link.partitions.values()
                          if not f.subscribed and not f.candidate]
                if states and link.stream.connected:
                    link.send(states)

    # -- roles ----------------------------------------------------------------------------------------------

    def reconcile(self) -> None:
        """Take up the role each record gives this node; create the records of new partitions we should lead."""
        if self._stopping:
            return
        view = self.view
        live = [n for n in self.membership.serving() if not ((self.leaving or self.membership.draining)
                                                             and n == self.node_id)]
        me = self.node_id
        for name, config in list(view.definitions.items()):
            if config.replication_factor < 2 or not self.definitions.servable(name):
                continue
            for index in range(config.partitions):
                key = (name, index)
                record = view.records.get(key)
                if record is None:
                    if live and not self.leaving and me in live and key not in self._proposing:
                        wanted = self.assigner.replicas(name, index, live, config.replication_factor,
                                                        partitions=config.partitions)
                        if wanted[0] == me:
                            isr = tuple(wanted)
                            self._propose(key, Record(me, self._next_epoch(key), tuple(wanted), isr, 0), None)
                    continue
                self._take_role(key, config, record)

    def _take_role(self, key: Partition, config: QueueConfig, record: Record) -> None:
        me = self.node_id
        leader = self.leaders.get(key)
        if leader is not None:
            if record.leader == me and record.epoch == leader.epoch:
                if record.revision >= leader.record.revision:
                    leader.record = record
                    leader.settle_adding(record)
                    leader.advance()
                return
            self._demote(leader, f"the record names {record.leader} at epoch {record.epoch}")
        part = self.manager.queue(key[0]).partition(key[1])
        if record.leader == me:
            if key in self._proposing or self.leaving:
                return
            follower = self.followers.get(key)
            if not synced(me, part, record):
                return  # (a log not synced, a wiped disk say, never leads: the others take over)
            if record.epoch > part.epochs[-1][0]:
                # A handoff named us at a new epoch: begin it (invariant 4).
                self._become_leader(key, config, record, follower.leader_commit if follower else 0)
            else:
                # Ours before a restart (or a handoff back): lead again, at a new epoch.
                self._propose(key, replace(record, epoch=self._next_epoch(key)), record)
            return
        if me not in record.replicas:
            self._stop_following(key)
            return
        follower = self.followers.get(key)
        if follower is not None and follower.leader == record.leader and follower.epoch >= record.epoch:
            node = self.view.nodes.get(record.leader)
            link = self.links.get(record.leader)
            target = node.get("grpc") if node else None
            if target is None or (link is not None and link.target == target and key in link.partitions):
                return
            # The leader's node is live now (or back on another address): follow it there.
        self._follow(key, record, part)

    def _follow(self, key: Partition, record: Record, part: PartitionLog) -> None:
        self._stop_following(key)
        node = self.view.nodes.get(record.leader)
        target = node.get("grpc") if node else None
        part.replicated = False
        part.reset_reads(0)
        follower = Follower(self, part, record)
        self.followers[key] = follower
        if target is None:
            return  # the leader is not live: the failover check proposes us once it has been silent long enough
        link = self.links.get(record.leader)
        if link is None or link.target != target:
            old = link
            link = self.links[record.leader] = FollowerLink(self, record.leader, target)
            link.last_heard = self.clock()
            if old is not None:  # (the leader's node came back on another address: its partitions move along)
                link.partitions.update(old.partitions)
                asyncio.ensure_future(old.close())
        link.partitions[key] = follower
        if link.stream.connected:
            link.send([follower.state(subscribe=True)])
        else:
            link.start()

    def forget_queue(self, name: str) -> None:
        """The queue was deleted: lead and follow none of its partitions from now on (its records are deleted by
        the node deleting it)."""
        for key, leader in list(self.leaders.items()):
            if key[0] == name:
                self._demote(leader, "its queue was deleted")
        for key in [key for key in self.followers if key[0] == name]:
            self._stop_following(key)

    def _stop_following(self, key: Partition) -> None:
        follower = self.followers.pop(key, None)
        if follower is None:
            return
        link = self.links.get(follower.leader)
        if link is not None:
            link.partitions.pop(key, None)
            if not link.partitions:
                del self.links[follower.leader]
                asyncio.ensure_future(link.close())

    def resubscribe(self, follower: Follower) -> None:
        link = self.links.get(follower.leader)
        if link is not None and link.partitions.get(follower.key) is follower:
            link.send([follower.state(subscribe=True)])

    def _become_leader(self, key: Partition, config: QueueConfig, record: Record, hw: int) -> None:
        self._stop_following(key)
        part = self.manager.queue(key[0]).partition(key[1])
        epochs = part.epochs
        if not epochs or epochs[-1][0] < record.epoch:
            part.begin_epoch(record.epoch, part.next_offset)
        elif part.epoch < record.epoch:
            part.set_epoch(record.epoch)
        hw = min(hw, part.committed_offset)
        part.replicated = True
        part.reset_reads(hw)
        leader = Leader(self, part, config, record, hw)
        self.leaders[key] = leader
        self.view.mine[key] = record.epoch
        stats.COUNTERS.leader_changes += 1
        log.info("partition %s/%d led here from epoch %d (replicas %s, in sync %s)", key[0], key[1], record.epoch,
                 ",".join(record.replicas), ",".join(record.isr))
        leader.advance()
        self._changed()

    def _demote(self, leader: Leader, why: str) -> None:
        key = leader.key
        if self.leaders.get(key) is not leader:
            return
        del self.leaders[key]
        if self.view.mine.get(key) == leader.epoch:
            del self.view.mine[key]
        leader.fail_waiters(NotOwner(f"partition {key[0]}/{key[1]} is no longer led here ({why})"))
        self.manager.take_back(*key)
        part = leader.part
        part.replicated = False
        part.reset_reads(0)
        for progress in leader.followers.values():
            progress.session.partitions.discard(key)
        log.info("partition %s/%d no longer led here: %s", key[0], key[1], why)
        self._changed()

    def _changed(self) -> None:
        for callback in self.on_change:
            callback()

    def _next_epoch(self, key: Partition) -> int:
        record = self.view.records.get(key)
        part = self.manager.queue(key[0]).partition(key[1])
        known = max(self.view.max_epoch.get(key, 0), record.epoch if record else 0, part.epoch,
                    part.epochs[-1][0] if part.epochs else 0)
        return known + 1

    def wanted_replicas(self, key: Partition, config: QueueConfig, record: Record | None = None) -> list[str]:
        """The assigner's replicas for the partition over the live nodes, counting as live a replica gone for less
        than REPLACE_AFTER (a node restarting keeps its place; one gone for good is replaced)."""
        now = self.clock()
        live = set(self.view.nodes)
        for node in live:
            self._last_live[node] = now
        candidates = set(live)
        for node in record.replicas if record is not None else ():
            if node not in live and now - self._last_live.setdefault(node, now) < REPLACE_AFTER:
                candidates.add(node)
        if self.leaving:
            candidates.discard(self.node_id)
        candidates -= {n for n, info in self.view.nodes.items() if info.get("draining")}
        if not candidates:
            return []
        return self.assigner.replicas(key[0], key[1], sorted(candidates), config.replication_factor,
                                      partitions=config.partitions)

    def hand_over(self, leader: Leader, target: str) -> None:
        """Move leadership to ``target`` (an in-sync follower): stop taking writes, wait until it has everything
        (HANDOFF_WAIT at most; else take writes again), then name it leader at epoch + 1."""
        if leader.closing or leader.changing or leader.key in self.draining:
            return
        asyncio.ensure_future(self._hand_over(leader, target))

    async def _drain(self, leaders: list[Leader]) -> None:
        """Stop dispatching from these partitions (writes go on) and give consumers ACK_GRACE to ack what they
        hold, so that a graceful move does not deliver it all again; the acks then go to the followers."""
        keys = {leader.key for leader in leaders}
        self.draining |= keys
        self._changed()
        deadline = self.clock() + ACK_GRACE
        try:
            while self.clock() < deadline and any(
                    self.leaders.get(k) is not None and self.manager.held(*k) for k in keys):
                await asyncio.sleep(0.01)
        finally:
            self.draining -= keys
        self._pump(meta=True)  # (the acks made meanwhile, to the followers now)
        await asyncio.sleep(0)

    async def _hand_over(self, leader: Leader, target: str) -> None:
        await self._drain([leader])
        if self.leaders.get(leader.key) is not leader or leader.closing or leader.changing:
            self._changed()
            return
        if not await self._move_leadership(leader, target, HANDOFF_WAIT) and self.leaders.get(leader.key) is leader \
                and not self.leaving:
            # Not handed over (the target fell behind, or the swap failed): lead on.
            leader.closing = False
            self.view.mine[leader.key] = leader.epoch
            self._changed()

    async def _move_leadership(self, leader: Leader, target: str | None, timeout: float) -> bool:
        """Stop taking writes, wait (``timeout`` at most) until ``target`` (None: any in-sync follower) has
        everything, then name it leader at epoch + 1 (leaving: with this node out of the ISR, if enough remain).
        True once the swap is done."""
        leader.closing = True
        if self.view.mine.pop(leader.key, None) is not None:
            self._changed()
        deadline = self.clock() + timeout
        while self.leaders.get(leader.key) is leader and self.clock() < deadline:
            chosen = self._handoff_target(leader, target)
            if chosen is not None and not leader.changing:
                record = leader.record
                isr = record.isr
                if self.leaving and len(isr) - 1 >= record.min_insync(leader.config):
                    isr = tuple(n for n in isr if n != self.node_id)
                log.info("partition %s/%d: handing leadership to %s at epoch %d", *leader.key, chosen,
                         record.epoch + 1)
                await self._swap(leader.key, replace(record, leader=chosen, epoch=record.epoch + 1, isr=isr),
                                 record.revision, leader)
                return self.leaders.get(leader.key) is not leader
            await asyncio.sleep(0.005)
        return False

    # -- record changes (compare-and-swap) --------------------------------------------------------------------

    def _propose(self, key: Partition, record: Record, current: Record | None) -> None:
        """Make ``record`` the partition's (creating it if ``current`` is None), then lead it if it names us."""
        self._proposing.add(key)
        asyncio.ensure_future(self._swap(key, record, current.revision if current else 0, None))

    def change(self, leader: Leader, record: Record) -> None:
        """An ISR or replicas change by the leader."""
        leader.changing = True
        asyncio.ensure_future(self._swap(leader.key, record, leader.record.revision, leader))

    async def _swap(self, key: Partition, record: Record, revision: int, leader: Leader | None) -> None:
        try:
            written, current = await self.etcd.call(self.etcd.put_if_revision_sync, self.view.partition_key(key),
                                                    record.value(), revision)
        except ShoalError as exc:
            log.warning("cannot change the record of %s/%d now: %s", key[0], key[1], exc)
            written, current = 0, None
        finally:
            self._proposing.discard(key)
            if leader is not None:
                leader.changing = False
        if written:
            record = replace(record, revision=written)
            self.view.record_replica(key, record)
            config = self.view.definitions.get(key[0])
            if config is None:
                return
            if leader is not None:
                if self.leaders.get(key) is leader:
                    if record.leader != self.node_id:  # handed over
                        self._demote(leader, f"leadership handed to {record.leader} at epoch {record.epoch}")
                    else:
                        leader.record = record
                        leader.settle_adding(record)
                        leader.advance()
            elif record.leader == self.node_id and key not in self.leaders:
                follower = self.followers.get(key)
                self._become_leader(key, config, record, follower.leader_commit if follower else 0)
        else:
            if current is not None:
                parsed = parse_record(current.value, current.mod_revision)
                if parsed is not None:
                    self.view.record_replica(key, parsed)
            follower = self.followers.get(key)
            if follower is not None:
                follower.candidate = False
        self.reconcile()

    # -- failover -------------------------------------------------------------------------------------------

    def _check_leader(self, follower: Follower, now: float) -> None:
        """Propose this node for a partition whose leader has been silent too long (after a pre-vote)."""
        if follower.candidate or self.leaving:
            return
        record = self.view.records.get(follower.key)
        if record is None or record.leader == self.node_id or not follower.eligible(record):
            return
        link = self.links.get(follower.leader)
        heard = max(link.last_heard if link is not None and not follower.refused else 0.0, follower.started)
        others = sorted(n for n in record.isr if n != record.leader)
        rank = others.index(self.node_id) if self.node_id in others else len(others)
        if now - heard < FAILOVER_TIMEOUT + rank * RANK_DELAY:
            return
        config = self.view.definitions.get(follower.key[0])
        if config is None:
            return
        follower.candidate = True  # from here on, nothing of the old leader is acknowledged (invariant 3)
        self._candidates.append((follower, record, now - heard))
        if len(self._candidates) == 1:
            self.loop.call_soon(lambda: asyncio.ensure_future(self._elect()))

    async def _elect(self) -> None:
        """Pre-vote, then propose: ask the other in-sync followers of each candidate partition (one request per
        node) when they last heard from its leader; propose where none heard it within half the failover timeout
        (a node that does not answer counts as not hearing it)."""
        candidates, self._candidates = self._candidates, []
        asks: dict[str, list[broker_pb2.PartitionProbe]] = {}
        for follower, record, _ in candidates:
            for node in record.isr:
                if node not in (record.leader, self.node_id):
                    asks.setdefault(node, []).append(broker_pb2.PartitionProbe(
                        queue=follower.key[0], partition=follower.key[1], leader=record.leader, epoch=record.epoch))
        answers = await asyncio.gather(*(self._probe(node, probes) for node, probes in asks.items()))
        alive: set[Partition] = set()
        for reply in answers:
            for probe in reply:
                if probe.heard_ms < FAILOVER_TIMEOUT * 500:
                    alive.add((probe.queue, probe.partition))
        for follower, record, silence in candidates:
            key = follower.key
            if key in alive or self.followers.get(key) is not follower or self.view.records.get(key) != record:
                follower.candidate = False
                if key in alive:
                    log.info("partition %s/%d: leader %s silent here for %.2f s but heard by another in-sync "
                             "replica: not proposing", key[0], key[1], record.leader, silence)
                continue
            config = self.view.definitions.get(key[0])
            if config is None:
                follower.candidate = False
                continue
            isr = tuple(n for n in record.isr if n != record.leader)
            if len(isr) < record.min_insync(config):
                isr = record.isr  # never below min_insync (the old leader stays, out of reach, until it is back)
            log.warning("partition %s/%d: leader %s silent for %.2f s, proposing this node at epoch %d", key[0],
                        key[1], record.leader, silence, record.epoch + 1)
            self._propose(key, replace(record, leader=self.node_id, epoch=record.epoch + 1, isr=isr), record)

    async def _probe(self, node: str, probes: list[broker_pb2.PartitionProbe]) -> list[broker_pb2.PartitionProbe]:
        """``ProbeLeaders`` on one peer, PROBE_TIMEOUT at most (no answer: it hears nobody)."""
        info = self.view.nodes.get(node)
        target = info.get("grpc") if info else None
        if target is None:
            return []
        try:
            return list(await asyncio.wait_for(self.probe_peer(node, target, broker_pb2.LeaderProbe(
                partitions=probes)), PROBE_TIMEOUT))
        except (TimeoutError, grpc.aio.AioRpcError, ShoalError) as exc:
            log.debug("no pre-vote answer from %s: %r", node, exc)
            return []

    async def _probe_over_grpc(self, node: str, target: str,
                               request: broker_pb2.LeaderProbe) -> list[broker_pb2.PartitionProbe]:
        channel = self._channels.get(target)
        if channel is None:
            channel = self._channels[target] = open_channel(target)
        reply = await broker_pb2_grpc.BrokerStub(channel).ProbeLeaders(request, timeout=PROBE_TIMEOUT)
        return list(reply.partitions)

    def probe(self, request: broker_pb2.LeaderProbe) -> broker_pb2.LeaderProbe:
        """Answer a pre-vote: when this node last heard from each leader named (see ``ProbeLeaders``)."""
        now = self.clock()
        out = []
        for probe in request.partitions:
            key = (probe.queue, probe.partition)
            heard_ms = NEVER_HEARD
            leader = self.leaders.get(key)
            follower = self.followers.get(key)
            if leader is not None and leader.epoch >= probe.epoch:
                heard_ms = 0  # we lead it (a failover already happened): the proposal would be stale
            elif (follower is not None and not follower.candidate and not follower.refused
                  and (follower.epoch > probe.epoch or follower.leader == probe.leader)):
                link = self.links.get(follower.leader)
                if link is not None and link.stream.connected:
                    heard_ms = min(int((now - link.last_heard) * 1000), NEVER_HEARD)
            out.append(broker_pb2.PartitionProbe(queue=probe.queue, partition=probe.partition, leader=probe.leader,
                                                 epoch=probe.epoch, heard_ms=heard_ms))
        return broker_pb2.LeaderProbe(partitions=out)

    # -- the leader's side of the streams ----------------------------------------------------------------------

    async def serve(self, requests: AsyncIterator[broker_pb2.ReplicaRequest], peer: str,
                    identity: str | None = None) -> AsyncIterator[broker_pb2.ReplicaData]:
        session = FollowerSession(self, peer, identity)
        self.sessions.add(session)
        reader = asyncio.ensure_future(session.read(requests))
        try:
            while True:
                message = await session.outgoing.get()
                if message is None:
                    return
                if message.partitions:
                    stats.sent("replicate", sum(len(p.offsets) for p in message.partitions))
                else:
                    stats.sent("replicate_heartbeat", 0)
                yield message
                if session.outgoing.qsize() < SESSION_BACKLOG // 2:
                    self.wake_pump()
        finally:
            reader.cancel()
            session.closed = True
            self.sessions.discard(session)
            for key in session.partitions:
                leader = self.leaders.get(key)
                progress = leader.followers.get(session.node) if leader is not None else None
                if progress is not None and progress.session is session:
                    # Not following until it subscribes again; it leaves the ISR only after replica_lag_ms of that
                    # (a stream that breaks and reconnects at once costs nothing).
                    progress.following = False
                    progress.tailing = False

    def follower_state(self, session: FollowerSession, state: broker_pb2.FollowerState) -> None:
        key = (state.queue, state.partition)
        leader = self.leaders.get(key)
        if leader is None or state.epoch > leader.epoch or leader.closing and state.subscribe:
            if leader is not None and state.epoch > leader.epoch:
                self._demote(leader, f"follower {session.node} follows epoch {state.epoch}")
            session.send(PartitionData(queue=state.queue, partition=state.partition, epoch=state.epoch,
                                       status=PartitionData.NOT_LEADER))
            return
        if state.subscribe:
            progress = leader.followers.get(session.node)
            if progress is None or progress.session is not session:
                previous = progress
                progress = leader.followers[session.node] = Progress(session)
                if previous is not None:  # (behind since then: a reconnect does not reset replica_lag_ms)
                    progress.caught_up_at = previous.caught_up_at
                session.partitions.add(key)
            progress.following = False
            progress.tailing = False
            progress.sent_commit = leader.hw
            session.send(PartitionData(queue=state.queue, partition=state.partition, epoch=leader.epoch,
                                       has_history=True, history=leader.history(), commit_offset=leader.hw))
            return
        progress = leader.followers.get(session.node)
        if progress is None or progress.session is not session or state.epoch != leader.epoch:
            return
        if not progress.following:
            progress.following = True
            progress.following_since = self.clock()
            progress.sent = state.end_offset
        progress.durable = max(progress.durable, state.durable_offset) if progress.following else 0
        if state.durable_offset < progress.durable:
            progress.durable = state.durable_offset
        leader.advance()
        self.wake_pump()

    def wake_pump(self) -> None:
        if not self._pump_scheduled:
            self._pump_scheduled = True
            self.loop.call_soon(self._pump)

    def _pump(self, meta: bool = False) -> None:
        """Send every follower what it lacks (and with it the acks and commit offset; ``meta``: those alone too):
        one stream message per follower."""
        self._pump_scheduled = False
        self.turn += 1
        budget = [32 << 20]
        more = False
        for leader in self.leaders.values():
            for node, progress in leader.followers.items():
                session = progress.session
                if not progress.following or session.closed or session.backed_up:
                    continue
                data = leader.data_for(node, progress, budget, meta)
                if data is not None:
                    session.send(data)
                if progress.sent < leader.part.committed_offset:
                    more = True
        for session in self.sessions:
            session.flush()
        if more and budget[0] > 0:
            self.wake_pump()
        elif more:
            self.loop.call_later(0.005, self.wake_pump)

    def _durable(self, entries: list[tuple[PartitionLog, list[Any]]]) -> None:
        leaders = self.leaders
        for part, runs in entries:
            leader = leaders.get((part.queue, part.index))
            if leader is not None and leader.part is part:
                leader.durable(runs)

    def _acked(self, part: PartitionLog, offsets: Iterable[int]) -> None:
        leader = self.leaders.get((part.queue, part.index))
        if leader is not None:
            leader.acked(offsets)

    # -- the follower's reports -------------------------------------------------------------------------------

    def report_soon(self, follower: Follower) -> None:
        self._reports.setdefault(follower.leader, {})[follower.key] = follower
        if not self._report_scheduled:
            self._report_scheduled = True
            self.loop.call_soon(self._report)

    def _report(self) -> None:
        self._report_scheduled = False
        reports, self._reports = self._reports, {}
        for node, followers in reports.items():
            link = self.links.get(node)
            if link is None:
                continue
            states = [f.state() for f in followers.values() if f.subscribed and not f.candidate
                      and link.partitions.get(f.key) is f]
            if states:
                link.send(states)

    # -- the queue manager's side -----------------------------------------------------------------------------

    def committed(self, part: PartitionLog, offset: int, flush: asyncio.Future[None]) -> asyncio.Future[None]:
        leader = self.leaders.get((part.queue, part.index))
        if leader is None or leader.part is not part:
            raise NotOwner(f"partition {part.queue}/{part.index} is not led here")
        return leader.committed(offset, flush)

    def check(self, queue: str, partition: int, epoch: int) -> None:
        leader = self.leaders.get((queue, partition))
        if leader is None or leader.closing:
            raise NotOwner(f"node {self.node_id} does not lead {queue}/{partition}")
        if leader.epoch != epoch:
            raise StaleEpoch(f"{queue}/{partition} is at epoch {leader.epoch} on {self.node_id}, not {epoch}")

    # -- leaving --------------------------------------------------------------------------------------------

    async def leave(self, timeout: float = HANDOFF_WAIT) -> None:
        """Hand every partition led here to an in-sync follower (Kafka's controlled shutdown): stop dispatching
        and let consumers ack (``_drain``), stop taking writes, wait (``timeout`` at most) until a follower has
        everything, then name it leader at epoch + 1."""
        self.leaving = True
        leaders = list(self.leaders.values())
        if not leaders:
            return
        await self._drain(leaders)
        moved = await asyncio.gather(*(self._move_leadership(leader, None, timeout) for leader in leaders))
        for leader, done in zip(leaders, moved):
            if not done and self.leaders.get(leader.key) is leader:
                log.warning("partition %s/%d: no in-sync follower caught up within %.1f s; its followers take "
                            "over when this node is gone", *leader.key, timeout)

    def _handoff_target(self, leader: Leader, only: str | None = None) -> str | None:
        """An in-sync follower with everything this leader stored, committed (``only``: that one), or None."""
        end = leader.part.next_offset
        if leader.part.committed_offset < end or leader.hw < end:
            return None
        for node in [only] if only is not None else sorted(leader.record.isr):
            progress = leader.followers.get(node)
            if (node != self.node_id and node in leader.record.isr and progress is not None and progress.following
                    and progress.durable >= end):
                return node
        return None
